"""Resolution-aware conditioning ("vec"): the embedder against a hand computation and diffusers'
module, its place in the forward, and its FLOPs."""

from __future__ import annotations

import math

import pytest
import torch

from pixelrun.model.denoiser import build_model
from pixelrun.model.flops import training_flops_per_image
from pixelrun.model.resolution import ResolutionEmbedder


def test_resolution_embedder_against_a_hand_computation_and_diffusers():
    pytest.importorskip("diffusers")
    from diffusers.models.transformers.transformer_prx import PRXResolutionEmbedder

    torch.manual_seed(0)
    ours = ResolutionEmbedder(8)
    h, w = 48, 80
    got = ours(3, h, w, torch.float32, "cpu")
    # by hand, in float64: per side [cos(s f_k) | sin(s f_k)], f_k = 10000^(-k/64), k < 64; then the MLP
    freqs = [math.exp(-math.log(10000) * k / 64) for k in range(64)]
    feats = [f(s * fk) for s in (h, w) for f in (math.cos, math.sin) for fk in freqs]
    x = torch.tensor(feats, dtype=torch.float64)
    w1, b1 = ours.mlp.in_layer.weight.double(), ours.mlp.in_layer.bias.double()
    w2, b2 = ours.mlp.out_layer.weight.double(), ours.mlp.out_layer.bias.double()
    z = w1 @ x + b1
    hand = w2 @ (z / (1 + torch.exp(-z))) + b2
    assert got.shape == (3, 8)
    assert torch.allclose(got.double(), hand.expand(3, 8), atol=1e-5), (got[0], hand)
    # diffusers' module with the same weights (the same names) computes the same, bit for bit
    theirs = PRXResolutionEmbedder(8)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    sizes = torch.full((3,), float(h)), torch.full((3,), float(w))
    assert torch.equal(got, theirs(*sizes, dtype=torch.float32))


def test_the_forward_adds_the_embedding_to_the_time_vector():
    """A "vec" model equals the same model without the embedder whose time_in output bias is moved by
    the embedding of the size it draws at (added to the time vector, nothing else); at another size
    it does not."""
    torch.manual_seed(0)
    vec = build_model("tiny", 8, patch_size=8, hidden_size=16, depth=2, num_heads=1, resolution_embeds="vec")
    for p in vec.parameters():  # the real init zeroes the adaLN and the output
        torch.nn.init.normal_(p, std=0.3)
    plain = build_model("tiny", 8, patch_size=8, hidden_size=16, depth=2, num_heads=1)
    plain.load_state_dict({k: v for k, v in vec.state_dict().items() if not k.startswith("resolution_embedder.")})
    with torch.no_grad():
        plain.time_in.out_layer.bias += vec.resolution_embedder(1, 16, 24, torch.float32, "cpu")[0]
        t, txt = torch.tensor([0.3, 0.9]), torch.randn(2, 3, 8)
        x = torch.randn(2, 3, 16, 24)
        a, b = vec(x, t, txt).prediction, plain(x, t, txt).prediction
        assert (a - b).abs().max() < 1e-4 * a.abs().max(), (a - b).abs().max()
        y = torch.randn(2, 3, 24, 16)
        assert not torch.allclose(vec(y, t, txt).prediction, plain(y, t, txt).prediction, atol=1e-3)


def test_flops_count_the_embedder_once_per_image():
    d = 64
    cfgs = [build_model("tiny", 8, hidden_size=d, num_heads=4, resolution_embeds=r).cfg for r in ("none", "vec")]
    none, vec = (training_flops_per_image(c, 32, 32, 4) for c in cfgs)
    # Linear(256 -> d), its input needs no gradient (forward + weight grad), then Linear(d -> d) (x3)
    assert vec["training_total"] - none["training_total"] == 2 * (2 * 256 * d) + 3 * (2 * d * d)
    assert vec["forward"]["time_embed"] - none["forward"]["time_embed"] == 2 * 256 * d + 2 * d * d
