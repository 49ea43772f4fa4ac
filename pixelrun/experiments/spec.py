"""The SPEC of `pixelrun ablate` (docs/ablations.md): named variants of one base config, the seeds,
the budget, the evaluation protocol and the launch, read from YAML with every key checked. An unknown
key or a bad value is a ConfigError naming it; keys the ablation decides for every run (MANAGED) may
not be set by a variant or the base."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pixelrun.config import ConfigError
from pixelrun.config.derived import _flat
from pixelrun.config.load import load_yaml
from pixelrun.config.schema import _build


@dataclass
class BaseSpec:
    config: str | None = None  # a config file, relative to the SPEC's folder or the current one; null = the defaults
    overrides: list[str] = field(default_factory=list)  # dotted key=value, applied to every variant


@dataclass
class BudgetSpec:
    kind: str = "images"  # images | flops | minutes | target
    value: float = 0.0  # images; FLOPs; minutes per run; for target: the most images a run may train
    cooldown: float = 0.2  # the learning rate's final linear decay, as a fraction of each run's steps
    metric: str | None = None  # target: the metric, as in metrics.jsonl without "eval/" (shapes/placed)
    target: float | str | None = None  # target: the value to reach, or "baseline" (its final score)
    calibration_steps: int = 3  # minutes: timed steps per variant (after one warm-up step)


@dataclass
class EvaluationSpec:
    points: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])  # fractions of the budget
    metrics: list[str] = field(default_factory=lambda: ["shapes"])
    prompts: int = 256  # enough for the shapes score to resolve a 0.1 difference
    sample_steps: int = 25
    guidance: list[float] = field(default_factory=lambda: [4.0])  # the first is the primary; more = a sweep
    guidance_mode: str = "cfg"
    weights: str = "ema"  # ema | raw
    val_images: int = 32  # the validation loss by noise level; 0 = off


@dataclass
class SlurmSpec:
    """The jobs of launch.executor slurm / submitit-local (pixelrun/experiments/launch.py): one
    job per (variant, seed), each of `nodes` nodes."""

    partition: str | None = None
    nodes: int = 1  # a torchrun across them per run; submitit-local: 1
    gpus_per_node: int = 0  # one rank per GPU; 0 = no GPU, launch.nproc_per_node CPU ranks per node
    cpus_per_task: int | None = None  # the one task per node runs torchrun and every rank of the node
    time_minutes: int = 60  # per job; a run that needs longer is requeued and resumes
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None


@dataclass
class LaunchSpec:
    parallel: int = 1  # runs at a time on this machine (each gets cores / parallel threads)
    nproc_per_node: int = 1  # ranks per run: 1 = a plain process, more = torchrun --standalone
    executor: str = "here"  # here | slurm | submitit-local
    slurm: SlurmSpec = field(default_factory=SlurmSpec)


@dataclass
class Spec:
    name: str = ""
    out: str = ""  # the ablation's folder; default runs/ablations/<name>
    baseline: str = ""  # default: the first variant
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    base: BaseSpec = field(default_factory=BaseSpec)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    launch: LaunchSpec = field(default_factory=LaunchSpec)
    variants: dict = field(default_factory=dict)  # name -> [key=value, ...] or a YAML overlay {section: {key: value}}
    path: Path | None = None  # where the SPEC was read from


BUDGETS = ("images", "flops", "minutes", "target")
EXECUTORS = ("here", "slurm", "submitit-local")
# What the ablation decides for every run: a variant or the base may not set these.
MANAGED = (
    "run.dir",
    "run.resume",
    "run.init_from",
    "seed",
    "sample.seed",
    "train.steps",
    "schedule.cooldown",
    "train.max_minutes",
    "eval.every",
    "eval.at_steps",
    "eval.metrics",
    "eval.prompts",
    "eval.guidance",
    "eval.weights",
    "eval.val_images",
    "sample.steps",
    "sample.guidance",
    "sample.guidance_mode",
    "log.flops_per_image",
    "stages",
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def load_spec(path: str | Path) -> Spec:
    """The SPEC file, every key checked: an unknown key or a bad value is a ConfigError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("SPEC", f"no such file: {p}")
    try:
        data = load_yaml(p.read_text(encoding="utf-8"))  # a key (a variant) written twice is refused
    except UnicodeDecodeError:
        raise ConfigError("SPEC", f"{p} is not a text file (not UTF-8); give a YAML SPEC") from None
    except OSError as e:
        raise ConfigError("SPEC", f"cannot read {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError("SPEC", f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError("SPEC", f"{p} must be a mapping of keys (name, base, variants, seeds, budget, ...)")
    data = dict(data)
    variants = data.pop("variants", None)
    if "path" in data:
        raise ConfigError("spec.path", "unknown key")
    if isinstance(data.get("seeds"), int) and not isinstance(data.get("seeds"), bool):
        data["seeds"] = list(range(data["seeds"]))  # a count
    baseline_target = _baseline_target(data)
    spec = _build(Spec, data, "spec.")
    if baseline_target:
        spec.budget.target = BASELINE_TARGET
    spec.path = p
    spec.variants = _variants(variants)
    spec.name = spec.name or p.stem
    spec.out = spec.out or str(Path("runs") / "ablations" / spec.name)
    spec.baseline = spec.baseline or next(iter(spec.variants))
    _check_spec(spec)
    return spec


BASELINE_TARGET = "baseline"  # budget.target: the baseline variant's own final score


def _baseline_target(data: dict) -> bool:
    """Whether budget.target is the word `baseline` (taken out of `data`, which the schema reads as
    numbers only); a target that is neither a number nor that word is refused here, naming the key."""
    budget = data.get("budget")
    if not isinstance(budget, dict) or not isinstance(target := budget.get("target"), str):
        return False
    if target.strip() == BASELINE_TARGET:
        data["budget"] = {k: v for k, v in budget.items() if k != "target"}
        return True
    try:
        float(target)  # YAML 1.1 reads "1e-3" as a string: the schema takes it as the number
    except ValueError:
        raise ConfigError(
            "spec.budget.target",
            f"must be a number or `baseline` (the baseline variant's final score); got {target!r}",
        ) from None
    return False


def _variants(raw) -> dict[str, list[str]]:
    """name -> dotted overrides, from a list of key=value or a YAML overlay."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            "spec.variants",
            "needs at least one named variant: {name: [key=value, ...]} "
            "(the baseline usually has none: `baseline: []`)",
        )
    out = {}
    for name, value in raw.items():
        name = str(name)
        if not _NAME.match(name):
            raise ConfigError(
                f"spec.variants.{name}",
                "a variant's name is its folder: letters, digits and _ . + - only, not starting with a symbol",
            )
        if value is None:
            value = []
        if isinstance(value, dict):
            out[name] = [f"{k}={json.dumps(v)}" for k, v in _flat(value).items()]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            out[name] = list(value)
        else:
            raise ConfigError(
                f"spec.variants.{name}",
                "must be a list of key=value overrides or a YAML overlay ({section: {key: value}})",
            )
    lowered = [n.lower() for n in out]
    for n in out:  # folders that differ only in case are one folder on macOS and Windows file systems
        if lowered.count(n.lower()) > 1:
            raise ConfigError(
                f"spec.variants.{n}", "two variants would share one run folder (names differ only in case)"
            )
    return out


def _check_spec(spec: Spec) -> None:
    b, e = spec.budget, spec.evaluation
    if b.kind not in BUDGETS:
        raise ConfigError("spec.budget.kind", f"must be one of {', '.join(BUDGETS)}; got {b.kind!r}")
    if not (math.isfinite(b.value) and b.value > 0):
        raise ConfigError("spec.budget.value", f"must be a positive number ({UNITS[b.kind]}); got {b.value}")
    if not 0 <= b.cooldown <= 1:
        raise ConfigError("spec.budget.cooldown", f"must be in [0, 1]; got {b.cooldown}")
    if b.kind == "target" and (b.metric is None or b.target is None):
        raise ConfigError(
            "spec.budget.metric" if b.metric is None else "spec.budget.target",
            "a target budget names a metric and the value to reach "
            "(metric: shapes/placed, target: 0.5 or target: baseline)",
        )
    if b.calibration_steps < 1:
        raise ConfigError("spec.budget.calibration_steps", f"must be >= 1; got {b.calibration_steps}")
    if not e.points or any(not 0 < f <= 1 for f in e.points):
        raise ConfigError("spec.evaluation.points", f"must be fractions of the budget in (0, 1]; got {e.points}")
    if not e.guidance:
        raise ConfigError("spec.evaluation.guidance", "needs at least one guidance scale")
    if not spec.seeds or len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError("spec.seeds", f"must be distinct seeds (or a count); got {spec.seeds}")
    if Path(spec.out).exists() and not Path(spec.out).is_dir():
        raise ConfigError("spec.out", f"{spec.out} is a file; the ablation's folder must be a new or existing folder")
    if spec.baseline not in spec.variants:
        raise ConfigError("spec.baseline", f"{spec.baseline!r} is not one of the variants ({', '.join(spec.variants)})")
    _check_launch(spec.launch)
    if spec.launch.executor == "slurm" and b.kind == "minutes":
        raise ConfigError(
            "spec.budget.kind",
            "minutes times the steps on the machine that plans, and Slurm trains the runs on other nodes: "
            "use images, flops or target (or executor here on the nodes themselves)",
        )
    for where, overrides in [
        ("spec.base.overrides", spec.base.overrides),
        *((f"spec.variants.{n}", o) for n, o in spec.variants.items()),
    ]:
        for item in overrides:
            key = override_key(item)
            if key in MANAGED or key.startswith("stages"):
                raise ConfigError(
                    f"{where}",
                    f"sets {key}, which the ablation decides for every run (from the "
                    f"budget, the seeds, the evaluation protocol or the run folder)",
                )


def _check_launch(launch: LaunchSpec) -> None:
    """launch.*: the executor and, for the Slurm ones, the jobs' shape."""
    s = launch.slurm
    for key, value in (("parallel", launch.parallel), ("nproc_per_node", launch.nproc_per_node)):
        if value < 1:
            raise ConfigError(f"spec.launch.{key}", f"must be >= 1; got {value}")
    if launch.executor not in EXECUTORS:
        raise ConfigError("spec.launch.executor", f"must be one of {', '.join(EXECUTORS)}; got {launch.executor!r}")
    if launch.executor == "here":
        if s != SlurmSpec():
            raise ConfigError("spec.launch.slurm", "is read only by launch.executor slurm or submitit-local")
        return
    if launch.parallel != 1:
        raise ConfigError(
            "spec.launch.parallel",
            f"is for launch.executor here; {launch.executor} starts one job per run and the scheduler runs them",
        )
    for key in ("nodes", "time_minutes"):
        if getattr(s, key) < 1:
            raise ConfigError(f"spec.launch.slurm.{key}", f"must be >= 1; got {getattr(s, key)}")
    if s.gpus_per_node < 0 or (s.cpus_per_task is not None and s.cpus_per_task < 1):
        key = "gpus_per_node" if s.gpus_per_node < 0 else "cpus_per_task"
        raise ConfigError(f"spec.launch.slurm.{key}", f"must be >= {0 if key == 'gpus_per_node' else 1}")
    if launch.executor == "submitit-local" and s.nodes != 1:
        raise ConfigError(
            "spec.launch.slurm.nodes", f"submitit-local runs its jobs on this machine: must be 1; got {s.nodes}"
        )
    if s.gpus_per_node and launch.nproc_per_node not in (1, s.gpus_per_node):
        raise ConfigError(
            "spec.launch.nproc_per_node",
            f"a job runs one rank per GPU (slurm.gpus_per_node: {s.gpus_per_node}); leave it out or make it equal",
        )


def ranks_per_node(launch: LaunchSpec) -> int:
    """A run's ranks on each of its nodes: one per GPU of a Slurm job, else launch.nproc_per_node."""
    if launch.executor != "here" and launch.slurm.gpus_per_node:
        return launch.slurm.gpus_per_node
    return launch.nproc_per_node


def world_size(launch: LaunchSpec) -> int:
    """A run's ranks in all: the global batch is split across them."""
    nodes = launch.slurm.nodes if launch.executor != "here" else 1
    return nodes * ranks_per_node(launch)


UNITS = {
    "images": "training images per run",
    "flops": "training FLOPs per run",
    "minutes": "minutes of training per run",
    "target": "the most training images a run may use",
}


def override_key(item: str) -> str:
    """The dotted key of a key=value override."""
    return item.split("=", 1)[0].strip()
