"""`pixelrun ablate plan` warns when its runs are too short for the EMA they are evaluated with
(issue 30: a 50-step study scored 0 on every metric for every variant, its EMA at decay 0.995 still
mostly its initialisation, and nothing said so)."""

from __future__ import annotations

import math

import pytest
from test_ablate import TOY, TOY_EVAL, write_spec

from pixelrun.cli import main
from pixelrun.experiments.plan import ema_half_life
from pixelrun.infra import units


def test_half_life_by_hand():
    # 0.995 ** n = 1/2  <=>  n = ln 2 / -ln 0.995 = 0.693147 / 0.0050125 = 138.2826
    assert ema_half_life(0.995, 1) == pytest.approx(138.2826, abs=1e-4)
    assert ema_half_life(0.999, 10) == pytest.approx(10 * math.log(2) / -math.log(0.999))  # ~6,928 steps
    assert 0.995 ** ema_half_life(0.995, 1) == pytest.approx(0.5)
    assert ema_half_life(0.0, 1) == 0.0 and ema_half_life(1.0, 1) == math.inf


def test_plan_warns_of_a_run_shorter_than_three_half_lives(tmp_path, capsys, monkeypatch):
    from pixelrun.experiments import plan as plan_module

    monkeypatch.setattr(plan_module, "calibrate_step_seconds", lambda *a: 0.5)  # the wall time's step: not timed here
    spec = write_spec(tmp_path, budget={"kind": "images", "value": 200})  # 50 steps of 4 images
    assert main(["ablate", "plan", str(spec)]) == 0
    out = capsys.readouterr().err  # the plan is said on stderr
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2  # both variants
    assert warnings[0].startswith(
        "warning: baseline: 50 steps are under 3 half-lives of its EMA (138 steps at ema.decay=0.995, every 1): "
        "the EMA weights evaluated still hold 78% of the initial ones"  # 0.5 ** (50 / 138.28) = 0.778
    )
    raw = write_spec(tmp_path, budget={"kind": "images", "value": 200}, evaluation={**TOY_EVAL, "weights": "raw"})
    assert main(["ablate", "plan", str(raw)]) == 0  # the scores are the raw weights': no advice to give
    assert "warning:" not in capsys.readouterr().err
    fast = write_spec(tmp_path, budget={"kind": "images", "value": 200}, base={"overrides": [*TOY, "ema.decay=0.9"]})
    assert main(["ablate", "plan", str(fast)]) == 0  # half-life 6.6 steps: nothing to say
    assert "warning:" not in capsys.readouterr().err


def test_plan_estimates_the_wall_time_from_the_flops_and_a_measured_step(tmp_path, capsys, monkeypatch):
    """The baseline's step timed here (stood in for by 0.5 s, so the test does not depend on the
    machine) gives this machine's FLOP/s; each run's time is its FLOPs divided by it: by hand,
    sum over runs of steps x batch x FLOPs per image / (baseline's FLOPs per image x batch / 0.5 s)."""
    from pixelrun.experiments import plan as plan_module
    from pixelrun.experiments.spec import load_spec

    timed = []
    monkeypatch.setattr(plan_module, "calibrate_step_seconds", lambda cfg, dim, steps: timed.append(steps) or 0.5)
    spec = write_spec(tmp_path, budget={"kind": "images", "value": 200})
    plan = plan_module.plan_ablation(load_spec(spec), say=lambda line: None)
    base = next(r for r in plan.runs if r.variant == "baseline").flops_per_image
    seconds = sum(r.steps * r.global_batch * r.flops_per_image / (base * 4 / 0.5) for r in plan.runs)
    deeper = next(r for r in plan.runs if r.variant == "deeper").flops_per_image
    assert seconds == pytest.approx(2 * 50 * 0.5 + 2 * 50 * 0.5 * deeper / base)
    line = plan_module.wall_estimate(plan, say=lambda line: None)
    assert timed == [3]  # budget.calibration_steps
    assert line.startswith(f"estimated wall time: {units.duration(seconds)} of training steps for the 4 runs one ")
    assert (
        f"baseline's {units.flop(base * 4 / 0.5)}/s, measured here now: its median step of 3 (0.5 s for 4 images)"
        in line
    )
    assert "evaluations, sample grids and checkpoints come on top" in line
    assert main(["ablate", "plan", str(spec)]) == 0
    assert line in capsys.readouterr().err


def test_a_recorded_throughput_is_used_before_measuring(tmp_path, monkeypatch):
    """A run already done in OUT recorded its images/s: the estimate divides by that FLOP/s (the
    variant without a record takes the mean of the recorded) and times nothing."""
    import json

    from pixelrun.experiments import plan as plan_module
    from pixelrun.experiments.spec import load_spec

    monkeypatch.setattr(plan_module, "calibrate_step_seconds", lambda *a: pytest.fail("measured despite a record"))
    plan = plan_module.plan_ablation(load_spec(write_spec(tmp_path)), say=lambda line: None)
    r = plan.runs[0]
    (plan.out / r.dir).mkdir(parents=True)
    summary = {"status": "done", "steps": r.steps, "images": r.images, "flops": r.images * 2e9, "flops_per_image": 2e9}
    summary |= {"train_seconds": 1.0, "images_per_s": 8.0, "step_seconds": 0.5, "peak_memory_bytes": 1}
    (plan.out / r.dir / "run-summary.json").write_text(json.dumps(summary | {"device": "cpu", "world_size": 1}))
    line = plan_module.wall_estimate(plan)
    seconds = sum(x.flops_per_image * x.images / 16e9 for x in plan.runs)  # 2 GFLOP x 8 images/s
    assert line.startswith(f"estimated wall time: {units.duration(seconds)} ")
    assert "the FLOP/s recorded by the runs already done (baseline; the mean for the others)" in line


def test_a_step_too_costly_to_time_here_is_not_timed(tmp_path, monkeypatch):
    """A study of a large model planned on a small machine: its step is not run (it would load the
    networks and take minutes or the memory); the line says why and what gives the step time."""
    from pixelrun.experiments import plan as plan_module
    from pixelrun.experiments.spec import load_spec

    monkeypatch.setattr(plan_module, "calibrate_step_seconds", lambda *a: pytest.fail("timed a step past the limit"))
    plan = plan_module.plan_ablation(load_spec(write_spec(tmp_path)), say=lambda line: None)
    base = next(r for r in plan.runs if r.variant == "baseline")
    monkeypatch.setattr(plan_module, "MEASURE_LIMIT_FLOP", base.flops_per_image * base.global_batch * 0.99)
    line = plan_module.wall_estimate(plan, say=lambda line: None)
    step = units.flop(base.flops_per_image * base.global_batch)
    assert line.startswith(f"estimated wall time: unknown here (one step of baseline is {step}, too costly")
    assert "`pixelrun bench` on the machine that will train" in line
