"""Optimizers: AdamW, or Muon for the blocks' matrices plus AdamW for everything else (docs/recipe.md, "Muon").

Which parameters Muon takes. Muon orthogonalises a matrix-shaped update, which only makes sense
for the hidden layers' weight matrices, so the split is: the 2-D weights of the `nn.Linear`
modules that sit inside a transformer `Block` go to Muon; everything else goes to AdamW: the
embeddings (`img_in`, `time_in`, `txt_in`), the final layer, norm weights, every bias, and any
extra module the caller names (the REPA projector). The per-block adaLN modulation matrix
(`blocks[i].modulation.lin.weight`, zero-initialised) is a 2-D weight inside a block, so it goes
to Muon as the recipe's wording says; its bias goes to AdamW. The split is decided by module type,
parameter shape and module membership, never by a name substring, so wrapping the model (DDP's
`.module`, `torch.compile`'s `_orig_mod`, FSDP2's subclassing) or renaming a layer cannot silently
move a parameter from one group to the other.

One optimizer object. `MuonAdamW` is a single `torch.optim.Optimizer` with one Muon group and one
AdamW group, so the training loop keeps a single `step()`, `zero_grad()`, `state_dict()` /
`load_state_dict()`, and an `LRScheduler` scales both groups' lr (each from its own base lr).

The Muon update is written out here (not wrapped from `torch.optim.Muon`) so that the
orthogonalisation is its own function. `orthogonalize_many` runs Newton-Schulz on many matrices
at once: matrices of the same shape are stacked and go through one batched matmul chain, so the
112 block matrices of the 1.2B model take 6 chains instead of 112. The FSDP2 path calls it on the
whole matrices each owner rank gathers (`muon_step` on DTensor parameters; `_orthogonalize_sharded`
for the communication, `balanced_owners` for who owns what).

Precision: Newton-Schulz runs in bfloat16 by default (`train.muon_precision: bf16`), as
`torch.optim.Muon` hard-codes (torch/optim/_muon.py, `_zeropower_via_newtonschulz`:
`grad.bfloat16()`) and as Keller Jordan's reference it cites does; the quintic iteration only
needs its singular values in roughly [0.7, 1.2], which bf16 gives (about 2% from the float64
iteration), and on GPUs bf16 runs on the tensor cores. In bf16 the update is
`torch.optim.Muon(adjust_lr_fn="match_rms_adamw")`'s bit for bit on the CPU, tall matrices included
(tests/test_optim.py: every matrix shape of the tiny preset); on a GPU the batched GEMM may sum in
another order than torch's one-matrix GEMM, so there the two agree to bf16 rounding, not bitwise.
`fp32` stays a setting: more exact, and far faster on a CPU without native bf16 (on this
project's AVX2 VM bf16 matmuls are emulated: benchmarks/results/muon-cpu/).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from pixelrun.config import Config
from pixelrun.model.denoiser import Block
from pixelrun.training.schedule import LRSchedule

# Keller Jordan's quintic Newton-Schulz coefficients (also torch.optim.Muon's defaults): chosen to
# maximise the slope at zero, so 5 steps push every singular value into roughly [0.7, 1.2]
# rather than converging exactly to 1, which trains just as well (and is what "Muon" means).
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7

# Newton-Schulz precisions: the config's spellings (train.muon_precision) and torch's dtype names
# (which earlier checkpoints stored in the Muon group's "ns_dtype").
NS_DTYPES = {
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}

try:  # FSDP2 shards parameters as DTensors; orthogonalising a shard would be silently wrong.
    from torch.distributed.tensor import DTensor as _DTensor
    from torch.distributed.tensor import Shard as _Shard
except Exception:  # pragma: no cover - builds without torch.distributed
    _DTensor = _Shard = None


# ----------------------------------------------------------------------------------------------
# The parameter split


def _params_of(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def split_parameters(
    model: nn.Module,
    extra_adam_modules: Iterable[nn.Module] = (),
    block_types: tuple[type[nn.Module], ...] = (Block,),
) -> tuple[list[nn.Parameter], list[nn.Parameter], dict]:
    """Split `model`'s parameters (and those of `extra_adam_modules`) into (muon, adam, report).

    Muon: `weight` of every `nn.Linear` that is a descendant of a transformer block (an instance of
    `block_types`, found by type anywhere in `model`, so wrappers are fine) and is 2-D.
    Adam: every other parameter, plus all parameters of `extra_adam_modules` whether or not they
    are inside `model` (naming a block's submodule there forces it to Adam).

    Parameters keep `model.parameters()` order (then the extras'), so the optimizer state's
    integer indices are stable across runs; shared parameters are counted once. Frozen parameters
    are included: they get no gradient and the optimizer skips them.

    report = {"muon": n_params, "adam": n_params, "muon_tensors": k, "adam_tensors": k}.
    """
    extra = list(extra_adam_modules)
    blocks = [m for m in model.modules() if isinstance(m, block_types)]
    if not blocks:
        raise ValueError(
            f"no transformer blocks ({', '.join(t.__name__ for t in block_types)}) in the model: "
            "Muon would get no parameters"
        )
    forced_adam = {id(p) for p in _params_of(extra)}
    muon_ids: set[int] = set()
    for block in blocks:
        for m in block.modules():
            if isinstance(m, nn.Linear) and m.weight.ndim == 2 and id(m.weight) not in forced_adam:
                muon_ids.add(id(m.weight))

    every = _params_of([model, *extra])
    muon = [p for p in every if id(p) in muon_ids]
    adam = [p for p in every if id(p) not in muon_ids]
    # Every parameter in exactly one group.
    assert len({id(p) for p in muon} | {id(p) for p in adam}) == len(every) == len(muon) + len(adam)
    assert not ({id(p) for p in muon} & {id(p) for p in adam})
    assert all(p.ndim == 2 for p in muon)
    report = {
        "muon": sum(p.numel() for p in muon),
        "adam": sum(p.numel() for p in adam),
        "muon_tensors": len(muon),
        "adam_tensors": len(adam),
    }
    return muon, adam, report


# ----------------------------------------------------------------------------------------------
# Muon


def newton_schulz_flops(shape: torch.Size | tuple[int, ...], steps: int = 5) -> int:
    """Matmul FLOPs of `steps` Newton-Schulz iterations on one matrix of `shape`. With m <= n its
    sides (the wide orientation `orthogonalize` uses), an iteration is X X^T (2 m^2 n), the
    polynomial b A + c A^2 (2 m^3) and its product with X (2 m^2 n)."""
    m, n = sorted(shape[-2:])
    return steps * (4 * m * m * n + 2 * m**3)


def _newton_schulz(x: Tensor, steps: int, coefficients: tuple[float, float, float], eps: float) -> Tensor:
    """The iteration on a stack [B, m, n] of wide matrices (m <= n), in x's dtype, in place on x
    (the caller's scratch stack). torch.optim.Muon's op sequence (norm, `div_`, X X^T, addmm,
    addmm) with the batched ops: each matrix is scaled by its own norm and multiplied by itself
    only, so the result is the per-matrix one. `bmm`, not `@`: matmul folds a stack of one into a
    2-D product through a copy, which for a transposed view sums in another order than torch's."""
    a, b, c = coefficients
    x.div_(x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps))  # in place: x keeps its memory layout
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b*A + c*A^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a*X + (b*A + c*A^2) X
    return x


def orthogonalize_many(
    updates: list[Tensor],
    steps: int = 5,
    *,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = NS_EPS,
    dtype: torch.dtype = torch.bfloat16,
) -> list[Tensor]:
    """`orthogonalize` of every 2-D matrix in `updates`, in `dtype`, in order. Matrices of one
    shape on one device go through one batched chain: a stack copied once into `dtype`, a tall one
    run as its transposed view. The result of a matrix does not depend on
    its batch-mates (per-matrix norms and products); on the CPU it is bitwise the one-by-one
    result (tests/test_optim.py), on GPUs a batched GEMM may sum in another order than a single
    one. Returns views into the stacks."""
    groups: dict[tuple, list[int]] = {}
    for i, u in enumerate(updates):
        if u.ndim != 2:
            raise ValueError(f"orthogonalize needs a 2-D matrix, got shape {tuple(u.shape)}")
        groups.setdefault((u.device, *u.shape), []).append(i)
    out: list[Tensor | None] = [None] * len(updates)
    for (device, rows, cols), idx in groups.items():
        x = torch.empty(len(idx), rows, cols, dtype=dtype, device=device)
        for j, i in enumerate(idx):
            x[j].copy_(updates[i])  # one pass: the cast
        # A tall stack runs as its transposed view, in the memory layout it has, as torch.optim.Muon
        # runs a tall matrix (`.T` of the bf16 copy): a GEMM reading a transposed operand may sum in
        # another order than one reading a contiguous copy of it (on the CPU, 1 ulp in the first
        # Gram matrix of a 1536x256 matrix, about 1e-3 in the result), so copying it into the wide
        # layout would lose the bitwise equality with torch. Tall and wide matrices of one shape
        # up to transposition therefore run as two chains.
        tall = rows > cols
        x = _newton_schulz(x.mT if tall else x, steps, coefficients, eps)
        for j, i in enumerate(idx):
            out[i] = x[j].mT if tall else x[j]
    return out


def orthogonalize(
    update: Tensor,
    steps: int = 5,
    *,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = NS_EPS,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Approximately replace the singular values of a 2-D `update` by 1 (U S V^T -> U S' V^T,
    S' roughly in [0.7, 1.2]) with `steps` quintic Newton-Schulz iterations computed in `dtype`.

    Works on the whole matrix: the iteration mixes all rows and columns, so under FSDP2 it must be
    given the gathered full matrix, not a shard. X = U / max(||U||_F, eps) puts every singular
    value in [0, 1] (the Frobenius norm bounds the spectral norm); the wide orientation
    (rows <= cols) keeps the Gram matrix X X^T the small one. The op sequence is
    torch.optim.Muon's, in the same memory layouts, so with dtype=bfloat16 on the CPU the result
    is bitwise torch's (on a GPU, to bf16 rounding). Returns `dtype`.
    """
    return orthogonalize_many([update], steps, coefficients=coefficients, eps=eps, dtype=dtype)[0]


def muon_lr_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """0.2 * sqrt(max(rows, cols)): torch's adjust_lr_fn="match_rms_adamw" (Moonshot's rule). An
    orthogonalised update has RMS about 1/sqrt(max dim); this makes it about 0.2, AdamW's typical
    update RMS, so one lr (and weight decay) serves both groups."""
    return 0.2 * math.sqrt(max(shape[0], shape[1]))


@torch.no_grad()
def muon_step(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_steps: int,
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = NS_EPS,
    ns_dtype: torch.dtype = torch.bfloat16,
) -> None:
    """One Muon update of each matrix, in place, torch.optim.Muon's arithmetic:

        B <- mu B + (1 - mu) G                   (written as B.lerp_(G, 1 - mu))
        U <- (1 - mu) G + mu B   if nesterov,    else U <- B
        O <- orthogonalize(U)                    (same-shape matrices batched: orthogonalize_many)
        W <- W (1 - lr wd)                       (decoupled weight decay, unscaled lr)
        W <- W - lr * 0.2 sqrt(max(rows, cols)) * O

    The textbook form B <- mu B + G, U <- G + mu B gives the same B and U times 1/(1 - mu); the
    Frobenius normalisation in `orthogonalize` removes that constant, so both forms give the same
    O (up to the 1e-7 guard). We keep torch's form so that updates and saved momentum buffers
    match torch.optim.Muon's.

    DTensor parameters (FSDP2 / HSDP shards) take `_muon_step_sharded`: the same arithmetic, with
    the momentum on the local shard and Newton-Schulz on the gathered whole matrix.
    """

    def orth_many(updates: list[Tensor]) -> list[Tensor]:
        return orthogonalize_many(updates, ns_steps, coefficients=ns_coefficients, eps=eps, dtype=ns_dtype)

    sharded, local, updates = [], [], []
    for p, g, buf in zip(params, grads, momentum_buffers):
        if g.ndim != 2:
            raise ValueError(f"Muon needs 2-D gradients, got shape {tuple(g.shape)}")
        if _DTensor is not None and isinstance(p, _DTensor):
            sharded.append((p, g, buf))
            continue
        buf.lerp_(g, 1 - momentum)
        local.append(p)
        updates.append(g.lerp(buf, momentum) if nesterov else buf)
    for p, o in zip(local, orth_many(updates)):  # all momenta first, then one chain per shape
        p.mul_(1 - lr * weight_decay)
        p.add_(o, alpha=-(lr * muon_lr_scale(p.shape)))
    if sharded:
        _muon_step_sharded(
            sharded,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            orth_many=orth_many,
            ns_steps=ns_steps,
        )


# ----------------------------------------------------------------------------------------------
# Muon under FSDP2: momentum on the shards, Newton-Schulz on whole matrices at owner ranks


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


def _shard_mesh_dim(p: Tensor) -> int | None:
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


def balanced_owners(shapes: list[torch.Size | tuple[int, ...]], world: int, steps: int = 5) -> list[int]:
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


def _orthogonalize_sharded(
    updates: list[Tensor],
    shapes: list[torch.Size],
    mesh,
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
    out: list[Tensor | None] = [None] * len(shapes)
    offset = 0
    for r in range(world):
        for k in (k for k in range(len(shapes)) if owner[k] == r):
            out[k] = _unpack_shard(got[offset : offset + sizes[k]], my_rows[k], shapes[k][1])
            offset += sizes[k]
    return out


def _muon_step_sharded(
    items: list[tuple[Tensor, Tensor, Tensor]],
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
    (`_orthogonalize_sharded`, one batch per shard group); the lr scale uses the full shape. The
    result equals the single-device step up to the matmuls' summation order."""
    batches: dict = {}  # (mesh, mesh dim) of a shard group, or None for unsharded -> [(param, update)]
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
            outs = _orthogonalize_sharded([u for _, u in batch], [p.shape for p, _ in batch], *key, orth_many, ns_steps)
        for (p, _), o in zip(batch, outs):
            local = p.to_local()
            local.mul_(1 - lr * weight_decay)
            local.add_(o, alpha=-(lr * muon_lr_scale(p.shape)))


# ----------------------------------------------------------------------------------------------
# The combined optimizer

# The AdamW group carries torch.optim.AdamW's own option keys so that torch's functional `adam`
# (the same code AdamW.step runs) sees exactly what AdamW would pass it.
_ADAMW_FIXED = dict(
    amsgrad=False,
    maximize=False,
    foreach=None,
    capturable=False,
    differentiable=False,
    fused=None,
    decoupled_weight_decay=True,
)


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the groups tagged algorithm="muon", torch AdamW on those tagged "adamw".

    Build it through `build_optimizer`. The AdamW groups run torch's own functional Adam with
    decoupled weight decay, the code path of `torch.optim.AdamW.step` (same state keys: `step`,
    `exp_avg`, `exp_avg_sq`); the Muon groups run `muon_step` (state key `momentum_buffer`, as in
    torch.optim.Muon). Group options are plain Python values (the NS dtype is a string) so a
    checkpoint loads with `torch.load(weights_only=True)`. Under FSDP2 (`fully_shard`, HSDP) the
    parameters, gradients and state are DTensors; the Muon step orthogonalises whole matrices
    (`_orthogonalize_sharded`) and every rank steps the same optimizer the same way.
    """

    def __init__(self, param_groups: list[dict]):
        for g in param_groups:
            if g.get("algorithm") not in ("muon", "adamw"):
                raise ValueError("every group needs algorithm='muon' or 'adamw'")
        super().__init__(param_groups, defaults={})
        for g in self.param_groups:
            if g["algorithm"] == "muon":
                bad = [tuple(p.shape) for p in g["params"] if p.ndim != 2]
                if bad:
                    raise ValueError(f"Muon only takes 2-D parameters, got shapes {bad}")

    def load_state_dict(self, state_dict: dict) -> None:
        saved = [g.get("algorithm") for g in state_dict["param_groups"]]
        mine = [g["algorithm"] for g in self.param_groups]
        if saved != mine:
            raise ValueError(f"optimizer state has groups {saved}, this optimizer has {mine}")
        # The Newton-Schulz precision and step count are settings, not state: torch restores every
        # saved group option, which would silently keep a checkpoint's fp32 after the config says
        # bf16. The AdamW kernel likewise follows the parameters' device, not the machine that saved.
        settings = [{k: g[k] for k in ("ns_dtype", "ns_steps", "fused") if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, mine in zip(self.param_groups, settings):
            g.update(mine)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["algorithm"] == "muon":
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict) -> None:
        params, grads, bufs = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            bufs.append(state["momentum_buffer"])
        muon_step(
            params,
            grads,
            bufs,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            ns_steps=group["ns_steps"],
            ns_coefficients=tuple(group["ns_coefficients"]),
            eps=group["eps"],
            ns_dtype=NS_DTYPES[group["ns_dtype"]],
        )

    def _adamw_group(self, group: dict) -> None:
        from torch.optim.adam import adam

        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamW does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # As torch.optim.Adam: the step count lives on the CPU, on the parameter's device for the
            # fused kernel (which groups every tensor by device); a resumed unfused state moves over.
            step_device = p.device if group["fused"] else torch.device("cpu")
            if state["step"].device != step_device:
                state["step"] = state["step"].to(step_device)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adam(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            amsgrad=False,
            has_complex=any(torch.is_complex(p) for p in params),
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
            foreach=group["foreach"],
            capturable=False,
            differentiable=False,
            fused=group["fused"],
            decoupled_weight_decay=True,
        )


def _fused_kernel(params: list[Tensor]) -> bool | None:
    """torch's fused AdamW kernel when every parameter is on CUDA (True), else torch's default
    (None): on the 1.2B model at 512px the foreach AdamW took 18% of an H200 step
    (benchmarks/results/gpu/profile-small-512.txt). Plain AdamW and Muon's AdamW group alike."""
    return True if params and all(p.is_cuda for p in params) else None


def build_optimizer(
    model: nn.Module,
    *,
    kind: str,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    muon_lr: float | None = None,
    muon_momentum: float = 0.95,
    muon_nesterov: bool = True,
    muon_ns_steps: int = 5,
    muon_ns_dtype: str = "bf16",
    extra_adam_modules: Iterable[nn.Module] = (),
) -> torch.optim.Optimizer:
    """kind="adamw": a plain `torch.optim.AdamW` over the model and the extra modules.
    kind="muon": one `MuonAdamW` with group 0 = Muon (lr `muon_lr`, default `lr`) and group 1 =
    AdamW (lr `lr`); the weight decay applies to both, decoupled. `muon_ns_dtype`: the
    Newton-Schulz precision, "bf16" (default; torch.optim.Muon's update, bit for bit on the CPU) or "fp32"
    (more exact, slower); torch's names "bfloat16", "float32" and "float64" work too.

    Either way the optimizer gets a `report` attribute (split counts, kind, lrs) for `describe`.
    """
    extra = list(extra_adam_modules)
    betas = (float(betas[0]), float(betas[1]))
    if kind == "adamw":
        every = _params_of([model, *extra])
        opt = torch.optim.AdamW(
            every, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=_fused_kernel(every)
        )
        opt.report = {
            "kind": "adamw",
            "muon": 0,
            "adam": sum(p.numel() for p in every),
            "muon_tensors": 0,
            "adam_tensors": len(every),
            "lr": lr,
        }
        return opt
    if kind != "muon":
        raise ValueError(f"unknown optimizer kind {kind!r}; choose 'adamw' or 'muon'")
    if muon_ns_dtype not in NS_DTYPES:
        raise ValueError(f"muon_ns_dtype must be one of {', '.join(NS_DTYPES)}, got {muon_ns_dtype!r}")
    muon_params, adam_params, report = split_parameters(model, extra)
    muon_lr = lr if muon_lr is None else muon_lr
    groups = [
        dict(
            params=muon_params,
            algorithm="muon",
            lr=muon_lr,
            weight_decay=weight_decay,
            momentum=muon_momentum,
            nesterov=muon_nesterov,
            ns_steps=muon_ns_steps,
            ns_coefficients=NS_COEFFICIENTS,
            eps=NS_EPS,
            ns_dtype=muon_ns_dtype,
        ),
        dict(
            params=adam_params,
            algorithm="adamw",
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            **{**_ADAMW_FIXED, "fused": _fused_kernel(adam_params)},
        ),
    ]
    opt = MuonAdamW(groups)
    opt.report = {"kind": "muon", **report, "lr": lr, "muon_lr": muon_lr}
    return opt


def make_optimizer(
    model: nn.Module, cfg: Config, extra_adam_modules: Iterable[nn.Module] = ()
) -> tuple[torch.optim.Optimizer, LRSchedule]:
    """AdamW, or Muon + AdamW (`build_optimizer`), as `cfg.train` sets them, with the learning-rate
    schedule (`LRSchedule`)."""
    t = cfg.train
    opt = build_optimizer(
        model,
        kind=t.optimizer,
        lr=t.lr,
        betas=(t.betas[0], t.betas[1]),
        eps=t.eps,
        weight_decay=t.weight_decay,
        muon_lr=t.muon_lr,
        muon_momentum=t.muon_momentum,
        muon_ns_dtype=t.muon_precision,
        muon_ns_steps=t.muon_ns_steps,
        extra_adam_modules=extra_adam_modules,
    )
    return opt, LRSchedule(opt, cfg)


# ----------------------------------------------------------------------------------------------
# Reporting


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _lr(x: float) -> str:
    if x == 0 or 1e-2 <= abs(x) < 1e3:
        return f"{x:g}"
    mant, exp = f"{x:.2e}".split("e")
    return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"


def describe(report: dict) -> str:
    """One line for the log, e.g. "optimizer: Muon 5.2M params in 24 matrices (lr 1e-4), AdamW 1.2M
    params in 40 tensors (lr 1e-4)". Takes `optimizer.report` (or `split_parameters`' report;
    the lrs are then left out)."""

    def lr(key):
        return f" (lr {_lr(report[key])})" if key in report else ""

    adam = f"AdamW {_count(report['adam'])} params in {report['adam_tensors']} tensors{lr('lr')}"
    if report.get("kind") == "adamw":
        return f"optimizer: {adam}"
    muon = f"Muon {_count(report['muon'])} params in {report['muon_tensors']} matrices{lr('muon_lr')}"
    return f"optimizer: {muon}, {adam}"
