"""Confidence intervals for comparing training variants run over several seeds.

Two kinds of numbers come out of an evaluation:

* per-prompt scores (the shapes score's measures): an array ``[seeds, prompts]`` per variant, the
  same seeds and the same prompts (and noise) in every variant. Their interval comes from a
  two-level bootstrap: each resample draws the seeds with replacement and, independently, the
  prompts with replacement, and takes the mean over the drawn cells. It covers both sources of
  noise: which seeds trained the models and which prompts scored them. A comparison is paired:
  the bootstrap runs on ``variant - baseline`` cell by cell, so what every variant shares (a hard
  prompt, a lucky seed) cancels.
* one number per seed (Fréchet distances, MMDs, validation losses): the paired difference over
  seeds gets a Student t interval with ``n - 1`` degrees of freedom; with one seed there is none.

Every interval is seeded: the same data and seed give the same interval.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 10_000


@dataclass(frozen=True)
class Estimate:
    """A mean (or a mean difference) with its interval. ``low``/``high`` are None where there is no
    interval (one seed for a t interval, one value for a bootstrap); ``note`` then says why."""

    estimate: float
    low: float | None
    high: float | None
    n: int  # seeds (for a two-level bootstrap: seeds; the prompts are in `prompts`)
    method: str  # "bootstrap" (prompts only), "two-level bootstrap", "t" or "none"
    prompts: int | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def bootstrap_mean(values, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0) -> Estimate:
    """The mean of 1-D ``values`` with scipy's percentile bootstrap interval."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("no values")
    if x.size == 1:
        return Estimate(float(x[0]), None, None, 1, "none", note="one value: no interval")
    res = stats.bootstrap(
        (x,),
        np.mean,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        axis=-1,
        rng=np.random.default_rng(seed),
    )
    low, high = res.confidence_interval
    return Estimate(float(x.mean()), float(low), float(high), x.size, "bootstrap")


def two_level_bootstrap(data, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0) -> Estimate:
    """The mean of ``data [seeds, prompts]`` with a percentile interval from resampling seeds and
    prompts independently (a crossed design: every seed scored the same prompts). With one seed only
    the prompts are resampled, and the note says the interval leaves seed-to-seed noise out."""
    d = np.asarray(data, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"expected a non-empty [seeds, prompts] array, got shape {d.shape}")
    s, p = d.shape
    if s == 1:
        one = bootstrap_mean(d[0], confidence, resamples, seed)
        return Estimate(
            one.estimate,
            one.low,
            one.high,
            1,
            one.method,
            prompts=p,
            note="one seed: the interval covers prompt sampling only, not seed-to-seed noise"
            if one.low is not None
            else "one seed and one prompt: no interval",
        )
    seed_counts, prompt_counts = _draw_counts(s, p, resamples, seed)
    means = np.einsum("bp,bp->b", seed_counts @ d, prompt_counts) / (s * p)
    alpha = (1.0 - confidence) / 2
    low, high = np.percentile(means, [100 * alpha, 100 * (1 - alpha)])
    return Estimate(float(d.mean()), float(low), float(high), s, "two-level bootstrap", prompts=p)


@functools.lru_cache(maxsize=4)
def _draw_counts(s: int, p: int, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """How often each seed and each prompt is drawn in each resample, ``[resamples, s]`` and
    ``[resamples, p]``: a resample's mean is then sum_ij seed_count_i * d_ij * prompt_count_j / (s p),
    all resamples in two matrix products. Drawing is most of the cost and depends only on the shape
    and the seed, so a report's many same-shaped tables share one draw (read-only)."""
    rng = np.random.default_rng(seed)
    seed_counts = rng.multinomial(s, np.full(s, 1.0 / s), size=resamples).astype(np.float64)
    prompt_counts = rng.multinomial(p, np.full(p, 1.0 / p), size=resamples).astype(np.float64)
    seed_counts.flags.writeable = prompt_counts.flags.writeable = False
    return seed_counts, prompt_counts


def paired_bootstrap(
    variant, baseline, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0
) -> Estimate:
    """Mean of ``variant - baseline`` (both ``[seeds, prompts]``, same seeds and prompts in the same
    order) with its two-level bootstrap interval."""
    v, b = np.asarray(variant, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if v.shape != b.shape:
        raise ValueError(f"variant {v.shape} and baseline {b.shape} must pair seed by seed and prompt by prompt")
    return two_level_bootstrap(v - b, confidence, resamples, seed)


def t_interval(values, confidence: float = CONFIDENCE) -> Estimate:
    """The mean of per-seed ``values`` with a Student t interval (n - 1 degrees of freedom)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("no values")
    n, mean = x.size, float(x.mean())
    if n == 1:
        return Estimate(mean, None, None, 1, "none", note="one seed: no interval")
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * x.std(ddof=1) / np.sqrt(n)
    return Estimate(mean, float(mean - half), float(mean + half), n, "t")


def paired_t(variant, baseline, confidence: float = CONFIDENCE) -> Estimate:
    """Mean of the per-seed differences ``variant - baseline`` with a t interval."""
    v, b = np.asarray(variant, dtype=np.float64).ravel(), np.asarray(baseline, dtype=np.float64).ravel()
    if v.shape != b.shape:
        raise ValueError(f"{v.size} variant seeds but {b.size} baseline seeds: the difference pairs them")
    return t_interval(v - b, confidence)


BETTER, WORSE, WITHIN_NOISE, NO_INTERVAL = "better", "worse", "within noise", "no interval"


def verdict(delta: Estimate, higher_is_better: bool) -> str:
    """ "better" / "worse" when the difference's interval excludes 0 (which one by the metric's
    direction), "within noise" when it contains 0, "no interval" when there is none."""
    if delta.low is None or delta.high is None:
        return NO_INTERVAL
    if delta.low > 0:
        return BETTER if higher_is_better else WORSE
    if delta.high < 0:
        return WORSE if higher_is_better else BETTER
    return WITHIN_NOISE


def noise_floor(per_seed_means) -> dict:
    """How far the baseline moves between seeds alone: the standard deviation (ddof 1; None with one
    seed) and the range (max - min) of its per-seed means. A difference smaller than these is within
    what reseeding the baseline does."""
    x = np.asarray(per_seed_means, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("no values")
    return {
        "n": int(x.size),
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if x.size > 1 else None,
        "min": float(x.min()),
        "max": float(x.max()),
        "range": float(x.max() - x.min()),
    }
