"""Muon under FSDP2 (and HSDP): the momentum runs on each rank's shard, Newton-Schulz on whole
matrices, each gathered at one owner rank, orthogonalised there and scattered back
(`orthogonalize_sharded`: two all_to_all_single calls per step; `balanced_owners`: who owns what).
FSDP2 shards parameters as DTensors in dim-0 blocks (`shard_rows`); orthogonalising a shard would be
silently wrong, so every shard is packed, sent, reassembled and cut here."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeGuard

import torch
from torch import Tensor

from pixelrun.training.newton_schulz import muon_lr_scale, newton_schulz_flops

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor

try:  # FSDP2 shards parameters as DTensors; orthogonalising a shard would be silently wrong.
    from torch.distributed.tensor import DTensor as _DTensor
    from torch.distributed.tensor import Shard as _Shard
except Exception:  # pragma: no cover - builds without torch.distributed
    _DTensor = _Shard = None  # type: ignore[assignment,misc]  # no DTensor exists there: is_dtensor is False


def is_dtensor(t: Tensor) -> TypeGuard[DTensor]:
    """Whether `t` is an FSDP2 / HSDP DTensor (a shard of a matrix, or laid out as one)."""
    return _DTensor is not None and isinstance(t, _DTensor)


def shard_rows(rows: int, world: int) -> tuple[int, list[int]]:
    """How FSDP2 (and DTensor's Shard(0)) split `rows` over `world` ranks: torch.chunk's rule,
    ceil(rows / world) rows per rank in rank order, so trailing ranks may get fewer rows or none.
    Returns (that block size, which every shard is padded to for the collectives; each rank's rows)."""
    block = -(-rows // world)
    return block, [max(0, min(block, rows - r * block)) for r in range(world)]


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    if x.size(0) == rows:
        return x
    out = x.new_zeros(rows, *x.shape[1:])
    out[: x.size(0)] = x
    return out


def _pack_shard(shard: Tensor, block: int) -> Tensor:
    """A rank's shard as `block` rows (zero-padded), flat: every rank sends an equal-size piece."""
    return _pad_rows(shard, block).reshape(-1)


def _unpack_full(pieces: Tensor, rows: int, cols: int) -> Tensor:
    """[world, block * cols] packed shards in rank order -> the [rows, cols] matrix (padding cut)."""
    return pieces.reshape(-1, cols)[:rows]


def _split_full(full: Tensor, world: int, block: int) -> Tensor:
    """[rows, cols] -> [world, block * cols]: row r is rank r's rows, packed as `_pack_shard`."""
    return _pad_rows(full, world * block).reshape(world, -1)


def _unpack_shard(piece: Tensor, rows: int, cols: int) -> Tensor:
    """A flat packed shard -> its `rows` real rows."""
    return piece.view(-1, cols)[:rows]


def _shard_mesh_dim(p: DTensor) -> int | None:
    """The device-mesh dim whose ranks hold different rows of `p` (FSDP2: (Shard(0),); HSDP:
    (Replicate(), Shard(0)) -> 1), or None when every rank holds the whole matrix. Any other
    layout (a tensor-parallel Shard(1), two sharded dims, Partial) is refused: the gather below
    reassembles dim-0 shards only."""
    dims = [i for i, pl in enumerate(p.placements) if not pl.is_replicate()]
    if not dims:
        return None
    pl = p.placements[dims[0]]
    if len(dims) > 1 or type(pl) is not _Shard or pl.dim != 0:
        raise NotImplementedError(
            f"Muon on DTensors supports Shard(0) on one mesh dim plus Replicate "
            f"(FSDP2 / HSDP), got placements {p.placements}"
        )
    return dims[0]


def _exchange(
    send: list[list[Tensor]], recv_sizes: list[int], group, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """One all_to_all_single: the flat tensors of send[r], concatenated, go to group rank r; the
    result is what every rank sent here, in rank order (recv_sizes[r] elements from rank r).
    all_to_all_single (alltoall_base) is implemented by NCCL and, with uneven splits, by gloo."""
    import torch.distributed as dist

    flat = [t for to_rank in send for t in to_rank]
    inp = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
    out = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    dist.all_to_all_single(
        out,
        inp,
        output_split_sizes=recv_sizes,
        input_split_sizes=[sum(t.numel() for t in to_rank) for to_rank in send],
        group=group,
    )
    return out


def balanced_owners(shapes: Sequence[torch.Size | tuple[int, ...]], world: int, steps: int = 5) -> list[int]:
    """The owner rank of each matrix so that every rank's Newton-Schulz FLOPs are about equal.

    Counting matrices would not do: in a block of the 1.2B model the adaLN modulation (10752 x
    1792) costs 4.3x the output projection (1792 x 1792) and 1.6x a GeGLU matrix. Greedy longest-
    processing-time first: matrices in decreasing cost (ties: input order), each to the rank with
    the least load so far (ties: the lowest rank). Every rank computes the same list from the same
    shapes, so no communication is needed; the busiest rank carries at most 4/3 of the optimum."""
    load = [0] * world
    owner = [0] * len(shapes)
    cost = [newton_schulz_flops(s, steps) for s in shapes]
    for k in sorted(range(len(shapes)), key=lambda k: (-cost[k], k)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[k] = r
        load[r] += cost[k]
    return owner


def orthogonalize_sharded(
    updates: list[Tensor],
    shapes: list[torch.Size],
    mesh: DeviceMesh,
    dim: int,
    orth_many: Callable[[list[Tensor]], list[Tensor]],
    ns_steps: int = 5,
) -> list[Tensor]:
    """Orthogonalise whole matrices that live as dim-0 shards over mesh dim `dim`; return each
    rank's rows of the results. `updates` are this rank's local shards, `shapes` the full shapes;
    every rank of the shard group calls this with the same matrices in the same order.

    Owners come from `balanced_owners` (each rank runs about 1/world of the Newton-Schulz FLOPs).
    Two all_to_all_single calls over the shard group, each batching every matrix: (1) each rank
    sends its shard of matrix k to k's owner, which reassembles the whole matrix; the owner
    orthogonalises all its matrices together (`orth_many`: one batched chain per shape); (2) the
    owner sends every rank its rows of the result. Shards are padded to ceil(rows / world) rows so
    that the pieces line up; padding is cut off.

    Communication: a matrix of M elements crosses the network twice, (world-1)/world * M each way
    (the owner's own shard stays put). Per exchange a rank sends its shards (about 1/world of the
    Muon weights) and receives its owned matrices (about as much): 1/world of what FSDP's own
    reduce-scatter of those gradients moves per rank. All-gathering every matrix to every rank
    instead moves (world-1) * M per matrix in total and repeats Newton-Schulz on every rank;
    torch.optim.Muon on DTensors redistributes inside every Newton-Schulz iteration. Under HSDP
    the group is the shard sub-group: each replica group does the same work on the same
    (all-reduced) gradients, with no traffic between replicas.
    """
    group = mesh.get_group(dim)
    world, me = mesh.size(dim), mesh.get_local_rank(dim)
    dtype = functools.reduce(torch.promote_types, [u.dtype for u in updates])
    device = updates[0].device
    owner = balanced_owners(shapes, world, ns_steps)
    blocks = [shard_rows(s[0], world)[0] for s in shapes]  # padded rows per rank
    my_rows = [shard_rows(s[0], world)[1][me] for s in shapes]
    sizes = [b * s[1] for b, s in zip(blocks, shapes)]  # elements of one packed shard
    owned_size = [sum(sizes[k] for k in range(len(shapes)) if owner[k] == r) for r in range(world)]

    # (1) Shards to owners.
    send: list[list[Tensor]] = [[] for _ in range(world)]
    for k, u in enumerate(updates):
        if u.shape != (my_rows[k], shapes[k][1]):
            raise RuntimeError(
                f"local shard of a {tuple(shapes[k])} matrix is {tuple(u.shape)} on shard rank {me}, "
                f"expected {my_rows[k]} rows (torch.chunk's split over {world} ranks)"
            )
        send[owner[k]].append(_pack_shard(u.to(dtype), blocks[k]))
    got = _exchange(send, [owned_size[me]] * world, group, dtype, device).view(world, owned_size[me])

    # Whole matrices, orthogonalised together on their owner.
    mine = [k for k in range(len(shapes)) if owner[k] == me]
    fulls, offset = [], 0
    for k in mine:
        fulls.append(_unpack_full(got[:, offset : offset + sizes[k]], *shapes[k]))
        offset += sizes[k]
    send = [[] for _ in range(world)]
    for k, o in zip(mine, orth_many(fulls)):
        for r, piece in enumerate(_split_full(o.to(dtype), world, blocks[k])):
            send[r].append(piece)

    # (2) Each rank's rows back from the owners, in owner order then matrix order.
    got = _exchange(send, owned_size, group, dtype, device)
    out: dict[int, Tensor] = {}
    offset = 0
    for r in range(world):
        for k in (k for k in range(len(shapes)) if owner[k] == r):
            out[k] = _unpack_shard(got[offset : offset + sizes[k]], my_rows[k], shapes[k][1])
            offset += sizes[k]
    return [out[k] for k in range(len(shapes))]


def muon_step_sharded(
    items: list[tuple[DTensor, Tensor, Tensor]],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    orth_many: Callable[[list[Tensor]], list[Tensor]],
    ns_steps: int,
) -> None:
    """`muon_step` for DTensor (param, grad, momentum buffer) triples, in place on the local shards.

    The momentum and Nesterov mix are elementwise, so they run on the local shards exactly as on
    the whole matrix; Newton-Schulz mixes all rows, so it gets the gathered matrix
    (`orthogonalize_sharded`, one batch per shard group); the lr scale uses the full shape. The
    result equals the single-device step up to the matmuls' summation order."""
    # (mesh, mesh dim) of a shard group, or None for unsharded -> [(param, update)]
    batches: dict[tuple[DeviceMesh, int] | None, list[tuple[DTensor, Tensor]]] = {}
    for p, g, buf in items:
        dim = _shard_mesh_dim(p)
        if not isinstance(g, _DTensor) or g.placements != p.placements or not isinstance(buf, _DTensor):
            raise ValueError(
                "under FSDP2 a Muon parameter's gradient and momentum buffer must be DTensors "
                "laid out like the parameter"
            )
        g_local, b_local = g.to_local(), buf.to_local()
        b_local.lerp_(g_local, 1 - momentum)
        update = g_local.lerp(b_local, momentum) if nesterov else b_local
        key = (p.device_mesh, dim) if dim is not None and p.device_mesh.size(dim) > 1 else None
        batches.setdefault(key, []).append((p, update))
    for key, batch in batches.items():
        if key is None:  # every rank holds the whole matrix (e.g. a shard group of one): no traffic
            outs = orth_many([u for _, u in batch])
        else:
            mesh, dim = key
            outs = orthogonalize_sharded(
                [u for _, u in batch], [p.shape for p, _ in batch], mesh, dim, orth_many, ns_steps
            )
        for (p, _), o in zip(batch, outs):
            local = p.to_local()
            local.mul_(1 - lr * weight_decay)
            local.add_(o, alpha=-(lr * muon_lr_scale(p.shape)))
