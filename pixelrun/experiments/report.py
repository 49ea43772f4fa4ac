"""Reports built from run folders alone, so they can be rebuilt offline at any time.

* ``write_ablation_report(out_dir)``: an ablation's variants compared at an equal budget, from the
  folder ``pixelrun ablate`` writes (``ablation.json`` and one run folder per variant and seed):
  ``report.md``, ``summary.csv``, ``summary.json``, ``report.html`` (self-contained) and the PNGs
  under ``report/``. The numbers come from ``summarize_ablation(out_dir)``.
* ``write_run_report(run_dir, out=None)``: one run's curves and sample grids as PNGs and a
  self-contained ``report.html`` in ``run_dir/report`` (``pixelrun report RUN``).

The rooms: folders.py reads the run folders (typed records), summary.py computes the numbers,
render.py writes Markdown, HTML and CSV, figures.py draws the PNGs. Intervals, verdicts and the
noise floor are pixelrun/experiments/stats.py's; docs/reports.md says how to read them. Every file is
written beside its destination and swapped in whole.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from pixelrun.config import ConfigError
from pixelrun.experiments.figures import LeftOut, ablation_figures, figure, is_loss_term, row_panels
from pixelrun.experiments.folders import StudyRun, result_value
from pixelrun.experiments.render import (
    LOADED,
    ablation_blocks,
    csv_rows,
    jsonable,
    left_out_blocks,
    loaded,
    render_html,
    render_markdown,
)
from pixelrun.experiments.summary import summarize
from pixelrun.infra import units
from pixelrun.infra.files import write_atomic
from pixelrun.infra.records import EvalPoint, Provenance, RunSummary, read_metrics

FIGURES = "report"  # the ablation's PNGs, under its folder


def write_ablation_report(out_dir: str | Path) -> list[Path]:
    """report.md, summary.csv, summary.json, the PNGs (under report/) and a self-contained
    report.html in ``out_dir``, from its run folders alone. Returns the paths written."""
    out_dir = Path(out_dir)
    summary, runs = summarize(out_dir)
    left = LeftOut()
    figures = ablation_figures(summary, runs, out_dir / FIGURES, left)
    blocks = ablation_blocks(summary, figures, left)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(csv_rows(summary))
    written = [
        write_atomic(out_dir / "report.md", render_markdown(blocks, out_dir)),
        write_atomic(out_dir / "summary.csv", buf.getvalue()),
        write_atomic(out_dir / "summary.json", json.dumps(jsonable(summary), indent=2) + "\n"),
        write_atomic(out_dir / "report.html", render_html(f"Ablation: {summary['name']}", blocks)),
    ]
    return written + list(figures.values())


def write_run_report(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """One run's curves (loss terms, validation bins, eval metrics, lr, gradient norm, images/s) as
    PNGs and a self-contained report.html with its sample grids over training, in ``out`` (default
    ``run_dir/report``). A series the same at every point is named, not drawn; a series of one point
    is written as a value. Returns the paths written."""
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
        ("loss terms", is_loss_term, "losses.png"),
        ("validation loss by noise level", lambda k: k.startswith("val"), "validation.png"),
        ("evaluation metrics", lambda k: k.startswith("eval/"), "eval.png"),
        (
            "learning rate, gradient norm, images/s",
            lambda k: k in ("lr", "grad_norm", "images_per_s", "skipped_steps"),
            "optimizer.png",
        ),
    )
    run = StudyRun(variant=run_dir.name, seed=0, dir=".", rows=rows)
    figures, left = {}, LeftOut()
    for title, pick, fname in groups:
        panels = left.keep(row_panels([run], [run_dir.name], pick, lambda r, step: step))
        if panels:
            figures[title] = figure(panels, "step", out / fname)
    blocks: list[tuple] = [("h1", f"Run: {run_dir.resolve().name}")]
    last = max((row["step"] for row in rows), default=None)
    blocks.append(
        (
            "p",
            f"{units.count(len(rows))} rows in metrics.jsonl, up to step {units.count(last)}."
            if rows
            else "metrics.jsonl holds no rows yet.",
        )
    )
    blocks += _summary_table(run_dir / "run-summary.json")
    blocks += _provenance_tables(run_dir / "provenance.json")
    blocks += _last_evaluation(run_dir)
    if figures or left.constant or left.single:
        blocks.append(("h2", "Curves"))
        blocks += left_out_blocks(left, "step", "run")
        blocks += [("img", title, path) for title, path in figures.items()]
    grids = sorted((run_dir / "samples").glob("step_*.png")) + sorted((run_dir / "samples").glob("final.png"))
    if grids:
        blocks.append(("h2", "Samples over training (EMA weights)"))
        blocks += [("img", "final" if g.stem == "final" else f"step {g.stem[5:].lstrip('0') or 0}", g) for g in grids]
    denoise = run_dir / "samples" / "denoise.png"
    if denoise.is_file():
        blocks.append(("h2", "What the model predicts from held-out images at each noise level (EMA weights)"))
        blocks.append(("img", "denoise", denoise))
    html = write_atomic(out / "report.html", render_html(f"Run: {run_dir.resolve().name}", blocks))
    return list(figures.values()) + [html]


# run-summary.json's fields, each written as what it measures
_BY_KIND = {
    "steps": units.count,
    "images": units.count,
    "world_size": units.count,
    "cpus": units.count,
    "flops": units.flop,
    "flops_per_image": units.flop,
    "train_seconds": units.duration,
    "step_seconds": units.duration,
    "peak_memory_bytes": units.size,
}


_LABELS = {
    "flops": "training FLOPs",
    "flops_per_image": "FLOPs per image",
    "train_seconds": "training time",
    "images_per_s": "images/s (median of the logged)",
    "step_seconds": "step time",
    "peak_memory_bytes": "peak memory",
    "load_1min": "1-minute load average at the end",
    "world_size": "ranks",
}


def _summary_table(path: Path) -> list[tuple]:
    """run-summary.json as a table, each number by its kind; images/s marked when measured on a
    machine whose load exceeded its CPUs. Nothing when the run has not finished."""
    if not path.exists():
        return []
    fields = RunSummary.read(path).content()
    rows = []
    for k, v in fields.items():
        if v is None:  # the machine's load, in a summary written before it was recorded
            continue
        text = _BY_KIND[k](v) if k in _BY_KIND else units.number(v) if isinstance(v, (int, float)) else str(v)
        if k == "images_per_s" and loaded(fields):
            text += (
                f" {LOADED}: the 1-minute load average was {units.number(fields['load_1min'])} on {fields['cpus']} CPUs"
            )
        rows.append([_LABELS.get(k, k.replace("_", " ")), text])
    return [("h2", "Summary"), ("table", ["key", "value"], rows)]


def _provenance_tables(path: Path) -> list[tuple]:
    """provenance.json: its fields as a table, the packages as a table of their own."""
    if not path.exists():
        return []
    fields = Provenance.read(path).content()
    packages = fields.pop("packages") or {}
    out: list[tuple] = [("h2", "Provenance"), ("table", ["key", "value"], [[k, str(v)] for k, v in fields.items()])]
    if packages:
        out.append(("table", ["package", "version"], [[k, str(v)] for k, v in packages.items()]))
    return out


def _last_evaluation(run_dir: Path) -> list[tuple]:
    """The newest evaluation point's results, one row per EMA (ema.decays) and guidance, each with
    its model evaluations per image (NFE) beside the scores; nothing before the first evaluation."""
    files = sorted((run_dir / "points").glob("step_*.json"))
    if not files:
        return []
    point = EvalPoint.read(files[-1])
    metrics = list(
        dict.fromkeys(
            f"{name}/{m}" if isinstance(value, dict) else name
            for r in point.results
            for name, value in r.metrics.items()
            for m in (value if isinstance(value, dict) else [name])
            if m != "n"
        )
    )
    rows = [
        [point.weights if r.ema_decay is None else f"EMA {r.ema_decay:g}", f"{r.guidance:g}", str(r.nfe or "–")]
        + [units.number(result_value(r, m)) for m in metrics]
        for r in point.results
    ]
    return [
        ("h2", f"Evaluation at step {units.count(point.step)}: EMA x guidance"),
        ("table", ["weights", "guidance", "NFE"] + metrics, rows),
    ]
