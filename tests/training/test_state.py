"""A checkpoint of stateful parts (pixelrun/training/state.py): each part's state round-trips, one
call saves them all and one call restores them, and the meta of a checkpoint written before the
parts (`CheckpointMeta` format 1) still loads."""

from __future__ import annotations

import pytest
import torch

from pixelrun.config import load_config, to_dict
from pixelrun.data.shapes import ShapesBatchSource
from pixelrun.infra import checkpoint as ckpt
from pixelrun.infra.distributed import DistContext
from pixelrun.infra.records import CheckpointMeta, RecordError
from pixelrun.training.ema import EMA
from pixelrun.training.schedule import LRSchedule
from pixelrun.training.state import (
    Checkpointer,
    Counters,
    DataPosition,
    ModelWeights,
    NonFiniteState,
    OptimizerState,
    RNGState,
    RunIdentity,
    ScheduleState,
)

CPU = DistContext(0, 1, 0, torch.device("cpu"))


def _parts(seed: int, cfg):
    """A small run's parts: a linear model, its EMA copy, AdamW with the config's schedule."""
    torch.manual_seed(seed)
    trainable = torch.nn.ModuleDict({"denoiser": torch.nn.Linear(4, 3)})
    opt = torch.optim.AdamW(trainable.parameters(), lr=1e-2)
    sched = LRSchedule(opt, cfg)
    counters, position = Counters(), DataPosition(CPU)
    parts = {
        "model": ModelWeights(trainable),
        "optimizer": OptimizerState(trainable, opt),
        "ema": EMA(trainable["denoiser"], 0.9, 1),
        "schedule": ScheduleState(sched),
        "rng": RNGState(),
        "data": position,
        "counters": counters,
        "run": RunIdentity(cfg, 32),
    }
    return parts, trainable, opt, sched


def _train(trainable, opt, sched, ema, steps: int) -> None:
    for step in range(steps):
        loss = trainable["denoiser"](torch.randn(2, 4)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        ema.maybe_update(trainable["denoiser"], step)


@pytest.fixture
def cfg():
    return load_config(None, ["train.steps=10", "schedule.warmup_steps=4"])


def test_model_optimizer_and_ema_round_trip(cfg):
    parts, trainable, opt, sched = _parts(0, cfg)
    _train(trainable, opt, sched, parts["ema"], 3)
    saved = {k: parts[k].state_dict() for k in ("model", "optimizer", "ema")}
    saved = {k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in s.items()} for k, s in saved.items()}
    fresh, *_ = _parts(1, cfg)
    for k in ("model", "ema"):
        fresh[k].load_state_dict(saved[k])
        assert all(torch.equal(v, saved[k][n]) for n, v in fresh[k].state_dict().items()), k
    fresh["optimizer"].load_state_dict(parts["optimizer"].state_dict())
    a, b = parts["optimizer"].state_dict()["state"], fresh["optimizer"].state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[n]["exp_avg"], b[n]["exp_avg"]) for n in a)


def test_meta_parts_round_trip(cfg):
    parts, trainable, opt, sched = _parts(0, cfg)
    _train(trainable, opt, sched, parts["ema"], 3)
    assert parts["schedule"].state_dict() == {"scheduler": {"last_epoch": 3}}
    fresh, _, _, fresh_sched = _parts(1, cfg)
    fresh["schedule"].load_state_dict(parts["schedule"].state_dict())
    assert fresh_sched.last_epoch == 3 and fresh_sched.get_last_lr() == sched.get_last_lr()

    rng = parts["rng"].state_dict()
    first = torch.rand(3)
    parts["rng"].load_state_dict(rng)
    assert torch.equal(torch.rand(3), first)

    counters = Counters(step=7, stage=1, train_seconds=2.5, skipped_steps=1)
    back = Counters()
    back.load_state_dict(counters.state_dict())
    assert back == counters
    back.load_state_dict({"step": 3})  # a meta from before stages, times and skipped steps were saved
    assert back == Counters(step=3)

    assert parts["run"].state_dict() == {"config": to_dict(cfg), "text_dim": 32}


def test_data_position_round_trip_and_carry_over():
    position = DataPosition(CPU)
    position.source = ShapesBatchSource(0, "train", 4, [(32, 32)])
    for _ in range(3):
        next(position.source)
    state = position.state_dict()
    assert state == {"data": [{"next_batch": 3}], "world_size": 1}
    back = DataPosition(CPU)
    back.load_state_dict({**state, "stage": 0})
    source = _FolderLike()
    assert back.place(source, stage=0, steps_into_stage=3, accum=1) is None and source.state == {"next_batch": 3}
    two = DataPosition(CPU)
    two.load_state_dict({"data": [{"a": 1}, {"a": 2}], "world_size": 2, "stage": 0})
    warning = two.place(_FolderLike(), stage=0, steps_into_stage=3, accum=1)
    assert warning is not None and "saved on 2 rank(s)" in warning and "carried to 1" in warning
    counted = ShapesBatchSource(0, "train", 4, [(32, 32)])
    assert two.place(counted, stage=0, steps_into_stage=3, accum=2) is None and counted.next_batch == 6


class _FolderLike:
    """A batch source whose position is not a batch counter (an image folder's)."""

    state: dict | None = None

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def test_one_call_saves_every_part_and_one_call_restores_them(tmp_path, cfg):
    parts, trainable, opt, sched = _parts(0, cfg)
    _train(trainable, opt, sched, parts["ema"], 3)
    parts["data"].source = ShapesBatchSource(0, "train", 4, [(32, 32)])
    parts["counters"].step = 3
    path = Checkpointer(parts).save(tmp_path, 3, "seed: 0\n", keep=2, ctx=None)
    keys = ckpt.saved_keys(path)
    assert {k.split(".")[0] for k in keys} == {"model", "optimizer", "ema"}
    assert "model.denoiser.weight" in keys and "ema.weight" in keys
    meta = ckpt.load_meta(path)
    assert (meta.step, meta.stage, meta.world_size, meta.text_dim) == (3, 0, 1, 32)
    assert meta.scheduler == {"last_epoch": 3} and meta.data == [{"next_batch": 0}]
    after = torch.rand(2)

    fresh, f_trainable, f_opt, f_sched = _parts(1, cfg)
    Checkpointer(fresh).load(path, meta)
    assert torch.equal(f_trainable["denoiser"].weight, trainable["denoiser"].weight)
    assert torch.equal(fresh["ema"].model.weight, parts["ema"].model.weight)
    assert f_sched.last_epoch == 3 and fresh["counters"].step == 3
    assert torch.equal(torch.rand(2), after)  # the RNG is where the save left it
    a, b = opt.state_dict()["state"], f_opt.state_dict()["state"]
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in ("step", "exp_avg", "exp_avg_sq"))


def test_a_non_finite_state_is_never_saved(tmp_path, cfg):
    parts, trainable, *_ = _parts(0, cfg)
    parts["data"].source = ShapesBatchSource(0, "train", 4, [(32, 32)])
    with torch.no_grad():
        trainable["denoiser"].bias[1] = float("nan")
    with pytest.raises(NonFiniteState, match="model.denoiser.bias holds non-finite values"):
        Checkpointer(parts).save(tmp_path, 1, "seed: 0\n", keep=2, ctx=None)
    assert not ckpt.checkpoint_root(tmp_path).exists() or not list(ckpt.checkpoint_root(tmp_path).iterdir())


OLD_META = {  # what pixelrun wrote before the parts: no format, two keys nothing read
    "step": 20,
    "stage": 0,
    "scheduler": {"last_epoch": 20},
    "torch_rng": torch.get_rng_state(),
    "data": [{"next_batch": 20}],
    "world_size": 1,
    "trainable": ["denoiser", "repa_projector"],
    "optimizer_kind": "adamw",
    "config": {"seed": 0},
    "text_dim": 384,
    "train_seconds": 9.5,
    "skipped_steps": 0,
}


def test_an_old_meta_loads_and_a_new_one_drops_the_unread_keys(tmp_path):
    torch.save(OLD_META, tmp_path / "meta.pt")
    meta = CheckpointMeta.read(tmp_path)
    assert (meta.step, meta.stage, meta.text_dim, meta.train_seconds) == (20, 0, 384, 9.5)
    assert torch.equal(meta.torch_rng, OLD_META["torch_rng"]) and meta.data == [{"next_batch": 20}]
    oldest = {k: v for k, v in OLD_META.items() if k not in ("stage", "train_seconds", "skipped_steps")}
    torch.save(oldest, tmp_path / "meta.pt")
    meta = CheckpointMeta.read(tmp_path)
    assert (meta.stage, meta.train_seconds, meta.skipped_steps) == (None, 0.0, 0)
    meta.write(tmp_path)
    written = torch.load(tmp_path / "meta.pt", weights_only=True)
    assert written["format"] == CheckpointMeta.FORMAT and "trainable" not in written and "optimizer_kind" not in written


def test_an_unknown_or_missing_meta_field_names_the_file(tmp_path):
    new = {k: v for k, v in OLD_META.items() if k != "optimizer_kind"}
    torch.save({**new, "format": 2}, tmp_path / "meta.pt")  # format 2 no longer holds `trainable`
    with pytest.raises(RecordError, match=r"meta\.pt: unknown field checkpoint meta\.trainable"):
        CheckpointMeta.read(tmp_path)
    torch.save({k: v for k, v in OLD_META.items() if k != "text_dim"}, tmp_path / "meta.pt")
    with pytest.raises(RecordError, match=r"meta\.pt: missing field checkpoint meta\.text_dim"):
        CheckpointMeta.read(tmp_path)
    (tmp_path / "meta.pt").write_bytes(b"garbage")
    with pytest.raises(RecordError, match=r"meta\.pt: cannot be read as a checkpoint meta record"):
        CheckpointMeta.read(tmp_path)


def test_a_checkpoint_of_a_newer_format_is_an_error_not_damage(tmp_path):
    from pixelrun.infra.checkpoint_save import save_checkpoint
    from pixelrun.infra.checkpoint_verify import verified_latest, write_manifest

    meta = CheckpointMeta.from_dict(OLD_META)
    path = save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, meta, "seed: 0\n")
    torch.save({**meta.to_dict(), "format": 99}, path / "meta.pt")
    write_manifest(path)  # its files are whole: only this pixelrun is too old for them
    with pytest.raises(RecordError, match=r"meta\.pt: checkpoint meta record of format 99.*upgrade pixelrun"):
        verified_latest(tmp_path)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002"]  # not moved aside
