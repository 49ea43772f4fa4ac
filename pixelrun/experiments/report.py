"""Reports built from run folders alone, so they can be rebuilt offline at any time.

* ``write_ablation_report(out_dir)``: an ablation's variants compared at an equal budget, from the
  folder ``pixelrun ablate`` writes (``ablation.json`` and one run folder per variant and seed):
  ``report.md``, ``summary.csv``, ``summary.json``, ``report.html`` (self-contained) and the PNGs
  under ``report/``. The numbers come from ``summarize_ablation(out_dir)``.
* ``write_run_report(run_dir, out=None)``: one run's curves and sample grids as PNGs and a
  self-contained ``report.html`` in ``run_dir/report`` (``pixelrun report RUN``).

Intervals, verdicts and the noise floor are pixelrun/experiments/stats.py's; docs/reports.md says how to read
them. Every file is written beside its destination and swapped in whole.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import textwrap
from pathlib import Path

import numpy as np

from pixelrun.config import ConfigError
from pixelrun.experiments import stats
from pixelrun.infra.files import write_atomic
from pixelrun.infra.grids import drawable, label_font

FIGURES = "report"  # the ablation's PNGs, under its folder
TRAINING_ONLY = ("step", "lr", "grad_norm", "images_per_s", "train_seconds")


# ----------------------------------------------------------------------------- reading run folders


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``; None when it is missing or unreadable (a run still being written)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; lines that do not parse (a torn last line) are skipped."""
    rows: list[dict] = []
    try:
        text = Path(path).read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    return rows


def read_points(run_dir: Path) -> dict[float, dict]:
    """The run's budget points (points/step_*.json), keyed by their fraction of the budget."""
    out = {}
    for f in sorted((Path(run_dir) / "points").glob("step_*.json")):
        point = read_json(f)
        if point is not None and "fraction" in point:
            point["_dir"] = f.with_suffix("")
            out[_key(point["fraction"])] = point
    return out


def _key(fraction) -> float:
    return round(float(fraction), 6)


def higher_is_better(metric: str) -> bool:
    """The shapes score's measures go up as a model improves; distances, MMDs and losses go down."""
    return metric.removeprefix("eval/").startswith("shapes/")


def _result_at(point: dict, guidance: float | None) -> dict | None:
    for result in point.get("results", []):
        if guidance is None or math.isclose(float(result.get("guidance", math.nan)), guidance):
            return result
    return None


def point_value(point: dict, metric: str, guidance: float | None) -> tuple[float, list[float] | None] | None:
    """A metric of one run at one point: (the number, its per-prompt values or None); None if absent.
    Shapes measures are ``shapes/<measure>``; validation losses (``val...``) have no guidance."""
    if metric.startswith("val"):
        value = point.get("val", {}).get(metric)
        return None if value is None else (float(value), None)
    result = _result_at(point, guidance)
    if result is None:
        return None
    name, _, measure = metric.partition("/")
    value = result.get("metrics", {}).get(name)
    if measure:
        value = value.get(measure) if isinstance(value, dict) else None
    if not isinstance(value, (int, float)):
        return None
    per_prompt = result.get("per_prompt", {}).get(name, {})
    values = per_prompt.get(measure) if measure and isinstance(per_prompt, dict) else None
    return float(value), ([float(v) for v in values] if values else None)


def point_metrics(point: dict) -> list[str]:
    """The metric names a point holds, in a stable order: shapes measures, other metrics, then
    validation losses."""
    names = []
    for result in point.get("results", []):
        for name, value in result.get("metrics", {}).items():
            if isinstance(value, dict):
                names += [f"{name}/{m}" for m in value if m != "n"]
            else:
                names.append(name)
    names += list(point.get("val", {}))
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------- the ablation's numbers


def _load_runs(out_dir: Path, spec: dict) -> list[dict]:
    """Every run the spec lists, with what its folder holds and its status: done, unfinished (no
    run-summary.json yet) or missing (no folder)."""
    runs = []
    for r in spec.get("runs", []):
        rel = r.get("dir", f"runs/{r['variant']}/seed{r['seed']}")
        d = out_dir / rel
        run = {**r, "dir": rel, "path": d, "points": {}, "summary": None, "rows": []}
        if not d.is_dir():
            run["status"] = "missing"
        else:
            run["points"] = read_points(d)
            run["summary"] = read_json(d / "run-summary.json")
            run["rows"] = read_metrics(d / "metrics.jsonl")
            run["status"] = "done" if (run["summary"] or {}).get("status") == "done" else "unfinished"
        runs.append(run)
    return runs


def _cell(
    runs: list[dict], base_runs: list[dict], metric: str, fraction: float, guidance: float | None, is_baseline: bool
) -> dict | None:
    """One variant x metric x point x guidance: the mean over seeds with its interval, the paired
    difference from the baseline with its interval, and the verdict."""

    def values(rs):
        out = {}
        for r in rs:
            point = r["points"].get(fraction)
            v = point_value(point, metric, guidance) if point else None
            if v is not None:
                out[r["seed"]] = v
        return out

    mine = values(runs)
    if not mine:
        return None
    seeds = sorted(mine)
    prompts = [mine[s][1] for s in seeds]
    if all(p is not None for p in prompts) and len({len(p) for p in prompts}) == 1:
        mean = stats.two_level_bootstrap(np.array(prompts))
    else:
        mean = stats.t_interval([mine[s][0] for s in seeds])
    cell = {
        "metric": metric,
        "guidance": guidance,
        "higher_is_better": higher_is_better(metric),
        "seeds": seeds,
        "per_seed": [mine[s][0] for s in seeds],
        "mean": mean.as_dict(),
        "delta": None,
        "verdict": None,
    }
    if is_baseline:
        return cell
    theirs = values(base_runs)
    common = [s for s in seeds if s in theirs]
    if not common:
        cell["verdict"] = stats.NO_INTERVAL
        cell["delta_note"] = "no seed evaluated in both this variant and the baseline"
        return cell
    a, b = [mine[s][1] for s in common], [theirs[s][1] for s in common]
    if all(p is not None for p in a + b) and len({len(p) for p in a + b}) == 1:
        delta = stats.paired_bootstrap(np.array(a), np.array(b))
    else:
        delta = stats.paired_t([mine[s][0] for s in common], [theirs[s][0] for s in common])
    cell["delta"] = delta.as_dict()
    cell["verdict"] = stats.verdict(delta, higher_is_better(metric))
    return cell


def _guidances(runs: list[dict], fraction: float) -> list[float]:
    found = {
        float(res["guidance"])
        for r in runs
        for res in r["points"].get(fraction, {}).get("results", [])
        if "guidance" in res
    }
    return sorted(found)


def _throughput(runs: list[dict]) -> dict:
    """Speed and what was reached, averaged over the variant's runs that have it."""

    def mean_of(values):
        values = [float(v) for v in values if isinstance(v, (int, float))]
        return float(np.mean(values)) if values else None

    summaries = [r["summary"] for r in runs if r["summary"]]
    last = [r["points"][max(r["points"])] for r in runs if r["points"]]
    out = {
        k: mean_of(s.get(k) for s in summaries)
        for k in ("images_per_s", "step_seconds", "peak_memory_bytes", "train_seconds")
    }
    out["flops_per_image"] = mean_of(
        [s.get("flops_per_image") for s in summaries] or [r.get("flops_per_image") for r in runs]
    )
    for k in ("step", "images", "flops"):
        out[f"{k}_reached"] = mean_of(p.get(k) for p in last)
    return out


def _budget_line(spec: dict, runs: list[dict]) -> tuple[str, bool]:
    """The sentence stating the budget, and whether every run trained the same steps at the same batch."""
    b = spec.get("budget", {})
    kind, value = b.get("kind"), b.get("value")
    text = {
        "images": lambda: f"{value:,.0f} training images per run",
        "flops": lambda: f"{value:.3g} training FLOPs per run",
        "minutes": lambda: f"{value:g} minutes of training per run",
        "target": lambda: f"training until {b.get('metric')} reaches {b.get('target')} (at most {value:g})",
    }.get(kind, lambda: f"{kind} {value}")()
    batches = {r.get("global_batch") for r in spec.get("runs", [])}
    steps = {r.get("steps") for r in spec.get("runs", [])}
    equal = len(batches) == 1 and len(steps) == 1 and bool(spec.get("runs"))
    if equal:
        text += f"; equal steps: every run {steps.pop()} steps at global batch {batches.pop()}"
    elif b.get("equal_steps"):
        text += "; equal steps were asked for, but the runs' steps or batches differ"
    return f"Budget: {text}.", equal


def summarize_ablation(out_dir: str | Path) -> dict:
    """Every number of an ablation's report, from its folder (see the module docstring)."""
    return _summarize(Path(out_dir))[0]


def _summarize(out_dir: Path) -> tuple[dict, list[dict]]:
    spec = read_json(out_dir / "ablation.json")
    if spec is None:
        raise ConfigError("OUT", f"{out_dir} has no readable ablation.json: not a `pixelrun ablate` folder")
    runs = _load_runs(out_dir, spec)
    variants = list(spec.get("variants") or dict.fromkeys(r["variant"] for r in runs))
    baseline = spec.get("baseline", variants[0] if variants else None)
    by_variant = {v: [r for r in runs if r["variant"] == v] for v in variants}
    fractions = sorted(_key(f) for f in spec.get("points", [1.0]))
    final = fractions[-1]
    protocol = spec.get("protocol", {})
    primary = protocol.get("primary_guidance")
    primary = float(primary) if primary is not None else None
    metrics = list(dict.fromkeys(m for r in runs for p in r["points"].values() for m in point_metrics(p)))

    def cells(fraction, guidance, names):
        return {
            v: {
                m: c
                for m in names
                if (c := _cell(by_variant[v], by_variant.get(baseline, []), m, fraction, guidance, v == baseline))
            }
            for v in variants
        }

    by_point = {f"{f:g}": cells(f, primary, metrics) for f in fractions}
    guidance_curves, best = {}, {}
    eval_metrics = [m for m in metrics if not m.startswith("val")]
    all_guidance = _guidances(runs, final)
    if len(all_guidance) > 1:
        curves = {g: cells(final, g, eval_metrics) for g in all_guidance}
        for v in variants:
            guidance_curves[v] = {m: [curves[g][v][m] for g in all_guidance if m in curves[g][v]] for m in eval_metrics}
            best[v] = {
                m: _best_guidance(points, higher_is_better(m)) for m, points in guidance_curves[v].items() if points
            }
    floor = {}
    for m, cell in by_point[f"{final:g}"].get(baseline, {}).items():
        floor[m] = stats.noise_floor(cell["per_seed"])
    incomplete = [
        {
            "variant": r["variant"],
            "seed": r["seed"],
            "dir": r["dir"],
            "status": r["status"],
            "reason": _incomplete_reason(r, final),
        }
        for r in runs
        if final not in r["points"]
    ]
    budget_line, equal = _budget_line(spec, runs)
    target = _time_to_target(runs, spec.get("budget", {}), primary)
    return {
        "name": spec.get("name", out_dir.name),
        "baseline": baseline,
        "variants": variants,
        "seeds": spec.get("seeds", []),
        "budget": spec.get("budget", {}),
        "budget_line": budget_line,
        "equal_steps": equal,
        "points": fractions,
        "final_point": final,
        "primary_guidance": primary,
        "protocol": protocol,
        "machine": spec.get("machine", {}),
        "metrics": metrics,
        "final": by_point[f"{final:g}"],
        "by_point": by_point,
        "guidance": guidance_curves,
        "best_guidance": best,
        "noise_floor": floor,
        "throughput": {v: _throughput(by_variant[v]) for v in variants},
        "runs": [_run_row(r, final) for r in runs],
        "incomplete": incomplete,
        "confidence": stats.CONFIDENCE,
        "time_to_target": target,
    }, runs


def _time_to_target(runs: list[dict], budget: dict, guidance: float | None) -> list[dict]:
    """A `target` budget: per run, the first evaluation point at which budget.metric reached
    budget.target (higher or lower, as the metric improves), with its images and training seconds;
    None where it never did. Empty for the other budgets."""
    if budget.get("kind") != "target" or budget.get("metric") is None or budget.get("target") is None:
        return []
    metric, goal = budget["metric"], float(budget["target"])
    higher = higher_is_better(metric)
    out = []
    for r in runs:
        reached = None
        for fraction in sorted(r["points"]):
            value = point_value(r["points"][fraction], metric, guidance)
            if value is not None and (value[0] >= goal if higher else value[0] <= goal):
                point = r["points"][fraction]
                reached = {
                    "step": point.get("step"),
                    "images": point.get("images"),
                    "train_seconds": point.get("train_seconds"),
                    "value": value[0],
                }
                break
        out.append({"variant": r["variant"], "seed": r["seed"], "reached": reached})
    return out


def _best_guidance(curve: list[dict], higher: bool) -> float:
    pick = max if higher else min
    return pick(curve, key=lambda c: c["mean"]["estimate"])["guidance"]


def _incomplete_reason(run: dict, final: float) -> str:
    if run["status"] == "missing":
        return "no run folder"
    reached = ", ".join(f"{f:g}" for f in sorted(run["points"])) or "none"
    return f"no evaluation at the budget (fraction {final:g}); points reached: {reached}"


def _run_row(run: dict, final: float) -> dict:
    last = run["points"][max(run["points"])] if run["points"] else {}
    return {
        "variant": run["variant"],
        "seed": run["seed"],
        "dir": run["dir"],
        "status": run["status"],
        "points": sorted(run["points"]),
        "step": last.get("step"),
        "images": last.get("images"),
        "flops": last.get("flops"),
        "train_seconds": last.get("train_seconds"),
        "global_batch": run.get("global_batch"),
        "command": run.get("command"),
    }


# ----------------------------------------------------------------------------- writing


def _jsonable(value):
    """NaN and infinities as null: a diverged run's loss must not make the JSON unreadable."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
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
        f"At the budget (fraction {summary['final_point']:g}), {p.get('weights', 'ema')} weights, "
        f"guidance {_num(g)} ({p.get('guidance_mode', '?')}), {p.get('prompts', '?')} prompts, "
        f"{p.get('sample_steps', '?')} sampling steps; mean over seeds "
        f"{', '.join(map(str, summary['seeds']))}, {summary['confidence']:.0%} intervals. Δ is the paired "
        f"difference from {summary['baseline']}: a verdict is 'better' or 'worse' when its interval excludes 0."
    )


def ablation_blocks(summary: dict, figures: dict[str, Path]) -> list[tuple]:
    """The report as blocks (heading, paragraph, table, list, image), rendered as Markdown and HTML."""
    eval_m = [m for m in summary["metrics"] if not m.startswith("val")]
    val_m = [m for m in summary["metrics"] if m.startswith("val")]
    final, tp = summary["final"], summary["throughput"]
    header = ["variant"] + eval_m + ["images/s", "step s", "FLOPs/image", "peak memory", "steps", "images"]
    rows = [
        [v]
        + [_cell_text(final[v].get(m)) for m in eval_m]
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
    blocks: list[tuple] = [
        ("h1", f"Ablation: {summary['name']}"),
        ("p", summary["budget_line"]),
        ("p", _protocol_line(summary)),
        ("table", header, rows),
    ]
    if val_m:
        blocks += [
            ("h2", "Validation loss at the budget (lower is better)"),
            (
                "table",
                ["variant"] + val_m,
                [[v] + [_cell_text(final[v].get(m)) for m in val_m] for v in summary["variants"]],
            ),
        ]
    floor = summary["noise_floor"]
    if floor:
        blocks += [
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
    if summary["best_guidance"]:
        blocks += [
            ("h2", "Best guidance per variant"),
            (
                "table",
                ["variant"] + eval_m,
                [[v] + [_num(summary["best_guidance"][v].get(m)) for m in eval_m] for v in summary["variants"]],
            ),
        ]
    if summary["time_to_target"]:
        b = summary["budget"]
        blocks += [
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
    if summary["incomplete"]:
        blocks += [
            ("h2", "Runs missing from the comparison"),
            (
                "ul",
                [
                    f"{r['variant']} seed {r['seed']} ({r['dir']}, {r['status']}): {r['reason']}"
                    for r in summary["incomplete"]
                ],
            ),
        ]
    blocks += [
        ("h2", "Protocol"),
        ("ul", [f"{k}: {_plain(v)}" for k, v in summary["protocol"].items()]),
        ("h2", "Machine"),
        ("ul", [f"{k}: {_plain(v)}" for k, v in summary["machine"].items()]),
    ]
    if figures:
        blocks.append(("h2", "Figures"))
        blocks += [("img", title, path) for title, path in figures.items()]
    return blocks


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


def _csv_rows(summary: dict) -> list[list]:
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


def write_ablation_report(out_dir: str | Path) -> list[Path]:
    """report.md, summary.csv, summary.json, the PNGs (under report/) and a self-contained
    report.html in ``out_dir``, from its run folders alone. Returns the paths written."""
    out_dir = Path(out_dir)
    summary, runs = _summarize(out_dir)
    figures = ablation_figures(summary, runs, out_dir / FIGURES)
    blocks = ablation_blocks(summary, figures)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(_csv_rows(summary))
    written = [
        write_atomic(out_dir / "report.md", render_markdown(blocks, out_dir)),
        write_atomic(out_dir / "summary.csv", buf.getvalue()),
        write_atomic(out_dir / "summary.json", json.dumps(_jsonable(summary), indent=2) + "\n"),
        write_atomic(out_dir / "report.html", render_html(f"Ablation: {summary['name']}", blocks)),
    ]
    return written + list(figures.values())


# ----------------------------------------------------------------------------- figures


def _figure(panels: list[tuple[str, list[tuple]]], xlabel: str, path: Path) -> Path:
    """One PNG of small plots: panels are (title, series); a series is (label, x, mean, low, high),
    drawn as a line with a shaded band from low to high (None: no band)."""
    # the object API: no pyplot state, renders PNGs with Agg
    from matplotlib.figure import Figure

    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    width, height = 4.4 * cols, 3.2 * rows
    fig = Figure(figsize=(width, height), dpi=100)
    # fixed margins in inches: a layout engine would cost more than the drawing itself
    fig.subplots_adjust(
        left=0.7 / width, right=1 - 0.15 / width, bottom=0.55 / height, top=1 - 0.35 / height, wspace=0.3, hspace=0.5
    )
    for i, (title, series) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for label, x, y, low, high in series:
            (line,) = ax.plot(x, y, marker="o" if len(x) <= 12 else None, markersize=3, label=label)
            if low is not None:
                ax.fill_between(x, low, high, alpha=0.2, color=line.get_color(), linewidth=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return write_atomic(path, buf.getvalue())


def _seed_band(per_seed: list[dict]) -> tuple | None:
    """Per-seed curves {key: (x, y)} -> (x, mean, min, max) over the seeds that have each key (x
    averaged too: a point's wall time differs between seeds); no band (None, None) for one seed."""
    keys = sorted({k for curve in per_seed for k in curve})
    if not keys:
        return None
    xs, mean, low, high = [], [], [], []
    for k in keys:
        pts = np.array([curve[k] for curve in per_seed if k in curve], dtype=np.float64)
        xs.append(pts[:, 0].mean())
        mean.append(pts[:, 1].mean())
        low.append(pts[:, 1].min())
        high.append(pts[:, 1].max())
    return (xs, mean, low, high) if len(per_seed) > 1 else (xs, mean, None, None)


def ablation_figures(summary: dict, runs: list[dict], folder: Path) -> dict[str, Path]:
    """The ablation's PNGs, by title: eval metrics against images, FLOPs and wall time; training
    loss terms and validation bins over training; the guidance curve; the sample grid."""
    variants = summary["variants"]
    eval_m = [m for m in summary["metrics"] if not m.startswith("val")]
    figures = {}
    for axis, label, name in (
        ("images", "training images", "images"),
        ("flops", "training FLOPs", "flops"),
        ("train_seconds", "training seconds", "seconds"),
    ):
        panels = _point_panels(runs, variants, eval_m, summary["primary_guidance"], axis)
        if panels:
            figures[f"eval metrics against {label}"] = _figure(panels, label, folder / f"eval_vs_{name}.png")
    batch = {(r["variant"], r["seed"]): r.get("global_batch") or 1 for r in runs}
    for title, pick, fname in (
        ("training loss terms", _is_loss_term, "training_losses.png"),
        ("validation loss by noise level", lambda k: k.startswith("val"), "validation.png"),
    ):
        panels = _row_panels(runs, variants, pick, lambda r, step: step * batch[(r["variant"], r["seed"])])
        if panels:
            figures[f"{title} against training images"] = _figure(panels, "training images", folder / fname)
    panels = _guidance_panels(summary["guidance"], variants, eval_m)
    if panels:
        figures[f"guidance at the budget (mean over seeds, {summary['confidence']:.0%} interval)"] = _figure(
            panels, "guidance", folder / "guidance.png"
        )
    grid = sample_grid(summary, runs, folder / "samples.png")
    if grid is not None:
        figures["the same prompts and noise across variants (first seed, at the budget)"] = grid
    return figures


def _point_panels(
    runs: list[dict], variants: list[str], metrics: list[str], guidance: float | None, axis: str
) -> list[tuple]:
    """Each metric at the budget points against the points' `axis` (images, flops, train_seconds)."""
    panels = []
    for m in metrics:
        series = []
        for v in variants:
            per_seed = []
            for r in (r for r in runs if r["variant"] == v):
                curve = {}
                for f, p in r["points"].items():
                    got = point_value(p, m, guidance)
                    if got is not None and isinstance(p.get(axis), (int, float)):
                        curve[f] = (p[axis], got[0])
                per_seed.append(curve)
            band = _seed_band(per_seed)
            if band:
                series.append((v, *band))
        if series:
            panels.append((m, series))
    return panels


def _guidance_panels(curves: dict, variants: list[str], metrics: list[str]) -> list[tuple]:
    """Each metric against guidance at the budget: the mean over seeds and its interval."""
    panels = []
    for m in metrics:
        series = []
        for v in variants:
            cells = curves.get(v, {}).get(m, [])
            if cells:
                series.append(
                    (v, [c["guidance"] for c in cells], [c["mean"]["estimate"] for c in cells], *_bounds(cells))
                )
        if series:
            panels.append((m, series))
    return panels


def _bounds(cells: list[dict]) -> tuple:
    if any(c["mean"]["low"] is None for c in cells):
        return None, None
    return [c["mean"]["low"] for c in cells], [c["mean"]["high"] for c in cells]


def _is_loss_term(key: str) -> bool:
    return key not in TRAINING_ONLY and not key.startswith(("val", "eval/"))


SMOOTH_ABOVE = 200  # logged values per curve above which a noisy curve is drawn as a moving average


def _row_panels(runs: list[dict], variants: list[str], pick, x_of) -> list[tuple]:
    """Panels of metrics.jsonl keys chosen by `pick`: one line per variant, band over its seeds.
    A long curve (more than SMOOTH_ABOVE values) other than the learning rate is drawn as a trailing
    moving average over 1 % of its length, said in the panel's title: minibatch losses scatter more
    than the trend a reader is after."""
    keys = list(
        dict.fromkeys(k for r in runs for row in r["rows"] for k in row if pick(k) and isinstance(row[k], (int, float)))
    )
    panels = []
    for k in keys:
        bands = {
            v: _seed_band(
                [
                    {
                        row["step"]: (x_of(r, row["step"]), row[k])
                        for row in r["rows"]
                        if isinstance(row.get(k), (int, float))
                    }
                    for r in runs
                    if r["variant"] == v
                ]
            )
            for v in variants
        }
        longest = max((len(b[0]) for b in bands.values() if b), default=0)
        window = longest // 100 if longest > SMOOTH_ABOVE and k != "lr" else 1
        series = []
        for v, band in bands.items():
            if band and len(band[0]) >= window > 1:
                band = (band[0][window - 1 :], *(None if y is None else _moving_average(y, window) for y in band[1:]))
            if band:
                series.append((v, *band))
        panels.append((k if window == 1 else f"{k} (moving average of {window})", series))
    return panels


def _moving_average(values, window: int) -> list[float]:
    """The mean of each `window` consecutive values, placed at the last of them."""
    c = np.cumsum(np.concatenate([[0.0], np.asarray(values, dtype=np.float64)]))
    return list((c[window:] - c[:-window]) / window)


def sample_grid(summary: dict, runs: list[dict], path: Path, tile: int = 128) -> Path | None:
    """Rows = variants, columns = prompts: each variant's first seed at the budget, the same prompts
    and noise in every row. None when no run has images there."""
    from PIL import Image, ImageDraw

    final = summary["final_point"]
    rows: list[tuple[str, list[Path]]] = []
    prompts: list[str] = []
    for v in summary["variants"]:
        mine = sorted((r for r in runs if r["variant"] == v and final in r["points"]), key=lambda r: r["seed"])
        if not mine:
            continue
        point = mine[0]["points"][final]
        files = sorted(Path(point["_dir"]).glob("*.png"))
        if files:
            rows.append((f"{v}\nseed {mine[0]['seed']}", files))
            prompts = prompts or point.get("prompts", [])
    if not rows:
        return None
    cols = max(len(files) for _, files in rows)
    font = label_font(11)
    label_w, pad = 110, 6
    captions = ["\n".join(textwrap.wrap(drawable(p, font), max(8, tile // 6))[:5]) for p in prompts[:cols]]
    head = 14 * max((c.count("\n") + 1 for c in captions), default=0) + pad
    canvas = Image.new("RGB", (label_w + cols * (tile + pad) + pad, head + len(rows) * (tile + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(captions):
        draw.multiline_text((label_w + pad + c * (tile + pad), 3), text, fill="black", font=font, spacing=2)
    for r, (label, files) in enumerate(rows):
        y = head + r * (tile + pad)
        draw.multiline_text((pad, y + 3), drawable(label, font), fill="black", font=font, spacing=2)
        for c, f in enumerate(files):
            with Image.open(f) as src:
                im = src.convert("RGB")
            scale = tile / max(im.size)
            # enlarged pixel for pixel (nothing is invented), reduced with a proper filter
            how = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), how)
            canvas.paste(im, (label_w + pad + c * (tile + pad), y))
    buf = io.BytesIO()
    canvas.save(buf, format="png")
    return write_atomic(path, buf.getvalue())


# ----------------------------------------------------------------------------- one run


def write_run_report(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """One run's curves (loss terms, validation bins, eval metrics, lr, gradient norm, images/s) as
    PNGs and a self-contained report.html with its sample grids over training, in ``out`` (default
    ``run_dir/report``). Returns the paths written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError("RUN", f"{run_dir} is not a folder")
    if not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError("RUN", f"{run_dir} has no metrics.jsonl: not a pixelrun run folder")
    out = Path(out) if out is not None else run_dir / "report"
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} is a file")
    rows = read_metrics(run_dir / "metrics.jsonl")
    groups = (
        ("loss terms", _is_loss_term, "losses.png"),
        ("validation loss by noise level", lambda k: k.startswith("val"), "validation.png"),
        ("evaluation metrics", lambda k: k.startswith("eval/"), "eval.png"),
        ("learning rate, gradient norm, images/s", lambda k: k in ("lr", "grad_norm", "images_per_s"), "optimizer.png"),
    )
    run = {"variant": run_dir.name, "seed": 0, "rows": rows}
    figures = {}
    for title, pick, fname in groups:
        panels = _row_panels([run], [run_dir.name], pick, lambda r, step: step)
        if panels:
            figures[title] = _figure(panels, "step", out / fname)
    blocks: list[tuple] = [("h1", f"Run: {run_dir.resolve().name}")]
    last = max((row["step"] for row in rows), default=None)
    blocks.append(
        ("p", f"{len(rows)} rows in metrics.jsonl, up to step {last}." if rows else "metrics.jsonl holds no rows yet.")
    )
    for name, heading in (("run-summary.json", "Summary"), ("provenance.json", "Provenance")):
        info = read_json(run_dir / name)
        if info:
            blocks += [
                ("h2", heading),
                (
                    "table",
                    ["key", "value"],
                    [[k, json.dumps(v) if isinstance(v, (dict, list)) else str(v)] for k, v in info.items()],
                ),
            ]
    if figures:
        blocks.append(("h2", "Curves"))
        blocks += [("img", title, path) for title, path in figures.items()]
    grids = sorted((run_dir / "samples").glob("step_*.png")) + sorted((run_dir / "samples").glob("final.png"))
    if grids:
        blocks.append(("h2", "Samples over training (EMA weights)"))
        blocks += [("img", "final" if g.stem == "final" else f"step {g.stem[5:].lstrip('0') or 0}", g) for g in grids]
    html = write_atomic(out / "report.html", render_html(f"Run: {run_dir.resolve().name}", blocks))
    return list(figures.values()) + [html]
