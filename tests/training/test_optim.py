"""The Muon/AdamW optimizer: which parameters each algorithm gets, that the updates are torch's
(torch.optim.Muon with match_rms_adamw, torch.optim.AdamW), grouped Newton-Schulz equal to one matrix
at a time, the owners' FLOP balance, exact state_dict resume, LR schedules."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from pixelrun.config import PRESETS, ConfigError, load_config
from pixelrun.model.denoiser import build_model
from pixelrun.training.muon_sharded import balanced_owners
from pixelrun.training.newton_schulz import newton_schulz_flops, orthogonalize, orthogonalize_many
from pixelrun.training.optim import MuonAdamW, build_optimizer, describe, split_parameters


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests do many tiny matmuls; on a shared 2-core machine two OpenMP threads make each one
    ~100x slower (0.3 ms -> 40 ms for a 96x32 Newton-Schulz) than one thread. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(seed: int = 0, depth: int = 2):
    torch.manual_seed(seed)
    return build_model("tiny", 24, hidden_size=32, num_heads=2, depth=depth)


def ids(params):
    return {id(p) for p in params}


def randomize(model: nn.Module, seed: int = 1):
    """The model zero-initialises its modulation and output layer; give every parameter a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(2, 3, 16, 16, generator=g)
    t = torch.rand(2, generator=g)
    text = torch.randn(2, 5, 24, generator=g)
    return (model(x, t, text).prediction - x).pow(2).mean()


# ---------------------------------------------------------------------------------------------- split


def test_split_is_a_partition_by_module_type():
    model = tiny()
    muon, adam, report = split_parameters(model)
    every = list(model.parameters())
    assert ids(muon) | ids(adam) == ids(every) and not ids(muon) & ids(adam)
    assert len(muon) + len(adam) == len(every)

    expected_muon = {id(m.weight) for blk in model.blocks for m in blk.modules() if isinstance(m, nn.Linear)}
    assert ids(muon) == expected_muon
    blk = model.blocks[0]
    for p in (
        blk.attention.img_qkv_proj.weight,
        blk.attention.txt_kv_proj.weight,
        blk.attention.to_out[0].weight,
        blk.gate_proj.weight,
        blk.up_proj.weight,
        blk.down_proj.weight,
        blk.modulation.lin.weight,
    ):
        assert id(p) in ids(muon)
    for mod in (model.img_in, model.time_in, model.txt_in, model.final_layer):
        assert ids(mod.parameters()) <= ids(adam)
    for p in (
        blk.modulation.lin.bias,
        blk.attention.norm_q.weight,
        blk.attention.norm_k.weight,
        blk.attention.norm_added_k.weight,
    ):
        assert id(p) in ids(adam)
    assert all(p.ndim == 2 for p in muon)

    assert report == {
        "muon": sum(p.numel() for p in muon),
        "adam": sum(p.numel() for p in adam),
        "muon_tensors": len(muon),
        "adam_tensors": len(adam),
    }
    assert report["muon_tensors"] == 7 * 2


def test_split_ignores_names_and_wrappers():
    model = tiny()
    muon, adam, _ = split_parameters(model)

    class Wrapper(nn.Module):  # every name gets a prefix and `.blocks` is no longer on the root
        def __init__(self, inner):
            super().__init__()
            self.wrapped_denoiser = inner

    w_muon, w_adam, _ = split_parameters(Wrapper(model))
    assert [id(p) for p in w_muon] == [id(p) for p in muon]
    assert [id(p) for p in w_adam] == [id(p) for p in adam]

    # A Linear outside the blocks whose name looks like a block's stays in Adam.
    model.add_module("gate_proj", nn.Linear(32, 32))
    muon2, adam2, _ = split_parameters(model)
    assert ids(muon2) == ids(muon) and id(model.gate_proj.weight) in ids(adam2)


def test_extra_modules_always_go_to_adam():
    model = tiny()
    projector = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 16))  # a REPA head, outside the model
    forced = model.blocks[1].down_proj  # inside a block, but named as extra
    muon, adam, report = split_parameters(model, extra_adam_modules=[projector, forced])
    assert ids(projector.parameters()) <= ids(adam)
    assert id(forced.weight) in ids(adam) and id(forced.weight) not in ids(muon)
    assert report["muon_tensors"] == 13
    assert report["muon"] + report["adam"] == sum(p.numel() for p in model.parameters()) + sum(
        p.numel() for p in projector.parameters()
    )


def test_no_blocks_is_an_error():
    with pytest.raises(ValueError, match="no transformer blocks"):
        split_parameters(nn.Linear(4, 4))


def test_describe():
    model = tiny()
    line = describe(build_optimizer(model, kind="muon", lr=1e-4, muon_lr=2e-2).report)
    assert line.startswith("optimizer: Muon 46.1K params in 14 matrices (lr 0.02), AdamW ")
    assert line.endswith("in 20 tensors (lr 1e-4)")
    assert describe(build_optimizer(model, kind="adamw", lr=3e-4).report).startswith("optimizer: AdamW 71.3K")
    big = {"muon": 5_200_000, "adam": 1_200_000, "muon_tensors": 24, "adam_tensors": 40}
    assert describe(big) == "optimizer: Muon 5.2M params in 24 matrices, AdamW 1.2M params in 40 tensors"


# ---------------------------------------------------------------------------------------------- updates


# bf16 keeps 8 significant bits and rounds after each of the 15 products: the result lands about
# 2% (relative Frobenius distance) from the float64 iteration, fp32's about 1e-6.
@pytest.mark.parametrize("dtype, cosine, rel", [(torch.float32, 0.97, 1e-5), (torch.bfloat16, 0.96, 5e-2)])
def test_newton_schulz_singular_values(dtype, cosine, rel):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 32, generator=g)
    o = orthogonalize(a, dtype=dtype)
    assert o.shape == a.shape and o.dtype == dtype
    s = torch.linalg.svdvals(o.double())
    assert 0.6 < s.min() and s.max() < 1.2
    s_in = torch.linalg.svdvals(a.double())
    assert s_in.max() / s_in.min() > 4  # the input was far from orthogonal
    # The singular vectors are kept: O is close to U V^T (the polar factor), not some other matrix.
    u, _, vh = torch.linalg.svd(a.double(), full_matrices=False)
    assert torch.nn.functional.cosine_similarity((u @ vh).flatten(), o.double().flatten(), dim=0) > cosine

    def distance(x, y):
        return ((x.double() - y.double()).norm() / y.double().norm()).item()

    assert distance(o, orthogonalize(a, dtype=torch.float64)) < rel
    # The wide input is the same computation up to summation order (a tall matrix runs as the
    # transposed view of its copy, as torch's does); a scaled input gives the same result.
    assert distance(orthogonalize(a.T, dtype=dtype), o.T) < rel
    assert distance(orthogonalize(1e3 * a, dtype=dtype), o) < rel
    assert orthogonalize(a).dtype == torch.bfloat16  # the default precision


def _torch_zeropower(u: torch.Tensor) -> torch.Tensor:
    from torch.optim._muon import _zeropower_via_newtonschulz  # what torch.optim.Muon.step calls

    return _zeropower_via_newtonschulz(u, (3.4445, -4.7750, 2.0315), 5, 1e-7)


def test_grouped_newton_schulz_is_one_by_one_bitwise():
    """Stacking same-shape matrices (tall ones transposed, so a 96x32 and a 32x96 share a chain)
    changes no bit on the CPU: each matrix keeps its own norm and its own products."""
    g = torch.Generator().manual_seed(3)
    shapes = [(32, 96), (96, 32), (32, 96), (48, 48), (5, 7), (32, 96), (48, 48), (1, 32)]
    mats = [torch.randn(*s, generator=g) * 10 ** (i % 3) for i, s in enumerate(shapes)]
    for dtype in (torch.bfloat16, torch.float32):
        grouped = orthogonalize_many(mats, dtype=dtype)
        for m, o in zip(mats, grouped):
            assert o.shape == m.shape and o.dtype == dtype
            assert torch.equal(o, orthogonalize(m, dtype=dtype))
        # A matrix's result does not depend on its batch-mates (or their order).
        assert torch.equal(orthogonalize_many(mats[::-1], dtype=dtype)[-1], grouped[0])
    # ... and in bf16 each is torch.optim.Muon's own orthogonalisation.
    for m, o in zip(mats, orthogonalize_many(mats)):
        assert torch.equal(o, _torch_zeropower(m))


def test_tall_matrices_are_torch_muon_bitwise():
    """torch.optim.Muon orthogonalises a tall matrix as the transposed view of its bf16 copy, and a
    GEMM reading a transposed operand may sum in another order than one reading a contiguous copy:
    the tiny preset's 1536x256 matrix (the 6 modulations of a 256-wide block) came out up to 1e-3
    off when it was copied into the wide layout. Every shape of the tiny preset, alone (torch's 2-D
    ops) and two at a time (the batched ones), is torch's result bit for bit."""
    with torch.device("meta"):
        shapes = sorted({tuple(p.shape) for p in split_parameters(build_model("tiny", 64))[0]})
    assert (1536, 256) in shapes and (256, 896) in shapes  # tall and wide
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(*s, generator=g) for s in shapes]
    refs = [_torch_zeropower(m) for m in mats]
    for m, ref in zip(mats, refs):
        assert torch.equal(orthogonalize(m), ref), m.shape
    for o, ref in zip(orthogonalize_many(mats + mats), refs + refs):
        assert torch.equal(o, ref), o.shape


def test_newton_schulz_flops_are_what_torch_counts():
    from torch.utils.flop_counter import FlopCounterMode

    for shape in ((48, 80), (80, 48), (33, 33)):
        with FlopCounterMode(display=False) as counter:
            orthogonalize(torch.randn(*shape), steps=3, dtype=torch.float32)
        assert counter.get_total_flops() == newton_schulz_flops(shape, 3)
    # A GeGLU matrix of the small preset, 6272 x 1792: 5 * (4 * 1792^2 * 6272 + 2 * 1792^3), by hand.
    assert newton_schulz_flops((6272, 1792)) == 460_366_807_040


def test_balanced_owners_by_hand():
    # A 2x5 matrix costs 5 * (4*4*5 + 2*8) = 480 FLOPs, a 2x3 one 5 * (4*4*3 + 2*8) = 320: 3 : 2.
    # Costs 3, 2, 3, 2, 2 on 2 ranks, longest first (ties in input order): matrix 0 -> r0,
    # 2 -> r1, 1 -> r0 (equal loads: the lowest rank), 3 -> r1, 4 -> r0: loads 7 and 5.
    big, small = (2, 5), (3, 2)  # a tall one costs as its transpose
    assert (newton_schulz_flops(big), newton_schulz_flops(small)) == (480, 320)
    shapes = [big, small, big, small, small]
    assert balanced_owners(shapes, 2) == [0, 0, 1, 1, 0]
    assert balanced_owners(shapes, 1) == [0] * 5
    assert balanced_owners(shapes, 8) == [0, 2, 1, 3, 4]  # more ranks than matrices: one each


def _block_shapes(preset: str) -> list[tuple[int, int]]:
    with torch.device("meta"):
        model = build_model(preset, 2304)
    return [tuple(p.shape) for p in split_parameters(model)[0]]


@pytest.mark.parametrize("world", [2, 8, 32])
def test_owners_balance_the_small_presets_flops(world):
    """The 112 block matrices of the 1.2B model span 4.3x in cost. Round-robin by count leaves
    the busiest rank well above the mean; the FLOP-balanced owners keep it within 4/3 of the best
    possible (LPT's bound) and under the round-robin load."""
    shapes = _block_shapes("small")
    assert len(shapes) == 7 * PRESETS["small"]["depth"]
    cost = [newton_schulz_flops(s) for s in shapes]

    def busiest(owner):
        load = [0] * world
        for k, r in enumerate(owner):
            load[r] += cost[k]
        return max(load)

    best_possible = max(sum(cost) / world, max(cost))
    balanced = busiest(balanced_owners(shapes, world))
    round_robin = busiest([k % world for k in range(len(shapes))])
    assert balanced <= 4 / 3 * best_possible
    assert balanced <= round_robin
    if world in (2, 32):  # perfectly balanced here; round-robin on 32 ranks: 1.38x the mean (docs/distributed.md)
        assert balanced == sum(cost) / world
    if world == 32:
        assert round(round_robin / (sum(cost) / world), 2) == 1.38
    assert max(cost) / min(cost) == pytest.approx(13 / 3)  # adaLN modulation vs output projection


def _two_copies(n_steps_grads, make_mine, make_ref, seed=0, depth=2, only=None):
    """Run our optimizer and a torch reference on identical parameter copies with identical random
    gradients (on every parameter, or those `only(model)` returns); return (model, initial, mine,
    ref) with the parameter lists after the steps."""
    model = tiny(seed, depth)
    randomize(model)
    mine_model, ref_model = copy.deepcopy(model), copy.deepcopy(model)
    mine, ref = make_mine(mine_model), make_ref(ref_model)
    init = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(7)
    for _ in range(n_steps_grads):
        chosen = ids(only(model)) if only else ids(model.parameters())
        for p, pa, pb in zip(model.parameters(), mine_model.parameters(), ref_model.parameters()):
            if id(p) not in chosen:
                continue
            grad = torch.randn(pa.shape, generator=g)
            pa.grad, pb.grad = grad.clone(), grad.clone()
        mine.step()
        ref.step()
    return model, init, list(mine_model.parameters()), list(ref_model.parameters())


def _muon_ref(lr, wd, nesterov, ns_steps=5):
    def make(model):
        muon, _, _ = split_parameters(model)
        return torch.optim.Muon(
            muon,
            lr=lr,
            weight_decay=wd,
            momentum=0.95,
            nesterov=nesterov,
            ns_coefficients=(3.4445, -4.7750, 2.0315),
            eps=1e-7,
            ns_steps=ns_steps,
            adjust_lr_fn="match_rms_adamw",
        )

    return make


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_bf16_is_torch_muon_bitwise(nesterov):
    """torch.optim.Muon runs Newton-Schulz in bfloat16; so does our default, batched by shape (the
    depth-3 model has 3 matrices of each block shape: gate and up share one chain of 6, the wide
    down its own of 3), and the update is torch's exactly."""
    lr, wd = 0.02, 0.1  # a large lr so that the comparison is not swamped by the weights
    model, init, mine, ref = _two_copies(
        3,
        lambda m: build_optimizer(m, kind="muon", lr=lr, muon_lr=lr, weight_decay=wd, muon_nesterov=nesterov),
        _muon_ref(lr, wd, nesterov),
        depth=3,
    )
    muon, _, _ = split_parameters(model)
    assert len(muon) == 21 and sum(p.shape in ((112, 32), (32, 112)) for p in muon) == 9
    is_muon = [id(p) in ids(muon) for p in model.parameters()]
    for flag, p0, a, b in zip(is_muon, init, mine, ref):
        if flag:
            assert torch.equal(a, b)
            assert not torch.equal(a, p0)


def test_three_newton_schulz_steps_are_torch_muons_three():
    """optimizer.muon_ns_steps=3 is torch.optim.Muon with ns_steps=3, bit for bit, and a different update
    from the default 5 steps."""
    lr = 0.02
    three = lambda m: build_optimizer(m, kind="muon", lr=lr, muon_ns_steps=3)  # noqa: E731
    model, init, mine, ref = _two_copies(3, three, _muon_ref(lr, 0.0, True, ns_steps=3))
    _, _, five, _ = _two_copies(3, lambda m: build_optimizer(m, kind="muon", lr=lr), _muon_ref(lr, 0.0, True))
    muon = ids(split_parameters(model)[0])
    for p, a, b, c in zip(model.parameters(), mine, ref, five):
        if id(p) in muon:
            assert torch.equal(a, b) and not torch.equal(a, c)


def test_muon_fp32_matches_torch_muon():
    """fp32 Newton-Schulz (optimizer.muon_precision=fp32) is the same update computed more precisely:
    it agrees with a float64 run to ~1e-5 and with torch's bfloat16 one only to bfloat16 precision
    (about 1.3% of the step here), compared on the parameter change, which is what the update is."""
    lr, wd = 0.02, 0.1
    fp32 = lambda m: build_optimizer(m, kind="muon", lr=lr, weight_decay=wd, muon_ns_dtype="fp32")  # noqa: E731
    fp64 = lambda m: build_optimizer(m, kind="muon", lr=lr, weight_decay=wd, muon_ns_dtype="float64")  # noqa: E731
    model, init, mine, ref = _two_copies(3, fp32, _muon_ref(lr, wd, True))
    _, _, exact, _ = _two_copies(3, fp64, lambda m: torch.optim.SGD(m.parameters(), lr=0.0))
    muon, _, _ = split_parameters(model)
    for p, p0, a, b, c in zip(model.parameters(), init, mine, ref, exact):
        if id(p) in ids(muon):
            da, db, dc = (a - p0).detach(), (b - p0).detach(), (c - p0).detach()
            assert (da - dc).norm() < 1e-4 * dc.norm()
            assert (da - db).norm() < 3e-2 * db.norm()


def test_precision_comes_from_the_config():
    model = tiny()
    cfg = load_config(None, ["optimizer.name=muon"])
    assert cfg.optimizer.muon_precision == "bf16"
    from pixelrun.training.optim import make_optimizer

    assert make_optimizer(model, cfg)[0].param_groups[0]["ns_dtype"] == "bf16"
    cfg = load_config(None, ["optimizer.name=muon", "optimizer.muon_precision=fp32"])
    assert make_optimizer(model, cfg)[0].param_groups[0]["ns_dtype"] == "fp32"
    with pytest.raises(ConfigError, match="optimizer.muon_precision: must be one of bf16, fp32; got 'float16'"):
        load_config(None, ["optimizer.muon_precision=float16"])
    cfg = load_config(None, ["optimizer.name=muon", "optimizer.muon_ns_steps=3"])
    assert make_optimizer(model, cfg)[0].param_groups[0]["ns_steps"] == 3
    with pytest.raises(ConfigError, match="optimizer.muon_ns_steps"):
        load_config(None, ["optimizer.muon_ns_steps=0"])


def test_precision_is_a_setting_not_restored_state():
    """A checkpoint written with fp32 Newton-Schulz (or torch's old "float32" name) resumed under
    bf16 continues in bf16: the step after loading is a bf16 optimizer's step, bit for bit."""
    model = tiny()
    randomize(model)
    old = build_optimizer(copy.deepcopy(model), kind="muon", lr=1e-2, muon_ns_dtype="float32")
    saved = old.state_dict()
    assert saved["param_groups"][0]["ns_dtype"] == "float32"
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    resumed = build_optimizer(a, kind="muon", lr=1e-2)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["ns_dtype"] == "bf16"
    three = build_optimizer(copy.deepcopy(model), kind="muon", lr=1e-2, muon_ns_steps=3)
    three.load_state_dict(saved)  # saved with 5 steps: the step count is the config's too
    assert three.param_groups[0]["ns_steps"] == 3
    fresh = build_optimizer(b, kind="muon", lr=1e-2)
    for m, o in ((a, resumed), (b, fresh)):
        loss_of(m, 0).backward()
        o.step()
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name


def test_adam_group_is_torch_adamw():
    lr, wd = 1e-3, 0.05

    def ref(model):
        _, adam, _ = split_parameters(model)
        # fused: the kernel torch.optim.AdamW is given for parameters all on the CPU (or all on CUDA)
        return torch.optim.AdamW(adam, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd, fused=True)

    # Gradients on the Adam group only (the Muon matrices, without gradients, are skipped).
    model, init, mine, theirs = _two_copies(
        3, lambda m: build_optimizer(m, kind="muon", lr=lr, weight_decay=wd), ref, only=lambda m: split_parameters(m)[1]
    )
    _, adam, _ = split_parameters(model)
    for p, p0, a, b in zip(model.parameters(), init, mine, theirs):
        if id(p) in ids(adam):
            assert torch.equal(a, b) and not torch.equal(a, p0)


def test_adam_group_takes_the_fused_kernel_as_plain_adamw(monkeypatch):
    """Parameters all on the CPU (or all on CUDA): plain AdamW and Muon's AdamW group both take
    torch's fused kernel, and the group equals torch.optim.AdamW(fused=True). Loading a state saved
    unfused (a run from before, or from a device without the kernel) keeps it fused: the kernel
    follows the machine, not the checkpoint. Parameters elsewhere get torch's default."""
    import pixelrun.training.optim as optim

    lr, wd = 1e-3, 0.05
    with monkeypatch.context() as patched:
        patched.setattr(optim, "_fused_kernel", lambda params: None)
        unfused_state = build_optimizer(tiny(), kind="muon", lr=lr, weight_decay=wd).state_dict()
    assert unfused_state["param_groups"][1]["fused"] is None
    assert build_optimizer(tiny(), kind="adamw", lr=lr).param_groups[0]["fused"] is True
    assert optim._fused_kernel([torch.zeros(2, device="meta")]) is None

    def ref(model):
        return torch.optim.AdamW(
            split_parameters(model)[1], lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd, fused=True
        )

    def mine(model):
        opt = build_optimizer(model, kind="muon", lr=lr, weight_decay=wd)
        assert opt.param_groups[1]["fused"] is True
        opt.load_state_dict(unfused_state)  # no state yet: only the settings, which stay fused
        assert opt.param_groups[1]["fused"] is True
        return opt

    model, init, a, b = _two_copies(3, mine, ref, only=lambda m: split_parameters(m)[1])
    for p, p0, x, y in zip(model.parameters(), init, a, b):
        if id(p) in ids(split_parameters(model)[1]):
            assert torch.equal(x, y) and not torch.equal(x, p0)


def test_adamw_kind_is_plain_adamw():
    model = tiny()
    projector = nn.Linear(32, 8)
    opt = build_optimizer(model, kind="adamw", lr=1e-4, extra_adam_modules=[projector])
    assert type(opt) is torch.optim.AdamW
    assert len(opt.param_groups) == 1
    assert ids(opt.param_groups[0]["params"]) == ids(model.parameters()) | ids(projector.parameters())
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["weight_decay"] == 0.0
    with pytest.raises(ValueError):
        build_optimizer(model, kind="sgd")


def test_parameters_without_grad_are_left_alone():
    model = tiny()
    randomize(model)
    opt = build_optimizer(model, kind="muon", lr=1e-2)
    loss_of(model, 0).backward()
    frozen = model.blocks[0].gate_proj.weight
    frozen.grad = None
    before = frozen.detach().clone()
    opt.step()
    assert torch.equal(frozen, before) and frozen not in opt.state


# ---------------------------------------------------------------------------------------------- resume, schedules


def _train(model, opt, sched, steps):
    for s in steps:
        opt.zero_grad()
        loss_of(model, s).backward()
        opt.step()
        sched.step()


def _make(model):
    opt = build_optimizer(model, kind="muon", lr=1e-3, muon_lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return opt, sched


def test_state_dict_round_trip_is_bitwise():
    model = tiny()
    randomize(model)
    straight = copy.deepcopy(model)
    opt, sched = _make(straight)
    _train(straight, opt, sched, range(6))

    first = copy.deepcopy(model)
    opt, sched = _make(first)
    _train(first, opt, sched, range(3))
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    resumed = tiny(seed=123)  # different initial values: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2, sched2 = _make(resumed)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert {k for s in opt2.state.values() for k in s} == {"momentum_buffer", "step", "exp_avg", "exp_avg_sq"}
    _train(resumed, opt2, sched2, range(3, 6))

    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_loading_state_with_other_groups_fails():
    model = tiny()
    adamw = build_optimizer(model, kind="adamw")
    muon = build_optimizer(model, kind="muon")
    with pytest.raises(ValueError):
        muon.load_state_dict(adamw.state_dict())


def test_lambda_lr_warmup_scales_both_groups():
    model = tiny()
    randomize(model)
    warm_model, fixed_model = copy.deepcopy(model), copy.deepcopy(model)
    opt, sched = _make(warm_model)
    muon_group, adam_group = opt.param_groups
    assert (muon_group["algorithm"], adam_group["algorithm"]) == ("muon", "adamw")
    assert muon_group["lr"] == pytest.approx(2e-3 / 3) and adam_group["lr"] == pytest.approx(1e-3 / 3)

    # The step reads the scheduled lr: a warmup step equals a step of an optimizer built at lr * 1/3.
    fixed = build_optimizer(fixed_model, kind="muon", lr=1e-3 * (1 / 3), muon_lr=2e-3 * (1 / 3), weight_decay=0.01)
    for m, o in ((warm_model, opt), (fixed_model, fixed)):
        o.zero_grad()
        loss_of(m, 0).backward()
        o.step()
    for (name, a), b in zip(warm_model.named_parameters(), fixed_model.parameters()):
        assert torch.equal(a, b), name
    # ... and differs from an un-warmed step.
    full = copy.deepcopy(model)
    full_opt = build_optimizer(full, kind="muon", lr=1e-3, muon_lr=2e-3, weight_decay=0.01)
    loss_of(full, 0).backward()
    full_opt.step()
    w = model.blocks[0].gate_proj.weight
    d_warm = (warm_model.blocks[0].gate_proj.weight - w).norm()
    d_full = (full.blocks[0].gate_proj.weight - w).norm()
    assert d_warm.item() == pytest.approx(d_full.item() / 3, rel=1e-3)

    for _ in range(3):
        sched.step()
    assert muon_group["lr"] == pytest.approx(2e-3) and adam_group["lr"] == pytest.approx(1e-3)


def test_is_one_torch_optimizer():
    opt = build_optimizer(tiny(), kind="muon")
    assert isinstance(opt, MuonAdamW) and isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups[1]["betas"] == (0.9, 0.95) and opt.param_groups[1]["eps"] == 1e-8
    assert opt.param_groups[0]["momentum"] == 0.95 and opt.param_groups[0]["nesterov"] is True
    assert all(g["weight_decay"] == 0.0 and g["lr"] == 1e-4 for g in opt.param_groups)


def test_muon_bf16_on_an_emulating_cpu_is_warned(monkeypatch):
    from pixelrun.infra import precision

    cfg = load_config(overrides=["optimizer.name=muon"])
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: False)
    assert "optimizer.muon_precision=fp32" in precision.muon_precision_warning(cfg, cpu)
    assert precision.muon_precision_warning(cfg, cuda) is None  # GPUs run bf16 natively
    assert (
        precision.muon_precision_warning(
            load_config(overrides=["optimizer.name=muon", "optimizer.muon_precision=fp32"]), cpu
        )
        is None
    )
    assert precision.muon_precision_warning(load_config(overrides=[]), cpu) is None  # AdamW: no Newton-Schulz
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: True)
    assert precision.muon_precision_warning(cfg, cpu) is None
