"""`pixelrun bench --memory` (pixelrun/tools/memory.py): the model states per GPU, against the
bytes per parameter counted by hand, for full training and for LoRA."""

from __future__ import annotations

import pytest

from pixelrun.cli import main
from pixelrun.config import load_config
from pixelrun.tools.memory import state_memory


def test_full_training_is_twenty_bytes_a_parameter_over_the_gpus():
    cfg = load_config(None, ["optimizer.name=adamw"])
    m = state_memory(cfg, 384, gpus=4)
    p = m["parameters"]
    assert p == m["trained"] == 6_365_632  # `pixelrun presets`: tiny with MiniLM
    # weights 4 + gradients 4 + AdamW's two moments 8 + one EMA 4, sharded over 4 GPUs
    assert m["total_per_gpu"] == pytest.approx(20 * p / 4)


def test_lora_trains_its_adapters_and_holds_the_base_once():
    over = ["optimizer.name=adamw", "train.lora.rank=2", "run.init_from=runs/base", "ema.decays=[0.9,0.99]"]
    cfg = load_config(None, over)
    # per block, a Linear(in, out) adapter adds r (in + out): qkv D+3D, text kv D+2D, out 2D, the MLP
    # 3 x (D + 3.5 D); tiny: D = 256, 4 blocks
    adapters = 2 * (4 + 3 + 2 + 3 * 4.5) * 256 * 4
    one = state_memory(cfg, 384, gpus=1)
    assert one["trained"] == adapters and one["parameters"] == 6_365_632 + adapters
    assert one["total_per_gpu"] == pytest.approx(4 * one["parameters"] + (4 + 8 + 2 * 4) * adapters)
    two = state_memory(cfg, 384, gpus=2)  # under FSDP2 each EMA copy also holds the base's shards
    base = 6_365_632
    assert two["total_per_gpu"] == pytest.approx(
        (4 * one["parameters"] + (4 + 8 + 2 * 4) * adapters + 2 * 4 * base) / 2
    )


def test_the_command_prints_it_without_running_a_step(capsys):
    assert main(["bench", "model.preset=prxpixel-7b", "--memory", "--gpus", "8", "--text-dim", "2048"]) == 0
    out = capsys.readouterr().out
    assert "prxpixel-7b (7,003,535,872 parameters" in out and "on 8 GPUs (FSDP2)" in out
    assert "total                     16.31 GiB" in out  # 20 B x 7.0e9 / 8 = 17.5 GB
