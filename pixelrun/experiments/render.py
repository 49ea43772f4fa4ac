"""An ablation's report as text: its blocks (headings, paragraphs, tables, lists, figures) from the
summary of pixelrun/experiments/summary.py, rendered as Markdown and as one self-contained HTML page
(also the single-run report's), and its rows for summary.csv."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

from pixelrun.experiments.stats import NO_INTERVAL
from pixelrun.infra import units


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


def _num(x) -> str:
    return units.number(x)


# the marks a cell carries, each explained once in the report's warnings
CONSTANT, SHORT_EMA, LOADED = "⚠ same in every run", "⚠ EMA too short", "⚠ loaded machine"


def _cell_text(cell: dict | None, marks: tuple[str, ...] = ()) -> str:
    """'mean [low, high]; Δ delta [low, high] verdict', '(no interval)' once where either has none."""
    if cell is None:
        return "–"
    mean, delta = cell["mean"], cell["delta"]
    text = units.interval(mean["estimate"], mean["low"], mean["high"])
    missing = mean["low"] is None
    if delta is not None:
        text += "; Δ " + units.interval(delta["estimate"], delta["low"], delta["high"], sign=True)
        missing = missing or delta["low"] is None
    elif cell.get("verdict"):
        text += "; Δ –"
        missing = True
    if cell.get("verdict") and cell["verdict"] != NO_INTERVAL:
        text += f" {cell['verdict']}"
    if missing:
        text += " (no interval)"
    return " ".join([text, *marks])


def _plain(value) -> str:
    """A setting for people: lists comma-separated, nested settings as JSON."""
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return json.dumps(value) if isinstance(value, dict) else str(value)


def _protocol_line(summary: dict) -> str:
    p = summary["protocol"]
    g = summary["primary_guidance"]
    return (
        f"At the budget (fraction {summary['final_point']:g}), {p['weights']} weights, "
        f"guidance {_num(g)} ({p['guidance_mode']}), {p['prompts']} prompts, "
        f"{p['sample_steps']} sampling steps{_other_samplers(summary, p['sample_steps'])}; mean over seeds "
        f"{', '.join(map(str, summary['seeds']))}, {summary['confidence']:.0%} intervals. Δ is the paired "
        f"difference from {summary['baseline']}: a verdict is 'better' or 'worse' when its interval excludes 0."
    )


def _other_samplers(summary: dict, steps: int) -> str:
    """ " (Euler; heun: Heun in 13 steps, ...)" for variants sampled otherwise: at the steps that make
    the model evaluations of Euler's `steps` (the NFE column)."""
    others = summary.get("samplers") or {}
    if not others:
        return ""
    each = "; ".join(f"{v}: {sampler.capitalize()} in {n} steps" for v, (sampler, n) in others.items())
    return f" (Euler; {each}, the same model evaluations per image as Euler's {steps})"


def ablation_blocks(summary: dict, figures: dict[str, Path], left=None) -> list[tuple]:
    """The report as blocks (heading, paragraph, table, list, image), rendered as Markdown and HTML.
    `left`: what the figures left out (pixelrun/experiments/figures.py LeftOut)."""
    blocks: list[tuple] = [
        ("h1", f"Ablation: {summary['name']}"),
        ("p", summary["budget_line"]),
        ("p", _protocol_line(summary)),
        *_warning_blocks(summary),
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
        ("h2", "How to read the numbers"),
        ("ul", READING),
    ]
    if figures or left is not None:
        blocks.append(("h2", "Figures"))
        if not same_loss_terms(summary):
            blocks.append(("p", _loss_terms_line(summary)))
        blocks += left_out_blocks(left, None) if left is not None else []
        blocks += [("img", title, path) for title, path in figures.items()]
    return blocks


READING = [
    "An interval is written 'estimate [low, high]', not 'estimate ± half-width': the bootstrap's "
    "percentile intervals are not symmetric about the estimate, nor is an interval clipped at 0.",
    "The interval of a quantity that cannot be negative (a loss, a distance, a fraction of prompts) is "
    "clipped at 0: a t interval over few seeds is symmetric about the mean and runs below 0 near 0. "
    "A difference (Δ) is not clipped.",
    "'(no interval)': one seed on a side (a t interval needs two), written once per cell.",
    "Numbers carry at most 4 significant digits; an interval's three numbers share their decimals.",
]


def marks(summary: dict, variant: str, metric: str) -> tuple[str, ...]:
    """The warnings a cell carries: a metric the same in every run, an EMA too short for its weights."""
    out = []
    if metric in summary.get("constant", {}):
        out.append(CONSTANT)
    ema_weights = metric.startswith("val_ema/") or (
        not metric.startswith("val") and summary["protocol"].get("weights") == "ema"
    )
    if ema_weights and variant in summary.get("short_ema", {}):
        out.append(SHORT_EMA)
    return tuple(out)


def loaded(tp: dict) -> bool:
    """Images/s measured while the machine's 1-minute load average exceeded its CPUs."""
    return tp.get("load_1min") is not None and bool(tp.get("cpus")) and tp["load_1min"] > tp["cpus"]


def _warning_blocks(summary: dict) -> list[tuple]:
    lines = warning_lines(summary)
    return [("h2", "Warnings"), ("ul", lines)] if lines else []


def warning_lines(summary: dict) -> list[str]:
    """One line per mark the tables carry, saying what it means for the comparison (also printed by
    `pixelrun ablate` after the report)."""
    lines = [
        f"{CONSTANT}: {m} is {_num(value)} in every run at the budget: it cannot tell the variants apart "
        f"(too few steps, or a metric that does not apply to what the runs learned)."
        for m, value in summary.get("constant", {}).items()
    ]
    # scores of the raw weights: only the val_ema/ cells come from the EMA
    cells = "their cells" if summary["protocol"].get("weights") == "ema" else "their cells (val_ema/ only)"
    lines += [
        f"{SHORT_EMA}: {v}: {units.count(e['steps'])} steps are under 3 half-lives of its EMA "
        f"({units.count(e['half_life'])} steps at decay {e['decay']:g}): the EMA weights evaluated still hold "
        f"{e['held']:.0%} of the initial ones, so {cells} compare initialisations more than training."
        for v, e in summary.get("short_ema", {}).items()
    ]
    lines += [
        f"{LOADED}: {v}: images/s measured with a 1-minute load average of {_num(tp['load_1min'])} on "
        f"{units.count(tp['cpus'])} CPUs: the machine was shared, the speed is not this variant's alone."
        for v, tp in summary["throughput"].items()
        if loaded(tp)
    ]
    return lines


def same_loss_terms(summary: dict) -> bool:
    """Whether every variant's total loss sums the same terms."""
    return len({tuple(t) for t in summary.get("loss_terms", {}).values()}) <= 1


def _loss_terms_line(summary: dict) -> str:
    terms = "; ".join(f"{v}: {', '.join(t) or 'none logged'}" for v, t in summary["loss_terms"].items())
    return (
        f"The total loss is not compared: the variants sum different terms ({terms}), and a term such as "
        f"REPA's negative cosine lowers the total without a better model. Compare the flow loss, drawn "
        f"with every term below."
    )


def left_out_blocks(left, at: str | None, of: str = "variant") -> list[tuple]:
    """What the plots leave out: one line naming the series the same at every point, and the series
    of one point as values (`at`: the x axis's name, to show where each was taken; None: not shown)."""
    out: list[tuple] = []
    if left.constant:
        named = ", ".join(f"{k} ({_num(v)})" for k, v in left.constant.items())
        out.append(("p", f"Not drawn, the same at every point: {named}."))
    if left.single:
        header = ["series", of, *([at] if at else []), "value"]
        rows = [
            [title, label, *([_num(x)] if at else []), _num(y)]
            for title, points in left.single.items()
            for label, x, y in points
        ]
        out += [("p", "One point each, so written here rather than drawn:"), ("table", header, rows)]
    return out


def _eval_metrics(summary: dict) -> list[str]:
    return [m for m in summary["metrics"] if not m.startswith("val")]


def _main_table(summary: dict) -> tuple:
    """Each variant at the budget: its evaluation metrics, speed, cost and what it reached."""
    eval_m = _eval_metrics(summary)
    final, tp = summary["final"], summary["throughput"]
    nfe = summary.get("nfe")  # model evaluations per image beside the scores (absent: points from before)
    header = ["variant"] + eval_m + (["NFE"] if nfe else [])
    header += ["images/s", "step time", "FLOPs/image", "peak memory", "steps", "images"]
    rows = [
        [v]
        + [_cell_text(final[v].get(m), marks(summary, v, m)) for m in eval_m]
        + ([_num(nfe.get(v))] if nfe else [])
        + [
            " ".join([_num(tp[v]["images_per_s"]), *([LOADED] if loaded(tp[v]) else [])]),
            units.duration(tp[v]["step_seconds"]),
            units.flop(tp[v]["flops_per_image"]),
            units.size(tp[v]["peak_memory_bytes"]),
            units.count(tp[v]["step_reached"]),
            units.count(tp[v]["images_reached"]),
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
            [[v] + [_cell_text(final[v].get(m), marks(summary, v, m)) for m in val_m] for v in summary["variants"]],
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
            [[m, _num(f["mean"]), _num(f["std"]), _num(f["range"]), str(f["n"])] for m, f in floor.items()],
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
                [v, _num(c["ema_decay"]), _num(c["guidance"]), units.count(c["nfe"])]
                + [_num(c["means"].get(m)) for m in eval_m]
                for v, rows in sweep.items()
                for c in rows
            ],
        ),
    ]


def _time_to_target_blocks(summary: dict) -> list[tuple]:
    speedups = _speedup_blocks(summary)
    if not summary["time_to_target"]:
        return speedups
    b = summary["budget"]
    target = b["target"]
    if target == "baseline":
        resolved = next((r["target"] for r in summary.get("speedup", {}).values() if r["target"] is not None), None)
        target = f"{_num(resolved)} (the baseline's final score)"
    return speedups + [
        ("h2", f"Time to reach {b['metric']} {target}"),
        (
            "table",
            ["variant", "seed", "step", "images", "training time"],
            [
                [t["variant"], str(t["seed"])]
                + (
                    [
                        units.count(t["reached"]["step"]),
                        units.count(t["reached"]["images"]),
                        units.duration(t["reached"]["train_seconds"]),
                    ]
                    if t["reached"]
                    else ["not reached", "", ""]
                )
                for t in summary["time_to_target"]
            ],
        ),
    ]


def _speedup_blocks(summary: dict) -> list[tuple]:
    """A `target` budget's speed-ups (pixelrun/experiments/speedup.py): a sentence per variant and
    how to read them."""
    found = summary.get("speedup") or {}
    if not found:
        return []
    lines = [speedup_sentence(v, r, summary["baseline"]) for v, r in found.items()]
    some = next((r for r in found.values() if "flops" in r), None)
    if some is not None:
        over = (
            f"{summary['confidence']:.0%} intervals from {some['resamples']:,} resamples of "
            f"{some['interval_over']}, the target recomputed in each"
            if some["resamples"]
            else f"no interval: the draws cover {some['interval_over']}"
        )
        lines.append(
            f"Speed-up: the baseline's training FLOPs (or seconds) to the target over the variant's; below 1x "
            f"the variant needs more. Each crossing is interpolated linearly between the evaluation points of "
            f"the mean curve over seeds; {over}. A bound is left open where more than "
            f"{(1 - summary['confidence']) / 2:.1%} of the resamples never reach the target on that side."
        )
    return [("h2", "Time to target: speed-up over the baseline"), ("ul", lines)]


def speedup_sentence(variant: str, r: dict, baseline: str) -> str:
    """'recipe reaches the baseline's final shapes/placed (0.672) at a speed-up of 3.1x [2.2x, 4.5x] in
    training FLOPs and 2.7x [1.9x, 3.8x] in training time' (0.8x: it needs 1.25 times the baseline's),
    or what can be said instead."""
    if "flops" not in r:
        return f"{variant}: {r.get('note', 'no speed-up')}"
    what = (
        f"the baseline's final {r['metric']} ({_num(r['target'])})"
        if r["target_from"] == "baseline"
        else f"{r['metric']} {_num(r['target'])}"
    )
    flops, seconds = r["flops"], r["seconds"]
    if flops["estimate"] is not None:
        return (
            f"{variant} reaches {what} at a speed-up of {_ratio_text(flops, variant, baseline)} in training "
            f"FLOPs and {_ratio_text(seconds, variant, baseline)} in training time"
        )
    if flops["at_most"] is not None:
        return (
            f"{variant} does not reach {what} within its budget: its speed-up is below {_x(flops['at_most'])} "
            f"in training FLOPs and below {_x(seconds['at_most'])} in training time (cannot be bounded below)"
        )
    if flops["at_least"] is not None:
        return (
            f"{variant} reaches {what}, which {baseline} does not within its budget: its speed-up is above "
            f"{_x(flops['at_least'])} in training FLOPs and above {_x(seconds['at_least'])} in training time "
            f"(cannot be bounded above)"
        )
    return f"neither {variant} nor {baseline} reaches {what} within its budget: no speed-up"


def _x(ratio: float | None) -> str:
    return "–" if ratio is None else f"{units.number(ratio, 2)}x"


def _ratio_text(r: dict, variant: str, baseline: str) -> str:
    """'3.1x [2.2x, 4.5x]'; where a bound is open, the one given and why the other is not."""
    text = _x(r["estimate"])
    low, high, missed = r["low"], r["high"], r["unreached"]
    if low is not None and high is not None:
        return f"{text} [{_x(low)}, {_x(high)}]"
    if low is None and high is None and not (missed["variant"] or missed["baseline"]):
        return f"{text} (no interval)"
    why = []
    if low is None:
        why.append(f"{variant} missed the target in {missed['variant']:.0%} of resamples")
    if high is None:
        why.append(f"{baseline} missed it in {missed['baseline']:.0%} of resamples")
    if low is None and high is None:
        return f"{text} (cannot be bounded: {'; '.join(why)})"
    bound = f"at most {_x(high)}" if low is None else f"at least {_x(low)}"
    return f"{text} ({bound}; the other bound cannot be given: {why[0]})"


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
