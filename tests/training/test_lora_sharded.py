"""LoRA under FSDP2 on 2 gloo ranks: the peft-injected denoiser shards like the plain one (frozen base
weights and trained adapters in the same units), the EMA copy that shares the base shards too, and
3 steps of 2 images per rank give the losses and adapters of 3 steps of 4 images on one process,
the base weights untouched and the checkpoint's model part the adapters alone."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, gloo_rank, tiny_overrides

STEPS = 3


def _run(world: int, rank: int, enc_dir: str, run_dir: str, ctx) -> dict:
    from pixelrun.config import load_config, stage_plan
    from pixelrun.data.shapes import ShapesBatchSource
    from pixelrun.model.text import text_encoder
    from pixelrun.training.build import build_state
    from pixelrun.training.step import train_step

    over = {"train.lora.rank": 2, "run.init_from": "unused-here", "optimizer.name": "muon"}
    cfg = load_config(None, tiny_overrides(run_dir, enc_dir, **over, **{"optimizer.muon_precision": "fp32"}))
    enc = text_encoder(cfg, "cpu")

    def base(model):
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)

    torch.manual_seed(0)
    st = build_state(cfg, [c for *_, c in stage_plan(cfg)], ctx, enc.dim, base=base)
    micro = 4 // world
    source = ShapesBatchSource(0, "train", micro, [(32, 32)], rank=rank, world_size=world)
    null = enc.encode([""])
    losses = [train_step(st, source, enc, *null, cfg, s, micro, 1)[0]["loss"].item() for s in range(STEPS)]

    def full(p):
        return p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()

    return {
        "losses": losses,
        "weights": {n: full(p) for n, p in st.model.named_parameters()},
        "ema": {n: full(p) for n, p in st.ema.model.named_parameters()},
        "model_part": sorted(st.parts()["model"].state_dict()),
    }


def _worker(rank: int, port: int, enc_dir: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from pixelrun.infra.distributed import DistContext

    with gloo_rank(rank, 2, port):
        ctx = DistContext(rank, 2, rank, torch.device("cpu"), init_device_mesh("cpu", (2,), mesh_dim_names=("shard",)))
        out = _run(2, rank, enc_dir, os.path.join(out_dir, "r"), ctx)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_encoder_dir):
    from pixelrun.infra.distributed import DistContext

    out = tmp_path_factory.mktemp("lora-sharded")
    mp.spawn(_worker, args=(free_port(), tiny_encoder_dir, str(out)), nprocs=2, join=True)
    sharded = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    threads = torch.get_num_threads()
    one = _run(1, 0, tiny_encoder_dir, str(out / "one"), DistContext(0, 1, 0, torch.device("cpu")))
    torch.set_num_threads(threads)
    return sharded, one


def test_two_ranks_train_the_adapters_as_one_process_does(results):
    sharded, one = results
    mean = (torch.tensor(sharded[0]["losses"]) + torch.tensor(sharded[1]["losses"])) / 2  # each rank's 2 images
    torch.testing.assert_close(mean, torch.tensor(one["losses"]), rtol=1e-4, atol=1e-6)
    for r in sharded:
        assert r["model_part"] == one["model_part"] and all(".lora_" in k for k in one["model_part"])
        for n, w in one["weights"].items():
            tol = 1e-4 if ".lora_" in n else 0.0  # the base is never updated: bit for bit
            torch.testing.assert_close(r["weights"][n], w, rtol=tol, atol=tol, msg=n)
            torch.testing.assert_close(r["ema"][n], one["ema"][n], rtol=tol, atol=tol, msg=n)
