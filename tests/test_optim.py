"""The Muon/AdamW optimizer: which parameters each algorithm gets, that the updates are torch's
(torch.optim.Muon with match_rms_adamw, torch.optim.AdamW), exact state_dict resume, LR schedules."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from pixelrun.model import build_model
from pixelrun.optim import MuonAdamW, build_optimizer, describe, orthogonalize, split_parameters


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
    for p in (blk.attention.img_qkv_proj.weight, blk.attention.txt_kv_proj.weight, blk.attention.to_out[0].weight,
              blk.gate_proj.weight, blk.up_proj.weight, blk.down_proj.weight, blk.modulation.lin.weight):
        assert id(p) in ids(muon)
    for mod in (model.img_in, model.time_in, model.txt_in, model.final_layer):
        assert ids(mod.parameters()) <= ids(adam)
    for p in (blk.modulation.lin.bias, blk.attention.norm_q.weight, blk.attention.norm_k.weight,
              blk.attention.norm_added_k.weight):
        assert id(p) in ids(adam)
    assert all(p.ndim == 2 for p in muon)

    assert report == {"muon": sum(p.numel() for p in muon), "adam": sum(p.numel() for p in adam),
                      "muon_tensors": len(muon), "adam_tensors": len(adam)}
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
        p.numel() for p in projector.parameters())


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


def test_newton_schulz_singular_values():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 32, generator=g)
    o = orthogonalize(a)
    assert o.shape == a.shape and o.dtype == torch.float32
    s = torch.linalg.svdvals(o.double())
    assert 0.6 < s.min() and s.max() < 1.2
    s_in = torch.linalg.svdvals(a.double())
    assert s_in.max() / s_in.min() > 4  # the input was far from orthogonal
    # The singular vectors are kept: O is close to U V^T (the polar factor), not some other matrix.
    u, _, vh = torch.linalg.svd(a.double(), full_matrices=False)
    assert torch.nn.functional.cosine_similarity((u @ vh).flatten(), o.double().flatten(), dim=0) > 0.97
    # Wide input (no transpose) and a scaled input give the same kind of result.
    assert torch.allclose(orthogonalize(a.T), o.T, atol=1e-5)
    assert torch.allclose(orthogonalize(1e3 * a), o, atol=1e-5)


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


def _muon_ref(lr, wd, nesterov):
    def make(model):
        muon, _, _ = split_parameters(model)
        return torch.optim.Muon(muon, lr=lr, weight_decay=wd, momentum=0.95, nesterov=nesterov,
                                ns_coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7, ns_steps=5,
                                adjust_lr_fn="match_rms_adamw")
    return make


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_bf16_is_torch_muon_bitwise(nesterov):
    """torch.optim.Muon runs Newton-Schulz in bfloat16; in that mode our update is torch's exactly."""
    lr, wd = 0.02, 0.1  # a large lr so that the comparison is not swamped by the weights
    model, init, mine, ref = _two_copies(
        3, lambda m: build_optimizer(m, kind="muon", lr=lr, muon_lr=lr, weight_decay=wd, muon_nesterov=nesterov,
                                     muon_ns_dtype="bfloat16"),
        _muon_ref(lr, wd, nesterov))
    muon, _, _ = split_parameters(model)
    is_muon = [id(p) in ids(muon) for p in model.parameters()]
    for flag, p0, a, b in zip(is_muon, init, mine, ref):
        if flag:
            assert torch.equal(a, b)
            assert not torch.equal(a, p0)


def test_muon_fp32_matches_torch_muon():
    """The default float32 Newton-Schulz is the same update computed more precisely: it agrees with
    a float64 run to ~1e-5 and with torch's bfloat16 one only to bfloat16 precision (about 1.3%
    of the step here), compared on the parameter change, which is what the update is."""
    lr, wd = 0.02, 0.1
    fp32 = lambda m: build_optimizer(m, kind="muon", lr=lr, weight_decay=wd)  # noqa: E731
    fp64 = lambda m: build_optimizer(m, kind="muon", lr=lr, weight_decay=wd, muon_ns_dtype="float64")  # noqa: E731
    model, init, mine, ref = _two_copies(3, fp32, _muon_ref(lr, wd, True))
    _, _, exact, _ = _two_copies(3, fp64, lambda m: torch.optim.SGD(m.parameters(), lr=0.0))
    muon, _, _ = split_parameters(model)
    for p, p0, a, b, c in zip(model.parameters(), init, mine, ref, exact):
        if id(p) in ids(muon):
            da, db, dc = (a - p0).detach(), (b - p0).detach(), (c - p0).detach()
            assert (da - dc).norm() < 1e-4 * dc.norm()
            assert (da - db).norm() < 3e-2 * db.norm()


def test_adam_group_is_torch_adamw():
    lr, wd = 1e-3, 0.05

    def ref(model):
        _, adam, _ = split_parameters(model)
        return torch.optim.AdamW(adam, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)

    # Gradients on the Adam group only (the Muon matrices, without gradients, are skipped).
    model, init, mine, theirs = _two_copies(3, lambda m: build_optimizer(m, kind="muon", lr=lr, weight_decay=wd), ref,
                                            only=lambda m: split_parameters(m)[1])
    _, adam, _ = split_parameters(model)
    for p, p0, a, b in zip(model.parameters(), init, mine, theirs):
        if id(p) in ids(adam):
            assert torch.equal(a, b) and not torch.equal(a, p0)


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
