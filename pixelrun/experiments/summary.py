"""The numbers of an ablation's report, from its folder alone: per variant, metric, budget point and
guidance the mean over seeds with its interval, the paired difference from the baseline with its
interval and verdict (pixelrun/experiments/stats.py), the guidance curves, the noise floor, the
throughput and, for a `target` budget, when each run reached it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import yaml

from pixelrun.experiments import speedup, stats
from pixelrun.experiments.folders import (
    StudyRun,
    fraction_key,
    higher_is_better,
    load_runs,
    point_metrics,
    point_value,
    read_plan,
    result_value,
)
from pixelrun.infra import units
from pixelrun.infra.records import AblationBudget, AblationPlan


def _cell(
    runs: list[StudyRun],
    base_runs: list[StudyRun],
    metric: str,
    fraction: float,
    guidance: float | None,
    is_baseline: bool,
) -> dict | None:
    """One variant x metric x point x guidance: the mean over seeds with its interval, the paired
    difference from the baseline with its interval, and the verdict."""

    def values(rs: list[StudyRun]) -> dict[int, tuple[float, list[float] | None]]:
        out = {}
        for r in rs:
            point = r.points.get(fraction)
            v = point_value(point, metric, guidance) if point else None
            if v is not None:
                out[r.seed] = v
        return out

    mine = values(runs)
    if not mine:
        return None
    seeds = sorted(mine)
    prompts = [p for s in seeds if (p := mine[s][1]) is not None]
    if len(prompts) == len(seeds) and len({len(p) for p in prompts}) == 1:
        mean = stats.two_level_bootstrap(np.array(prompts))
    else:
        mean = stats.t_interval([mine[s][0] for s in seeds])
    if cannot_be_negative(metric) and mean.low is not None and mean.low < 0:
        # a t interval is symmetric about the mean: with few seeds it runs below 0 for a loss near 0
        mean = dataclasses.replace(mean, low=0.0, note="clipped at 0: the quantity cannot be negative")
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
    a = [p for s in common if (p := mine[s][1]) is not None]
    b = [p for s in common if (p := theirs[s][1]) is not None]
    if len(a) == len(b) == len(common) and len({len(p) for p in a + b}) == 1:
        delta = stats.paired_bootstrap(np.array(a), np.array(b))
    else:
        delta = stats.paired_t([mine[s][0] for s in common], [theirs[s][0] for s in common])
    cell["delta"] = delta.as_dict()
    cell["verdict"] = stats.verdict(delta, higher_is_better(metric))
    return cell


NONNEGATIVE = ("val/", "val_ema/", "shapes/", "fd", "fid", "cmmd")


def cannot_be_negative(metric: str) -> bool:
    """A loss, a distance or a fraction of prompts: its interval is clipped at 0."""
    return metric.removeprefix("eval/").startswith(NONNEGATIVE)


def _guidances(runs: list[StudyRun], fraction: float) -> list[float]:
    return sorted({float(res.guidance) for r in runs if fraction in r.points for res in r.points[fraction].results})


def _throughput(runs: list[StudyRun]) -> dict:
    """Speed and what was reached, averaged over the variant's runs that have it."""

    def mean_of(values: Iterable[object]) -> float | None:
        numbers = [float(v) for v in values if isinstance(v, (int, float))]
        return float(np.mean(numbers)) if numbers else None

    summaries = [r.summary for r in runs if r.summary is not None]
    last = [r.points[max(r.points)] for r in runs if r.points]
    return {
        "images_per_s": mean_of(s.images_per_s for s in summaries),
        "step_seconds": mean_of(s.step_seconds for s in summaries),
        "peak_memory_bytes": mean_of(s.peak_memory_bytes for s in summaries),
        "train_seconds": mean_of(s.train_seconds for s in summaries),
        "flops_per_image": mean_of([s.flops_per_image for s in summaries] or [r.flops_per_image for r in runs]),
        "step_reached": mean_of(p.step for p in last),
        "images_reached": mean_of(p.images for p in last),
        "flops_reached": mean_of(p.flops for p in last),
        # the machine's 1-minute load average and CPUs when each run ended: images/s measured while
        # the load exceeded the CPUs was shared with other work
        "load_1min": mean_of(s.load_1min for s in summaries),
        "cpus": mean_of(s.cpus for s in summaries),
    }


def _budget_line(spec: AblationPlan, goal: float | None = None) -> tuple[str, bool]:
    """The sentence stating the budget, and whether every run trained the same steps at the same batch.
    `goal`: a target budget's value, resolved where it is the baseline's final score."""
    b = spec.budget
    kind, value = b.kind, b.value
    target = b.target
    if target == speedup.BASELINE:
        target = f"the baseline's final score ({_num_or_dash(goal)})"
    text = {
        "images": lambda: f"{value:,.0f} training images per run",
        "flops": lambda: f"{units.flop(value)} of training per run",
        "minutes": lambda: f"{value:g} minutes of training per run",
        "target": lambda: f"training until {b.metric} reaches {target} (at most {value:g})",
    }.get(kind, lambda: f"{kind} {value}")()
    batches = {r.global_batch for r in spec.runs}
    steps = {r.steps for r in spec.runs}
    equal = len(batches) == 1 and len(steps) == 1 and bool(spec.runs)
    if equal:
        text += f"; equal steps: every run {steps.pop()} steps at global batch {batches.pop()}"
    elif b.equal_steps:
        text += "; equal steps were asked for, but the runs' steps or batches differ"
    return f"Budget: {text}.", equal


def summarize_ablation(out_dir: str | Path) -> dict:
    """Every number of an ablation's report, from its folder (see pixelrun/experiments/report.py)."""
    return summarize(Path(out_dir))[0]


def summarize(out_dir: Path) -> tuple[dict, list[StudyRun]]:
    """The report's numbers and the runs they come from (the figures draw those)."""
    spec = read_plan(out_dir)
    runs = load_runs(out_dir, spec.runs)
    variants = list(spec.variants or dict.fromkeys(r.variant for r in runs))
    baseline = spec.baseline
    by_variant = {v: [r for r in runs if r.variant == v] for v in variants}
    fractions = sorted(fraction_key(f) for f in spec.points)
    final = fractions[-1]
    primary = float(spec.protocol.primary_guidance)
    metrics = list(dict.fromkeys(m for r in runs for p in r.points.values() for m in point_metrics(p)))

    def cells(fraction: float, guidance: float | None, names: list[str]) -> dict:
        return {
            v: {
                m: c
                for m in names
                if (c := _cell(by_variant[v], by_variant.get(baseline, []), m, fraction, guidance, v == baseline))
            }
            for v in variants
        }

    by_point = {f"{f:g}": cells(f, primary, metrics) for f in fractions}
    guidance_curves, best = _guidance_curves(runs, variants, metrics, final, cells)
    floor = {m: stats.noise_floor(cell["per_seed"]) for m, cell in by_point[f"{final:g}"].get(baseline, {}).items()}
    configs = variant_configs(out_dir, spec)
    goal = _target(spec.budget, by_variant.get(baseline, []), primary, final)
    budget_line, equal = _budget_line(spec, goal)
    return {
        "name": spec.name,
        "baseline": baseline,
        "variants": variants,
        "seeds": spec.seeds,
        "budget": spec.budget.content(),
        "budget_line": budget_line,
        "equal_steps": equal,
        "points": fractions,
        "final_point": final,
        "primary_guidance": primary,
        "protocol": spec.protocol.content(),
        "machine": spec.machine,
        "metrics": metrics,
        "final": by_point[f"{final:g}"],
        "by_point": by_point,
        "guidance": guidance_curves,
        "best_guidance": best,
        "noise_floor": floor,
        "throughput": {v: _throughput(by_variant[v]) for v in variants},
        "constant": constant_metrics(by_point[f"{final:g}"]),
        "short_ema": short_ema(spec, configs),
        "loss_terms": {v: loss_terms(by_variant[v]) for v in variants},
        **_sampling(by_variant, metrics, final, primary),
        **_samplers(configs),
        "runs": [_run_row(r) for r in runs],
        "incomplete": [_incomplete(r, final) for r in runs if final not in r.points],
        "confidence": stats.CONFIDENCE,
        "time_to_target": _time_to_target(runs, spec.budget, primary, goal),
        **_speedups(by_variant, baseline, spec.budget, primary, final),
    }, runs


def _target(budget: AblationBudget, base_runs: list[StudyRun], guidance: float, final: float) -> float | None:
    """A `target` budget's value to reach: budget.target, or with `target: baseline` the baseline's
    final score (None until every evaluated seed of it reached the budget)."""
    if budget.kind != "target" or budget.metric is None or budget.target is None:
        return None
    if budget.target == speedup.BASELINE:
        return speedup.baseline_score(base_runs, budget.metric, guidance, final)
    return float(budget.target)


def _speedups(
    by_variant: dict[str, list[StudyRun]], baseline: str, budget: AblationBudget, guidance: float, final: float
) -> dict:
    """{"speedup": {variant: ...}} for a `target` budget (pixelrun/experiments/speedup.py): each
    variant's speed-up over the baseline to the target, in FLOPs and in seconds, with its interval.
    Nothing for the other budgets, so their reports read as they did."""
    if budget.kind != "target" or budget.metric is None or budget.target is None:
        return {}
    metric, base_runs = budget.metric, by_variant.get(baseline, [])
    return {
        "speedup": {
            v: speedup.speedup(
                runs, base_runs, metric, budget.target, guidance=guidance, higher=higher_is_better(metric), final=final
            )
            for v, runs in by_variant.items()
            if v != baseline
        }
    }


def _guidance_curves(
    runs: list[StudyRun], variants: list[str], metrics: list[str], final: float, cells: Callable
) -> tuple[dict, dict]:
    """With a guidance sweep: each variant's cells at the budget by guidance, per evaluation metric,
    and the guidance that scored best; both empty with one guidance."""
    guidance_curves: dict = {}
    best: dict = {}
    eval_metrics = [m for m in metrics if not m.startswith("val")]
    all_guidance = _guidances(runs, final)
    if len(all_guidance) > 1:
        curves = {g: cells(final, g, eval_metrics) for g in all_guidance}
        for v in variants:
            guidance_curves[v] = {m: [curves[g][v][m] for g in all_guidance if m in curves[g][v]] for m in eval_metrics}
            best[v] = {
                m: _best_guidance(points, higher_is_better(m)) for m, points in guidance_curves[v].items() if points
            }
    return guidance_curves, best


def _num_or_dash(x: float | None) -> str:
    return "not yet known" if x is None else units.number(x)


def _time_to_target(
    runs: list[StudyRun], budget: AblationBudget, guidance: float | None, goal: float | None
) -> list[dict]:
    """A `target` budget: per run, the first evaluation point at which budget.metric reached the
    target `goal` (higher or lower, as the metric improves), with its images and training seconds;
    None where it never did. Empty for the other budgets and while `goal` is unknown."""
    if budget.kind != "target" or budget.metric is None or goal is None:
        return []
    metric = budget.metric
    higher = higher_is_better(metric)
    out = []
    for r in runs:
        reached = None
        for fraction in sorted(r.points):
            point = r.points[fraction]
            value = point_value(point, metric, guidance)
            if value is not None and (value[0] >= goal if higher else value[0] <= goal):
                reached = {
                    "step": point.step,
                    "images": point.images,
                    "train_seconds": point.train_seconds,
                    "value": value[0],
                }
                break
        out.append({"variant": r.variant, "seed": r.seed, "reached": reached})
    return out


def _best_guidance(curve: list[dict], higher: bool) -> float:
    pick = max if higher else min
    return pick(curve, key=lambda c: c["mean"]["estimate"])["guidance"]


def _incomplete(run: StudyRun, final: float) -> dict:
    """A run without an evaluation at the budget, and why."""
    if run.status == "missing":
        reason = "no run folder"
    else:
        reached = ", ".join(f"{f:g}" for f in sorted(run.points)) or "none"
        reason = f"no evaluation at the budget (fraction {final:g}); points reached: {reached}"
    return {"variant": run.variant, "seed": run.seed, "dir": run.dir, "status": run.status, "reason": reason}


def _run_row(run: StudyRun) -> dict:
    last = run.points[max(run.points)] if run.points else None
    return {
        "variant": run.variant,
        "seed": run.seed,
        "dir": run.dir,
        "status": run.status,
        "points": sorted(run.points),
        "step": last.step if last else None,
        "images": last.images if last else None,
        "flops": last.flops if last else None,
        "train_seconds": last.train_seconds if last else None,
        "global_batch": run.global_batch,
        "command": run.command,
    }


def _sampling(by_variant: dict[str, list[StudyRun]], metrics: list[str], final: float, primary: float) -> dict:
    """Per variant, the NFE behind its numbers and the EMA x guidance sweep at the budget; nothing
    for a study whose points predate them (they carry no NFE), so its report reads as it did."""
    runs = [r for rs in by_variant.values() for r in rs]
    if not any(res.nfe is not None for r in runs for p in r.points.values() for res in p.results):
        return {}
    return {
        "nfe": {v: _nfe(rs, final, primary) for v, rs in by_variant.items()},
        "ema_guidance": {v: _ema_guidance(rs, metrics, final) for v, rs in by_variant.items()},
    }


def _samplers(configs: dict[str, dict]) -> dict:
    """{"samplers": {variant: [sampler, steps]}} for the variants that sample with another sampler
    than Euler (`pixelrun ablate` gives them the steps of Euler's model evaluations); nothing when
    every variant samples with Euler, so such a report reads as it did."""
    found = {}
    for v, cfg in configs.items():
        sample = cfg.get("sample") or {}
        if sample.get("sampler", "euler") != "euler":
            found[v] = [sample["sampler"], int(sample["steps"])]
    return {"samplers": found} if found else {}


def _nfe(runs: list[StudyRun], fraction: float, guidance: float) -> int | None:
    """The model evaluations per image behind a variant's numbers at the budget (its first EMA at
    the primary guidance); None for points written before they were recorded."""
    for r in runs:
        for res in r.points[fraction].results if fraction in r.points else []:
            if res.nfe is not None and res.ema_decay == r.points[fraction].results[0].ema_decay:
                if abs(float(res.guidance) - guidance) < 1e-9:
                    return res.nfe
    return None


def _ema_guidance(runs: list[StudyRun], metrics: list[str], fraction: float) -> list[dict]:
    """The sweep over EMA (ema.decays) x guidance at the budget: per (decay, guidance), its NFE and
    each evaluation metric's mean over the seeds that have it, in the order the runs evaluated them."""
    cells: dict[tuple, dict] = {}
    for r in runs:
        for res in r.points[fraction].results if fraction in r.points else []:
            cell = cells.setdefault((res.ema_decay, float(res.guidance)), {"nfe": res.nfe, "values": {}})
            for m in metrics:
                if not m.startswith("val") and (value := result_value(res, m)) is not None:
                    cell["values"].setdefault(m, []).append(value)
    return [
        {
            "ema_decay": decay,
            "guidance": guidance,
            "nfe": cell["nfe"],
            "means": {m: float(np.mean(v)) for m, v in cell["values"].items()},
            "seeds": max((len(v) for v in cell["values"].values()), default=0),
        }
        for (decay, guidance), cell in cells.items()
    ]


def constant_metrics(final: dict) -> dict[str, float]:
    """The metrics whose value is the same in every run at the budget (every shapes measure 0 after
    too few steps): no comparison can tell the variants apart on them. Metric -> the value."""
    values: dict[str, list[float]] = {}
    for cells in final.values():
        for m, cell in cells.items():
            values.setdefault(m, []).extend(cell["per_seed"])
    return {m: v[0] for m, v in values.items() if len(v) > 1 and max(v) == min(v)}


def variant_configs(out_dir: Path, spec: AblationPlan) -> dict[str, dict]:
    """Each variant's first resolved config (OUT/configs/, as the plan wrote it), read once; a
    variant whose configs are gone is left out."""
    out: dict[str, dict] = {}
    for r in spec.runs:
        if r.variant not in out and (out_dir / r.config).is_file():
            out[r.variant] = yaml.safe_load((out_dir / r.config).read_text()) or {}
    return out


def short_ema(spec: AblationPlan, configs: dict[str, dict], half_lives: float = 3.0) -> dict[str, dict]:
    """The variants whose runs are shorter than `half_lives` half-lives of their EMA (the warning of
    `ablate plan`, pixelrun/experiments/plan.py ema_warnings): variant -> steps, decay, half-life and
    the share of the initial weights the EMA still holds, from `configs` (`variant_configs`)."""
    from pixelrun.config.schema import EMAConfig
    from pixelrun.experiments.plan import ema_half_life

    out: dict[str, dict] = {}
    for r in spec.runs:
        if r.variant in out or r.variant not in configs:
            continue
        ema = configs[r.variant].get("ema") or {}
        decays = ema.get("decays") or [ema.get("decay", EMAConfig.decay)]  # the first is the one evaluated
        decay, every = float(decays[0]), int(ema.get("every", EMAConfig.every))
        life = ema_half_life(decay, every)
        if r.steps < half_lives * life:
            out[r.variant] = {"steps": r.steps, "decay": decay, "half_life": life, "held": 0.5 ** (r.steps / life)}
    return out


def loss_terms(runs: list[StudyRun]) -> list[str]:
    """The loss terms a variant's total loss sums (flow, repa, ...), from its metrics.jsonl rows."""
    from pixelrun.experiments.figures import is_loss_term

    keys = {k for r in runs for row in r.rows for k in row if is_loss_term(k) and k != "loss"}
    return sorted(keys)
