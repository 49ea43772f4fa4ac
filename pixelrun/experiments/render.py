"""An ablation's report as text: its blocks (headings, paragraphs, tables, lists, figures) from the
summary of pixelrun/experiments/summary.py, rendered as Markdown and as one self-contained HTML page
(also the single-run report's), and its rows for summary.csv."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any


def jsonable(value: Any) -> Any:
    """NaN and infinities as null: a diverged run's loss must not make the JSON unreadable."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _num(x, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}g}"


def _interval(est: dict | None, signed: bool = False) -> str:
    if not est:
        return "–"
    fmt = (lambda x: f"{x:+.3g}") if signed else (lambda x: f"{x:.4g}")
    text = fmt(est["estimate"])
    return text + (f" [{fmt(est['low'])}, {fmt(est['high'])}]" if est["low"] is not None else " (no interval)")


def _cell_text(cell: dict | None) -> str:
    if cell is None:
        return "–"
    text = _interval(cell["mean"])
    if cell["delta"] is not None:
        text += f"; Δ {_interval(cell['delta'], signed=True)} {cell['verdict']}"
    elif cell.get("verdict"):
        text += f"; Δ – {cell['verdict']}"
    return text


def _plain(value) -> str:
    """A setting for people: lists comma-separated, nested settings as JSON."""
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return json.dumps(value) if isinstance(value, dict) else str(value)


def _gib(x) -> str:
    return "–" if x is None else f"{x / 2**30:.2f} GiB"


def _protocol_line(summary: dict) -> str:
    p = summary["protocol"]
    g = summary["primary_guidance"]
    return (
        f"At the budget (fraction {summary['final_point']:g}), {p['weights']} weights, "
        f"guidance {_num(g)} ({p['guidance_mode']}), {p['prompts']} prompts, "
        f"{p['sample_steps']} sampling steps; mean over seeds "
        f"{', '.join(map(str, summary['seeds']))}, {summary['confidence']:.0%} intervals. Δ is the paired "
        f"difference from {summary['baseline']}: a verdict is 'better' or 'worse' when its interval excludes 0."
    )


def ablation_blocks(summary: dict, figures: dict[str, Path]) -> list[tuple]:
    """The report as blocks (heading, paragraph, table, list, image), rendered as Markdown and HTML."""
    blocks: list[tuple] = [
        ("h1", f"Ablation: {summary['name']}"),
        ("p", summary["budget_line"]),
        ("p", _protocol_line(summary)),
        _main_table(summary),
        *_validation_blocks(summary),
        *_noise_floor_blocks(summary),
        *_best_guidance_blocks(summary),
        *_ema_guidance_blocks(summary),
        *_time_to_target_blocks(summary),
        *_incomplete_blocks(summary),
        ("h2", "Protocol"),
        ("ul", [f"{k}: {_plain(v)}" for k, v in summary["protocol"].items()]),
        ("h2", "Machine"),
        ("ul", [f"{k}: {_plain(v)}" for k, v in summary["machine"].items()]),
    ]
    if figures:
        blocks.append(("h2", "Figures"))
        blocks += [("img", title, path) for title, path in figures.items()]
    return blocks


def _eval_metrics(summary: dict) -> list[str]:
    return [m for m in summary["metrics"] if not m.startswith("val")]


def _main_table(summary: dict) -> tuple:
    """Each variant at the budget: its evaluation metrics, speed, cost and what it reached."""
    eval_m = _eval_metrics(summary)
    final, tp = summary["final"], summary["throughput"]
    nfe = summary.get("nfe")  # model evaluations per image beside the scores (absent: points from before)
    header = ["variant"] + eval_m + (["NFE"] if nfe else [])
    header += ["images/s", "step s", "FLOPs/image", "peak memory", "steps", "images"]
    rows = [
        [v]
        + [_cell_text(final[v].get(m)) for m in eval_m]
        + ([_num(nfe.get(v))] if nfe else [])
        + [
            _num(tp[v]["images_per_s"]),
            _num(tp[v]["step_seconds"], 3),
            _num(tp[v]["flops_per_image"], 3),
            _gib(tp[v]["peak_memory_bytes"]),
            _num(tp[v]["step_reached"]),
            _num(tp[v]["images_reached"]),
        ]
        for v in summary["variants"]
    ]
    return ("table", header, rows)


def _validation_blocks(summary: dict) -> list[tuple]:
    val_m = [m for m in summary["metrics"] if m.startswith("val")]
    if not val_m:
        return []
    final = summary["final"]
    return [
        ("h2", "Validation loss at the budget (lower is better)"),
        (
            "table",
            ["variant"] + val_m,
            [[v] + [_cell_text(final[v].get(m)) for m in val_m] for v in summary["variants"]],
        ),
    ]


def _noise_floor_blocks(summary: dict) -> list[tuple]:
    floor = summary["noise_floor"]
    if not floor:
        return []
    return [
        ("h2", f"Noise floor: {summary['baseline']} from seed to seed"),
        (
            "p",
            (
                "The spread of the baseline's per-seed means at the budget: differences of this size "
                "are what changing the seed alone does."
            ),
        ),
        (
            "table",
            ["metric", "mean", "std", "range", "seeds"],
            [[m, _num(f["mean"]), _num(f["std"], 3), _num(f["range"], 3), str(f["n"])] for m, f in floor.items()],
        ),
    ]


def _best_guidance_blocks(summary: dict) -> list[tuple]:
    if not summary["best_guidance"]:
        return []
    eval_m = _eval_metrics(summary)
    return [
        ("h2", "Best guidance per variant"),
        (
            "table",
            ["variant"] + eval_m,
            [[v] + [_num(summary["best_guidance"][v].get(m)) for m in eval_m] for v in summary["variants"]],
        ),
    ]


def _ema_guidance_blocks(summary: dict) -> list[tuple]:
    """The EMA x guidance sweep at the budget, where a variant evaluated more than one pair."""
    sweep = summary.get("ema_guidance", {})
    if not any(len(rows) > 1 for rows in sweep.values()):
        return []
    eval_m = _eval_metrics(summary)
    return [
        ("h2", "EMA x guidance at the budget (mean over seeds)"),
        ("p", "NFE: model evaluations per generated image (sampler, guidance and guidance interval)."),
        (
            "table",
            ["variant", "EMA decay", "guidance", "NFE"] + eval_m,
            [
                [v, _num(c["ema_decay"]), _num(c["guidance"]), _num(c["nfe"])]
                + [_num(c["means"].get(m)) for m in eval_m]
                for v, rows in sweep.items()
                for c in rows
            ],
        ),
    ]


def _time_to_target_blocks(summary: dict) -> list[tuple]:
    if not summary["time_to_target"]:
        return []
    b = summary["budget"]
    return [
        ("h2", f"Time to reach {b['metric']} {b['target']}"),
        (
            "table",
            ["variant", "seed", "step", "images", "training seconds"],
            [
                [t["variant"], str(t["seed"])]
                + (
                    [str(t["reached"]["step"]), str(t["reached"]["images"]), _num(t["reached"]["train_seconds"])]
                    if t["reached"]
                    else ["not reached", "", ""]
                )
                for t in summary["time_to_target"]
            ],
        ),
    ]


def _incomplete_blocks(summary: dict) -> list[tuple]:
    if not summary["incomplete"]:
        return []
    return [
        ("h2", "Runs missing from the comparison"),
        (
            "ul",
            [
                f"{r['variant']} seed {r['seed']} ({r['dir']}, {r['status']}): {r['reason']}"
                for r in summary["incomplete"]
            ],
        ),
    ]


def render_markdown(blocks: list[tuple], base: Path) -> str:
    def esc(text):
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            lines += [("# " if kind == "h1" else "## ") + rest[0], ""]
        elif kind == "p":
            lines += [rest[0], ""]
        elif kind == "table":
            header, rows = rest
            lines += ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(esc, row)) + " |" for row in rows] + [""]
        elif kind == "ul":
            lines += [f"- {item}" for item in rest[0]] + [""]
        elif kind == "img":
            lines += [f"![{rest[0]}]({rest[1].relative_to(base).as_posix()})", ""]
    return "\n".join(lines)


_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font-family: sans-serif; margin: 2em; max-width: 1400px; }
table { border-collapse: collapse; margin: 1em 0; font-size: 90%; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; }
figure { margin: 1.5em 0; }
</style></head><body>
{% for b in blocks %}
{% if b.kind == "h1" %}<h1>{{ b.text }}</h1>
{% elif b.kind == "h2" %}<h2>{{ b.text }}</h2>
{% elif b.kind == "p" %}<p>{{ b.text }}</p>
{% elif b.kind == "ul" %}<ul>{% for i in b.entries %}<li>{{ i }}</li>{% endfor %}</ul>
{% elif b.kind == "pre" %}<pre>{{ b.text }}</pre>
{% elif b.kind == "table" %}<table><tr>{% for h in b.header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in b.rows %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>
{% elif b.kind == "img" %}<figure><img alt="{{ b.text }}" src="{{ b.uri }}"><figcaption>{{ b.text }}</figcaption></figure>
{% endif %}
{% endfor %}
</body></html>
"""


def render_html(title: str, blocks: list[tuple]) -> str:
    """One self-contained page: every image is embedded as a data URI, so it opens without a server
    and survives being mailed or copied alone."""
    import jinja2

    items = []
    for kind, *rest in blocks:
        if kind == "table":
            items.append({"kind": kind, "header": rest[0], "rows": rest[1]})
        elif kind == "ul":
            items.append({"kind": kind, "entries": rest[0]})
        elif kind == "img":
            data = base64.b64encode(Path(rest[1]).read_bytes()).decode()
            items.append({"kind": kind, "text": rest[0], "uri": f"data:image/png;base64,{data}"})
        else:
            items.append({"kind": kind, "text": rest[0]})
    env = jinja2.Environment(autoescape=True)
    return env.from_string(_HTML).render(title=title, blocks=items)


def csv_rows(summary: dict) -> list[list]:
    """summary.csv: one row per point, variant, metric and guidance, then each variant's throughput."""
    rows = [
        [
            "point",
            "variant",
            "metric",
            "guidance",
            "higher_is_better",
            "seeds",
            "mean",
            "low",
            "high",
            "method",
            "delta",
            "delta_low",
            "delta_high",
            "delta_seeds",
            "delta_method",
            "verdict",
        ]
    ]

    def add(point, cell, variant):
        m, d = cell["mean"], cell["delta"] or {}
        rows.append(
            [
                point,
                variant,
                cell["metric"],
                cell["guidance"],
                cell["higher_is_better"],
                len(cell["seeds"]),
                m["estimate"],
                m["low"],
                m["high"],
                m["method"],
                d.get("estimate"),
                d.get("low"),
                d.get("high"),
                d.get("n"),
                d.get("method"),
                cell["verdict"],
            ]
        )

    for point, by_variant in summary["by_point"].items():
        for v, cells in by_variant.items():
            for cell in cells.values():
                add(point, cell, v)
    final = f"{summary['final_point']:g}"
    for v, by_metric in summary["guidance"].items():
        for curve in by_metric.values():
            for cell in curve:
                if cell["guidance"] != summary["primary_guidance"]:
                    add(final, cell, v)
    for v, tp in summary["throughput"].items():
        rows += [[final, v, k, None, None, None, value] + [None] * 9 for k, value in tp.items()]
    return [["" if x is None else x for x in row] for row in rows]
