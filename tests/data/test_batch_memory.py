"""A batch that cannot fit in the machine's memory is refused before any work, in one line: "one batch
needs X GiB, Y available" (uint8 images plus their fp32 model input), for training
(train.batch_size, data.resolution, per stage) and for `pixelrun sample --size`. The available memory
is set by the test, not read from the machine."""

from __future__ import annotations

import pytest
from conftest import one_line_error

from pixelrun.cli import main
from pixelrun.config import ConfigError, load_config
from pixelrun.data import sources

GiB = 1 << 30


@pytest.fixture
def eight_gib(monkeypatch):
    monkeypatch.setattr(sources, "available_memory", lambda device: (8 * GiB, "RAM"))


@pytest.mark.parametrize(
    "overrides, key, need",
    [
        (
            ["train.batch_size=1000000000"],
            "train.batch_size",
            "one batch of 1000000000 images of 48x48 needs 32186.5 GiB",
        ),
        (
            ["data.resolution=1000000"],
            "data.resolution",
            "one batch of 16 images of 1000000x1000000 needs 223517.4 GiB",
        ),
    ],
)
def test_a_batch_past_the_memory_is_refused_before_any_work(tmp_path, capsys, eight_gib, overrides, key, need):
    run = tmp_path / "run"
    assert main(["train", f"run.dir={run}", *overrides]) == 2
    one_line_error(capsys, f"config error: {key}:", need, "8.0 GiB RAM available", "lower train.batch_size")
    assert not run.exists()  # nothing built, nothing written


def test_each_stage_is_checked(eight_gib):
    cfg = load_config(
        None, ["train.batch_size=16", "stages=[{steps: 2}, {steps: 2, resolution: 4096, batch_size: 64}]"]
    )
    with pytest.raises(ConfigError, match=r"64 images of 4096x4096 needs 15\.0 GiB, 8\.0 GiB RAM"):
        sources.check_batch_memory(cfg)


def test_a_batch_that_fits_passes(eight_gib):
    sources.check_batch_memory(load_config(None, ["train.batch_size=64", "data.resolution=256"]))


def test_memory_unknown_checks_nothing(monkeypatch):
    monkeypatch.setattr(sources, "available_memory", lambda device: None)
    sources.check_batch_memory(load_config(None, ["train.batch_size=1000000000"]))


def test_the_available_memory_is_read_on_this_machine():
    free, kind = sources.available_memory("cpu")
    assert free > 0 and kind == "RAM"


def test_a_sample_size_past_the_memory_is_refused_before_reading_the_checkpoint(tmp_path, capsys, eight_gib):
    out = tmp_path / "images"
    args = ["sample", "--checkpoint", str(tmp_path / "no-run"), "--prompt", "a", "--out", str(out)]
    assert main([*args, "--size", "100000x100000"]) == 2
    one_line_error(capsys, "--size: 100000x100000 (WxH): one batch of 1 image(s) needs 279.4 GiB", "8.0 GiB RAM")
    assert main([*args, "--size", "64x32"]) == 2  # fits: on to the checkpoint, which is missing
    assert "no checkpoint found" in capsys.readouterr().err


def test_on_cuda_the_gpus_free_memory_is_compared(monkeypatch):
    import torch

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (4 * GiB, 80 * GiB))
    assert sources.available_memory("auto") == (4 * GiB, "GPU memory")
    assert sources.available_memory("cuda:1") == (4 * GiB, "GPU memory") and asked[-1] == torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"needs 15\.0 GiB, 4\.0 GiB GPU memory available"):
        sources.check_batch_memory(load_config(None, ["train.batch_size=64", "data.resolution=4096"]))
    assert sources.available_memory("cpu")[1] == "RAM"
