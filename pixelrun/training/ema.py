"""The exponential moving average of the weights: what grids, evaluations and exports sample."""

from __future__ import annotations

import copy

import torch
from torch.distributed.tensor import DTensor

from pixelrun.infra.distributed import DistContext, is_sharded, local, shard


class EMA:
    """The weights' moving average, kept in fp32, updated every `every` steps.

    Under FSDP2 the EMA copy is sharded exactly like the model, so each rank averages its own
    shards with no communication."""

    def __init__(self, model: torch.nn.Module, decay: float, every: int):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.every = decay, every

    def shard(self, ctx: DistContext) -> None:
        """Shard the copy like the model; it only ever runs forward (grids, evaluations)."""
        shard(self.model, ctx, None, blocks=self.model.blocks, forward_only=True)

    def state_dict(self) -> dict:
        """The averaged weights by name, sharded as they are (a checkpoint's ``ema.*``)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, state)

    @torch.no_grad()
    def maybe_update(self, model: torch.nn.Module, step: int):
        if step % self.every == 0:
            ema_p, model_p = list(self.model.parameters()), [p.detach() for p in model.parameters()]
            if is_sharded(self.model) and not all(isinstance(p, DTensor) for p in ema_p):
                # A full tensor where a shard belongs: averaging it with the model's shard would
                # mix unrelated rows (or fail on the shapes). Never average anything but shards.
                raise RuntimeError(
                    "EMA update on unsharded parameters: a forward-only pass left the "
                    "EMA copy gathered (shard it with forward_only=True)"
                )
            torch._foreach_lerp_([local(p) for p in ema_p], [local(p) for p in model_p], 1.0 - self.decay)
