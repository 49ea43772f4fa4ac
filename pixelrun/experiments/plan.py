"""The plan of an ablation (pixelrun/experiments/ablate.py runs it): every (variant, seed) run's config
resolved and checked, its steps from the budget, before any work; written as OUT/ablation.json (what
the report reads), one resolved config per run and OUT/commands.sh (one command per run, for a
scheduler).

Budgets (`budget.kind`), each turned into a number of optimizer steps per variant:
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
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pixelrun.config import Config, ConfigError, batch_split, load_config, to_yaml
from pixelrun.experiments.spec import UNITS, BudgetSpec, EvaluationSpec, Spec, override_key, ranks_per_node, world_size
from pixelrun.infra import units
from pixelrun.infra.records import AblationBudget, AblationPlan, AblationProtocol, AblationRun
from pixelrun.model.import_diffusers import resolve as resolve_model_init


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


def layered_overrides(base: list[str], variant: list[str]) -> list[str]:
    """The base's overrides with the variant's after them, a variant's key replacing the base's: the
    base may turn a default off for every run (repa.weight=0) and one variant turn it back on. A key
    given twice within one list stays an error (load_config's)."""
    mine = {override_key(item) for item in variant}
    return [item for item in base if override_key(item) not in mine] + list(variant)


def variant_config(spec: Spec, name: str, extra: Sequence[str] = ()) -> Config:
    """The base config with the variant's overrides (and `extra`), validated; an error names the variant."""
    try:
        cfg = load_config(_base_path(spec), [*layered_overrides(spec.base.overrides, spec.variants[name]), *extra])
        cfg, _ = resolve_model_init(cfg)  # model.init: its architecture, so the FLOPs budgets count it
    except ConfigError as e:
        raise ConfigError(f"spec.variants.{name}: {e.key}", str(e).split(": ", 1)[1]) from None
    if cfg.stages:
        raise ConfigError(f"spec.variants.{name}", "an ablation compares single-stage runs; this config has stages")
    return cfg


def _protocol_overrides(spec: Spec, sample_steps: int | None = None) -> list[str]:
    e = spec.evaluation
    return [
        f"eval.metrics={json.dumps(e.metrics)}",
        f"eval.prompts={e.prompts}",
        f"sample.steps={sample_steps or e.sample_steps}",
        f"sample.guidance={e.guidance[0]}",
        f"eval.guidance={json.dumps(e.guidance[1:])}",
        f"sample.guidance_mode={e.guidance_mode}",
        f"eval.weights={e.weights}",
        f"eval.val_images={e.val_images}",
        "eval.every=0",
    ]


def equal_nfe_steps(cfg: Config, euler_steps: int) -> int:
    """The steps at which `cfg`'s sampler makes no more model evaluations per image than Euler at
    `euler_steps` with the same guidance (the most such steps, at least 1): samplers compared at equal
    cost, as Karras et al. (2022) compare them. Euler: `euler_steps` itself."""
    from pixelrun.diffusion.sampling import model_evaluations

    s = cfg.sample
    if s.sampler == "euler":
        return euler_steps

    def nfe(steps: int, sampler: str) -> int:
        interval = tuple(s.guidance_interval) if s.guidance_interval else None
        return model_evaluations(
            steps,
            sampler=sampler,
            guidance=s.guidance,
            guidance_mode=s.guidance_mode,
            guidance_interval=interval,  # type: ignore[arg-type]
            shift=s.shift,
            spacing=s.spacing,
        )

    budget = nfe(euler_steps, "euler")
    steps = 1
    while steps < euler_steps and nfe(steps + 1, s.sampler) <= budget:
        steps += 1
    return steps


def point_steps(steps: int, fractions: list[float]) -> list[int]:
    """The step of each budget fraction (at least 1, at most `steps`), sorted, without repeats."""
    return sorted({min(steps, max(1, round(f * steps))) for f in fractions})


def flops_per_image(cfg: Config, text_dim: int, global_batch: int | None = None) -> float:
    """Training FLOPs of one image, the tricks' networks and extra EMAs included (pixelrun/training/flops.py)."""
    from pixelrun.training.flops import flops_per_image as count

    return count(cfg, text_dim, global_batch)


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
        assert step_seconds is not None, "a minutes budget is spent in calibrated steps"
        steps = budget.value * 60 / step_seconds
    return max(1, math.floor(steps + 1e-9))


def plan_ablation(spec: Spec, *, say=print) -> Plan:
    """Every run's config resolved and validated, and its steps from the budget, before any training.
    Raises ConfigError (naming the SPEC key or the variant and config key) on anything wrong."""
    from pixelrun.model.text import text_encoder

    out = Path(spec.out)
    nproc = world_size(spec.launch)  # the global batch is split across every rank of a run
    protocol = _protocol_overrides(spec)
    dims: dict[str, int] = {}
    per_variant = {}
    for name in spec.variants:
        cfg = variant_config(spec, name, protocol)
        steps = equal_nfe_steps(cfg, spec.evaluation.sample_steps)
        own = _protocol_overrides(spec, steps)  # the protocol with this variant's sampling steps
        if steps != spec.evaluation.sample_steps:
            cfg = variant_config(spec, name, own)
        try:
            global_batch = batch_split(cfg, nproc)[0]
        except ConfigError as e:
            raise ConfigError(f"spec.variants.{name}: {e.key}", str(e).split(": ", 1)[1]) from None
        if cfg.text.encoder not in dims:
            dims[cfg.text.encoder] = text_encoder(cfg, "cpu").dim
        dim = dims[cfg.text.encoder]
        fpi = flops_per_image(cfg, dim, global_batch)
        step_s = None
        if spec.budget.kind == "minutes":
            say(f"calibrating {name}: {spec.budget.calibration_steps} timed steps")
            step_s = calibrate_step_seconds(cfg, dim, spec.budget.calibration_steps)
        per_variant[name] = (global_batch, fpi, step_s, own)
    runs, configs = [], {}
    fractions = spec.evaluation.points
    if spec.budget.kind == "target" and fractions == EvaluationSpec().points:
        fractions = [i / 10 for i in range(1, 11)]  # when a target is reached is only known as finely as this
    for name, (global_batch, fpi, step_s, protocol) in per_variant.items():
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
                f"schedule.cooldown={spec.budget.cooldown}",
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


def train_command(plan: Plan, r: PlannedRun, python: str | None = None) -> list[str]:
    """The command that trains one run (rerun it to resume). With `python` (this machine's
    interpreter, what `execute` starts): a plain process for one rank, torch.distributed.run for more.
    Without (commands.sh and ablation.json, for a scheduler): torchrun, whatever the ranks."""
    n = ranks_per_node(plan.spec.launch)
    train = train_args(plan, r)
    if python is None:
        return ["torchrun", "--standalone", f"--nproc_per_node={n}", *train]
    if n == 1:
        return [python, *train]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *train]


def train_args(plan: Plan, r: PlannedRun) -> list[str]:
    """What every launcher of one run runs: `pixelrun train` on its resolved config."""
    return ["-m", "pixelrun", "train", "--config", str(plan.out / r.config_path)]


def write_plan(plan: Plan) -> Path:
    """OUT/ablation.json (what the report reads), each run's resolved config, and OUT/commands.sh
    with one line per run for a scheduler (a Slurm array, one k8s job each)."""
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
    lines += [" ".join(shlex.quote(a) for a in train_command(plan, r)) for r in plan.runs]
    (out / "commands.sh").write_text("\n".join(lines) + "\n")
    return ablation_record(plan).write(out / "ablation.json")


def ablation_record(plan: Plan) -> AblationPlan:
    """ablation.json's record: the SPEC as planned, the protocol, the machine and every run."""
    spec = plan.spec
    e = spec.evaluation
    return AblationPlan(
        name=spec.name,
        spec_file=str(spec.path) if spec.path else None,
        baseline=spec.baseline,
        variants=list(spec.variants),
        seeds=spec.seeds,
        budget=AblationBudget(
            kind=spec.budget.kind,
            value=spec.budget.value,
            metric=spec.budget.metric,
            target=spec.budget.target,
            equal_steps=plan.equal_steps,
            cooldown=spec.budget.cooldown,
        ),
        points=e.points,
        protocol=AblationProtocol(
            metrics=e.metrics,
            prompts=e.prompts,
            sample_steps=e.sample_steps,
            guidance=e.guidance,
            primary_guidance=e.guidance[0],
            guidance_mode=e.guidance_mode,
            weights=e.weights,
            val_images=e.val_images,
            spacing=plan.configs[(plan.runs[0].variant, plan.runs[0].seed)].sample.spacing,
            sample_seed="the run's seed",
        ),
        base={"config": spec.base.config, "overrides": spec.base.overrides},
        machine=plan.machine,
        runs=[
            AblationRun(
                variant=r.variant,
                seed=r.seed,
                dir=r.dir,
                steps=r.steps,
                global_batch=r.global_batch,
                images=r.images,
                flops_per_image=r.flops_per_image,
                point_steps=r.point_steps,
                overrides=r.overrides,
                config=r.config_path,
                step_seconds_calibrated=r.step_seconds,
                command=" ".join(shlex.quote(a) for a in train_command(plan, r)),
            )
            for r in plan.runs
        ],
    )


def describe_plan(plan: Plan) -> list[str]:
    b = plan.spec.budget
    lines = [
        f"ablation {plan.spec.name}: {len(plan.spec.variants)} variants x {len(plan.spec.seeds)} seeds, "
        f"budget {b.value:g} {UNITS[b.kind]}"
        + (" (equal steps: the variants' batches are equal)" if plan.equal_steps else "")
        + f", into {plan.out}"
    ]
    for name in plan.spec.variants:
        r = next(r for r in plan.runs if r.variant == name)
        sample = plan.configs[(r.variant, r.seed)].sample
        lines.append(
            f"  {name}: {r.steps} steps x {r.global_batch} images, {units.flop(r.flops_per_image)} per "
            f"image, evaluated at steps {r.point_steps}"
            + (
                f", sampled by {sample.sampler} in {sample.steps} steps (Euler's NFE)"
                if sample.sampler != "euler"
                else ""
            )
            + (" (baseline)" if name == plan.spec.baseline else "")
        )
    if plan.spec.evaluation.weights == "ema":
        lines += ema_warnings(plan)
    return lines


def ema_half_life(decay: float, every: int) -> float:
    """Optimizer steps after which an EMA gives the weights of that moment half its sum: each update
    keeps `decay` of the average, so half is left after ln(1/2) / ln(decay) updates, one per `every`."""
    return math.inf if decay >= 1 else 0.0 if decay <= 0 else every * math.log(0.5) / math.log(decay)


def ema_warnings(plan: Plan, half_lives: float = 3.0) -> list[str]:
    """A line per variant whose runs are shorter than a few half-lives of the EMA they are evaluated
    with: such an EMA still holds much of the initial weights, and every variant scores alike. None
    where the study scores the raw weights (only its val_ema/ loss reads the EMA; the report marks it)."""
    out: list[str] = []
    if plan.spec.evaluation.weights != "ema":
        return out
    for name in plan.spec.variants:
        r = next(r for r in plan.runs if r.variant == name)
        ema = plan.configs[(name, r.seed)].ema
        life = ema_half_life(ema.decay, ema.every)
        if r.steps < half_lives * life:
            out.append(
                f"warning: {name}: {r.steps} steps are under {half_lives:g} half-lives of its EMA ({life:.0f} steps "
                f"at ema.decay={ema.decay:g}, every {ema.every}): the EMA weights evaluated still hold "
                f"{100 * 0.5 ** (r.steps / life):.0f}% of the initial ones; lower ema.decay, raise the budget, or "
                f"evaluate the raw weights (evaluation.weights: raw)"
            )
    return out


#: The largest step `ablate plan` times for its estimate (about 10-20 s on 2 CPU cores); a study of a
#: larger model is planned where it cannot train, and timing it would load its networks for nothing.
MEASURE_LIMIT_FLOP = 1e12


def wall_estimate(plan: Plan, *, measure: bool = True, say=print) -> str:
    """The training time of the study's runs one after another: each run's FLOPs (FLOPs per image x
    images) divided by a FLOP/s of this machine, the first known of: each variant's calibrated step
    time (minutes budgets), the FLOP/s its runs already done in OUT recorded (run-summary.json), or
    the baseline's median step time measured here now (`measure`: budget.calibration_steps steps)."""
    rates = {r.variant: r.flops_per_image * r.global_batch / r.step_seconds for r in plan.runs if r.step_seconds}
    how = "each variant's FLOP/s from its calibrated step time"
    if not rates:
        rates = recorded_rates(plan)
        how = f"the FLOP/s recorded by the runs already done ({', '.join(rates)}; the mean for the others)"
    if not rates and not measure:
        return "estimated wall time: unknown (no step time calibrated or recorded)"
    if not rates:
        from pixelrun.model.text import text_encoder

        b = next(r for r in plan.runs if r.variant == plan.spec.baseline)
        cfg, n = plan.configs[(b.variant, b.seed)], plan.spec.budget.calibration_steps
        if b.flops_per_image * b.global_batch > MEASURE_LIMIT_FLOP:  # a GPU study planned on a login node
            return (
                f"estimated wall time: unknown here (one step of {b.variant} is {units.flop(b.flops_per_image * b.global_batch)}, "
                f"too costly to time on this machine); `pixelrun bench` on the machine that will train gives its step time"
            )
        say(f"timing {b.variant}: {n} steps, for the estimate of the wall time")
        step = calibrate_step_seconds(cfg, text_encoder(cfg, "cpu").dim, n)
        rates = {b.variant: b.flops_per_image * b.global_batch / step}
        how = (
            f"{b.variant}'s {units.flop(rates[b.variant])}/s, measured here now: its median step of {n} "
            f"({units.duration(step)} for {units.count(b.global_batch)} images){_load_note()}"
        )
    return estimate_line(plan, rates, how)


def _load_note() -> str:
    """A measurement taken on a machine busier than its CPUs is slower than the runs may be."""
    try:
        load, cpus = os.getloadavg()[0], len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return ""
    return f", with the 1-minute load at {units.number(load)} on {cpus} CPUs: a shared machine" if load > cpus else ""


def estimate_line(plan: Plan, rates: dict[str, float], how: str) -> str:
    """The sentence of `wall_estimate` from FLOP/s by variant (a variant without one: their mean)."""
    fallback = sum(rates.values()) / len(rates)
    flops = sum(r.flops_per_image * r.images for r in plan.runs)
    seconds = sum(r.flops_per_image * r.images / rates.get(r.variant, fallback) for r in plan.runs)
    parallel = plan.spec.launch.parallel
    return (
        f"estimated wall time: {units.duration(seconds)} of training steps for the {len(plan.runs)} runs one "
        f"after another ({units.flop(flops)} in all, divided by {how}); evaluations, sample grids and "
        f"checkpoints come on top"
        + (
            f"; launch.parallel={parallel} shares this machine between {parallel} runs at a time"
            if parallel > 1
            else ""
        )
    )


def recorded_rates(plan: Plan) -> dict[str, float]:
    """The FLOP/s each variant reached in a run already done in OUT (its run-summary.json)."""
    from pixelrun.infra.records import RecordError, RunSummary

    rates: dict[str, float] = {}
    for r in plan.runs:
        path = plan.out / r.dir / "run-summary.json"
        if r.variant in rates or not path.is_file():
            continue
        try:
            s = RunSummary.read(path)
        except RecordError:
            continue  # a damaged record says nothing of speed; the report names it
        if s.images_per_s > 0:
            rates[r.variant] = s.flops_per_image * s.images_per_s
    return rates
