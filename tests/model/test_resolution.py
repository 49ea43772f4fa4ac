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


def _side(size: float) -> torch.Tensor:
    """One side's 128 features by hand, in float64: [cos(s f_k) | sin(s f_k)], f_k = 10000^(-k/64)."""
    freqs = [math.exp(-math.log(10000) * k / 64) for k in range(64)]
    return torch.tensor([f(size * fk) for f in (math.cos, math.sin) for fk in freqs], dtype=torch.float64)


def _mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    z = mlp.in_layer.weight.double() @ x + mlp.in_layer.bias.double()
    return mlp.out_layer.weight.double() @ (z / (1 + torch.exp(-z))) + mlp.out_layer.bias.double()


def test_token_mode_gives_one_token_per_side_by_hand():
    torch.manual_seed(0)
    emb = ResolutionEmbedder(8, mode="token")
    got = emb(3, 48, 80, torch.float32, "cpu")
    assert got.shape == (3, 2, 8) and not hasattr(emb, "mlp")
    assert torch.allclose(got[:, 0].double(), _mlp(emb.h_embedder, _side(48)).expand(3, 8), atol=1e-5)
    assert torch.allclose(got[:, 1].double(), _mlp(emb.w_embedder, _side(80)).expand(3, 8), atol=1e-5)
    with pytest.raises(ValueError, match="vec | token"):
        ResolutionEmbedder(8, mode="tokens")


@pytest.mark.parametrize("routed", [False, True])
def test_token_mode_equals_two_more_text_tokens_before_the_prompt(routed):
    """A "token" model equals the same model without the embedder given the prompt with two more
    tokens in front (unmasked, the prompt's padding still masked), when those two tokens project
    (txt_in) to what its embedder gives: the embedding enters as text keys and values, nowhere else.
    Routed: the kept tokens' attention mask counts the two tokens too."""
    from pixelrun.model.denoiser import Routing

    torch.manual_seed(0)
    kw = dict(patch_size=8, hidden_size=16, depth=3, num_heads=1)
    tok = build_model("tiny", 8, resolution_embeds="token", **kw)
    for p in tok.parameters():  # the real init zeroes the adaLN and the output
        torch.nn.init.normal_(p, std=0.3)
    plain = build_model("tiny", 8, **kw)
    plain.load_state_dict({k: v for k, v in tok.state_dict().items() if not k.startswith("resolution_embedder.")})
    front = torch.randn(2, 8)  # the two extra prompt tokens, before txt_in
    with torch.no_grad():  # each side's MLP made a constant: txt_in of its extra token
        for side, mlp in enumerate((tok.resolution_embedder.h_embedder, tok.resolution_embedder.w_embedder)):
            mlp.out_layer.weight.zero_()
            mlp.out_layer.bias.copy_(plain.txt_in(front[side]))
        t, txt = torch.tensor([0.3, 0.9]), torch.randn(2, 3, 8)
        mask = torch.tensor([[True, True, True], [True, False, False]])
        x = torch.randn(2, 3, 16, 24)
        routing = Routing(keep=torch.tensor([[0, 2, 5], [1, 3, 4]]), start=1, end=1) if routed else None
        a = tok(x, t, txt, mask, routing=routing).prediction
        longer = torch.cat([front.expand(2, 2, 8), txt], dim=1)
        b = plain(x, t, longer, torch.cat([torch.ones(2, 2, dtype=torch.bool), mask], 1), routing=routing).prediction
        assert (a - b).abs().max() < 1e-5 * a.abs().max(), (a - b).abs().max()
        # without the two tokens it is another function
        assert not torch.allclose(a, plain(x, t, txt, mask, routing=routing).prediction, atol=1e-3)


def test_token_mode_is_a_config_choice_kept_on_resume_and_refused_by_the_diffusers_export():
    from pixelrun.config import ConfigError, load_config
    from pixelrun.run.resume import resume_changes
    from pixelrun.tools.export_diffusers import check_config

    token = load_config(None, ["model.resolution_embeds=token"])
    check_config(load_config(None, ["model.resolution_embeds=vec"]))  # vec exports
    with pytest.raises(ConfigError) as e:
        check_config(token)
    assert (
        e.value.key == "model.resolution_embeds"
        and "\n" not in str(e.value)
        and "PRXTransformer2DModel" in str(e.value)
    )
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.resolution_embeds=tokens"])
    assert e.value.key == "model.resolution_embeds" and "token" in str(e.value)
    refused, _ = resume_changes(load_config(None, []), token)
    assert "model.resolution_embeds" in refused
