"""pixelrun ablate: the SPEC's checks, budgets turned into steps (checked by hand against
pixelrun/model/flops.py), the warmup-stable-decay schedule, a resume that applies a changed learning rate,
and a 2-variant x 2-seed ablation that is interrupted and resumed."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TOY, TOY_EVAL, toy_study_spec

from pixelrun.cli import main
from pixelrun.config import ConfigError, load_config, model_fields
from pixelrun.experiments.plan import plan_ablation, point_steps, steps_for_budget, variant_config
from pixelrun.experiments.spec import BudgetSpec, load_spec
from pixelrun.model.denoiser import ModelConfig
from pixelrun.model.flops import training_flops_per_image
from pixelrun.training.schedule import lr_multiplier


def write_spec(tmp_path: Path, **changes) -> Path:
    spec = {
        "name": "toy",
        "out": str(tmp_path / "out"),
        "base": {"overrides": TOY},
        "variants": {"baseline": [], "deeper": ["model.depth=6"]},
        "seeds": 2,
        "budget": {"kind": "images", "value": 16},
        "evaluation": TOY_EVAL,
        **changes,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# ----------------------------------------------------------------------------- the SPEC


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"budgt": {"kind": "images"}}, "spec.budgt"),
        ({"budget": {"kind": "epochs", "value": 1}}, "spec.budget.kind"),
        ({"budget": {"kind": "images", "value": 0}}, "spec.budget.value"),
        ({"budget": {"kind": "target", "value": 100}}, "spec.budget.metric"),
        ({"variants": {"baseline": [], "tread": ["routing.ratoi=0.5"]}}, "spec.variants.tread: routing.ratoi"),
        ({"variants": {"baseline": [], "mine": ["run.dir=elsewhere"]}}, "spec.variants.mine"),
        ({"variants": {"Tread": [], "tread": []}}, "spec.variants.Tread"),
        ({"variants": {"a/b": []}}, "spec.variants.a/b"),
        ({"seeds": [0, 0]}, "spec.seeds"),
        ({"baseline": "nope"}, "spec.baseline"),
    ],
)
def test_a_bad_spec_is_one_line_naming_the_key(tmp_path, capsys, changes, key):
    spec = write_spec(tmp_path, **changes)
    assert main(["ablate", "plan", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pixelrun: config error: {key}"), err
    assert not (tmp_path / "out").exists()  # nothing written


def test_overlay_variants_and_seed_count(tmp_path):
    spec = load_spec(
        write_spec(tmp_path, variants={"baseline": None, "wide": {"model": {"hidden_size": 128}}}, seeds=3)
    )
    assert spec.variants == {"baseline": [], "wide": ["model.hidden_size=128"]}
    assert spec.seeds == [0, 1, 2] and spec.baseline == "baseline"


# ----------------------------------------------------------------------------- budgets


def test_point_steps_and_image_budget():
    assert point_steps(10, [0.25, 0.5, 0.75, 1.0]) == [2, 5, 8, 10]  # round half to even: 2.5 -> 2, 7.5 -> 8
    assert point_steps(2, [0.1, 0.2, 1.0]) == [1, 2]
    assert steps_for_budget(BudgetSpec(kind="images", value=40000), 16, 1.0, None) == 2500
    assert steps_for_budget(BudgetSpec(kind="minutes", value=2), 16, 1.0, 0.25) == 480


def test_flops_budget_gives_a_costlier_variant_fewer_steps(tmp_path):
    """Each variant's steps are floor(budget / (FLOPs per image x batch)), the FLOPs counted by hand
    from the model's shape through pixelrun/model/flops.py; a deeper model gets proportionally fewer."""
    budget = 5e10
    spec = load_spec(write_spec(tmp_path, budget={"kind": "flops", "value": budget}))
    plan = plan_ablation(spec, say=lambda *a: None)
    by_variant = {r.variant: r for r in plan.runs if r.seed == 0}
    for name, depth in (("baseline", 4), ("deeper", 6)):
        cfg = plan.configs[(name, 0)]
        fields = model_fields(cfg)
        assert fields["depth"] == depth
        fpi = training_flops_per_image(ModelConfig(text_dim=384, **fields), 16, 16, cfg.text.max_tokens)[
            "training_total"
        ]
        assert by_variant[name].flops_per_image == fpi
        assert by_variant[name].steps == math.floor(budget / (fpi * 4))
    ratio = by_variant["deeper"].flops_per_image / by_variant["baseline"].flops_per_image
    assert ratio > 1.3 and by_variant["deeper"].steps < by_variant["baseline"].steps
    assert abs(by_variant["baseline"].steps / by_variant["deeper"].steps - ratio) < 0.1
    assert not plan.equal_steps


def test_a_variant_key_replaces_the_base_one_and_a_key_twice_in_a_list_is_refused(tmp_path):
    spec = load_spec(write_spec(tmp_path, variants={"baseline": [], "repa": {"repa": {"weight": 0.5}}}))
    assert [variant_config(spec, v).repa.weight for v in ("baseline", "repa")] == [0.0, 0.5]
    assert load_config(None, []).repa.weight == 0.5  # the default the base turns off
    twice = write_spec(tmp_path, variants={"baseline": [], "repa": ["repa.weight=0.5", "repa.weight=0.2"]})
    with pytest.raises(ConfigError, match="given twice") as e:
        plan_ablation(load_spec(twice), say=lambda *a: None)
    assert e.value.key == "spec.variants.repa: repa.weight"


def test_teacher_flops_are_counted(tmp_path):
    """REPA adds its teacher's forward and the projector's forward and backward to an image's cost."""
    spec = load_spec(
        write_spec(tmp_path, variants={"baseline": [], "repa": ["repa.weight=0.5", "repa.hidden=64"]}, seeds=1)
    )
    plan = plan_ablation(spec, say=lambda *a: None)
    base, repa = (r.flops_per_image for r in plan.runs)
    assert repa > base


def test_repa_stopped_early_costs_its_share_of_the_run(tmp_path):
    """REPA for the first quarter of the steps: an image costs the baseline plus a quarter of
    REPA's extra FLOPs, on average over the run."""
    variants = {
        "baseline": [],
        "repa": ["repa.weight=0.5", "repa.hidden=64"],
        "quarter": ["repa.weight=0.5", "repa.hidden=64", "repa.until=0.25"],
    }
    plan = plan_ablation(load_spec(write_spec(tmp_path, variants=variants, seeds=1)), say=lambda *a: None)
    cost = {r.variant: r.flops_per_image for r in plan.runs}
    base, repa, quarter = cost["baseline"], cost["repa"], cost["quarter"]
    assert quarter == pytest.approx(base + 0.25 * (repa - base), rel=1e-9)


# ----------------------------------------------------------------------------- the schedule


def test_lr_multiplier_warmup_stable_decay():
    # warm-up of 2 steps, 10 steps, the last 3 decaying: 3/3, 2/3, 1/3
    got = [lr_multiplier(s, 10, 2, 0.3) for s in range(10)]
    assert got == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1, 2 / 3, 1 / 3])
    assert [lr_multiplier(s, 10, 2, 0.0) for s in range(10)] == pytest.approx([0.5] + [1.0] * 9)


def test_resume_applies_a_changed_learning_rate(tmp_path, capsys):
    from pixelrun.config import load_config
    from pixelrun.run.train import train

    over = TOY + [
        f"run.dir={tmp_path / 'run'}",
        "train.steps=4",
        "eval.prompts=0",
        "eval.val_images=0",
        "schedule.cooldown=0.5",
    ]
    train(load_config(None, over), stop_at_step=2)
    summary = train(load_config(None, over + ["optimizer.lr=0.002"]))
    assert summary["step"] == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in rows if "lr" in r}
    # each row logs the rate its step ran with: warm-up over 1 step, the last 2 of 4 steps decaying (2/2, 1/2)
    assert lr[1] == pytest.approx(1e-3) and lr[2] == pytest.approx(1e-3)
    assert lr[3] == pytest.approx(2e-3) and lr[4] == pytest.approx(1e-3)
    printed = capsys.readouterr()
    assert "changed since the checkpoint: optimizer.lr: 0.001 -> 0.002" in printed.out + printed.err


# ----------------------------------------------------------------------------- a whole ablation


def _run(spec: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pixelrun", "ablate", str(spec)], capture_output=True, text=True, timeout=900
    )


def test_one_command_builder_for_a_scheduler_and_for_this_machine(tmp_path):
    """commands.sh and ablation.json get torchrun whatever the ranks; `execute` starts a plain process
    for one rank and torch.distributed.run (the same launcher) for more."""
    from pixelrun.experiments.plan import Plan, PlannedRun, train_command
    from pixelrun.experiments.spec import LaunchSpec, Spec

    v = "base"
    r = PlannedRun(v, 0, f"runs/{v}/seed0", 4, 4, 1e9, [2, 4], [], f"configs/{v}-seed0.yaml")
    train = ["-m", "pixelrun", "train", "--config", str(tmp_path / "configs" / f"{v}-seed0.yaml")]
    here = {1: ["py", *train], 2: ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *train]}
    for n, command in here.items():
        plan = Plan(Spec(launch=LaunchSpec(nproc_per_node=n)), tmp_path, [r], {}, True, {})
        assert train_command(plan, r, "py") == command
        assert train_command(plan, r) == ["torchrun", "--standalone", f"--nproc_per_node={n}", *train]


def test_ablation_runs_resumes_and_skips_finished_runs(tmp_path, toy_study, tiny_encoder_dir):
    """The study of tests/conftest.py's toy SPEC, run once for the session (`toy_study`), is checked;
    then a copy of it, one run cut back to its step-2 checkpoint, is run again."""
    out = tmp_path / "out"
    shutil.copytree(toy_study, out)
    spec = toy_study_spec(tmp_path, tiny_encoder_dir, name="out")
    plan = json.loads((out / "ablation.json").read_text())
    assert [(r["variant"], r["seed"], r["steps"]) for r in plan["runs"]] == [
        ("baseline", 0, 4),
        ("baseline", 1, 4),
        ("deeper", 0, 4),
        ("deeper", 1, 4),
    ]
    assert plan["budget"]["equal_steps"] is True
    for r in plan["runs"]:
        folder = out / r["dir"]
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        assert cfg["seed"] == r["seed"] and cfg["sample"]["seed"] == r["seed"] and cfg["schedule"]["cooldown"] == 0.2
        point = json.loads((folder / "points" / "step_00000004.json").read_text())
        assert [x["guidance"] for x in point["results"]] == [4.0, 1.0]
        assert len(point["results"][0]["per_prompt"]["shapes"]["placed"]) == 4
        assert point["images"] == 16 and point["flops"] == pytest.approx(16 * r["flops_per_image"])
    # Paired: the same seed gives both variants the same evaluation prompts and the same data.
    p0 = [json.loads((out / f"runs/{v}/seed0/points/step_00000002.json").read_text()) for v in ("baseline", "deeper")]
    assert p0[0]["prompts"] == p0[1]["prompts"]

    # An interrupted run: the deeper seed-1 run as if it had been stopped after its step-2 checkpoint.
    victim = out / "runs/deeper/seed1"
    uninterrupted = [json.loads(line) for line in (victim / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(victim / "checkpoints" / "step_00000004")
    for f in ("run-summary.json", "points/step_00000004.json"):
        (victim / f).unlink()
    finished = {
        r["dir"]: (out / r["dir"] / "run-summary.json").stat().st_mtime_ns
        for r in plan["runs"]
        if r["dir"] != "runs/deeper/seed1"
    }
    second = _run(spec)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("done, skipped") == 3
    for d, mtime in finished.items():  # not trained again
        assert (out / d / "run-summary.json").stat().st_mtime_ns == mtime
    resumed = [json.loads(line) for line in (victim / "metrics.jsonl").read_text().splitlines()]
    loss = lambda rows: [(r["step"], r["loss"]) for r in rows if "loss" in r]  # noqa: E731
    assert loss(resumed) == loss(uninterrupted) and len(loss(resumed)) == 4
    assert (victim / "points" / "step_00000004.json").exists()
    # The report, rebuilt from the folders, holds the numbers the folders hold.
    summary = json.loads((out / "summary.json").read_text())
    for metric in ("val_ema/flow/high", "val/flow/mid"):
        per = {
            v: [
                json.loads((out / f"runs/{v}/seed{s}/points/step_00000004.json").read_text())["val"][metric]
                for s in (0, 1)
            ]
            for v in ("baseline", "deeper")
        }
        cell = summary["final"]["deeper"][metric]
        assert cell["per_seed"] == pytest.approx(per["deeper"])
        assert cell["mean"]["estimate"] == pytest.approx(sum(per["deeper"]) / 2)
        assert cell["delta"]["estimate"] == pytest.approx(
            sum(d - b for d, b in zip(per["deeper"], per["baseline"])) / 2
        )
    for name in ("report.md", "report.html", "summary.csv", "report/training_losses.png"):
        assert (out / name).stat().st_size > 0
    # the evaluation metrics are drawn unless each is the same at every point of every run (4 toy
    # steps can leave every shapes measure at 0): such a metric is named, not drawn
    shapes = {
        (m, v)
        for f in out.glob("runs/*/seed*/points/step_*.json")
        for m, v in json.loads(f.read_text())["results"][0]["metrics"]["shapes"].items()
        if m != "n"
    }
    flat = len({m for m, _ in shapes}) == len(shapes)
    assert (out / "report/eval_vs_images.png").exists() != flat
    if flat:
        assert "Not drawn, the same at every point: shapes/" in (out / "report.md").read_text()


def test_schedule_reapplies_the_configs_optimizer_settings_after_a_load():
    """torch's Optimizer.load_state_dict brings back the saved lr and betas; the schedule puts the
    config's back (a resume runs with the config it is given)."""
    import torch

    from pixelrun.config import load_config
    from pixelrun.training.schedule import LRSchedule

    cfg = load_config(
        None, ["optimizer.lr=0.002", "optimizer.betas=[0.8,0.9]", "schedule.warmup_steps=0", "train.steps=10"]
    )
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas))
    sched = LRSchedule(opt, cfg)
    saved = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=5.0, betas=(0.5, 0.6)).state_dict()
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 5.0  # what torch does
    sched.load_state_dict({"last_epoch": 3, "base_lrs": [5.0]})
    assert opt.param_groups[0]["lr"] == pytest.approx(0.002) and opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert sched.state_dict() == {"last_epoch": 3}
