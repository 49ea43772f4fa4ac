"""Data-parallel training across processes: torchrun's environment, FSDP2 sharding, and the few
collectives the training loop needs. A plain process (no WORLD_SIZE in the environment) uses none
of it: the model stays a plain module and every helper here is a no-op.

Layout of one optimizer step over `world` ranks with micro-batch B and A accumulation steps:
micro-step m on rank r holds step-local samples j = (m * world + r) * B + i, i < B. The data
sources and the per-sample noise (`diffusion.draws.step_draws`) are both keyed by j, so one step sees the
same images with the same noise whether it runs as 1 rank x 8, 2 ranks x 4 or 1 rank x 4 x 2.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from pixelrun.config import ConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None = None  # ("shard",) or ("replicate", "shard"); None = one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Launched by torchrun (or a launcher setting WORLD_SIZE): sharded with FSDP2, even on one
        rank, so `torchrun --nproc_per_node=1` runs the same code path as a cluster."""
        return self.mesh is not None

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of a dict of scalars (loss terms for the log)."""
        if not self.distributed or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return {k: v / self.world_size for k, v in zip(keys, t.tolist())}

    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """A small tensor summed over ranks, on the device (no host sync of its own)."""
        if not self.distributed:
            return t
        t = t.to(self._comm_device(), torch.float32)
        dist.all_reduce(t)
        return t

    def gather_objects(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun (or any launcher setting the usual variables)
    gives them; world size 0 when no launcher set WORLD_SIZE (a plain single process)."""
    world = int(os.environ.get("WORLD_SIZE", "0"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def resolve_device(name: str, key: str = "hardware.device") -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` as a torch device; anything else, or CUDA on a machine without
    it, is a ConfigError naming `key` (the config key, or the flag that gave the name)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (name in ("cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ConfigError(key, f"must be auto, cpu, cuda or cuda:N; got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(key, f"{name} asked for, but CUDA is not available on this machine (use cpu or auto)")
        if ":" in name and int(name[5:]) >= torch.cuda.device_count():
            raise ConfigError(key, f"{name} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def init_distributed(device_name: str, replicate: int = 1) -> DistContext:
    """Join the process group if the launcher started several processes: NCCL on CUDA, gloo on CPU.
    Each rank takes the GPU of its local rank."""
    rank, world, local = world_from_env()
    device = resolve_device(device_name)
    if world == 0:
        return DistContext(0, 1, 0, device)
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if cuda:
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh

    if replicate > 1:
        mesh = init_device_mesh(device.type, (replicate, world // replicate), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return DistContext(rank, world, local, device, mesh)


def shard(
    module: torch.nn.Module, ctx: DistContext, param_dtype: torch.dtype | None, blocks=(), forward_only: bool = False
) -> torch.nn.Module:
    """FSDP2: each of `blocks` is its own unit (its parameters are gathered just before it runs
    and freed after), then the root takes the rest. With bf16, parameters are gathered in bf16 and
    gradients reduced in fp32; the master weights and the optimizer stay fp32.

    `forward_only` is for a copy that never runs a backward (the EMA weights, used by grids and
    evaluations). FSDP2 leaves the root's parameters gathered after a forward, expecting the
    backward to need them at once; a forward-only module would keep full tensors registered where
    its shards belong, and the next shard-wise update (EMA) would mix the two. Asking for
    `reshard_after_forward=True` explicitly makes the root reshard like every other unit."""
    if not ctx.distributed:
        return module
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (
        MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        if param_dtype
        else MixedPrecisionPolicy()
    )
    for block in blocks:
        fully_shard(block, mesh=ctx.mesh, mp_policy=mp)
    fully_shard(module, mesh=ctx.mesh, mp_policy=mp, reshard_after_forward=True if forward_only else None)
    return module


def set_gradient_sync(modules, enabled: bool):
    """Under FSDP2, skip the reduce-scatter on all but the last micro-step of an accumulation."""
    for m in modules:
        if hasattr(m, "set_requires_gradient_sync"):
            m.set_requires_gradient_sync(enabled)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor is its own shard)."""
    return t.to_local() if hasattr(t, "to_local") else t


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether `fully_shard` was applied to `module` (its parameters are then DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip by the global 2-norm over all gradients (whole tensors, not shards) and return it."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm)
    return norm


@contextlib.contextmanager
def process_group(device_name: str, replicate: int = 1):
    """`init_distributed`'s context for the block, and the process group left as `shutdown` says:
    together after a clean finish, at once after an error."""
    ctx = init_distributed(device_name, replicate)
    try:
        yield ctx
    except BaseException:
        if ctx.distributed:
            shutdown(clean=False)
        raise
    if ctx.distributed:
        shutdown(clean=True)


def shutdown(clean: bool = True):
    """Leave the process group. After a clean finish the ranks leave together: the barrier keeps a
    rank that finished first from tearing down its gloo/NCCL pairs while a peer still has traffic
    in flight (seen as an abort in the C++ destructors at exit). After an error there is no
    barrier, since the peers may be stuck in another collective."""
    if dist.is_initialized():
        try:
            if clean:
                dist.barrier()
        finally:
            dist.destroy_process_group()
