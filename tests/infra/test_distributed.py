"""Data parallelism on the CPU: torchrun with 2 gloo ranks and FSDP2, against single-process runs.

One optimizer step over a global batch of 8 must not depend on how it is split: 2 ranks x
micro-batch 4, 1 rank x 8, and 1 rank x 4 x 2 accumulation steps see the same images with the same
noise and give the same losses and weights (up to fp32 summation order). Checkpoints written on 2
ranks resume on 1 and the other way round. The runs are shared by the tests of this module.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from pixelrun.config import ConfigError, batch_split, load_config
from pixelrun.infra import checkpoint as ckpt
from pixelrun.model.denoiser import model_from_config
from pixelrun.run.train import train

BASE = {
    "train.global_batch_size": 8,
    "eval.prompts": 0,
    "schedule.warmup_steps": 1,
    "optimizer.lr": 3e-3,
    "routing.ratio": 0.5,
    "model.depth": 4,
}


def _over(run, enc, steps, micro, **extra):
    return tiny_overrides(run, enc, **{**BASE, "train.steps": steps, "train.batch_size": micro, **extra})


TEARDOWN_ABORT = "terminate called without an active exception"


def torchrun(nproc: int, overrides: list[str]):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "pixelrun",
        "train",
        *overrides,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and TEARDOWN_ABORT in proc.stderr and "done:" in proc.stdout:
        # A rare abort in gloo's C++ destructors after the run has finished and written everything
        # (seen once in CI, never reproduced here, even under load). Running the command again
        # resumes from the final checkpoint and must then exit cleanly.
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _losses(run):
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["flow"]) for r in rows if "loss" in r]


def _weights(run, which="raw"):
    cfg = load_config(Path(run) / "config.yaml")
    latest = ckpt.latest_checkpoint(run)
    model = model_from_config(cfg, ckpt.load_meta(latest).text_dim)
    ckpt.load_weights(latest, model, which)
    return model.state_dict()


def _same_run(a, b, rel=1e-5, atol=1e-6):
    la, lb = _losses(a), _losses(b)
    assert [s for s, *_ in la] == [s for s, *_ in lb]
    for (s, loss_a, flow_a), (_, loss_b, flow_b) in zip(la, lb):
        assert loss_a == pytest.approx(loss_b, rel=rel), s
        assert flow_a == pytest.approx(flow_b, rel=rel), s
    for which in ("raw", "ema"):
        wa, wb = _weights(a, which), _weights(b, which)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=rel, atol=atol, msg=f"{which} {k}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_encoder_dir):
    root = tmp_path_factory.mktemp("dist")
    enc = tiny_encoder_dir
    r = {
        k: root / k
        for k in (
            "one_x8",
            "one_x4x2",
            "two_x4",
            "moved",
            "muon_one_x8",
            "muon_two_x4",
            "hsdp_two_x4",
        )
    }
    # The shapes score at the end (sampling a sharded model is collective), plus grids and an evaluation
    # between checkpoints: the EMA updates that follow them once crashed on 2 ranks (a forward-only
    # pass left the sharded EMA's root gathered; tests/training/test_ema_sharded.py).
    with_eval = {"eval.prompts": 4, "cadence.sample_every": 2, "eval.every": 3}
    train(load_config(None, _over(r["one_x8"], enc, 4, 8, **with_eval)))
    train(load_config(None, _over(r["one_x4x2"], enc, 4, 4)))
    r["two_x4_log"] = torchrun(2, _over(r["two_x4"], enc, 4, 4, **with_eval)).stdout
    # A 2-rank run resumed on 2 ranks is the rehearsal test's (tests/run/test_rehearsal.py: every rank
    # killed in stage 2, the same command again, the losses of a run never stopped); not run again here.
    # One run's checkpoints move 1 rank -> 2 ranks -> 1 rank (step 1 on 1 rank, step 2 on 2, steps 3-4 on
    # 1): both directions with one torchrun. The three checkpoints are kept to read their rank counts.
    moved = {"cadence.keep_checkpoints": 3}
    train(load_config(None, _over(r["moved"], enc, 1, 8, **moved)))
    torchrun(2, _over(r["moved"], enc, 2, 4, **moved))  # the 1-rank checkpoint on 2 ranks
    train(load_config(None, _over(r["moved"], enc, 4, 8, **moved)))  # the 2-rank checkpoint on 1 rank
    # MLP width 97: uneven shards over 2 ranks; Newton-Schulz in fp32 (see test_muon_on_two_ranks_equals_one)
    muon = {"optimizer.name": "muon", "optimizer.muon_precision": "fp32", "model.mlp_ratio": 3.04}
    train(load_config(None, _over(r["muon_one_x8"], enc, 3, 8, **muon)))
    torchrun(2, _over(r["muon_two_x4"], enc, 3, 4, **muon))
    torchrun(2, _over(r["hsdp_two_x4"], enc, 4, 4, **{"parallel.replicate": 2}))  # 2 replicas of 1 shard
    return r


def test_accumulation_equals_the_large_batch(runs):
    _same_run(runs["one_x8"], runs["one_x4x2"])


def test_two_ranks_equal_one(runs):
    assert "2 rank(s) x micro-batch 4 x 1 accumulation step(s)" in runs["two_x4_log"]
    _same_run(runs["one_x8"], runs["two_x4"])
    # grids at steps 2 and an evaluation at 3 ran between checkpoints, and the EMA kept updating
    assert (Path(runs["two_x4"]) / "samples" / "step_00000002.png").is_file()
    rows = [json.loads(line) for line in (Path(runs["two_x4"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/shapes/placed" in r] == [3, 4]


def test_evaluation_on_two_ranks_equals_one(runs):
    """Both ranks sample the sharded EMA model together; rank 0 scores and writes eval.json."""
    one, two = (json.loads((Path(runs[k]) / "eval.json").read_text()) for k in ("one_x8", "two_x4"))
    assert one["settings"] == two["settings"] and one["settings"]["prompts"] == 4
    assert one["metrics"]["shapes"] == two["metrics"]["shapes"]
    assert one["denoise"] == two["denoise"]  # both ranks predict from the held-out images, rank 0 scores
    assert "shapes score" in runs["two_x4_log"]


def test_checkpoints_move_between_rank_counts(runs):
    checkpoints = Path(runs["moved"]) / "checkpoints"
    assert [ckpt.load_meta(checkpoints / f"step_{s:08d}").world_size for s in (1, 2, 4)] == [1, 2, 1]
    _same_run(runs["one_x8"], runs["moved"])


def test_muon_on_two_ranks_equals_one(runs):
    """Newton-Schulz on whole matrices gathered from uneven FSDP2 shards (pixelrun/training/optim.py). Given
    the same gradients the sharded update is bitwise the single-device one, in bf16 as in fp32
    (tests/training/test_dist_muon.py); here the gradients differ by fp32 reduction order. In fp32 that
    stays at the 1e-6 level. In bf16 (the default) it turns into an occasional different rounding of an
    orthogonalised entry, 2^-8 of it, moving a weight by lr * 0.2 sqrt(max side) * 2^-8 * |O| per
    step: the 1536-wide modulation matrix of this model moved 3.6e-4 in 3 steps, which says nothing about
    the sharding, hence fp32 here."""
    _same_run(runs["muon_one_x8"], runs["muon_two_x4"], atol=5e-6)  # 4.5e-7 seen


def test_hybrid_sharding_equals_one_rank(runs):
    _same_run(runs["one_x8"], runs["hsdp_two_x4"])


def test_masks_differ_across_ranks_and_steps_and_repeat_from_the_seed():
    from pixelrun.diffusion.draws import step_draws

    cfg = load_config(None, ["routing.ratio=0.5"])
    shape = (3, 48, 48)
    rank0, rank1 = (step_draws(cfg, 5, list(range(a, a + 4)), shape, 8, "cpu") for a in (0, 4))
    again = step_draws(cfg, 5, [0, 1, 2, 3], shape, 8, "cpu")
    later = step_draws(cfg, 6, [0, 1, 2, 3], shape, 8, "cpu")
    assert torch.equal(rank0.routing.keep, again.routing.keep) and torch.equal(rank0.eps, again.eps)
    assert not torch.equal(rank0.routing.keep, rank1.routing.keep)
    assert not torch.equal(rank0.routing.keep, later.routing.keep)
    assert len({tuple(k.tolist()) for k in rank0.routing.keep}) == 4  # per sample, too
    both = step_draws(cfg, 5, list(range(8)), shape, 8, "cpu")  # one rank holding all 8 samples
    assert torch.equal(both.routing.keep, torch.cat([rank0.routing.keep, rank1.routing.keep]))
    assert torch.equal(both.t, torch.cat([rank0.t, rank1.t]))


def test_impossible_batch_split_is_a_config_error():
    cfg = load_config(None, ["train.batch_size=4", "train.global_batch_size=24"])
    assert batch_split(cfg, 1) == (24, 4, 6) and batch_split(cfg, 3) == (24, 4, 2)
    with pytest.raises(ConfigError) as e:
        batch_split(cfg, 4)  # 24 images over 4 ranks x 4 is 1.5 accumulation steps
    assert e.value.key == "train.global_batch_size"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.batch_size=4", "train.global_batch_size=6"])
    assert e.value.key == "train.global_batch_size"
    with pytest.raises(ConfigError) as e:
        batch_split(load_config(None, ["parallel.replicate=2"]), 3)
    assert e.value.key == "parallel.replicate"
