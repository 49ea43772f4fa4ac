"""Validation loss by noise level: the flow loss of one fixed held-out batch in three bins of t.

PRX logs it, and it is the cheapest early warning that a run has gone wrong: a rising "low" bin
(fine detail) or a "high" bin (composition) stuck at its start are visible long before samples or
FID move. Unlike the training loss, nothing in it changes between calls but the weights.

The batch: the first ``eval.val_images`` held-out images of the run's data and their captions
(:func:`pixelrun.evaluation.heldout.real_images_and_prompts`: the shapes "eval" split, the held-out emoji,
the first items of a folder or of the shards), each evaluated once in every bin:

    low  = t in [0, 1/3)      (little noise)
    mid  = t in [1/3, 2/3)
    high = t in [2/3, 1]      (t = 1 is pure noise)

Inside a bin the ``n`` times are the midpoints ``lo + (hi - lo) (k + 1/2) / n``, k = 0..n-1, so
each bin is covered evenly; which image gets which midpoint is a fixed permutation per bin (from
``seed``), so no image is always the least noisy. Each (bin, image) pair has its own noise, drawn
from a generator keyed by (seed, bin, image) on the model's device: the same every call, and a
resumed run reproduces the numbers of the run it continues. Captions are never dropped; routing is
off (the dense model); autocast is the training step's.

The loss is :func:`pixelrun.diffusion.objective.velocity_loss` (x-prediction compared in velocity space,
``objective.t_clamp``), noising with ``objective.noise_scale``: the training step's ``flow`` term,
averaged over every pixel of the bin's images.

How the training loop uses it (every ``eval.every`` steps and at the end, on EVERY rank, since a
sharded model's forward is collective; rank 0 writes the numbers)::

    val = ValidationLoss(cfg, encoder, device)            # once per run, before training
    ...
    row = {**val(model, scfg), **val(ema.model, scfg, prefix="val_ema")}
    # {"val/flow/low": .., "val/flow/mid": .., "val/flow/high": ..,
    #  "val_ema/flow/low": .., "val_ema/flow/mid": .., "val_ema/flow/high": ..}

Each call leaves a sharded model resharded (FSDP2 keeps the root gathered after a forward, for
a backward that validation never runs), so the optimizer and the EMA update find shards.

``val/...`` are the raw weights (the ones the optimizer moves: comparable with the training loss),
``val_ema/...`` the EMA weights (the ones sampled and evaluated). Every rank feeds the same rows in
the same chunks of ``train.batch_size`` (the micro-batch, which is known to fit), bin by bin, images
in held-out order, so FSDP2's collectives line up and no shape depends on the rank.
"""

from __future__ import annotations

import numpy as np
import torch

from pixelrun.config import Config, ConfigError
from pixelrun.data import to_model_range
from pixelrun.diffusion.objective import add_noise, velocity_loss
from pixelrun.evaluation.heldout import dataset_key, real_images_and_prompts
from pixelrun.infra.distributed import is_sharded
from pixelrun.infra.precision import autocast_dtype

#: (name, lower bound, upper bound) of each bin of t; the last bin includes t = 1
BINS = (("low", 0.0, 1 / 3), ("mid", 1 / 3, 2 / 3), ("high", 2 / 3, 1.0))

_VAL_STREAM = 0x76616C  # "val": keeps these draws apart from training's and sampling's


def bin_times(n: int, seed: int) -> dict[str, torch.Tensor]:
    """The ``n`` times of each bin, in held-out image order: the bin's midpoints, permuted."""
    out = {}
    for b, (name, lo, hi) in enumerate(BINS):
        mid = lo + (hi - lo) * (np.arange(n) + 0.5) / n
        order = np.random.default_rng([seed & (2**63 - 1), _VAL_STREAM, b]).permutation(n)
        out[name] = torch.tensor(mid[order], dtype=torch.float32)
    return out


def bin_noise(seed: int, bin_index: int, images: range, shape: tuple[int, int, int], device) -> torch.Tensor:
    """The noise of images ``images`` in bin ``bin_index``: one generator per (seed, bin, image) on
    ``device``, so a chunk's noise does not depend on how the rows are chunked."""
    device = torch.device(device)
    out = []
    for i in images:
        key = np.random.SeedSequence([seed & (2**63 - 1), _VAL_STREAM, bin_index, i]).generate_state(1, np.uint64)[0]
        g = torch.Generator(device).manual_seed(int(key) & (2**63 - 1))
        out.append(torch.randn((1, *shape), generator=g, device=device))
    return torch.cat(out)


class ValidationLoss:
    """The flow loss of a fixed held-out batch per noise bin (see the module docstring)."""

    def __init__(self, cfg: Config, encoder, device, *, images: int | None = None):
        self.cfg, self.encoder, self.device = cfg, encoder, torch.device(device)
        self.n = cfg.eval.val_images if images is None else int(images)
        if self.n < 1:
            raise ConfigError("eval.val_images", f"the validation loss needs at least 1 image, got {self.n}")
        self._batches: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]] = {}
        self.batch(cfg)  # now: too few held-out images fail before any training

    def batch(self, cfg: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        """(clean images uint8 [n, 3, R, R] on the CPU, text [n, T, D] and mask [n, T] on the device,
        captions) of ``cfg``'s data and resolution; built once per data and resolution (a stage that
        changes the resolution gets its own)."""

        key = (dataset_key(cfg), cfg.data.resolution)
        if key not in self._batches:
            # a folder smaller than eval.val_images lends all its images (the same ones every call)
            images, captions = real_images_and_prompts(cfg, self.n, at_most=True)
            self.n = len(captions)
            text, mask = (a.to(self.device) for a in self.encoder.encode(captions))
            self._batches[key] = (
                torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2),
                text,
                mask,
                captions,
            )
        return self._batches[key]

    @torch.no_grad()
    def __call__(self, model, cfg: Config | None = None, *, prefix: str = "val") -> dict[str, float]:
        """``{f"{prefix}/flow/low": ..., ".../mid": ..., ".../high": ...}`` of ``model`` (raw or EMA,
        sharded or not) on this batch. ``cfg``: the current stage's config (default: the one given at
        construction) for its resolution and objective settings."""

        cfg = cfg or self.cfg
        images, text, mask, _ = self.batch(cfg)
        o = cfg.objective
        dtype = autocast_dtype(cfg, self.device)
        chunk = max(1, cfg.train.batch_size)
        times = bin_times(self.n, cfg.seed)
        was_training = model.training
        model.eval()
        out = {}
        try:
            for b, (name, _, _) in enumerate(BINS):
                total = 0.0
                for k in range(0, self.n, chunk):
                    rows = range(k, min(k + chunk, self.n))
                    x = to_model_range(images[k : rows.stop].to(self.device))
                    t = times[name][k : rows.stop].to(self.device)
                    c, h, w = x.shape[1:]
                    eps = bin_noise(cfg.seed, b, rows, (c, h, w), self.device)
                    x_t = add_noise(x, eps, t, o.noise_scale)
                    with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                        x_hat = model(x_t, t, text[k : rows.stop], mask[k : rows.stop]).prediction
                    total += velocity_loss(x_hat.float(), x, x_t, t, o.t_clamp).item() * len(rows)
                out[f"{prefix}/flow/{name}"] = total / self.n
        finally:
            model.train(was_training)
            if is_sharded(model):  # FSDP2 keeps the root gathered after a forward, for a backward
                model.reshard()  # that never comes here: leave the weights as shards, as found
        return out
