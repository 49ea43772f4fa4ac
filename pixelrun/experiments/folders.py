"""The folder of an ablation as the report reads it: its plan (ablation.json) and each (variant, seed)
run's evaluation points, run summary and metrics.jsonl rows, as the typed records of
pixelrun/infra/records.py; and the value of a metric at a point."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from pixelrun.config import ConfigError
from pixelrun.infra.records import AblationPlan, AblationRun, EvalPoint, GuidanceResult, RunSummary, read_metrics


@dataclass
class StudyRun:
    """One (variant, seed) of an ablation: its entry in ablation.json and what its folder holds."""

    variant: str
    seed: int
    dir: str  # relative to the ablation's folder
    status: str = "missing"  # done | unfinished (no run-summary.json yet) | missing (no folder)
    points: dict[float, EvalPoint] = field(default_factory=dict)  # by fraction_key of the budget
    point_files: dict[float, Path] = field(default_factory=dict)
    summary: RunSummary | None = None
    rows: list[dict] = field(default_factory=list)  # metrics.jsonl
    global_batch: int | None = None
    flops_per_image: float | None = None
    command: str | None = None


def read_plan(out_dir: Path) -> AblationPlan:
    """The ablation's ablation.json; a folder without one is not an ablation's."""
    path = out_dir / "ablation.json"
    if not path.is_file():
        raise ConfigError("OUT", f"{out_dir} has no readable ablation.json: not a `pixelrun ablate` folder")
    return AblationPlan.read(path)


def read_points(run_dir: Path) -> tuple[dict[float, EvalPoint], dict[float, Path]]:
    """The run's evaluation points (points/step_*.json) and their files, by fraction of the budget."""
    points, files = {}, {}
    for f in sorted((Path(run_dir) / "points").glob("step_*.json")):
        point = EvalPoint.read(f)
        points[fraction_key(point.fraction)] = point
        files[fraction_key(point.fraction)] = f
    return points, files


def load_runs(out_dir: Path, planned: list[AblationRun]) -> list[StudyRun]:
    """Every run the plan lists, with what its folder holds and its status."""
    runs = []
    for r in planned:
        run = StudyRun(
            variant=r.variant,
            seed=r.seed,
            dir=r.dir,
            global_batch=r.global_batch,
            flops_per_image=r.flops_per_image,
            command=r.command,
        )
        d = out_dir / run.dir
        if d.is_dir():
            run.points, run.point_files = read_points(d)
            run.summary = RunSummary.read(d / "run-summary.json") if (d / "run-summary.json").exists() else None
            run.rows = read_metrics(d / "metrics.jsonl")
            run.status = "done" if run.summary is not None and run.summary.status == "done" else "unfinished"
        runs.append(run)
    return runs


def fraction_key(fraction: float) -> float:
    """A fraction of the budget as a key: the same point of two runs compares equal."""
    return round(float(fraction), 6)


def higher_is_better(metric: str) -> bool:
    """The shapes score's measures go up as a model improves; distances, MMDs and losses go down."""
    return metric.removeprefix("eval/").startswith("shapes/")


def _result_at(point: EvalPoint, guidance: float | None) -> GuidanceResult | None:
    """The run's first EMA's result at `guidance` (its results come first; ema.decays' others after)."""
    first = point.results[0].ema_decay if point.results else None
    for result in point.results:
        if result.ema_decay == first and (guidance is None or math.isclose(float(result.guidance), guidance)):
            return result
    return None


def result_value(result: GuidanceResult, metric: str) -> float | None:
    """A metric's number in one result (``shapes/<measure>`` for the shapes score's), or None."""
    name, _, measure = metric.partition("/")
    value = result.metrics.get(name)
    if measure:
        value = value.get(measure) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def point_value(point: EvalPoint, metric: str, guidance: float | None) -> tuple[float, list[float] | None] | None:
    """A metric of one run at one point: (the number, its per-prompt values or None); None if absent.
    Shapes measures are ``shapes/<measure>``; validation losses (``val...``) have no guidance."""
    if metric.startswith("val"):
        loss = point.val.get(metric)
        return None if loss is None else (float(loss), None)
    result = _result_at(point, guidance)
    if result is None:
        return None
    name, _, measure = metric.partition("/")
    value = result.metrics.get(name)
    if measure:
        value = value.get(measure) if isinstance(value, dict) else None
    if not isinstance(value, (int, float)):
        return None
    per_prompt = result.per_prompt.get(name)
    values = per_prompt.get(measure) if measure and isinstance(per_prompt, dict) else None
    return float(value), ([float(v) for v in values] if values else None)


def point_metrics(point: EvalPoint) -> list[str]:
    """The metric names a point holds, in a stable order: shapes measures, other metrics, then
    validation losses."""
    names = []
    for result in point.results:
        for name, value in result.metrics.items():
            if isinstance(value, dict):
                names += [f"{name}/{m}" for m in value if m != "n"]
            else:
                names.append(name)
    names += list(point.val)
    return list(dict.fromkeys(names))
