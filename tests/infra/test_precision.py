"""`auto` precision: the frozen text tower runs bf16 exactly where bf16 is native (CUDA, AVX512-BF16 /
AMX CPUs), since elsewhere a CPU emulates bf16 tens of times slower than fp32; training autocasts to
bf16 on CUDA only."""

import pytest
import torch

from pixelrun.config import ConfigError, load_config
from pixelrun.infra import precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native", [False, True])
def test_auto_text_is_bf16_where_native_and_training_autocasts_on_cuda_only(monkeypatch, native):
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: native)
    auto = load_config(overrides=[])
    assert precision.text_dtype(auto, CPU) == (torch.bfloat16 if native else torch.float32)
    assert precision.autocast_dtype(auto, CPU) is None  # None: no autocast, whatever the CPU
    assert precision.autocast_dtype(auto, CUDA) == precision.text_dtype(auto, CUDA) == torch.bfloat16


def test_spelled_out_precisions_are_kept_on_every_device(monkeypatch):
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: False)
    fp32 = load_config(overrides=["hardware.precision=fp32", "text.precision=fp32"])
    bf16 = load_config(overrides=["hardware.precision=bf16", "text.precision=bf16"])
    for device in (CPU, CUDA):
        assert precision.autocast_dtype(fp32, device) is None and precision.text_dtype(fp32, device) == torch.float32
        assert precision.autocast_dtype(bf16, device) == precision.text_dtype(bf16, device) == torch.bfloat16


def test_an_unknown_text_precision_is_one_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"^text\.precision: must be one of auto, bf16, fp32; got 'fp16'"):
        load_config(overrides=["text.precision=fp16"])
