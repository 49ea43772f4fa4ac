"""Worker processes (`data.workers`, pixelrun/data/loader.py): the batches, skipped items and saved
positions of the inline source, for folders, shards and emoji; processes started once, ended by
`close`; exact resume and a clean Ctrl-C in training."""

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides, until
from PIL import Image
from webdataset import TarWriter

from pixelrun.config import ConfigError, aspect_buckets, load_config
from pixelrun.data import Batch, CountedBatchSource, Prefetcher
from pixelrun.data.folder import FolderBatchSource, ImageFolder
from pixelrun.data.loader import WorkerLoader, _Plans
from pixelrun.data.shards import ShardBatchSource
from pixelrun.infra import checkpoint as ckpt

BUCKETS = aspect_buckets(32, 8)  # 24x40, 32x32, 40x24
SIZES = [(40, 40), (24, 48), (48, 24)]  # (height, width): one of each bucket


def _image(rng, h, w):
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not


def make_folder(root, n=17):
    """n JPEGs of three shapes; two of them cut in half (they fail only when decoded, in a worker),
    and one file that is not an image at all (it fails when its header is read, in this process)."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        _image(rng, *SIZES[i % 3]).save(root / f"{i:02d}.jpg")
        (root / f"{i:02d}.txt").write_text(f"item {i}")
    for i in (4, 8):
        if i < n:
            _truncate(root / f"{i:02d}.jpg")
    (root / "99.png").write_bytes(b"not an image")
    (root / "99.txt").write_text("broken")
    return root


def make_shards(root):
    """Two shards; the first holds a sample whose JPEG is cut short and one that is not an image."""
    root.mkdir()
    rng = np.random.default_rng(1)
    for s in range(2):
        with TarWriter(str(root / f"{s:05d}.tar")) as w:
            for i in range(8):
                buf = _jpeg(rng, *SIZES[(i + s) % 3])
                if s == 0 and i == 2:
                    buf = buf[: len(buf) // 2]
                w.write({"__key__": f"s{s}i{i}", "jpg": buf, "txt": f"sample {s} {i}"})
            if s == 0:
                w.write({"__key__": "junk", "jpg": b"\xff\xd8 junk", "txt": "junk"})
    return root


def _jpeg(rng, h, w):
    import io

    buf = io.BytesIO()
    _image(rng, h, w).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _same(a: Batch, b: Batch) -> bool:
    return a.captions == b.captions and torch.equal(a.images, b.images)


def _assert_like_inline(make, n, workers=2):
    """n batches with `workers` processes equal the inline ones, with the same position after each
    and the same skipped items; returns the positions and batches for resume checks."""
    inline, loader = make(), WorkerLoader(make(), workers)
    states, batches = [], []
    try:
        for k in range(n):
            a, b = next(inline), next(loader)
            assert _same(a, b), k
            assert loader.state_dict() == inline.state_dict(), k
            states.append(json.loads(json.dumps(loader.state_dict())))  # as a checkpoint keeps it
            batches.append(a)
        assert loader.skipped == getattr(inline, "skipped", 0)
        assert loader.skipped_paths == getattr(inline, "skipped_paths", [])
    finally:
        loader.close()
    return states, batches, inline


def test_folder_with_workers_gives_the_inline_batches_skips_and_positions(tmp_path):
    folder = ImageFolder(make_folder(tmp_path / "d"))
    _, _, inline = _assert_like_inline(lambda: FolderBatchSource(folder, 3, BUCKETS, seed=3), 14)  # > 2 epochs
    names = sorted(p.rsplit("/", 1)[1].split(" (")[0] for p in inline.skipped_paths)
    assert names == ["04.jpg", "08.jpg", "99.png"]  # decoded in a worker (04, 08) or not (99)


def test_shards_with_workers_and_resume_mid_flight(tmp_path):
    spec = str(make_shards(tmp_path / "s"))

    def make():
        return ShardBatchSource(spec, 3, BUCKETS, seed=5)

    states, batches, inline = _assert_like_inline(make, 12)  # > 2 epochs of 16 usable samples
    assert inline.skipped == 2
    assert any("#s0i2 (image does not decode)" in p for p in inline.skipped_paths)
    assert any(any(s["fill"]) for s in states)  # positions with samples waiting in buckets
    loader = WorkerLoader(make(), 2)
    try:
        for k in (3, 7, 1):  # into a fresh loader, then into one with plans in flight
            loader.load_state_dict(states[k])
            for j in range(k + 1, min(k + 5, len(batches))):
                assert _same(next(loader), batches[j]), (k, j)
                assert loader.state_dict() == states[j]
    finally:
        loader.close()


def test_emoji_with_workers_gives_the_inline_batches():
    from pixelrun.data.emoji import EmojiBatchSource

    _assert_like_inline(lambda: EmojiBatchSource(0, 4, [(24, 24), (16, 32)]), 4)


class _PidFolder(FolderBatchSource):
    """Tags each caption with the process that built its batch."""

    def _batch(self, idx, images):
        batch = super()._batch(idx, images)
        batch.captions = [f"{c}@{os.getpid()}" for c in batch.captions]
        return batch


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_workers_are_processes_started_once_and_ended_by_close(tmp_path):
    folder = ImageFolder(make_folder(tmp_path / "d", n=6))  # 3 usable items of each shape: an epoch is 1-2 batches
    loader = WorkerLoader(_PidFolder(folder, 2, BUCKETS, seed=1), 2)
    pids = {c.rsplit("@", 1)[1] for _ in range(12) for c in next(loader).captions}
    assert loader.state_dict()["epoch"] >= 4
    assert len(pids) == 2 and str(os.getpid()) not in pids
    at_close = loader.state_dict()
    loader.close()
    assert all(_gone(int(p)) for p in pids)
    replay = FolderBatchSource(folder, 2, BUCKETS, seed=1)
    replay.load_state_dict(at_close)
    batch = next(loader)  # a later batch starts new processes and continues where close left off
    assert [c.rsplit("@", 1)[0] for c in batch.captions] == next(replay).captions
    loader.close()


def test_a_loader_dropped_without_close_ends_its_workers(tmp_path):
    """As `source` is rebound at the next stage (data.prefetch=false: nothing calls close)."""
    folder = ImageFolder(make_folder(tmp_path / "d", n=6))
    loader = WorkerLoader(_PidFolder(folder, 2, BUCKETS, seed=1), 1)
    pid = int(next(loader).captions[0].rsplit("@", 1)[1])
    del loader
    assert _gone(pid)


def test_workers_outlive_ctrl_c_and_sigterm_until_closed(tmp_path):
    """A terminal's Ctrl-C and a scheduler's SIGTERM reach every process of the job; the workers
    must keep serving until the training process has saved and closes them."""
    folder = ImageFolder(make_folder(tmp_path / "d", n=6))
    loader = WorkerLoader(_PidFolder(folder, 2, BUCKETS, seed=1), 2)
    pids = {int(c.rsplit("@", 1)[1]) for _ in range(4) for c in next(loader).captions}
    assert len(pids) == 2
    for pid in pids:
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
    for pid in pids:  # handled (or ignored) by each worker: none is pending any more
        until(lambda pid=pid: _gone(pid) or not _pending_signals(pid), f"worker {pid} taking its signals")
    for _ in range(8):
        next(loader)
    assert not any(_gone(pid) for pid in pids)
    loader.close()
    assert all(_gone(pid) for pid in pids)


def test_prefetcher_closes_the_workers(tmp_path):
    folder = ImageFolder(make_folder(tmp_path / "d", n=6))
    ahead = Prefetcher(WorkerLoader(_PidFolder(folder, 2, BUCKETS, seed=1), 1))
    pids = {c.rsplit("@", 1)[1] for _ in range(3) for c in next(ahead).captions}
    ahead.close()
    assert len(pids) == 1 and _gone(int(pids.pop()))


class _Failing(CountedBatchSource):
    def __init__(self, error):
        self.next_batch, self.error = 0, error

    def build(self, k):
        if k == 2:
            raise self.error
        return Batch(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), [str(k)])


def test_an_error_in_a_worker_surfaces_in_order_with_its_message():
    loader = WorkerLoader(_Failing(OSError("disk gone at batch 2")), 1)
    assert next(loader).captions == ["0"] and next(loader).captions == ["1"]
    with pytest.raises(OSError, match="disk gone at batch 2"):
        next(loader)
    loader.close()
    # a config error (one line, naming the key, for the CLI) arrives as itself
    loader = WorkerLoader(_Failing(ConfigError("data.path", "x.tar#k: its stored text embedding has 3 NaN")), 1)
    next(loader), next(loader)
    with pytest.raises(ConfigError) as caught:
        next(loader)
    assert (
        caught.value.key == "data.path"
        and str(caught.value) == "data.path: x.tar#k: its stored text embedding has 3 NaN"
    )
    loader.close()


def test_the_workers_copy_of_a_shard_source_pickles(tmp_path):
    """Under spawn or forkserver (macOS; Linux from Python 3.14) workers get a pickled copy of the
    source, without its open tar stream; it builds the same batch."""
    src = ShardBatchSource(str(make_shards(tmp_path / "s")), 3, BUCKETS, seed=5)
    plan, _ = src.plan()
    assert src._stream is not None
    copy = pickle.loads(pickle.dumps(_Plans(src)))
    assert _same(copy[7, plan][1], src.build(plan))


# ---------------------------------------------------------------- training


def _folder_run(tmp_path, tiny_encoder_dir, name, workers, **extra):
    return tiny_overrides(
        tmp_path / name,
        tiny_encoder_dir,
        **{
            "data.source": "folder",
            "data.path": str(tmp_path / "d"),
            "data.buckets": "true",
            "data.workers": workers,
            "train.batch_size": 2,
            "train.steps": 6,
            "eval.prompts": 0,
            "sample.grid_prompts": 1,
            **extra,
        },
    )


def _losses(run):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_a_run_with_workers_stopped_and_resumed_has_the_inline_losses(tmp_path, tiny_encoder_dir):
    from pixelrun.run.train import train

    make_folder(tmp_path / "d")
    inline = train(load_config(None, _folder_run(tmp_path, tiny_encoder_dir, "inline", 0)))
    cfg = load_config(None, _folder_run(tmp_path, tiny_encoder_dir, "workers", 2))
    assert train(cfg, stop_at_step=3)["step"] == 3
    assert any(ckpt.load_meta(ckpt.latest_checkpoint(tmp_path / "workers")).data[0]["fill"])
    resumed = train(cfg)
    assert _losses(tmp_path / "workers") == _losses(tmp_path / "inline")
    assert resumed["skipped_images"] == inline["skipped_images"] >= 1  # the first session's skips carried over


def test_ctrl_c_with_workers_saves_exits_cleanly_and_resumes(tmp_path, tiny_encoder_dir):
    """Ctrl-C in a terminal reaches the whole process group: the workers too."""
    from pixelrun.cli import main

    make_folder(tmp_path / "d")
    run = tmp_path / "run"
    args = _folder_run(tmp_path, tiny_encoder_dir, "run", 2, **{"train.steps": 100000})
    proc = subprocess.Popen(
        [sys.executable, "-m", "pixelrun", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    metrics = run / "metrics.jsonl"
    until(lambda: metrics.exists() and metrics.read_text().count("\n") >= 3, "three rows of metrics.jsonl")
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "stopped by SIGINT" in out and "Traceback" not in err and "DataLoader" not in err, err[-2000:]
    # stderr was a pipe: the bar as plain lines, no redraws or cursor moves (pixelrun/infra/progress.py)
    assert "\r" not in err and "\x1b[" not in err and "train: " in err, repr(err[-2000:])
    until(lambda: not _group_alive(proc.pid), "the run's worker processes ending after it")  # none outlived it
    step = ckpt.load_meta(ckpt.latest_checkpoint(run)).step
    assert step >= 3
    assert main(["train", *_folder_run(tmp_path, tiny_encoder_dir, "run", 2, **{"train.steps": step + 2})]) == 0
    assert [s for s, _ in _losses(run)] == list(range(1, step + 3))


def _pending_signals(pid: int) -> bool:
    """Whether a signal sent to `pid` still waits to be delivered (/proc/PID/status, SigPnd/ShdPnd)."""
    try:
        fields = dict(
            line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line
        )
    except FileNotFoundError:
        return False
    return any(int(fields[k].strip(), 16) for k in ("SigPnd", "ShdPnd"))


def _group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` lives (a zombie waiting for its reaper counts as ended)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False
