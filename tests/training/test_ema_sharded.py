"""The EMA copy under FSDP2 on 2 gloo ranks: it only ever runs forward (grids, evaluations), and
FSDP2 leaves a root module gathered after a forward, expecting a backward. The EMA update averages
shard with shard, so its parameters must be DTensor shards at every update, whatever ran before it.

Reproduced first without the fix (the root's parameters stay full tensors after a forward, which
is what crashed `torchrun ... cadence.sample_every=2 cadence.checkpoint_every=1000` at the update after
a grid), then with it: shards after a forward, and the update equals the unsharded lerp."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, gloo_rank

from pixelrun.model.denoiser import build_model

DECAY = 0.9


def _model():
    torch.manual_seed(0)
    model = build_model("tiny", 8, hidden_size=32, depth=2, num_heads=2, patch_size=8)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def _forward(model):
    g = torch.Generator().manual_seed(1)
    x, t, text = torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, generator=g), torch.randn(2, 3, 8, generator=g)
    with torch.no_grad():
        return model(x, t, text).prediction


def _worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.tensor import DTensor

    from pixelrun.infra.distributed import DistContext, shard
    from pixelrun.training.ema import EMA

    with gloo_rank(rank, 2, port):
        from torch.distributed.device_mesh import init_device_mesh

        ctx = DistContext(rank, 2, rank, torch.device("cpu"), init_device_mesh("cpu", (2,), mesh_dim_names=("shard",)))
        model = _model()
        # the mechanism: a plain fully_shard'ed copy keeps its root gathered after a forward
        twin = copy.deepcopy(model).requires_grad_(False)
        plain = shard(twin, ctx, None, blocks=twin.blocks)
        _forward(plain)
        left_full = [n for n, p in plain.named_parameters() if not isinstance(p, DTensor)]

        ema = EMA(model, [DECAY, 0.0], 1)  # a second EMA (ema.decays), of decay 0: the raw weights
        shard(model, ctx, None, blocks=model.blocks)
        ema.shard(ctx)
        with torch.no_grad():  # move the model so the update has something to average
            for p in model.parameters():
                p.add_(1.0)
        for m in ema.models:
            _forward(m)  # a grid or an evaluation (of each EMA) between two updates
        after_forward = [n for m in ema.models for n, p in m.named_parameters() if not isinstance(p, DTensor)]
        ema.maybe_update(model, 0)
        full = {n: p.full_tensor() for n, p in ema.model.named_parameters()}
        zero = {n: p.full_tensor() for n, p in ema.models[1].named_parameters()}
        raw = {n: p.full_tensor() for n, p in model.named_parameters()}
        torch.save(
            {"left_full": left_full, "after_forward": after_forward, "ema": full, "zero": zero, "raw": raw},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ema")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_a_forward_leaves_a_plain_root_gathered(results):
    """Without forward_only the root's own parameters (patch embedding, final layer...) stay full."""
    for r in results:
        assert r["left_full"] and any(n.startswith("img_in") for n in r["left_full"])


def test_ema_is_shards_after_a_forward_and_updates_like_the_unsharded_lerp(results):
    model = _model()
    want = {n: torch.lerp(p, p + 1.0, 1 - DECAY) for n, p in model.named_parameters()}
    for r in results:
        assert r["after_forward"] == []
        for n, w in want.items():
            torch.testing.assert_close(r["ema"][n], w, rtol=0, atol=1e-7, msg=n)


def test_a_second_ema_of_decay_0_is_the_sharded_raw_weights_bit_for_bit(results):
    for r in results:
        assert r["zero"].keys() == r["raw"].keys()
        for n, w in r["raw"].items():
            assert torch.equal(r["zero"][n], w), n
