"""A checkpoint made of stateful parts (torchtitan's `CheckpointManager` in torchtitan/components/checkpoint.py takes a dict of such parts): the
model, the EMA copy, the optimizer, the schedule, the data position, the RNG and the counters each
expose `state_dict()` / `load_state_dict()`, and `Checkpointer` saves them in one call and restores
them in one call.

    parts = {"model": ..., "optimizer": ..., "ema": ..., "schedule": ..., "rng": ..., ...}
    Checkpointer(parts).save(run_dir, step, config_yaml, keep, ctx)
    Checkpointer(parts).load(path, meta)

Two kinds of part, by where their state goes:
- tensor parts (`TENSOR_PARTS`: model, optimizer, ema): a (possibly sharded) state dict tree that
  torch.distributed.checkpoint writes under the part's name (keys ``model.*``, ``optimizer.*``,
  ``ema.*``, one EMA per decay: pixelrun/training/ema.py), every rank its shards;
- meta parts: a few plain fields of the checkpoint meta (`CheckpointMeta`, rank 0's ``meta.pt``);
  each returns the fields it owns and reads them back from the whole meta.

Parts load in the order of the dict: the optimizer before the schedule (which re-applies the
config's optimizer settings), the RNG last.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

import torch

from pixelrun.config import Config, RunFailed, to_dict
from pixelrun.infra import checkpoint as ckpt
from pixelrun.infra.checkpoint_save import save_checkpoint
from pixelrun.infra.distributed import DistContext
from pixelrun.infra.records import CheckpointMeta

TENSOR_PARTS = ("model", "optimizer", "ema")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NonFiniteState(RunFailed):
    """A state that would be saved with a NaN or an infinity: nothing was written."""

    def __init__(self, name: str):
        super().__init__(f"{name} holds non-finite values")
        self.name = name


# ----------------------------------------------------------------------------- tensor parts


class ModelWeights:
    """The trained modules by name (the denoiser, and the REPA projector when REPA is on). Frozen
    weights (LoRA's base, read from run.init_from by every session) are not saved: only what trains."""

    def __init__(self, trainable: torch.nn.Module):
        self.trainable = trainable
        params = list(trainable.named_parameters())
        self.trained_names = {n for n, p in params if p.requires_grad}
        self.partial = len(self.trained_names) < len(params)

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(self.trainable)
        return {k: v for k, v in sd.items() if k in self.trained_names} if self.partial else sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.trainable, state, options=StateDictOptions(strict=not self.partial))


class OptimizerState:
    """The optimizer's moments by parameter name (so it reshards like the weights)."""

    def __init__(self, trainable: torch.nn.Module, opt: torch.optim.Optimizer):
        self.trainable, self.opt = trainable, opt

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.trainable, self.opt)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.trainable, self.opt, state)


# ----------------------------------------------------------------------------- meta parts


class ScheduleState:
    """The learning-rate schedule's step count (meta ``scheduler``); the rest is the config's."""

    def __init__(self, sched: Any):
        self.sched = sched

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.sched.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sched.load_state_dict(state["scheduler"])


class RNGState:
    """torch's CPU generator (meta ``torch_rng``). The training draws are keyed by global sample
    (diffusion/draws.py) and need none of it; what else draws from it resumes as it was."""

    def state_dict(self) -> dict[str, Any]:
        return {"torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch_rng"])


@dataclasses.dataclass
class Counters:
    """How far the run is (meta ``step``, ``stage``, ``train_seconds``, ``skipped_steps``)."""

    step: int = 0
    stage: int = 0
    train_seconds: float = 0.0  # time in training steps over every session (no grids, evaluations, saves)
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient norm, resumed sessions included

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.stage = int(state.get("stage") or 0)
        self.train_seconds = float(state.get("train_seconds") or 0.0)
        self.skipped_steps = int(state.get("skipped_steps") or 0)


class DataPosition:
    """Where each rank's batch source stands (meta ``data``, by rank, and ``world_size``, the ranks
    that saved it). Saving gathers every rank's position; loading keeps the saved one until a
    stage's source is opened (`place`)."""

    def __init__(self, ctx: DistContext):
        self.ctx = ctx
        self.source: Any = None  # the open stage's batch source
        self.saved: list[Any] | None = None
        self.saved_stage: int | None = None
        self.saved_world_size: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.ctx.gather_objects(self.source.state_dict()), "world_size": self.ctx.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved, self.saved_world_size = state["data"], int(state["world_size"])
        self.saved_stage = state.get("stage")  # the counters' field: the stage this position belongs to

    def place(self, source: Any, stage: int, steps_into_stage: int, accum: int) -> str | None:
        """Put a fresh batch source of `stage` where the checkpoint left it. The shapes stream is a
        pure function of its batch counter (the same on every rank), so it resumes on any number of
        ranks; an image folder's per-rank position only carries over to the same number of ranks.
        Returns a warning when the position cannot be carried over."""
        self.source = source
        if steps_into_stage == 0:
            return None
        if hasattr(source, "next_batch"):
            source.load_state_dict({"next_batch": steps_into_stage * accum})
            return None
        if self.saved is not None and self.saved_stage == stage and self.saved_world_size == self.ctx.world_size:
            source.load_state_dict(self.saved[self.ctx.rank])
            return None
        return (
            f"warning: the data position was saved on {self.saved_world_size or '?'} rank(s) and cannot be "
            f"carried to {self.ctx.world_size}; this stage's image order starts afresh"
        )


class RunIdentity:
    """The run's config and text width (meta ``config``, ``text_dim``): what a resume checks before
    loading anything (pixelrun/run/resume.py), so loading them back changes nothing."""

    def __init__(self, cfg: Config, text_dim: int):
        self.cfg, self.text_dim = cfg, text_dim

    def state_dict(self) -> dict[str, Any]:
        return {"config": to_dict(self.cfg), "text_dim": self.text_dim}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# ----------------------------------------------------------------------------- the checkpoint


class Checkpointer:
    """Every part of a run saved in one call and restored in one call."""

    def __init__(self, parts: dict[str, Stateful]):
        self.parts = parts

    def tensors(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items() if name in TENSOR_PARTS}

    def meta(self) -> CheckpointMeta:
        fields: dict[str, Any] = {}
        for name, part in self.parts.items():
            if name not in TENSOR_PARTS:
                fields.update(part.state_dict())
        return CheckpointMeta.from_dict({"format": CheckpointMeta.FORMAT, **fields}, "the checkpoint being saved")

    def save(self, run_dir: str | Path, step: int, config_yaml: str, keep: int, ctx: DistContext | None) -> Path:
        """Write the checkpoint of `step` (every rank calls this: the tensor save is collective).
        Never of a non-finite state: NonFiniteState names the first such tensor, nothing written."""
        tensors = self.tensors()
        bad = ckpt.first_nonfinite(tensors, ctx)
        if bad is not None:
            raise NonFiniteState(bad)
        return save_checkpoint(run_dir, step, tensors, self.meta(), config_yaml, keep, ctx)

    def load(self, path: str | Path, meta: CheckpointMeta) -> None:
        """Every part from the checkpoint at `path` (written on any number of ranks: DCP reshards)."""
        tree = {
            name: part.load_tree(meta.config) if hasattr(part, "load_tree") else part.state_dict()
            for name, part in self.parts.items()
            if name in TENSOR_PARTS
        }  # `load_tree`: a part whose saved layout depends on the saved config (the EMAs, one per decay)
        ckpt.load_tensors(path, tree)
        fields = meta.to_dict()
        for name, part in self.parts.items():
            part.load_state_dict(tree[name] if name in TENSOR_PARTS else fields)
