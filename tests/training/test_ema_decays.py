"""Several EMAs (ema.decays): decay 0 is the raw weights, each decay is its own average, a checkpoint
keeps each under its key and reloads it by decay, and a checkpoint of one EMA (every run before
ema.decays) still loads, a decay it lacks starting from its EMA with a note."""

from __future__ import annotations

import pytest
import torch

from pixelrun.config import ConfigError, load_config, to_dict
from pixelrun.data.shapes import ShapesBatchSource
from pixelrun.infra import checkpoint as ckpt
from pixelrun.infra.distributed import DistContext
from pixelrun.training.ema import EMA
from pixelrun.training.schedule import LRSchedule
from pixelrun.training.state import (
    Checkpointer,
    Counters,
    DataPosition,
    ModelWeights,
    OptimizerState,
    RNGState,
    RunIdentity,
    ScheduleState,
)

CPU = DistContext(0, 1, 0, torch.device("cpu"))


def _run(decays: list[float], steps: int, seed: int = 0):
    """A linear model trained `steps` AdamW steps with an EMA per decay (updated every step)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, decays, 1)
    for step in range(steps):
        model(torch.randn(2, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.maybe_update(model, step)
    return model, opt, ema


def test_decay_0_is_the_raw_weights_bit_for_bit():
    model, _, ema = _run([0.9, 0.0], steps=5)
    for raw, zero, slow in zip(model.parameters(), ema.models[1].parameters(), ema.models[0].parameters()):
        assert torch.equal(zero, raw)
        assert not torch.equal(slow, raw)


def test_each_decay_is_its_own_average_and_the_first_is_the_runs():
    model, _, two = _run([0.9, 0.5], steps=4)
    _, _, one = _run([0.9], steps=4)
    _, _, half = _run([0.5], steps=4)
    assert two.model is two.models[0] and two.decay == 0.9
    for a, b in zip(two.models[0].parameters(), one.model.parameters()):
        assert torch.equal(a, b)  # a second EMA changes nothing of the first
    for a, b in zip(two.models[1].parameters(), half.model.parameters()):
        assert torch.equal(a, b)


def _save(tmp_path, decays: list[float]):
    cfg = load_config(None, [f"ema.decays={decays}"])
    model, opt, ema = _run(decays, steps=3)
    trainable = torch.nn.ModuleDict({"denoiser": model})
    position = DataPosition(CPU)
    position.source = ShapesBatchSource(0, "train", 4, [(32, 32)])
    parts = {
        "model": ModelWeights(trainable),
        "optimizer": OptimizerState(trainable, opt),
        "ema": ema,
        "schedule": ScheduleState(LRSchedule(opt, cfg)),
        "rng": RNGState(),
        "data": position,
        "counters": Counters(step=3),
        "run": RunIdentity(cfg, 32),
    }
    return Checkpointer(parts).save(tmp_path / "run", 3, "seed: 0\n", keep=2, ctx=None), ema


def _load(path, decays: list[float]) -> EMA:
    cfg = load_config(None, [f"ema.decays={decays}"])
    model, opt, ema = _run(decays, steps=0, seed=1)
    trainable = torch.nn.ModuleDict({"denoiser": model})
    parts = {
        "model": ModelWeights(trainable),
        "optimizer": OptimizerState(trainable, opt),
        "ema": ema,
        "schedule": ScheduleState(LRSchedule(opt, cfg)),
    }
    Checkpointer(parts).load(path, ckpt.load_meta(path))
    return ema


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_checkpoint_keeps_each_ema_by_decay(tmp_path):
    path, saved = _save(tmp_path, [0.9, 0.5])
    keys = ckpt.saved_keys(path)
    assert "ema.weight" in keys and f"ema.{ckpt.ema_key(0.5)}.weight" in keys
    assert ckpt.ema_key(0.9999) == "decay_0p9999"
    loaded = _load(path, [0.5, 0.9])  # the order changed: each decay still finds its own
    assert _same(loaded.models[0], saved.models[1]) and _same(loaded.models[1], saved.models[0])
    assert loaded.notes == []
    plain = torch.nn.Linear(4, 3)
    ckpt.load_weights(path, plain, "ema", 0.5)  # what `pixelrun sample --ema-decay 0.5` reads
    assert _same(plain, saved.models[1])
    ckpt.load_weights(path, plain, "ema")  # no decay: the run's first
    assert _same(plain, saved.models[0])
    with pytest.raises(ValueError, match="keeps the EMA of decay 0.9, 0.5, not 0.7"):
        ckpt.load_weights(path, plain, "ema", 0.7)


def test_a_checkpoint_of_one_ema_resumes_with_two(tmp_path):
    path, saved = _save(tmp_path, [0.9])
    assert not any("decay_" in k for k in ckpt.saved_keys(path))  # the layout of every earlier run
    loaded = _load(path, [0.9, 0.99])
    assert _same(loaded.models[0], saved.model) and _same(loaded.models[1], saved.model)
    assert loaded.notes == ["EMA 0.99: not in the checkpoint (it keeps 0.9); starts from its EMA 0.9"]
    other = _load(path, [0.99])  # the decay changed: the checkpoint's EMA goes on under the new decay
    assert _same(other.model, saved.model) and other.notes[0].startswith("EMA 0.99: not in the checkpoint")


def test_decays_are_validated_in_one_line():
    assert load_config(None, []).ema.decays == []
    with pytest.raises(ConfigError, match=r"ema.decays\[1\]: must be in \[0, 1\); got 1.0"):
        load_config(None, ["ema.decays=[0.9,1.0]"])
    with pytest.raises(ConfigError, match="ema.decays: holds a decay twice"):
        load_config(None, ["ema.decays=[0.9,0.9]"])
    assert to_dict(load_config(None, ["ema.decays=[0.9,0]"]))["ema"]["decays"] == [0.9, 0.0]


def test_each_ema_past_the_first_is_counted_in_the_flops_per_image():
    from pixelrun.model.denoiser import build_model
    from pixelrun.training.flops import extra_ema_flops_per_image, flops_per_image

    base = ["repa.weight=0", "ema.every=2", "train.batch_size=4"]  # no teacher: the analytic count alone
    one, three = load_config(None, base), load_config(None, [*base, "ema.decays=[0.99,0.999,0.9999]"])
    params = sum(p.numel() for p in build_model("tiny", 384).parameters())
    # two extra EMAs x 3 FLOPs (a lerp) per parameter, one update every 2 steps of 4 images
    assert extra_ema_flops_per_image(three, 384) == 2 * 3 * params / (2 * 4)
    assert extra_ema_flops_per_image(three, 384, global_batch=16) == 2 * 3 * params / (2 * 16)
    assert extra_ema_flops_per_image(one, 384) == 0.0  # one EMA counts as it always did
    assert flops_per_image(three, 384) - flops_per_image(one, 384) == extra_ema_flops_per_image(three, 384)
