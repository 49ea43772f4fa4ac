"""The exponential moving averages of the weights: what grids, evaluations and exports sample.

A run keeps one EMA per decay of `ema.decays` (JiT keeps two, picked at evaluation: LTH14/JiT
denoiser.py, `Denoiser.update_ema` on `ema_params1` / `ema_params2`; read in forks of JiT). The
first is the run's EMA as before there were several: grids, the validation loss, metrics.jsonl and
the checkpoint's ``ema.*`` keys. Each further one is saved under ``ema.<ema_key(decay)>.*``
(pixelrun/infra/checkpoint.py), so a checkpoint of one EMA is still read as it was written.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from pixelrun.infra.checkpoint import ema_key, saved_ema_decays
from pixelrun.infra.distributed import DistContext, is_sharded, local, shard


class EMA:
    """The weights' moving averages, one fp32 copy per decay, updated every `every` steps.

    Under FSDP2 every copy is sharded exactly like the model, so each rank averages its own shards
    with no communication.

    Only what trains is averaged: a model with frozen parameters (LoRA's base weights) gives copies
    that share them with it (one set of base weights in memory, not one per decay) and a state of
    the trained parameters alone (the adapters)."""

    def __init__(self, model: torch.nn.Module, decay: float | list[float], every: int):
        self.decays = [float(decay)] if isinstance(decay, (int, float)) else [float(d) for d in decay]
        params = list(model.named_parameters())
        self.trained = [i for i, (_, p) in enumerate(params) if p.requires_grad]
        self.partial = len(self.trained) < len(params)  # frozen weights: LoRA's base
        self.trained_names = {n for n, p in params if p.requires_grad}
        frozen = {id(p): p for _, p in params if not p.requires_grad} if self.partial else {}
        # deepcopy's memo maps each frozen parameter to itself: shared, not copied
        self.models = [copy.deepcopy(model, memo=dict(frozen)).eval().requires_grad_(False) for _ in self.decays]
        self.every = every
        self.notes: list[str] = []  # what a load did not find in the checkpoint (the run prints them)
        self._sources: list[str | None] | None = None  # set by `load_tree`, used by `load_state_dict`

    @property
    def model(self) -> torch.nn.Module:
        """The first decay's copy: the run's EMA (grids, the validation loss, metrics.jsonl)."""
        return self.models[0]

    @property
    def decay(self) -> float:
        return self.decays[0]

    def by_decay(self) -> list[tuple[float, torch.nn.Module]]:
        return list(zip(self.decays, self.models))

    def shard(self, ctx: DistContext) -> None:
        """Shard each copy like the model; they only ever run forward (grids, evaluations)."""
        for m in self.models:
            shard(m, ctx, None, blocks=m.blocks, forward_only=True)

    def _state(self, m: torch.nn.Module) -> dict[str, Any]:
        """A copy's averaged weights by name (the trained ones: the frozen ones are the model's)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(m)
        return {k: v for k, v in sd.items() if k in self.trained_names} if self.partial else sd

    def _set(self, m: torch.nn.Module, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(m, state, options=StateDictOptions(strict=not self.partial))

    def state_dict(self) -> dict[str, Any]:
        """The first copy's weights by name (a checkpoint's ``ema.*``), each further copy's under its
        `ema_key`; sharded as they are."""
        sd: dict[str, Any] = dict(self._state(self.models[0]))
        for d, m in zip(self.decays[1:], self.models[1:]):
            sd[ema_key(d)] = self._state(m)
        return sd

    def load_tree(self, config: dict | None) -> dict[str, Any]:
        """The tree to fill from a checkpoint saved with `config` (its meta's): each configured decay
        from where that checkpoint keeps it. A decay it does not keep (ema.decays grew since, or an
        old checkpoint of one EMA) starts from the checkpoint's first EMA, with a note."""
        saved = saved_ema_decays(config) if config is not None else self.decays
        sources: list[str | None] = ["" if d == saved[0] else ema_key(d) if d in saved else None for d in self.decays]
        # the checkpoint's first EMA (keys ema.*) goes into the copy of its decay, else the first fresh one
        first = sources.index("") if "" in sources else sources.index(None) if None in sources else None
        if first is not None:
            sources[first] = ""
        self._sources = sources
        tree: dict[str, Any] = {}
        for i, src in enumerate(sources):
            if src == "":
                tree.update(self._state(self.models[i]))
            elif src is not None:
                tree[src] = self._state(self.models[i])
        self.notes = [
            f"EMA {d:g}: not in the checkpoint (it keeps {', '.join(f'{s:g}' for s in saved)}); "
            f"starts from its EMA {saved[0]:g}"
            for d, src in zip(self.decays, sources)
            if src is None or (src == "" and d != saved[0])
        ]
        return tree

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Each copy from `state` (a tree from `state_dict`, or from `load_tree` once it is filled);
        a copy the checkpoint lacked takes the weights of the one that read its first EMA."""
        sources = self._sources or ["", *(ema_key(d) for d in self.decays[1:])]
        self._sources = None
        first = {k: v for k, v in state.items() if not isinstance(v, dict)}
        for m, src in zip(self.models, sources):
            if src is not None:
                self._set(m, first if src == "" else state[src])
        with torch.no_grad():
            for m, src in zip(self.models, sources):
                if src is None:  # load_tree gave the checkpoint's first EMA to one copy: `origin`
                    origin = self.models[sources.index("")]
                    torch._foreach_copy_([local(p) for p in m.parameters()], [local(p) for p in origin.parameters()])

    @torch.no_grad()
    def maybe_update(self, model: torch.nn.Module, step: int):
        if step % self.every:
            return
        all_p = list(model.parameters())
        model_p = [local(all_p[i].detach()) for i in self.trained]
        for decay, copy_ in zip(self.decays, self.models):
            copy_p = list(copy_.parameters())
            ema_p = [copy_p[i] for i in self.trained]
            if is_sharded(copy_) and not all(isinstance(p, DTensor) for p in ema_p):
                # A full tensor where a shard belongs: averaging it with the model's shard would
                # mix unrelated rows (or fail on the shapes). Never average anything but shards.
                raise RuntimeError(
                    "EMA update on unsharded parameters: a forward-only pass left the "
                    "EMA copy gathered (shard it with forward_only=True)"
                )
            # decay 0: lerp with weight 1 is `end` exactly (torch computes end - diff * 0), the raw weights
            torch._foreach_lerp_([local(p) for p in ema_p], model_p, 1.0 - decay)
