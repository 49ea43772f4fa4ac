"""Ctrl-C stops after the step it lands in (issue 30: the docs say one step): a SIGINT delivered
while step 3 trains ends the run at step 3, saved, and the next command resumes from there."""

from __future__ import annotations

import os
import signal

from conftest import tiny_overrides

from pixelrun.config import load_config
from pixelrun.infra import checkpoint as ckpt
from pixelrun.run import train as train_module


def test_ctrl_c_during_a_step_stops_after_that_step(tmp_path, tiny_encoder_dir, monkeypatch, capsys):
    real_step, calls = train_module.train_step, []

    def step_with_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the terminal's Ctrl-C, while the third step runs
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", step_with_ctrl_c)
    cfg = load_config(
        None, tiny_overrides(tmp_path / "run", tiny_encoder_dir, **{"train.steps": 50, "eval.prompts": 0})
    )
    summary = train_module.train(cfg)
    assert len(calls) == 3 and summary["step"] == 3
    assert ckpt.step_of(ckpt.latest_checkpoint(tmp_path / "run")) == 3
    assert "stopped by SIGINT at step 3/50" in capsys.readouterr().out
