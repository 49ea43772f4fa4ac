"""Chaos kept as a test (issue 33): a short run killed with SIGKILL at seeded moments, a kill inside
a checkpoint write among them, run again with the same command until it finishes, ends with the losses,
model, EMA and optimizer of a run never interrupted, bit for bit; and `pixelrun ablate` killed
mid-study, rerun until done, gives the same summary as a study never interrupted.

Where a kill lands is chosen by a seeded generator, among moments a timer would rarely hit (inside a
checkpoint save: `pixelrun/infra/faults.py`) and moments in the loop (a number of steps logged, then
a seeded pause). Waits are for files, bounded, never a sleep that is usually long enough: whatever
the machine's speed, a kill lands somewhere in the run, and the invariant holds wherever it lands."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides, toy_study_spec

from pixelrun.infra import checkpoint as ckpt
from pixelrun.infra.faults import ENV

ROOT = Path(__file__).parents[2]
STEPS, EVERY = 10, 3
CLOCKS = {"images_per_s", "train_seconds", "step_seconds"}


def _env(kill_at: str | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop(ENV, None)
    if kill_at:
        env[ENV] = kill_at
    return env


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written
            break
    return rows


def _last_step(metrics: Path) -> int:
    return max((r.get("step", 0) for r in _rows(metrics)), default=0)


def _kill_when(proc: subprocess.Popen, ready, pause: float, bound: float = 300.0) -> bool:
    """SIGKILL `proc` once `ready()` holds and `pause` seconds more have passed; False if it ended first."""
    end = time.monotonic() + bound
    while proc.poll() is None:
        if ready():
            time.sleep(pause)  # a seeded offset into the loop, not a wait for anything
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            break
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"nothing to kill on within {bound} s")
        time.sleep(0.01)
    proc.wait()
    return False


def _plan(seed: int, kills: int) -> list[tuple[str, int]]:
    """Seeded kill moments: each a crash point in a save of a checkpoint step, or a step logged."""
    rng = random.Random(seed)
    saves = list(range(EVERY, STEPS, EVERY))
    pool = [("save-files", s) for s in saves] + [("save-placed", s) for s in saves]
    pool += [("step", s) for s in range(2, STEPS)]
    plan = rng.sample(pool, kills)
    if not any(p.startswith("save") for p, _ in plan):  # a kill inside a checkpoint write, always
        plan[0] = rng.choice([p for p in pool if p[0].startswith("save")])
    return plan


# ----------------------------------------------------------------------------- pixelrun train


def _train(run: Path, encoder_dir: str, kill_at: str | None = None) -> subprocess.Popen:
    over = tiny_overrides(
        run,
        encoder_dir,
        **{"train.steps": STEPS, "cadence.checkpoint_every": EVERY, "eval.prompts": 0, "hardware.threads": 1},
    )
    return subprocess.Popen(
        [sys.executable, "-m", "pixelrun", "train", *over],
        env=_env(kill_at),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def _state(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.read_tensors(ckpt.latest_checkpoint(run))


def _losses(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in CLOCKS} for r in _rows(run / "metrics.jsonl")]


@pytest.mark.parametrize("seed", [0])
def test_train_killed_at_seeded_moments_ends_as_an_uninterrupted_run(tmp_path, tiny_encoder_dir, seed):
    whole = tmp_path / "whole"
    _finish(_train(whole, tiny_encoder_dir))
    run, rng, landed = tmp_path / "chaos", random.Random(seed), []
    for point, step in _plan(seed, kills=3):
        if point == "step":
            proc = _train(run, tiny_encoder_dir)
            metrics = run / "metrics.jsonl"
            killed = _kill_when(proc, lambda s=step, m=metrics: _last_step(m) >= s, rng.uniform(0, 0.05))
        else:
            proc = _train(run, tiny_encoder_dir, kill_at=f"{point}:{step}")
            proc.wait(timeout=600)
            killed = proc.returncode == -signal.SIGKILL
        landed.append((point, step, killed, _last_step(run / "metrics.jsonl")))
    assert any(k for p, _, k, _ in landed if p.startswith("save")), landed  # a save was cut short
    _finish(_train(run, tiny_encoder_dir))  # the same command, until done
    assert _losses(run) == _losses(whole), landed
    a, b = _state(whole), _state(run)
    assert a.keys() == b.keys()
    for k in a:  # model, EMA, optimizer, schedule: bit for bit
        assert torch.equal(a[k], b[k]), (k, landed)
    leftovers = [p.name for p in ckpt.checkpoint_root(run).iterdir() if p.name.startswith(".tmp")]
    assert leftovers == [], leftovers


# ----------------------------------------------------------------------------- pixelrun ablate


def _ablate(spec: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pixelrun", "ablate", str(spec)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _all_rows(out: Path) -> int:
    return sum(len(_rows(m)) for m in out.glob("runs/*/seed*/metrics.jsonl"))


def _results(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    return {k: s[k] for k in ("final", "by_point", "guidance", "incomplete")}


def test_ablate_killed_mid_study_ends_with_the_uninterrupted_summary(tmp_path, tiny_encoder_dir, toy_study):
    """The uninterrupted study is tests/conftest.py's `toy_study`, of the same SPEC."""
    out = tmp_path / "chaos"
    spec = toy_study_spec(tmp_path, tiny_encoder_dir, name="chaos")
    rng, landed = random.Random(1), []
    total = _all_rows(toy_study)
    for _ in range(2):  # the parent killed while a child trains: the child goes with it (PR_SET_PDEATHSIG)
        at = _all_rows(out) + rng.randint(1, 3)
        proc = _ablate(spec)
        landed.append((at, _kill_when(proc, lambda n=at: _all_rows(out) >= min(n, total), rng.uniform(0, 0.05))))
    assert landed[0][1], landed  # the first kill lands inside the study
    _finish(_ablate(spec))
    assert _results(out) == _results(toy_study), landed
