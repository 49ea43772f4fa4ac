"""`pixelrun ablate SPEC.yaml`: named variants of one base config, each trained with the same seeds at
an equal budget, evaluated at the same budget points with one frozen protocol, and compared in one
report built from the run folders alone.

    SPEC -> plan (every config resolved and checked, steps from the budget) -> OUT/ablation.json
         -> one `pixelrun train` per (variant, seed), each in OUT/runs/<variant>/seed<s>/
         -> OUT/report.md, report.html, summary.csv / .json, curves (pixelrun/experiments/report.py)

Pairing: the runs of seed s share `seed` (data order, initial weights, training noise) and
`sample.seed` (the noise of every evaluation image), and all runs share the evaluation prompts, so
variant - baseline differences at the same seed and prompt are paired.

Budgets (`budget.kind`), each turned into a number of optimizer steps per variant before any work:
- `images`: value / global batch; equal steps when the variants' batches are equal.
- `flops`: value / (FLOPs per image x global batch); the FLOPs of an image are the denoiser's
  analytic count (pixelrun/model/flops.py) plus what the teachers and the REPA projector add, counted by
  torch's FlopCounterMode on a one-image step; a costlier variant gets fewer steps.
- `minutes`: value x 60 / step time, the step time measured by `pixelrun bench` on this machine
  before the runs (machine-specific: the report names the machine).
- `target`: trains up to `value` images, evaluates at `evaluation.points`, and the report gives the
  images and time at which each run first reached `budget.target` on `budget.metric`.
The learning rate ends in a linear cooldown over the last `budget.cooldown` of each run's steps
(warmup-stable-decay; default 0.2), so each run is compared at the end of its own decay.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pixelrun.config import Config, ConfigError, batch_split, load_config, to_yaml
from pixelrun.config.derived import _flat
from pixelrun.config.schema import _build

# ----------------------------------------------------------------------------- the SPEC


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
    target: float | None = None  # target: the value to reach
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
class LaunchSpec:
    parallel: int = 1  # runs at a time on this machine (each gets cores / parallel threads)
    nproc_per_node: int = 1  # ranks per run: 1 = a plain process, more = torchrun --standalone


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
# What the ablation decides for every run: a variant or the base may not set these.
MANAGED = (
    "run.dir",
    "run.resume",
    "run.init_from",
    "seed",
    "sample.seed",
    "train.steps",
    "train.cooldown",
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
        data = yaml.safe_load(p.read_text())
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
    spec = _build(Spec, data, "spec.")
    spec.path = p
    spec.variants = _variants(variants)
    spec.name = spec.name or p.stem
    spec.out = spec.out or str(Path("runs") / "ablations" / spec.name)
    spec.baseline = spec.baseline or next(iter(spec.variants))
    _check_spec(spec)
    return spec


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
        raise ConfigError("spec.budget.value", f"must be a positive number ({_UNITS[b.kind]}); got {b.value}")
    if not 0 <= b.cooldown <= 1:
        raise ConfigError("spec.budget.cooldown", f"must be in [0, 1]; got {b.cooldown}")
    if b.kind == "target" and (b.metric is None or b.target is None):
        raise ConfigError(
            "spec.budget.metric" if b.metric is None else "spec.budget.target",
            "a target budget names a metric and the value to reach (metric: shapes/placed, target: 0.5)",
        )
    if b.calibration_steps < 1:
        raise ConfigError("spec.budget.calibration_steps", f"must be >= 1; got {b.calibration_steps}")
    if not e.points or any(not 0 < f <= 1 for f in e.points):
        raise ConfigError("spec.evaluation.points", f"must be fractions of the budget in (0, 1]; got {e.points}")
    if not e.guidance:
        raise ConfigError("spec.evaluation.guidance", "needs at least one guidance scale")
    if not spec.seeds or len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError("spec.seeds", f"must be distinct seeds (or a count); got {spec.seeds}")
    if spec.baseline not in spec.variants:
        raise ConfigError("spec.baseline", f"{spec.baseline!r} is not one of the variants ({', '.join(spec.variants)})")
    if spec.launch.parallel < 1 or spec.launch.nproc_per_node < 1:
        raise ConfigError(
            "spec.launch.parallel" if spec.launch.parallel < 1 else "spec.launch.nproc_per_node", "must be >= 1"
        )
    for where, overrides in [
        ("spec.base.overrides", spec.base.overrides),
        *((f"spec.variants.{n}", o) for n, o in spec.variants.items()),
    ]:
        for item in overrides:
            key = _key(item)
            if key in MANAGED or key.startswith("stages"):
                raise ConfigError(
                    f"{where}",
                    f"sets {key}, which the ablation decides for every run (from the "
                    f"budget, the seeds, the evaluation protocol or the run folder)",
                )


_UNITS = {
    "images": "training images per run",
    "flops": "training FLOPs per run",
    "minutes": "minutes of training per run",
    "target": "the most training images a run may use",
}

# ----------------------------------------------------------------------------- the plan


@dataclass
class PlannedRun:
    variant: str
    seed: int
    dir: str  # relative to OUT
    steps: int
    global_batch: int
    flops_per_image: float
    point_steps: list[int]
    overrides: list[str]  # the variant's own
    config_path: str  # relative to OUT: the resolved config this run trains with
    step_seconds: float | None = None  # minutes budgets: the calibrated step time

    @property
    def images(self) -> int:
        return self.steps * self.global_batch


@dataclass
class Plan:
    spec: Spec
    out: Path
    runs: list[PlannedRun]
    configs: dict[tuple[str, int], Config]
    equal_steps: bool
    machine: dict


def _base_path(spec: Spec) -> str | None:
    if spec.base.config is None:
        return None
    p = Path(spec.base.config)
    if not p.is_absolute() and not p.exists() and spec.path is not None and (spec.path.parent / p).exists():
        p = spec.path.parent / p
    return str(p)


def _key(item: str) -> str:
    return item.split("=", 1)[0].strip()


def layered_overrides(base: list[str], variant: list[str]) -> list[str]:
    """The base's overrides with the variant's after them, a variant's key replacing the base's: the
    base may turn a default off for every run (repa.weight=0) and one variant turn it back on. A key
    given twice within one list stays an error (load_config's)."""
    mine = {_key(item) for item in variant}
    return [item for item in base if _key(item) not in mine] + list(variant)


def variant_config(spec: Spec, name: str, extra: list[str] = ()) -> Config:
    """The base config with the variant's overrides (and `extra`), validated; an error names the variant."""
    try:
        cfg = load_config(_base_path(spec), [*layered_overrides(spec.base.overrides, spec.variants[name]), *extra])
    except ConfigError as e:
        raise ConfigError(f"spec.variants.{name}: {e.key}", str(e).split(": ", 1)[1]) from None
    if cfg.stages:
        raise ConfigError(f"spec.variants.{name}", "an ablation compares single-stage runs; this config has stages")
    return cfg


def _protocol_overrides(spec: Spec) -> list[str]:
    e = spec.evaluation
    return [
        f"eval.metrics={json.dumps(e.metrics)}",
        f"eval.prompts={e.prompts}",
        f"sample.steps={e.sample_steps}",
        f"sample.guidance={e.guidance[0]}",
        f"eval.guidance={json.dumps(e.guidance[1:])}",
        f"sample.guidance_mode={e.guidance_mode}",
        f"eval.weights={e.weights}",
        f"eval.val_images={e.val_images}",
        "eval.every=0",
    ]


def point_steps(steps: int, fractions: list[float]) -> list[int]:
    """The step of each budget fraction (at least 1, at most `steps`), sorted, without repeats."""
    return sorted({min(steps, max(1, round(f * steps))) for f in fractions})


def flops_per_image(cfg: Config, text_dim: int) -> float:
    """Training FLOPs of one image, the tricks' networks included (pixelrun/training/flops.py)."""
    from pixelrun.training.flops import flops_per_image as count

    return count(cfg, text_dim)


def calibrate_step_seconds(cfg: Config, text_dim: int, steps: int) -> float:
    """The median time of a training step of this config on this machine (`pixelrun bench`)."""
    from pixelrun.tools.bench import time_steps

    return float(
        time_steps(cfg, text_dim=text_dim, steps=steps, warmup=1, text_tokens=cfg.text.max_tokens, count_flops=False)[
            "step_seconds_median"
        ]
    )


def steps_for_budget(budget: BudgetSpec, global_batch: int, flops_per_img: float, step_seconds: float | None) -> int:
    """Optimizer steps that spend the budget (at least one)."""
    if budget.kind in ("images", "target"):
        steps = budget.value / global_batch
    elif budget.kind == "flops":
        steps = budget.value / (flops_per_img * global_batch)
    else:
        steps = budget.value * 60 / step_seconds
    return max(1, math.floor(steps + 1e-9))


def plan_ablation(spec: Spec, *, say=print) -> Plan:
    """Every run's config resolved and validated, and its steps from the budget, before any training.
    Raises ConfigError (naming the SPEC key or the variant and config key) on anything wrong."""
    from pixelrun.model.text import text_encoder

    out = Path(spec.out)
    nproc = spec.launch.nproc_per_node
    protocol = _protocol_overrides(spec)
    dims: dict[str, int] = {}
    per_variant = {}
    for name in spec.variants:
        cfg = variant_config(spec, name, protocol)
        try:
            global_batch = batch_split(cfg, nproc)[0]
        except ConfigError as e:
            raise ConfigError(f"spec.variants.{name}: {e.key}", str(e).split(": ", 1)[1]) from None
        if cfg.text.encoder not in dims:
            dims[cfg.text.encoder] = text_encoder(cfg, "cpu").dim
        dim = dims[cfg.text.encoder]
        fpi = flops_per_image(cfg, dim)
        step_s = None
        if spec.budget.kind == "minutes":
            say(f"calibrating {name}: {spec.budget.calibration_steps} timed steps")
            step_s = calibrate_step_seconds(cfg, dim, spec.budget.calibration_steps)
        per_variant[name] = (global_batch, fpi, step_s)
    runs, configs = [], {}
    fractions = spec.evaluation.points
    if spec.budget.kind == "target" and fractions == EvaluationSpec().points:
        fractions = [i / 10 for i in range(1, 11)]  # when a target is reached is only known as finely as this
    for name, (global_batch, fpi, step_s) in per_variant.items():
        steps = steps_for_budget(spec.budget, global_batch, fpi, step_s)
        points = point_steps(steps, fractions)
        for seed in spec.seeds:
            rel = f"runs/{name}/seed{seed}"
            managed = [
                f"run.dir={json.dumps(str(out / rel))}",
                "run.resume=true",
                f"seed={seed}",
                f"sample.seed={seed}",
                f"train.steps={steps}",
                f"train.cooldown={spec.budget.cooldown}",
                f"eval.at_steps={json.dumps(points[:-1])}",
                f"log.flops_per_image={fpi}",
            ]
            configs[(name, seed)] = variant_config(spec, name, [*protocol, *managed])
            runs.append(
                PlannedRun(
                    name,
                    seed,
                    rel,
                    steps,
                    global_batch,
                    fpi,
                    points,
                    spec.variants[name],
                    f"configs/{name}-seed{seed}.yaml",
                    step_s,
                )
            )
    dirs = [r.dir for r in runs]
    if len(set(dirs)) != len(dirs):  # unreachable with the name rules above; kept as the invariant it is
        raise ConfigError("spec.variants", "two runs would share one run folder")
    batches = {r.global_batch for r in runs}
    return Plan(
        spec,
        out,
        runs,
        configs,
        equal_steps=len(batches) == 1 and spec.budget.kind in ("images", "target"),
        machine=_machine(),
    )


def _machine() -> dict:
    import platform
    import socket

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "host": socket.gethostname(),
    }


def run_command(plan: Plan, r: PlannedRun, python: str = "python") -> list[str]:
    """The command that trains one run (rerun it to resume): a plain process, or torchrun."""
    config = str(plan.out / r.config_path)
    n = plan.spec.launch.nproc_per_node
    if n > 1:
        return [
            python,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={n}",
            "-m",
            "pixelrun",
            "train",
            "--config",
            config,
        ]
    return [python, "-m", "pixelrun", "train", "--config", config]


def write_plan(plan: Plan) -> Path:
    """OUT/ablation.json (what the report reads), each run's resolved config, and OUT/commands.sh
    with one line per run for a scheduler (a Slurm array, one k8s job each)."""
    from pixelrun.run.train import write_json

    spec = plan.spec
    out = plan.out
    for r in plan.runs:
        path = out / r.config_path
        path.parent.mkdir(parents=True, exist_ok=True)
        text = to_yaml(plan.configs[(r.variant, r.seed)])
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    lines = [
        "#!/usr/bin/env bash",
        f"# {spec.name}: one line per run; each resumes when run again.",
        "# On a cluster replace --standalone by the scheduler's rendezvous (--nnodes, --rdzv-endpoint).",
        "set -e",
    ]
    lines += [" ".join(shlex.quote(a) for a in _torchrun(plan, r)) for r in plan.runs]
    (out / "commands.sh").write_text("\n".join(lines) + "\n")
    e = spec.evaluation
    data = {
        "name": spec.name,
        "spec_file": str(spec.path) if spec.path else None,
        "baseline": spec.baseline,
        "variants": list(spec.variants),
        "seeds": spec.seeds,
        "budget": {
            "kind": spec.budget.kind,
            "value": spec.budget.value,
            "metric": spec.budget.metric,
            "target": spec.budget.target,
            "equal_steps": plan.equal_steps,
            "cooldown": spec.budget.cooldown,
        },
        "points": e.points,
        "protocol": {
            "metrics": e.metrics,
            "prompts": e.prompts,
            "sample_steps": e.sample_steps,
            "guidance": e.guidance,
            "primary_guidance": e.guidance[0],
            "guidance_mode": e.guidance_mode,
            "weights": e.weights,
            "val_images": e.val_images,
            "spacing": plan.configs[(plan.runs[0].variant, plan.runs[0].seed)].sample.spacing,
            "sample_seed": "the run's seed",
        },
        "base": {"config": spec.base.config, "overrides": spec.base.overrides},
        "machine": plan.machine,
        "runs": [
            {
                "variant": r.variant,
                "seed": r.seed,
                "dir": r.dir,
                "steps": r.steps,
                "global_batch": r.global_batch,
                "images": r.images,
                "flops_per_image": r.flops_per_image,
                "point_steps": r.point_steps,
                "overrides": r.overrides,
                "config": r.config_path,
                "step_seconds_calibrated": r.step_seconds,
                "command": " ".join(shlex.quote(a) for a in _torchrun(plan, r)),
            }
            for r in plan.runs
        ],
    }
    return write_json(out / "ablation.json", data)


def _torchrun(plan: Plan, r: PlannedRun) -> list[str]:
    n = plan.spec.launch.nproc_per_node
    return [
        "torchrun",
        "--standalone",
        f"--nproc_per_node={n}",
        "-m",
        "pixelrun",
        "train",
        "--config",
        str(plan.out / r.config_path),
    ]


# ----------------------------------------------------------------------------- the runs


def run_state(plan: Plan, r: PlannedRun) -> dict:
    """Where a run stands, from its folder: done (its summary and final point at the planned step),
    the step it reached (from metrics.jsonl), or not started."""
    folder = plan.out / r.dir
    summary = folder / "run-summary.json"
    final = folder / "points" / f"step_{r.steps:08d}.json"
    if summary.exists() and final.exists():
        try:
            if json.loads(summary.read_text()).get("steps") == r.steps:
                return {"state": "done", "step": r.steps}
        except json.JSONDecodeError:
            pass
    step = _last_step(folder / "metrics.jsonl")
    return {"state": "started" if step else "not started", "step": step}


def _last_step(path: Path) -> int:
    if not path.exists():
        return 0
    last = 0
    for line in path.read_text().splitlines():
        try:
            last = max(last, int(json.loads(line).get("step", 0)))
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
            continue
    return last


def execute(plan: Plan, *, parallel: int | None = None) -> dict:
    """Train every run that is not done, `parallel` at a time, each in its own process (a crash stays
    in its run; the others go on). Ctrl-C or SIGTERM reaches every run, which saves and stops; the
    same command resumes them. Returns {"trained": [...], "skipped": [...], "failed": [...]}."""
    from tqdm import tqdm

    parallel = parallel or plan.spec.launch.parallel
    pending = [r for r in plan.runs if run_state(plan, r)["state"] != "done"]
    skipped = [r for r in plan.runs if r not in pending]
    for r in skipped:
        tqdm.write(f"{r.variant} seed {r.seed}: done, skipped", file=sys.stderr)
    logs = plan.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // (parallel * plan.spec.launch.nproc_per_node))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if parallel > 1:
        env.update(OMP_NUM_THREADS=str(threads))
    running: dict[subprocess.Popen, PlannedRun] = {}
    result = {"trained": [], "skipped": [(r.variant, r.seed) for r in skipped], "failed": []}
    total = sum(r.steps for r in plan.runs)
    queue = list(pending)
    interrupted = False

    def stop(signum, frame):
        nonlocal interrupted
        interrupted = True
        queue.clear()
        for proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # each run saves a checkpoint and exits

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with tqdm(
            total=total, desc=f"ablate {plan.spec.name}", unit="step", file=sys.stderr, dynamic_ncols=True
        ) as bar:
            while queue or running:
                while queue and len(running) < parallel:
                    r = queue.pop(0)
                    cmd = run_command(plan, r, sys.executable)
                    if parallel > 1:
                        cmd += [f"train.threads={threads}"]
                    log = open(logs / f"{r.variant}-seed{r.seed}.log", "ab")
                    tqdm.write(
                        f"{r.variant} seed {r.seed}: training {r.steps} steps -> {plan.out / r.dir} (log {log.name})",
                        file=sys.stderr,
                    )
                    running[
                        subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                    ] = r
                    log.close()
                time.sleep(0.5)
                bar.n = sum(min(run_state(plan, r)["step"], r.steps) for r in plan.runs)
                bar.refresh()
                for proc in [p for p in running if p.poll() is not None]:
                    r = running.pop(proc)
                    if proc.returncode == 0 and run_state(plan, r)["state"] == "done":
                        result["trained"].append((r.variant, r.seed))
                        tqdm.write(f"{r.variant} seed {r.seed}: done", file=sys.stderr)
                    elif not interrupted:
                        result["failed"].append((r.variant, r.seed))
                        tqdm.write(
                            f"{r.variant} seed {r.seed}: FAILED (exit {proc.returncode}); see "
                            f"{logs / f'{r.variant}-seed{r.seed}.log'}",
                            file=sys.stderr,
                        )
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    result["interrupted"] = interrupted
    return result


def status_lines(plan: Plan) -> list[str]:
    lines = [f"{'variant':<20}{'seed':>5}{'steps':>8}{'images':>10}  state"]
    for r in plan.runs:
        st = run_state(plan, r)
        where = "done" if st["state"] == "done" else (f"at step {st['step']}" if st["step"] else "not started")
        lines.append(f"{r.variant:<20}{r.seed:>5}{r.steps:>8}{r.images:>10}  {where}")
    return lines


def describe_plan(plan: Plan) -> list[str]:
    b = plan.spec.budget
    lines = [
        f"ablation {plan.spec.name}: {len(plan.spec.variants)} variants x {len(plan.spec.seeds)} seeds, "
        f"budget {b.value:g} {_UNITS[b.kind]}"
        + (" (equal steps: the variants' batches are equal)" if plan.equal_steps else "")
        + f", into {plan.out}"
    ]
    for name in plan.spec.variants:
        r = next(r for r in plan.runs if r.variant == name)
        lines.append(
            f"  {name}: {r.steps} steps x {r.global_batch} images, {r.flops_per_image / 1e9:.3g} GFLOP per "
            f"image, evaluated at steps {r.point_steps}" + (" (baseline)" if name == plan.spec.baseline else "")
        )
    return lines
