"""The run's sink (pixelrun/infra/tracking.py): metrics.jsonl, TensorBoard and, with log.wandb=true,
Weights & Biases in offline mode, read back from the files each one wrote. wandb is in the `test`
extra; without it the W&B test is skipped, the rest still runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from pixelrun.cli import main
from pixelrun.config import ConfigError, load_config
from pixelrun.data.sources import check_paths
from pixelrun.infra.tracking import Tracker


def _tensorboard(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    out = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    out["images"] = {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}
    return out


def _log_a_run(tracker: Tracker, grid: Path) -> None:
    tracker.scalars(1, {"loss": 0.5, "flow": 0.25}, prefix="train/")
    tracker.scalars(2, {"loss": 0.4, "flow": 0.2}, prefix="train/")
    tracker.scalars(2, {"val/flow/low": 0.125, "eval/fd-effnet": 3.0})
    tracker.image("samples/ema", grid, 2)


@pytest.fixture
def grid(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "grid.png"
    Image.fromarray(np.full((16, 24, 3), 200, np.uint8)).save(path)
    return path


def test_off_by_default_jsonl_and_tensorboard(tmp_path, grid):
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}"])
    assert cfg.log.wandb is False
    tracker = Tracker(cfg, tmp_path / "run")
    _log_a_run(tracker, grid)
    tracker.close()
    tracker.close()  # twice is harmless
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [
        {"step": 1, "loss": 0.5, "flow": 0.25},
        {"step": 2, "loss": 0.4, "flow": 0.2},
        {"step": 2, "val/flow/low": 0.125, "eval/fd-effnet": 3.0},
    ]
    tb = _tensorboard(tmp_path / "run")
    assert tb["train/loss"] == [(1, 0.5), (2, pytest.approx(0.4))] and tb["val/flow/low"] == [(2, 0.125)]
    assert tb["images"] == {"samples/ema": [2]}
    assert not (tmp_path / "run" / "wandb").exists() and not (tmp_path / "run" / "wandb_run_id").exists()
    # a resume from step 1 drops the rows past it (and a torn line), then appends
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    resumed = Tracker(cfg, tmp_path / "run", start_step=1)
    resumed.scalars(2, {"loss": 0.3}, prefix="train/")
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 0.5, "flow": 0.25}, {"step": 2, "loss": 0.3}]
    # ranks other than 0 write nothing
    Tracker(cfg, tmp_path / "rank1", enabled=False).scalars(1, {"loss": 1.0})
    assert not (tmp_path / "rank1").exists()


def _wandb_records(path: Path):
    """The protobuf records of an offline run file: a 7-byte header (":W&B", magic, version), then
    LevelDB log blocks of 32 KiB, each record chunk with a 7-byte header (crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_gets_the_same_scalars_the_grid_and_the_config(tmp_path, grid, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    run = tmp_path / "my-run"
    cfg = load_config(None, [f"run.dir={run}", "log.wandb=true", "log.wandb_project=pixelrun-test", "train.steps=7"])
    tracker = Tracker(cfg, run)
    _log_a_run(tracker, grid)
    tracker.close()
    (run_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 300  # W&B's service process may still be writing after finish()
    while "exit" not in (kinds := [r.WhichOneof("record_type") for r in _wandb_records(run_file)]):
        assert time.monotonic() < deadline, kinds
        time.sleep(0.2)
    history, runs = [], []
    for r in _wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {}
            for i in r.history.item:  # an image is a nested value: its key, then its fields
                key, value = [i.key] if i.key else list(i.nested_key), json.loads(i.value_json)
                if len(key) > 1:
                    row.setdefault(key[0], {})[key[1]] = value
                else:
                    row[key[0]] = value
            history.append(row)
        elif kind == "run":
            runs.append(r.run)
    config = {i.key: json.loads(i.value_json) for i in runs[0].config.update}
    assert runs[0].project == "pixelrun-test" and runs[0].display_name == "my-run"
    assert runs[0].run_id == (run / "wandb_run_id").read_text().strip()
    scalars = [{k: v for k, v in h.items() if not k.startswith("_") and k != "samples/ema"} for h in history]
    assert scalars[:3] == [
        {"step": 1, "train/loss": 0.5, "train/flow": 0.25},
        {"step": 2, "train/loss": 0.4, "train/flow": 0.2},
        {"step": 2, "val/flow/low": 0.125, "eval/fd-effnet": 3.0},
    ]
    image = history[3]["samples/ema"]
    assert image["_type"] == "image-file" and (image["width"], image["height"]) == (24, 16) and history[3]["step"] == 2
    assert config["train"]["steps"] == 7 and config["log"]["wandb"] is True
    # the same rows went to metrics.jsonl and TensorBoard
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert _tensorboard(run)["train/flow"][0] == (1, 0.25)
    # a resume continues the same W&B run
    again = Tracker(cfg, run, start_step=2)
    again.close()
    # every offline folder holds the one run's file, run-<id>.wandb (read the id from it: a folder made
    # in the same second as the first is named offline-run-<time>-<id>-1)
    assert {p.stem.split("-", 1)[1] for p in run.glob("wandb/offline-run-*/run-*.wandb")} == {runs[0].run_id}


def test_wandb_on_without_the_package_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a)
    )
    with pytest.raises(ConfigError, match=r"^log\.wandb: .*pip install wandb"):
        check_paths(load_config(None, ["log.wandb=true"]))
    assert main(["train", f"run.dir={tmp_path / 'run'}", "log.wandb=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pixelrun: config error: log.wandb:") and not (tmp_path / "run").exists()


def test_write_atomic_writes_whole_files_or_none(tmp_path):
    """pixelrun/infra/files.py, the one writer of the package's files: text, bytes or a function
    writing into the open file; a writer that fails leaves the old file and no temporary beside it."""
    from pixelrun.infra.files import write_atomic

    path = tmp_path / "sub" / "a.npz"
    assert write_atomic(path, "old") == path and path.read_text() == "old"
    write_atomic(path, lambda f: np.savez(f, x=np.arange(3)))
    with np.load(path) as z:
        assert z["x"].tolist() == [0, 1, 2]

    def fails(f):
        f.write(b"half")
        raise OSError("disk full")

    write_atomic(path, b"kept")
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, fails)
    assert path.read_bytes() == b"kept" and sorted(p.name for p in path.parent.iterdir()) == ["a.npz"]
