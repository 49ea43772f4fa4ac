"""TREAD routing (pixelrun.model.routing) and self-guidance (sampling, guidance mode "self").

A tiny randomly initialised model (normal std 0.05 everywhere, so the zero-initialised modulation
and output layers do not make every output trivially 0) checks the model side of routing; small
stubs check the sampler's combination rule and its fixed mask.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pixelrun.config import span_for_depth
from pixelrun.diffusion.objective import x_to_velocity
from pixelrun.diffusion.sampling import initial_noise, sample, self_guidance_routing, time_grid
from pixelrun.model.denoiser import ModelOutput, Routing, build_model, gather_tokens, scatter_tokens
from pixelrun.model.routing import keep_mask, kept_count, random_routing, routed_indices, routing_generator

SIZE = 32  # 32x32 px at patch 8: 16 tokens
N_TOKENS = 16
SPAN = (1, 2)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = build_model("tiny", 24, hidden_size=32, num_heads=2, depth=4)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.05)
    return m.eval()


def _inputs(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, SIZE, SIZE, generator=g)
    t = torch.rand(b, generator=g)
    text = torch.randn(b, 5, 24, generator=g)
    mask = torch.ones(b, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return x, t, text, mask


# --- masks -------------------------------------------------------------------------------------


def test_kept_and_routed_partition_the_tokens():
    r = random_routing(4, N_TOKENS, 0.5, SPAN, torch.Generator().manual_seed(0))
    assert r.keep.shape == (4, 8) and r.keep.dtype == torch.long and (r.start, r.end) == SPAN
    dropped = routed_indices(r.keep, N_TOKENS)
    assert dropped.shape == (4, 8)
    for kept, rest in zip(r.keep.tolist(), dropped.tolist()):
        assert kept == sorted(kept) and len(set(kept)) == len(kept)
        assert not set(kept) & set(rest) and set(kept) | set(rest) == set(range(N_TOKENS))
    assert keep_mask(r.keep, N_TOKENS).sum(1).tolist() == [8] * 4
    assert len({tuple(k) for k in r.keep.tolist()}) == 4  # every sample its own mask


def test_kept_count_rounds_half_up_and_keeps_one():
    assert kept_count(16, 0.5) == 8 and kept_count(9, 0.5) == 5 and kept_count(256, 0.75) == 64
    assert kept_count(2, 0.9) == 1
    with pytest.raises(ValueError):
        kept_count(16, 1.0)
    with pytest.raises(ValueError):
        random_routing(2, 16, -0.1, SPAN, torch.Generator())


def test_masks_come_from_the_generator():
    draw = lambda seed: random_routing(3, N_TOKENS, 0.5, SPAN, torch.Generator().manual_seed(seed)).keep
    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
    g = torch.Generator().manual_seed(1)  # successive draws (steps, micro-batches) differ
    assert not torch.equal(random_routing(3, 16, 0.5, SPAN, g).keep, random_routing(3, 16, 0.5, SPAN, g).keep)
    per_rank = [random_routing(3, 16, 0.5, SPAN, routing_generator(7, rank)).keep for rank in (0, 1)]
    assert not torch.equal(*per_rank)
    assert torch.equal(per_rank[0], random_routing(3, 16, 0.5, SPAN, routing_generator(7, 0)).keep)


def test_gather_then_scatter_is_identity():
    x = torch.randn(3, N_TOKENS, 5)
    keep = random_routing(3, N_TOKENS, 0.5, SPAN, torch.Generator().manual_seed(0)).keep
    assert torch.equal(scatter_tokens(x, gather_tokens(x, keep), keep), x)
    assert torch.equal(gather_tokens(x, keep)[1, 0], x[1, keep[1, 0]])


# --- span --------------------------------------------------------------------------------------


def test_span_for_depth_rule():
    assert span_for_depth(16) == (2, 12)  # Photoroom's PRX config
    assert span_for_depth(4) == (1, 2)
    assert span_for_depth(8) == (1, 5)
    assert span_for_depth(12) == (2, 9)
    assert span_for_depth(28) == (4, 22)
    assert span_for_depth(2) == (0, 0) and span_for_depth(1) == (0, 0)
    for depth in range(3, 64):  # a dense block before and after, always
        s, e = span_for_depth(depth)
        assert 1 <= s <= e <= depth - 2
    assert span_for_depth(16, 3, 10) == (3, 10) and span_for_depth(16, start=0) == (0, 12)


@pytest.mark.parametrize(
    "start,end,word", [(-1, 3, "start"), (2, 16, "end"), (5, 4, "start"), (13, None, "start"), (None, 1, "end")]
)
def test_bad_spans_raise_naming_the_culprit(start, end, word):
    with pytest.raises(ValueError, match=word):
        span_for_depth(16, start, end)


# --- the model under routing -------------------------------------------------------------------


def test_blocks_inside_the_span_see_fewer_tokens(tiny):
    x, t, text, mask = _inputs()
    r = random_routing(2, N_TOKENS, 0.5, SPAN, torch.Generator().manual_seed(0))
    out = tiny(x, t, text, mask, routing=r, return_features=(0, 1, 2, 3))
    f = out.features
    assert f[0].shape == (2, N_TOKENS, 32)
    assert f[1].shape == (2, 8, 32)  # block `start`: only the kept tokens
    # Block `end` too: its features are taken before the routed tokens are put back (REPA on that
    # block must count only the tokens that went through it); block 3 sees all tokens again.
    assert f[2].shape == (2, 8, 32) and f[3].shape == (2, N_TOKENS, 32)
    # The routed tokens skipped blocks 1..2 unchanged: with block 3 made the identity (its adaLN
    # gates zero), its output shows them as block 0 left them, and the kept ones as block 2 did.
    identity_after = copy.deepcopy(tiny)  # the fixture is shared by the module's tests
    with torch.no_grad():
        identity_after.blocks[3].modulation.lin.weight.zero_()
        identity_after.blocks[3].modulation.lin.bias.zero_()
    f = identity_after(x, t, text, mask, routing=r, return_features=(0, 2, 3)).features
    dropped = routed_indices(r.keep, N_TOKENS)
    assert torch.equal(gather_tokens(f[3], dropped), gather_tokens(f[0], dropped))
    assert torch.equal(gather_tokens(f[3], r.keep), f[2])
    assert not torch.allclose(gather_tokens(f[3], r.keep), gather_tokens(f[0], r.keep))
    dense = tiny(x, t, text, mask, return_features=(1,))
    assert dense.features[1].shape == (2, N_TOKENS, 32)
    assert not torch.allclose(out.prediction, dense.prediction, atol=1e-4)  # routing changes the output


def test_ratio_zero_and_keep_all_equal_dense(tiny):
    x, t, text, mask = _inputs()
    dense = tiny(x, t, text, mask).prediction
    assert dense.abs().mean() > 1e-3  # non-trivial outputs
    r = random_routing(2, N_TOKENS, 0.0, SPAN, torch.Generator().manual_seed(0))
    assert r is None
    assert torch.equal(tiny(x, t, text, mask, routing=r).prediction, dense)
    everything = Routing(keep=torch.arange(N_TOKENS).expand(2, -1).contiguous(), start=1, end=2)
    assert torch.allclose(tiny(x, t, text, mask, routing=everything).prediction, dense, atol=1e-5)


# --- self-guidance -----------------------------------------------------------------------------


class Recorder(torch.nn.Module):
    """Wraps a model; records the routing it gets at each call and the first input image."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.cfg = inner, inner.cfg
        self.calls: list[Routing | None] = []
        self.first_x = None

    def forward(self, x, t, text, mask=None, routing=None, return_features=()):
        if self.first_x is None:
            self.first_x = x.clone()
        self.calls.append(routing)
        return self.inner(x, t, text, mask, routing=routing, return_features=return_features)


def _kw(**extra):
    return {**dict(height=SIZE, width=SIZE, steps=3, spacing="linear", seed=5), **extra}


def test_self_guidance_w1_is_dense_and_w0_is_routed(tiny):
    _, _, text, mask = _inputs()
    dense = sample(tiny, text, mask, guidance_mode="none", **_kw())
    one = sample(tiny, text, mask, guidance_mode="self", guidance=1.0, routing_span=SPAN, **_kw())
    assert torch.equal(one, dense)

    zero = sample(tiny, text, mask, guidance_mode="self", guidance=0.0, routing_span=SPAN, **_kw())
    # Oracle: a plain Euler loop that only ever runs the routed pass, with the same mask.
    routing = self_guidance_routing(2, N_TOKENS, SPAN, 0.5, seed=5)
    x, times = initial_noise(2, SIZE, SIZE, 5), time_grid(3, 3.0, "linear")
    with torch.no_grad():
        for i in range(3):
            t = times[i].expand(2)
            x_hat = tiny(x, t, text, mask, routing=routing).prediction
            x = x + (times[i + 1] - times[i]).item() * x_to_velocity(x, x_hat, t)
    assert torch.allclose(zero, x.clamp(-1, 1), atol=1e-6)
    assert not torch.allclose(zero, dense, atol=1e-3)


def test_self_guidance_combines_on_the_prediction():
    class TwoWay(torch.nn.Module):  # predicts 0.3 dense, -0.1 routed
        cfg = type("C", (), {"patch_size": 8, "depth": 4})()

        def forward(self, x, t, text, mask=None, routing=None, return_features=()):
            return ModelOutput(torch.full_like(x, 0.3 if routing is None else -0.1), {})

    _, _, text, mask = _inputs()
    out = sample(TwoWay(), text, mask, guidance_mode="self", guidance=2.0, routing_span=SPAN, **_kw(steps=8))
    # The exact x-prediction lands on it at t = 0 (see test_sampling): -0.1 + 2 * (0.3 + 0.1).
    assert torch.allclose(out, torch.full_like(out, 0.7), atol=1e-5)


def test_self_guidance_mask_is_fixed_and_noise_unchanged(tiny):
    _, _, text, mask = _inputs()
    rec = Recorder(tiny)
    sample(rec, text, mask, guidance_mode="self", guidance=3.5, routing_span=SPAN, **_kw())
    routed = [r for r in rec.calls if r is not None]
    assert len(rec.calls) == 6 and len(routed) == 3  # one dense + one routed pass per step
    assert all(torch.equal(r.keep, routed[0].keep) and (r.start, r.end) == SPAN for r in routed)
    assert routed[0].keep.shape == (2, 8) and not torch.equal(routed[0].keep[0], routed[0].keep[1])
    assert torch.equal(routed[0].keep, self_guidance_routing(2, N_TOKENS, SPAN, 0.5, seed=5).keep)

    plain = Recorder(tiny)
    sample(plain, text, mask, guidance_mode="none", **_kw())
    expected = torch.randn((2, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(5))
    assert torch.equal(rec.first_x, expected) and torch.equal(plain.first_x, expected)


def test_self_guidance_needs_a_span(tiny):
    _, _, text, mask = _inputs()
    with pytest.raises(ValueError, match="routing_span"):
        sample(tiny, text, mask, guidance_mode="self", **_kw())
    with pytest.raises(ValueError, match="routing_ratio"):
        sample(tiny, text, mask, guidance_mode="self", routing_span=SPAN, routing_ratio=0.0, **_kw())
    with pytest.raises(ValueError, match="end"):
        sample(tiny, text, mask, guidance_mode="self", routing_span=(1, 4), **_kw())  # depth 4: blocks 0..3
