"""Newton-Schulz orthogonalisation, the core of a Muon update: `orthogonalize` replaces a matrix's
singular values by roughly 1; `orthogonalize_many` runs it on many matrices at once: matrices of the
same shape are stacked and go through one batched matmul chain, so the 112 block matrices of the
1.2B model take 6 chains instead of 112. Also its FLOPs (`newton_schulz_flops`) and Muon's lr
scale by shape (`muon_lr_scale`).

Precision: Newton-Schulz runs in bfloat16 by default (`optimizer.muon_precision: bf16`), as
`torch.optim.Muon` hard-codes (torch/optim/_muon.py, `_zeropower_via_newtonschulz`:
`grad.bfloat16()`) and as Keller Jordan's reference it cites does; the quintic iteration only
needs its singular values in roughly [0.7, 1.2], which bf16 gives (about 2% from the float64
iteration), and on GPUs bf16 runs on the tensor cores. In bf16 the update is
`torch.optim.Muon(adjust_lr_fn="match_rms_adamw")`'s bit for bit on the CPU, tall matrices included
(tests/training/test_optim.py: every matrix shape of the tiny preset); on a GPU the batched GEMM may sum in
another order than torch's one-matrix GEMM, so there the two agree to bf16 rounding, not bitwise.
`fp32` stays a setting: more exact, and far faster on a CPU without native bf16 (on this
project's AVX2 VM bf16 matmuls are emulated: benchmarks/results/muon-cpu/).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Keller Jordan's quintic Newton-Schulz coefficients (also torch.optim.Muon's defaults): chosen to
# maximise the slope at zero, so 5 steps push every singular value into roughly [0.7, 1.2]
# rather than converging exactly to 1, which trains just as well (and is what "Muon" means).
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7

# Newton-Schulz precisions: the config's spellings (optimizer.muon_precision) and torch's dtype names
# (which earlier checkpoints stored in the Muon group's "ns_dtype").
NS_DTYPES = {
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


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
    result (tests/training/test_optim.py), on GPUs a batched GEMM may sum in another order than a single
    one. Returns views into the stacks."""
    groups: dict[tuple, list[int]] = {}
    for i, u in enumerate(updates):
        if u.ndim != 2:
            raise ValueError(f"orthogonalize needs a 2-D matrix, got shape {tuple(u.shape)}")
        groups.setdefault((u.device, *u.shape), []).append(i)
    out: dict[int, Tensor] = {}
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
    return [out[i] for i in range(len(updates))]


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
