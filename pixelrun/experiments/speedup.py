"""Time to target: how much sooner a variant reaches a `target` budget's value than the baseline, in
training FLOPs and in training seconds, with a bootstrap interval (docs/ablations.md, "Time to
target"). Pure numpy.

The cost to target. A variant's curve is, at each evaluation point every one of its seeds reached,
the metric's mean over its seeds and prompts against the mean over its seeds of the point's training
FLOPs (or seconds). The curve reaches the target at its first point at or above it (at or below, for
a metric that improves downwards); the cost is the linear interpolation between that point and the
one before it. A curve already at the target at its first point is given that point's cost: the
crossing was no later, so it is an upper bound of the cost there. A curve that never reaches the
target has no cost: its crossing lies beyond its budget (its last point).

The speed-up is the baseline's cost over the variant's: 2x = the variant needed half the FLOPs.

`target: baseline` is the baseline's own final score, its curve's last point (the mean over its
seeds at its whole budget). In each bootstrap resample the target is recomputed from the resampled
baseline, as are both curves: the speed-up is a function of the data, target included, and holding
the target at its estimate would treat the baseline's final score as known exactly, which it is not
(with a flat end of the baseline's curve, its noise moves the crossings most). The baseline then
reaches the target in every resample, at its last point at the latest.

The interval. Each resample draws the seeds with replacement and, independently, the prompts (the
same draw for the variant and the baseline: the same seeds trained both and the same prompts scored
them), and recomputes the target, both costs and their ratio. The interval is the percentile one:
of B resampled ratios, the floor(alpha B) + 1-th smallest and largest, alpha = (1 - confidence) / 2.
A resample in which the variant never reaches the target counts as a speed-up of 0 for the lower
bound; one in which the baseline never does, as infinite for the upper bound; neither, as both. So
when more than alpha of the resamples miss the target on one side, that bound is not given (None),
never invented. With one seed the draw is of prompts only; without per-prompt scores (a Fréchet
distance, a validation loss), of seeds only; with one seed and no per-prompt scores there is no
interval. `interval` says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pixelrun.experiments import stats
from pixelrun.experiments.folders import StudyRun, point_value

BASELINE = "baseline"  # budget.target: the baseline's own final score
AXES = {"flops": "training FLOPs", "seconds": "training seconds"}


@dataclass(frozen=True)
class Curve:
    """A variant's evaluations at the points every one of its seeds reached."""

    seeds: list[int]
    fractions: list[float]  # of the budget, increasing
    values: np.ndarray  # [seeds, points, prompts]; prompts = 1 (the point's number) without per-prompt scores
    costs: dict[str, np.ndarray]  # "flops" / "seconds" -> [seeds, points]
    per_prompt: bool


def curve_of(runs: list[StudyRun], metric: str, guidance: float | None, per_prompt: bool = True) -> Curve | None:
    """The runs' curve of `metric` (None when no point of every run holds it). Per-prompt scores are
    used when every point has them, all of one length, and `per_prompt` allows it."""
    found = []
    for r in sorted(runs, key=lambda r: r.seed):
        at = {f: (p, v) for f, p in r.points.items() if (v := point_value(p, metric, guidance)) is not None}
        if at:
            found.append((r.seed, at))
    common = sorted(set.intersection(*(set(at) for _, at in found))) if found else []
    if not common:
        return None
    cells = [[at[f] for f in common] for _, at in found]
    lengths = {len(v[1]) if v[1] is not None else 0 for row in cells for _, v in row}
    use_prompts = per_prompt and len(lengths) == 1 and 0 not in lengths
    values = np.array([[v[1] if use_prompts else [v[0]] for _, v in row] for row in cells], dtype=np.float64)
    return Curve(
        seeds=[s for s, _ in found],
        fractions=common,
        values=values,
        costs={
            "flops": np.array([[p.flops for p, _ in row] for row in cells], dtype=np.float64),
            "seconds": np.array([[p.train_seconds for p, _ in row] for row in cells], dtype=np.float64),
        },
        per_prompt=use_prompts,
    )


def crossings(cost, value, target, higher: bool = True) -> np.ndarray:
    """Per row of `value` [B, points] against `cost` [B, points], the cost at which it first reaches
    `target` (a number or one per row): interpolated linearly between the first point at or above
    the target (at or below, `higher` False) and the point before it; the first point's cost when
    that is the first point; NaN where no point reaches it."""
    x, y = np.atleast_2d(np.asarray(cost, np.float64)), np.atleast_2d(np.asarray(value, np.float64))
    t = np.broadcast_to(np.asarray(target, np.float64), (y.shape[0],))
    sign = 1.0 if higher else -1.0
    at = sign * y >= sign * t[:, None]
    first = at.argmax(axis=1)
    rows, before = np.arange(y.shape[0]), np.maximum(first - 1, 0)
    x0, x1, y0, y1 = x[rows, before], x[rows, first], y[rows, before], y[rows, first]
    # the point before is below the target and the first is at or above it: y1 != y0 where used
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(first > 0, (t - y0) / (y1 - y0), 1.0)
    return np.where(at.any(axis=1), x0 + share * (x1 - x0), np.nan)


def _means(curve: Curve, seed_counts: np.ndarray, prompt_counts: np.ndarray) -> tuple[np.ndarray, dict]:
    """The curve in each draw: its values [B, points] and costs {axis: [B, points]} (counts of ones:
    the curve itself, B = 1)."""
    s, _, p = curve.values.shape
    values = np.einsum("bs,stp,bp->bt", seed_counts, curve.values, prompt_counts, optimize=True) / (s * p)
    return values, {axis: seed_counts @ c / s for axis, c in curve.costs.items()}


def order_bounds(low_side: np.ndarray, high_side: np.ndarray, confidence: float) -> tuple[float | None, float | None]:
    """The percentile interval's order statistics (the floor(alpha B) + 1-th smallest of `low_side`
    and largest of `high_side`), each None where it is 0 or infinite: a bound the resamples that
    never reached the target leave open."""
    k = math.floor((1.0 - confidence) / 2 * low_side.size)
    low = float(np.sort(low_side)[k])
    high = float(np.sort(high_side)[::-1][k])
    return (low if 0 < low < math.inf else None), (high if 0 < high < math.inf else None)


def ratio_with_interval(
    base: float,
    mine: float,
    base_draws: np.ndarray,
    my_draws: np.ndarray,
    budgets: tuple[float, float],
    confidence: float,
) -> dict:
    """One axis: the baseline's cost to target over the variant's (`base`, `mine`; NaN = not
    reached), its interval from the resampled costs (None with fewer than two distinct draws), and
    where a side never reached the target the bound its budget gives (`budgets`: the baseline's and
    the variant's last points)."""
    out: dict = {"estimate": None, "low": None, "high": None, "baseline_cost": None, "variant_cost": None}
    reached_base, reached_mine = not math.isnan(base), not math.isnan(mine)
    out["baseline_cost"] = base if reached_base else None
    out["variant_cost"] = mine if reached_mine else None
    if reached_base and reached_mine:
        out["estimate"] = base / mine
    out["at_most"] = base / budgets[1] if reached_base and not reached_mine else None  # the variant needs more
    out["at_least"] = budgets[0] / mine if reached_mine and not reached_base else None  # the baseline needs more
    out["unreached"] = {"baseline": None, "variant": None}  # the share of resamples that never reached it
    if base_draws.size > 1:
        out["unreached"] = {"baseline": float(np.isnan(base_draws).mean()), "variant": float(np.isnan(my_draws).mean())}
        miss_base, miss_mine = np.isnan(base_draws), np.isnan(my_draws)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = base_draws / my_draws
        low_side = np.where(miss_mine, 0.0, np.where(miss_base, np.inf, ratio))  # neither reached: 0
        high_side = np.where(miss_base, np.inf, np.where(miss_mine, 0.0, ratio))  # neither reached: inf
        out["low"], out["high"] = order_bounds(low_side, high_side, confidence)
    out["bounded"] = out["low"] is not None and out["high"] is not None
    return out


def interval_over(seeds: int, per_prompt: bool) -> str:
    """What the interval resamples, in words."""
    if seeds > 1 and per_prompt:
        return "seeds and prompts (paired)"
    if seeds > 1:
        return "seeds only (no per-prompt scores; paired)"
    if per_prompt:
        return "prompts only (one seed: seed-to-seed noise left out)"
    return "nothing: one seed and no per-prompt scores, no interval"


def paired_curves(
    runs: list[StudyRun], base_runs: list[StudyRun], metric: str, guidance: float | None
) -> tuple[Curve, Curve] | None:
    """The variant's and the baseline's curves on the seeds both have, per-prompt where both have
    per-prompt scores of one length (else the points' numbers); None where they share no seed."""
    mine, base = curve_of(runs, metric, guidance), curve_of(base_runs, metric, guidance)
    if mine is None or base is None:
        return None
    seeds = set(mine.seeds) & set(base.seeds)
    per_prompt = mine.per_prompt and base.per_prompt and mine.values.shape[2] == base.values.shape[2]
    if seeds != set(mine.seeds) or seeds != set(base.seeds) or not per_prompt:
        mine = curve_of([r for r in runs if r.seed in seeds], metric, guidance, per_prompt)
        base = curve_of([r for r in base_runs if r.seed in seeds], metric, guidance, per_prompt)
    if mine is None or base is None or mine.seeds != base.seeds or mine.values.shape[2] != base.values.shape[2]:
        return None
    return mine, base


def speedup(
    runs: list[StudyRun],
    base_runs: list[StudyRun],
    metric: str,
    target: float | str,
    *,
    guidance: float | None,
    higher: bool,
    final: float,
    confidence: float = stats.CONFIDENCE,
    resamples: int = stats.RESAMPLES,
    seed: int = 0,
) -> dict:
    """A variant against the baseline: the target, and per axis (FLOPs, seconds) the speed-up to it
    with its interval (`ratio_with_interval`); a `note` instead where it cannot be computed."""
    entry: dict = {"metric": metric, "target": None, "target_from": BASELINE if target == BASELINE else "spec"}
    pair = paired_curves(runs, base_runs, metric, guidance)
    if pair is None:
        return {
            **entry,
            "note": f"no seed with {metric} at its evaluation points in both this variant and the baseline",
        }
    mine, base = pair
    if target == BASELINE and not math.isclose(base.fractions[-1], final):
        return {**entry, "note": f"the baseline has no {metric} at the budget (fraction {final:g}) in every seed"}
    s, p = len(mine.seeds), mine.values.shape[2]
    ones = (np.ones((1, s)), np.ones((1, p)))
    # the draws of stats' two-level bootstrap: one draw of seeds and prompts for both curves (paired)
    draws = stats._draw_counts(s, p, resamples, seed) if s * p > 1 else ones
    (goal, *costs), (_, *drawn) = (_costs_to_target(mine, base, counts, target, higher) for counts in (ones, draws))
    entry.update(
        target=float(goal[0]),
        seeds=mine.seeds,
        prompts=p if mine.per_prompt else None,
        interval_over=interval_over(s, mine.per_prompt),
        confidence=confidence,
        resamples=int(draws[0].shape[0]) if s * p > 1 else 0,
    )
    for i, axis in enumerate(AXES):
        budgets = (float(base.costs[axis].mean(axis=0)[-1]), float(mine.costs[axis].mean(axis=0)[-1]))
        (base_cost, my_cost), (base_draws, my_draws) = costs[i], drawn[i]
        entry[axis] = ratio_with_interval(
            float(base_cost[0]), float(my_cost[0]), base_draws, my_draws, budgets, confidence
        )
    return entry


def _costs_to_target(
    mine: Curve, base: Curve, counts: tuple[np.ndarray, np.ndarray], target: float | str, higher: bool
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """In each draw: the target, then per axis (FLOPs, seconds) the baseline's and the variant's
    costs to it (NaN: not reached)."""
    base_values, base_costs = _means(base, *counts)
    my_values, my_costs = _means(mine, *counts)
    goal = base_values[:, -1] if target == BASELINE else np.full(base_values.shape[0], float(target))
    flops, seconds = (
        (crossings(base_costs[axis], base_values, goal, higher), crossings(my_costs[axis], my_values, goal, higher))
        for axis in AXES
    )
    return goal, flops, seconds


def baseline_score(base_runs: list[StudyRun], metric: str, guidance: float | None, final: float) -> float | None:
    """The baseline's final score: its curve's mean over seeds at the budget (fraction `final`);
    None where not every seed reached it."""
    curve = curve_of(base_runs, metric, guidance)
    if curve is None or not math.isclose(curve.fractions[-1], final):
        return None
    values, _ = _means(curve, np.ones((1, curve.values.shape[0])), np.ones((1, curve.values.shape[2])))
    return float(values[0, -1])
