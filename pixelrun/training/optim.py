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
orthogonalisation is its own function (`newton_schulz.orthogonalize_many`: many matrices at once,
precision, FLOPs). The FSDP2 path runs it on the whole matrices each owner rank gathers
(`muon_step` on DTensor parameters; muon_sharded.py for the communication and for who owns what).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pixelrun.config import Config
from pixelrun.model.denoiser import Block
from pixelrun.training.muon_sharded import is_dtensor, muon_step_sharded
from pixelrun.training.newton_schulz import NS_COEFFICIENTS, NS_DTYPES, NS_EPS, muon_lr_scale, orthogonalize_many
from pixelrun.training.schedule import LRSchedule

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

# ----------------------------------------------------------------------------------------------
# The parameter split


def _params_of(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """The trained parameters of `modules`, each once: a frozen one (`requires_grad=False`: the base
    weights of a LoRA run, pixelrun/model/lora.py) is no optimizer's."""
    seen: set[int] = set()
    out = []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
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
    (`requires_grad=False`) are left out: under LoRA only the adapters' A and B matrices are trained,
    and, being 2-D weights of `nn.Linear`s inside the blocks, they go to Muon.

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

    DTensor parameters (FSDP2 / HSDP shards) take `muon_sharded.muon_step_sharded`: the same arithmetic, with
    the momentum on the local shard and Newton-Schulz on the gathered whole matrix.
    """

    def orth_many(updates: list[Tensor]) -> list[Tensor]:
        return orthogonalize_many(updates, ns_steps, coefficients=ns_coefficients, eps=eps, dtype=ns_dtype)

    sharded: list[tuple[DTensor, Tensor, Tensor]] = []
    local: list[Tensor] = []
    updates: list[Tensor] = []
    for p, g, buf in zip(params, grads, momentum_buffers):
        if g.ndim != 2:
            raise ValueError(f"Muon needs 2-D gradients, got shape {tuple(g.shape)}")
        if is_dtensor(p):
            sharded.append((p, g, buf))
            continue
        buf.lerp_(g, 1 - momentum)
        local.append(p)
        updates.append(g.lerp(buf, momentum) if nesterov else buf)
    for p, o in zip(local, orth_many(updates)):  # all momenta first, then one chain per shape
        p.mul_(1 - lr * weight_decay)
        p.add_(o, alpha=-(lr * muon_lr_scale(p.shape)))
    if sharded:
        muon_step_sharded(
            sharded,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            orth_many=orth_many,
            ns_steps=ns_steps,
        )


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
    (`muon_sharded.orthogonalize_sharded`) and every rank steps the same optimizer the same way.
    """

    report: dict  # the split, kind and lrs, for `describe` (set by build_optimizer)

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
        kept_keys: tuple[str, ...] = ("ns_dtype", "ns_steps", "fused")
        settings = [{k: g[k] for k in kept_keys if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, kept in zip(self.param_groups, settings):
            g.update(kept)

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


def _fused_kernel(params: Sequence[Tensor]) -> bool | None:
    """torch's fused AdamW kernel when every parameter is on CUDA or every one on the CPU (True),
    else torch's default (None). On the 1.2B model at 512px the foreach AdamW took 18% of an H200
    step (benchmarks/results/gpu/profile-small-512.txt); on the 6.7M parameters of the CPU default
    at patch 16 the single-tensor AdamW torch picks for CPU tensors took 50 ms a step on one thread and the fused
    one 11 ms (docs/benchmarks.md). Plain AdamW and Muon's AdamW group alike."""
    if params and (all(p.is_cuda for p in params) or all(p.device.type == "cpu" for p in params)):
        return True
    return None


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
        adamw = torch.optim.AdamW(
            every, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=_fused_kernel(every)
        )
        # torch's own AdamW (not a subclass: its checkpoints and type stay torch's), carrying the split
        adamw.report = {  # type: ignore[attr-defined]
            "kind": "adamw",
            "muon": 0,
            "adam": sum(p.numel() for p in every),
            "muon_tensors": 0,
            "adam_tensors": len(every),
            "lr": lr,
        }
        return adamw
    if kind != "muon":
        raise ValueError(f"unknown optimizer kind {kind!r}; choose 'adamw' or 'muon'")
    if muon_ns_dtype not in NS_DTYPES:
        raise ValueError(f"muon_ns_dtype must be one of {', '.join(NS_DTYPES)}, got {muon_ns_dtype!r}")
    muon_params, adam_params, report = split_parameters(model, extra)
    muon_lr = lr if muon_lr is None else muon_lr
    groups: list[dict] = [
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
    """AdamW, or Muon + AdamW (`build_optimizer`), as `cfg.optimizer` sets them, with the learning-rate
    schedule (`LRSchedule`)."""
    t = cfg.optimizer
    opt = build_optimizer(
        model,
        kind=t.name,
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
