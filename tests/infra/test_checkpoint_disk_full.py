"""A disk that fills during a checkpoint write: one CheckpointError saying "no space" whatever DCP
wraps the error in (its failures map each rank to an (exception, traceback) pair), the temporary
folder removed, the earlier checkpoints intact."""

from __future__ import annotations

import errno
import shutil

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_fs

from pixelrun.infra import checkpoint as ckpt
from pixelrun.infra.checkpoint_save import save_checkpoint
from pixelrun.infra.records import CheckpointMeta


def _meta(step: int) -> CheckpointMeta:
    return CheckpointMeta(
        step=step, scheduler={}, torch_rng=torch.get_rng_state(), data=[], world_size=1, config={}, text_dim=0
    )


def _fail_mid_file(monkeypatch, error: BaseException) -> dict:
    """DCP's writer writes part of a tensor's bytes, then fails with `error`; from then on the disk
    reports what `disk["free"]` says (plenty until the failure)."""
    disk = {"free": 10**12}
    real_usage = shutil.disk_usage

    def write_item(transforms, stream, data, *a, **k):
        stream.write(b"\0" * 100)
        disk["free"] = 1000
        raise error

    def usage(path):
        u = real_usage(path)
        return shutil._ntuple_diskusage(u.total, u.total - disk["free"], disk["free"])

    monkeypatch.setattr(dcp_fs, "_write_item", write_item)
    monkeypatch.setattr(shutil, "disk_usage", usage)
    return disk


def _only_step_2(tmp_path) -> None:
    assert [p.name for p in ckpt.checkpoint_root(tmp_path).iterdir()] == ["step_00000002"]


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("unexpected pos 704 vs 598")],
    ids=["enospc", "unexpected-pos"],
)
def test_a_write_that_fills_the_disk_mid_file_says_no_space(tmp_path, monkeypatch, error):
    save_checkpoint(tmp_path, 2, {"w": torch.zeros(10)}, _meta(2), "seed: 0\n")
    _fail_mid_file(monkeypatch, error)
    with pytest.raises(ckpt.CheckpointError, match="no space left on device") as info:
        save_checkpoint(tmp_path, 4, {"w": torch.zeros(10)}, _meta(4), "seed: 0\n")
    assert "\n" not in str(info.value) and "step 4" in str(info.value)
    _only_step_2(tmp_path)  # the temporary folder removed, step 2 intact


def test_a_write_that_fails_for_another_reason_is_not_called_a_full_disk(tmp_path, monkeypatch):
    disk = _fail_mid_file(monkeypatch, RuntimeError("unexpected pos 704 vs 598"))
    disk["free"] = 10**12
    monkeypatch.setattr(dcp_fs, "_write_item", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bad pos")))
    with pytest.raises(BaseException) as info:  # DCP's own wrapping, not an AttributeError
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(10)}, _meta(2), "seed: 0\n")
    assert type(info.value).__name__ == "CheckpointException", info.value
    assert "bad pos" in repr(info.value.failures)
    assert not list(ckpt.checkpoint_root(tmp_path).iterdir())


def test_every_save_checks_the_free_space_first(tmp_path, monkeypatch):
    for step in (2, 4):
        save_checkpoint(tmp_path, step, {"w": torch.zeros(10)}, _meta(step), "seed: 0\n")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(ckpt.CheckpointError, match="not enough disk space for checkpoint step 6"):
        save_checkpoint(tmp_path, 6, {"w": torch.zeros(10)}, _meta(6), "seed: 0\n")
    assert sorted(p.name for p in ckpt.checkpoint_root(tmp_path).iterdir()) == ["step_00000002", "step_00000004"]
