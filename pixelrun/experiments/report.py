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
from pixelrun.experiments.figures import ablation_figures, figure, is_loss_term, row_panels
from pixelrun.experiments.folders import StudyRun, result_value
from pixelrun.experiments.render import ablation_blocks, csv_rows, jsonable, render_html, render_markdown
from pixelrun.experiments.summary import summarize
from pixelrun.infra.files import write_atomic
from pixelrun.infra.records import EvalPoint, Provenance, Record, RunSummary, read_metrics

FIGURES = "report"  # the ablation's PNGs, under its folder


def write_ablation_report(out_dir: str | Path) -> list[Path]:
    """report.md, summary.csv, summary.json, the PNGs (under report/) and a self-contained
    report.html in ``out_dir``, from its run folders alone. Returns the paths written."""
    out_dir = Path(out_dir)
    summary, runs = summarize(out_dir)
    figures = ablation_figures(summary, runs, out_dir / FIGURES)
    blocks = ablation_blocks(summary, figures)
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
        ("loss terms", is_loss_term, "losses.png"),
        ("validation loss by noise level", lambda k: k.startswith("val"), "validation.png"),
        ("evaluation metrics", lambda k: k.startswith("eval/"), "eval.png"),
        ("learning rate, gradient norm, images/s", lambda k: k in ("lr", "grad_norm", "images_per_s"), "optimizer.png"),
    )
    run = StudyRun(variant=run_dir.name, seed=0, dir=".", rows=rows)
    figures = {}
    for title, pick, fname in groups:
        panels = row_panels([run], [run_dir.name], pick, lambda r, step: step)
        if panels:
            figures[title] = figure(panels, "step", out / fname)
    blocks: list[tuple] = [("h1", f"Run: {run_dir.resolve().name}")]
    last = max((row["step"] for row in rows), default=None)
    blocks.append(
        ("p", f"{len(rows)} rows in metrics.jsonl, up to step {last}." if rows else "metrics.jsonl holds no rows yet.")
    )
    blocks += _record_table(run_dir / "run-summary.json", RunSummary, "Summary")
    blocks += _record_table(run_dir / "provenance.json", Provenance, "Provenance")
    blocks += _last_evaluation(run_dir)
    if figures:
        blocks.append(("h2", "Curves"))
        blocks += [("img", title, path) for title, path in figures.items()]
    grids = sorted((run_dir / "samples").glob("step_*.png")) + sorted((run_dir / "samples").glob("final.png"))
    if grids:
        blocks.append(("h2", "Samples over training (EMA weights)"))
        blocks += [("img", "final" if g.stem == "final" else f"step {g.stem[5:].lstrip('0') or 0}", g) for g in grids]
    html = write_atomic(out / "report.html", render_html(f"Run: {run_dir.resolve().name}", blocks))
    return list(figures.values()) + [html]


def _record_table(path: Path, kind: type[Record], heading: str) -> list[tuple]:
    """A run's record as a table of its fields; nothing when the run has not written it."""
    if not path.exists():
        return []
    fields = kind.read(path).content()
    return [
        ("h2", heading),
        (
            "table",
            ["key", "value"],
            [[k, json.dumps(v) if isinstance(v, (dict, list)) else str(v)] for k, v in fields.items()],
        ),
    ]


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
        + [f"{x:.4g}" if (x := result_value(r, m)) is not None else "–" for m in metrics]
        for r in point.results
    ]
    return [
        ("h2", f"Evaluation at step {point.step}: EMA x guidance"),
        ("table", ["weights", "guidance", "NFE"] + metrics, rows),
    ]
