"""The figures of the reports, as PNGs: metrics at the budget points against images, FLOPs and
training time; metrics.jsonl curves (loss terms, validation bins) with a band over seeds; the
guidance curve; and the grid of the same prompts and noise across variants."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pixelrun.experiments.folders import StudyRun, point_value
from pixelrun.experiments.render import same_loss_terms
from pixelrun.infra.files import write_atomic
from pixelrun.infra.grids import drawable, label_font, wrap_to_width
from pixelrun.infra.records import EvalPoint

TRAINING_ONLY = ("step", "lr", "grad_norm", "images_per_s", "train_seconds", "skipped_steps")
# one look per series, so that identical curves (two variants that coincide) do not hide each other:
# the later is drawn dashed or dotted over the earlier, with its own marker
STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")


@dataclass
class LeftOut:
    """What the plots leave out, said in the report instead: series the same at every point (name
    -> the value) and series of one point each (name -> [(series label, x, y)]), shown as values."""

    constant: dict[str, float] = field(default_factory=dict)
    single: dict[str, list[tuple[str, float, float]]] = field(default_factory=dict)

    def keep(self, panels: list[tuple[str, list[tuple]]]) -> list[tuple[str, list[tuple]]]:
        """The panels worth a plot; the others recorded here."""
        kept = []
        for title, series in panels:
            name = title.split(" (moving average", 1)[0]  # a constant or single series is not averaged
            ys = [float(y) for _, _, mean, _, _ in series for y in mean]
            if not ys:
                continue
            if len(ys) > 1 and max(ys) == min(ys):
                self.constant[name] = ys[0]
            elif all(len(x) == 1 for _, x, _, _, _ in series):
                self.single[name] = [(label, float(x[0]), float(mean[0])) for label, x, mean, _, _ in series]
            else:
                kept.append((title, series))
        return kept


def figure(panels: list[tuple[str, list[tuple]]], xlabel: str, path: Path) -> Path:
    """`draw`'s figure as one PNG at `path`."""
    buf = io.BytesIO()
    draw(panels, xlabel).savefig(buf, format="png")
    return write_atomic(path, buf.getvalue())


def draw(panels: list[tuple[str, list[tuple]]], xlabel: str):
    """Small plots: panels are (title, series); a series is (label, x, mean, low, high), drawn as a
    line with a shaded band from low to high (None: no band), each series in its own colour, line
    style and marker. Every panel is labelled: `xlabel` below, its metric (the title) beside."""
    # the object API: no pyplot state, renders PNGs with Agg
    from matplotlib.figure import Figure

    labels = list(dict.fromkeys(label for _, series in panels for label, *_ in series))
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
            j = labels.index(label)  # a variant keeps its colour, style and marker in every panel
            (line,) = ax.plot(
                x,
                y,
                color=f"C{j % 10}",
                linestyle=STYLES[j % len(STYLES)],
                marker=MARKERS[j % len(MARKERS)],
                markevery=max(1, len(x) // 12),
                markersize=3 + (len(labels) - 1 - j),  # the first drawn largest: one drawn on top leaves it seen
                label=label,
            )
            if low is not None:
                ax.fill_between(x, low, high, alpha=0.2, color=line.get_color(), linewidth=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel(title.split(" (", 1)[0], fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(labels) > 1:
            ax.legend(fontsize=8)
    return fig


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


def ablation_figures(summary: dict, runs: list[StudyRun], folder: Path, left: LeftOut) -> dict[str, Path]:
    """The ablation's PNGs, by title: eval metrics against images, FLOPs and wall time; training
    loss terms and validation bins over training; the guidance curve; the sample grid. What is not
    worth a plot goes to `left`; the total loss is drawn only where every variant sums the same
    terms (same_loss_terms)."""
    variants = summary["variants"]
    eval_m = [m for m in summary["metrics"] if not m.startswith("val")]
    figures = {}
    axes: tuple[tuple[Callable[[EvalPoint], float], str, str], ...] = (
        (lambda p: p.images, "training images", "images"),
        (lambda p: p.flops, "training FLOPs", "flops"),
        (lambda p: p.train_seconds, "training seconds", "seconds"),
    )
    for axis, label, name in axes:
        panels = left.keep(_point_panels(runs, variants, eval_m, summary["primary_guidance"], axis))
        if panels:
            figures[f"eval metrics against {label}"] = figure(panels, label, folder / f"eval_vs_{name}.png")
    batch = {(r.variant, r.seed): r.global_batch or 1 for r in runs}
    total = same_loss_terms(summary)
    for title, pick, fname in (
        ("training loss terms", lambda k: is_loss_term(k) and (total or k != "loss"), "training_losses.png"),
        ("validation loss by noise level", lambda k: k.startswith("val"), "validation.png"),
    ):
        panels = left.keep(row_panels(runs, variants, pick, lambda r, step: step * batch[(r.variant, r.seed)]))
        if panels:
            figures[f"{title} against training images"] = figure(panels, "training images", folder / fname)
    panels = [p for p in _guidance_panels(summary["guidance"], variants, eval_m) if p[0] not in left.constant]
    if panels:
        figures[f"guidance at the budget (mean over seeds, {summary['confidence']:.0%} interval)"] = figure(
            panels, "guidance", folder / "guidance.png"
        )
    grid = variant_grid(summary, runs, folder / "samples.png")
    if grid is not None:
        figures["the same prompts and noise across variants (first seed, at the budget)"] = grid
    return figures


def _point_panels(
    runs: list[StudyRun],
    variants: list[str],
    metrics: list[str],
    guidance: float | None,
    axis: Callable[[EvalPoint], float],
) -> list[tuple]:
    """Each metric at the budget points against the points' `axis` (images, flops, training seconds)."""
    panels = []
    for m in metrics:
        series = []
        for v in variants:
            per_seed = []
            for r in (r for r in runs if r.variant == v):
                curve = {}
                for f, p in r.points.items():
                    got = point_value(p, m, guidance)
                    if got is not None and isinstance(axis(p), (int, float)):
                        curve[f] = (axis(p), got[0])
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


def is_loss_term(key: str) -> bool:
    """A training loss term of metrics.jsonl (loss, flow, repa, ...), not a clock, optimizer or evaluation key."""
    return key not in TRAINING_ONLY and not key.startswith(("val", "eval/"))


SMOOTH_ABOVE = 200  # logged values per curve above which a noisy curve is drawn as a moving average


def row_panels(
    runs: list[StudyRun],
    variants: list[str],
    pick: Callable[[str], bool],
    x_of: Callable[[StudyRun, int], float],
) -> list[tuple]:
    """Panels of metrics.jsonl keys chosen by `pick`: one line per variant, band over its seeds.
    A long curve (more than SMOOTH_ABOVE values) other than the learning rate is drawn as a trailing
    moving average over 1 % of its length, said in the panel's title: minibatch losses scatter more
    than the trend a reader is after."""
    keys = list(
        dict.fromkeys(k for r in runs for row in r.rows for k in row if pick(k) and isinstance(row[k], (int, float)))
    )
    panels = []
    for k in keys:
        bands = {
            v: _seed_band(
                [
                    {
                        row["step"]: (x_of(r, row["step"]), row[k])
                        for row in r.rows
                        if isinstance(row.get(k), (int, float))
                    }
                    for r in runs
                    if r.variant == v
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


def variant_grid(summary: dict, runs: list[StudyRun], path: Path, tile: int = 128) -> Path | None:
    """Rows = variants, columns = prompts: each variant's first seed at the budget, the same prompts
    and noise in every row. None when no run has images there."""
    from PIL import Image, ImageDraw

    final = summary["final_point"]
    rows: list[tuple[str, list[Path]]] = []
    prompts: list[str] = []
    for v in summary["variants"]:
        mine = sorted((r for r in runs if r.variant == v and final in r.points), key=lambda r: r.seed)
        if not mine:
            continue
        files = sorted(EvalPoint.image_folder(mine[0].point_files[final]).glob("*.png"))
        if files:
            rows.append((f"{v}\nseed {mine[0].seed}", files))
            prompts = prompts or mine[0].points[final].prompts
    if not rows:
        return None
    cols = max(len(files) for _, files in rows)
    font = label_font(11)
    label_w, pad = 110, 6
    captions = [wrap_to_width(drawable(p, font), font, tile) for p in prompts[:cols]]
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
