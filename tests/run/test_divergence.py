"""A diverged run can always go back: divergence is caught before it is saved (pixelrun/run/health.py),
rotation keeps the newest healthy checkpoint, a resume that diverges again falls back one checkpoint,
and `pixelrun train --from-checkpoint step_N` resumes an older checkpoint on purpose."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import one_line_error, tiny_overrides

from pixelrun.cli import main
from pixelrun.infra import checkpoint as ckpt
from pixelrun.infra.checkpoint_save import save_checkpoint
from pixelrun.infra.records import CheckpointMeta

# ----------------------------------------------------------------------------- the detector's rule


def test_the_detector_rule_on_a_synthetic_history():
    from pixelrun.run.health import RECENT, RECOVER, WARMUP, Health

    h = Health(factor=10.0, window=20)
    for step in range(1, WARMUP + RECENT):  # the warm-up: nothing is compared yet, whatever the values
        assert h.observe(step, 1000.0 if step == 1 else 1.0, 1.0, True) is None
    assert len(h.losses) == WARMUP - 1 and h.healthy
    for step in range(WARMUP + RECENT, 40):
        assert h.observe(step, 1.0, 500.0, True) is None  # a gradient norm is not a sign
    assert list(h.losses) == [1.0] * 20  # the window: the last 20 healthy steps before the recent 5
    assert h.observe(40, 1e6, 1.0, True) is None  # one batch far out: the median of 5 does not move
    assert h.observe(41, 9.0, 1.0, True) is None
    why = h.observe(42, 11.0, 1.0, True)  # the median of (1, 1, 1e6, 9, 11) is 9: not yet
    assert why is None
    why = h.observe(43, 12.0, 1.0, True)  # (1, 1e6, 9, 11, 12): 11, over 10 times 1
    assert why is not None and why.startswith("a loss spike (median flow loss 11 over the last 5 steps, over")
    assert "train.divergence_factor=10 times its median 1 over the 20 healthy steps before" in why
    assert not h.healthy and h.since == 43
    assert h.observe(44, 50.0, 1.0, True) is None and h.since == 43  # the same episode: said once
    # from 47 on the median of the last 5 is 1 again: healthy after RECOVER such steps in a row
    for step in range(45, 47 + RECOVER - 1):
        h.observe(step, 1.0, 1.0, True)
    assert not h.healthy and 50.0 not in h.losses and 12.0 not in h.losses  # unhealthy losses: not history
    h.observe(47 + RECOVER - 1, 1.0, 1.0, True)
    assert h.healthy

    skipped = Health()
    why = skipped.observe(1, float("nan"), 3.0, False)  # a skipped step, even in the warm-up
    assert why is not None and why.startswith("a skipped step") and not skipped.healthy

    weights = Health(weight_growth=4.0, reference_norm=10.0)
    assert weights.check_weights(5, 39.0) is None and weights.healthy
    why = weights.check_weights(6, 41.0)
    assert why is not None and "train.divergence_weight_growth=4 times 10" in why and not weights.healthy
    assert weights.check_weights(7, float("inf")) is not None
    assert weights.check_weights(8, 12.0) is None and weights.healthy  # back within: healthy again

    off = Health(factor=0.0, weight_growth=0.0, reference_norm=1.0)
    for step in range(1, 40):
        assert off.observe(step, 1.0 if step < 20 else 1e9, 1.0, True) is None
    assert off.check_weights(30, 1e9) is None and off.healthy


# ----------------------------------------------------------------------------- rotation


def _meta(step: int, healthy: bool) -> CheckpointMeta:
    return CheckpointMeta(
        step=step,
        scheduler={},
        torch_rng=torch.get_rng_state(),
        data=[],
        world_size=1,
        config={},
        text_dim=0,
        healthy=healthy,
    )


def test_rotation_keeps_the_newest_healthy_checkpoint(tmp_path):
    for step, healthy in ((1, True), (2, True), (3, False), (4, False)):
        save_checkpoint(tmp_path, step, {"w": torch.ones(4) * step}, _meta(step, healthy), "seed: 0\n", keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003", "step_00000004"]
    save_checkpoint(tmp_path, 5, {"w": torch.ones(4)}, _meta(5, True), "seed: 0\n", keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    assert CheckpointMeta.read(ckpt.list_checkpoints(tmp_path)[-1]).healthy


# ----------------------------------------------------------------------------- the loop


def _losses(run) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _names(run) -> list[str]:
    return sorted(p.name for p in ckpt.checkpoint_root(run).iterdir())


def test_a_diverged_resume_is_never_saved_falls_back_and_a_lower_lr_finishes(tmp_path, tiny_encoder_dir, capsys):
    """The issue's reproduction: 4 healthy steps, then lr=1e6 from step 4. Nothing diverged is
    saved; the resume that diverged sets step 4 aside and names step 3; lr=1e-4 then finishes."""
    run = tmp_path / "S"

    def args(**extra):
        over = {"train.steps": 7, "cadence.checkpoint_every": 1, "eval.prompts": 0, **extra}
        return ["train", *tiny_overrides(run, tiny_encoder_dir, **over)]

    assert main(args(**{"train.steps": 4})) == 0
    assert _names(run) == ["step_00000003", "step_00000004"]
    capsys.readouterr()
    assert main(args(**{"optimizer.lr": 1e6})) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith("pixelrun: training ") and "step_00000004 and diverged again" in err, err
    assert "the next run resumes from step_00000003" in err and "optimizer.lr (now 1e+06)" in err, err
    assert "no checkpoint written: the state has diverged" in captured.out + captured.err  # when it was due
    assert _names(run) == ["aside-step_00000004", "step_00000003"]  # nothing diverged was saved
    assert main(args(**{"optimizer.lr": 1e-4})) == 0
    found = ckpt.list_checkpoints(run)
    assert [p.name for p in found] == ["step_00000006", "step_00000007"]
    assert all(CheckpointMeta.read(p).healthy for p in found)
    assert all(torch.isfinite(v).all() for v in ckpt.read_tensors(found[-1]).values() if v.is_floating_point())


def test_the_only_checkpoint_is_kept_and_named_when_its_resume_diverges(tmp_path, tiny_encoder_dir, capsys):
    run = tmp_path / "S"
    over = {"cadence.checkpoint_every": 2, "cadence.keep_checkpoints": 1, "eval.prompts": 0}
    assert main(["train", *tiny_overrides(run, tiny_encoder_dir, **over, **{"train.steps": 2})]) == 0
    capsys.readouterr()
    assert main(["train", *tiny_overrides(run, tiny_encoder_dir, **over, **{"optimizer.lr": 1e6})]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "step_00000002, the run's only checkpoint" in err and "optimizer.lr" in err, err
    assert _names(run) == ["step_00000002"]


def test_a_loss_spike_in_the_loop_skips_the_due_checkpoints_and_says_so_once(
    tmp_path, tiny_encoder_dir, monkeypatch, capsys
):
    """The flow loss (as the loop reads it) jumps a hundredfold from step 18 on: from step 20 (the
    median of the last 5 is spiked) the state is unhealthy, checkpoints 20 and 24 are not written,
    and the run ends in one line naming the sign and step_00000016."""
    from pixelrun.run import train as loop

    real = loop.train_step

    def spiking(st, source, encoder, null_text, null_mask, cfg, step, *rest):
        terms, grad_norm, applied = real(st, source, encoder, null_text, null_mask, cfg, step, *rest)
        if step + 1 >= 18:
            terms = {**terms, "flow": terms["flow"] * 100}
        return terms, grad_norm, applied

    monkeypatch.setattr(loop, "train_step", spiking)
    run = tmp_path / "S"
    over = {
        "train.steps": 24,
        "cadence.checkpoint_every": 4,
        "cadence.log_every": 4,
        "eval.prompts": 0,
        "train.divergence_window": 12,  # the history: 12 of the 15 healthy steps before the recent 5
    }
    assert main(["train", *tiny_overrides(run, tiny_encoder_dir, **over)]) == 1
    captured = capsys.readouterr()
    said = captured.out + captured.err
    assert said.count("no checkpoint written: the state has diverged (a loss spike") == 1, said
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith("pixelrun: training diverged at step 20 (a loss spike (median flow loss") and (
        "the next run resumes from step_00000016" in err
    ), err
    assert "over the 12 healthy steps before" in err, err
    assert _names(run) == ["step_00000012", "step_00000016"]


def test_a_stop_while_diverged_writes_nothing_and_sets_nothing_aside(tmp_path, tiny_encoder_dir, capsys):
    """Ctrl-C (here a test's stop_at_step) while diverged: no checkpoint of the diverged state, and
    the checkpoint the session resumed stays where it is (only a run that ends diverged falls back)."""
    from pixelrun.config import load_config
    from pixelrun.run.train import train

    run = tmp_path / "S"
    over = {"cadence.checkpoint_every": 2, "eval.prompts": 0}
    train(load_config(None, tiny_overrides(run, tiny_encoder_dir, **over, **{"train.steps": 2})))
    capsys.readouterr()
    summary = train(load_config(None, tiny_overrides(run, tiny_encoder_dir, **over, **{"optimizer.lr": 1e6})), 3)
    assert summary["stopped"] == "stop_at_step" and summary["step"] == 3
    out = capsys.readouterr().out
    assert "the state had diverged, so no checkpoint was written; the last healthy checkpoint is step_00000002" in out
    assert _names(run) == ["step_00000002"]


def test_from_checkpoint_resumes_step_n_and_sets_the_newer_aside(tmp_path, tiny_encoder_dir, capsys):
    run = tmp_path / "R"
    over = {"train.steps": 4, "cadence.checkpoint_every": 1, "cadence.keep_checkpoints": 4, "eval.prompts": 0}
    assert main(["train", *tiny_overrides(run, tiny_encoder_dir, **over)]) == 0
    first = _losses(run)
    capsys.readouterr()
    assert main(["train", "--from-checkpoint", "step_2", *tiny_overrides(run, tiny_encoder_dir, **over)]) == 0
    out = capsys.readouterr()
    assert f"resuming from {ckpt.checkpoint_root(run) / 'step_00000002'} (step 2" in out.err + out.out
    assert _names(run) == [
        "aside-step_00000003",
        "aside-step_00000004",
        "step_00000001",
        "step_00000002",
        "step_00000003",
        "step_00000004",
    ]
    assert _losses(run) == first  # steps 3 and 4 trained again from step 2: the same losses
    assert main(["train", "--from-checkpoint", "2", *tiny_overrides(run, tiny_encoder_dir, **over)]) == 0
    assert "aside-step_00000003-2" in _names(run)  # a second time: nothing replaced


@pytest.mark.parametrize(
    "flag, extra, words",
    [
        ("step_7", {}, ["--from-checkpoint", "'step_7' is not a checkpoint", "step_00000002"]),
        ("2", {"run.resume": "false"}, ["--from-checkpoint", "run.resume=false"]),
    ],
)
def test_from_checkpoint_refuses_in_one_line(tiny_run_two, tiny_encoder_dir, capsys, flag, extra, words):
    over = {"train.steps": 2, "eval.prompts": 0, **extra}
    capsys.readouterr()
    assert main(["train", "--from-checkpoint", flag, *tiny_overrides(tiny_run_two, tiny_encoder_dir, **over)]) == 2
    one_line_error(capsys, *words)
    assert _names(tiny_run_two) == ["step_00000002"]


def test_from_checkpoint_with_rehearse_is_refused(tiny_run_two, tiny_encoder_dir, capsys):
    over = {"train.steps": 2, "eval.prompts": 0}
    capsys.readouterr()
    args = ["train", "--rehearse", "--from-checkpoint", "2", *tiny_overrides(tiny_run_two, tiny_encoder_dir, **over)]
    assert main(args) == 2
    one_line_error(capsys, "--from-checkpoint", "--rehearse")


@pytest.fixture(scope="module")
def tiny_run_two(tmp_path_factory, tiny_encoder_dir):
    from pixelrun.config import load_config
    from pixelrun.run.train import train

    run = tmp_path_factory.mktemp("divergence") / "run"
    train(load_config(None, tiny_overrides(run, tiny_encoder_dir, **{"train.steps": 2, "eval.prompts": 0})))
    return run


@pytest.mark.parametrize("key", ["train.divergence_factor", "train.divergence_weight_growth"])
@pytest.mark.parametrize("value", ["1", "-2", ".nan"])
def test_divergence_settings_are_checked(tmp_path, tiny_encoder_dir, capsys, key, value):
    assert main(["train", *tiny_overrides(tmp_path, tiny_encoder_dir, **{key: value})]) == 2
    one_line_error(capsys, key, "must be a finite number" if value == ".nan" else "must be over 1")
