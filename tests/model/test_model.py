import pytest
import torch

from pixelrun.config import PRESETS
from pixelrun.model.denoiser import (
    Routing,
    apply_rope,
    build_model,
    count_parameters,
    patchify,
    rope_angles,
    unpatchify,
)


def tiny(**kw):
    torch.manual_seed(0)
    return build_model("tiny", 24, hidden_size=32, num_heads=2, depth=3, **kw)


def randomize(model):
    torch.manual_seed(1)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def inputs(b=2, h=32, w=24, t_len=5):
    torch.manual_seed(2)
    mask = torch.ones(b, t_len, dtype=torch.bool)
    mask[1, 3:] = False
    return torch.randn(b, 3, h, w), torch.tensor([0.3, 0.9])[:b], torch.randn(b, t_len, 24), mask


def test_output_is_zero_at_init_and_blocks_are_identity():
    m = tiny()
    x, t, txt, mask = inputs()
    out = m(x, t, txt, mask, return_features=(0, 1, 2))
    assert torch.equal(out.prediction, torch.zeros_like(x))
    embedded = m.img_in(patchify(x, 8))
    for i in range(3):  # zero-initialised adaLN gates: every block passes its input through
        assert torch.allclose(out.features[i], embedded)


def test_patchify_order_and_inverse():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    seq = patchify(x, 2)
    assert seq.shape == (2, 6, 12)
    # token 1 = patch row 0, column 1; values in (channel, y, x) order
    assert seq[0, 1, :4].tolist() == [
        x[0, 0, 0, 2].item(),
        x[0, 0, 0, 3].item(),
        x[0, 0, 1, 2].item(),
        x[0, 0, 1, 3].item(),
    ]
    assert seq[0, 1, 4].item() == x[0, 1, 0, 2].item()
    assert torch.equal(unpatchify(seq, 2, 4, 6), x)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    cos, sin = rope_angles(5, 5, 16, 10000.0, "cpu")

    def score(i, j):
        qi = apply_rope(q, cos[i][None, None, None], sin[i][None, None, None])
        kj = apply_rope(k, cos[j][None, None, None], sin[j][None, None, None])
        return (qi * kj).sum().item()

    # token index = row * 5 + col: (0,0)-(1,2) and (2,1)-(3,3) have the same offset (1, 2)
    assert score(0, 7) == pytest.approx(score(11, 18), abs=1e-5)
    assert score(0, 7) != pytest.approx(score(0, 8), abs=1e-3)
    # a rotation keeps the norm
    assert apply_rope(q, cos[13][None, None, None], sin[13][None, None, None]).norm().item() == pytest.approx(
        q.norm().item(), rel=1e-5
    )


def test_padding_tokens_are_ignored():
    m = randomize(tiny())
    x, t, txt, mask = inputs()
    a = m(x, t, txt, mask).prediction
    txt2 = txt.clone()
    txt2[1, 3:] = 100.0  # change only the padded positions of sample 1
    b = m(x, t, txt2, mask).prediction
    assert torch.allclose(a, b, atol=1e-6)
    txt2[1, 0] += 1.0  # a real token does matter
    assert not torch.allclose(a[1], m(x, t, txt2, mask).prediction[1], atol=1e-4)


def test_routing_keeping_every_token_equals_dense():
    m = randomize(tiny())
    x, t, txt, mask = inputs()
    n = (32 // 8) * (24 // 8)
    keep = torch.stack([torch.randperm(n) for _ in range(2)])  # all tokens, shuffled order
    dense = m(x, t, txt, mask).prediction
    routed = m(x, t, txt, mask, routing=Routing(keep, 1, 1)).prediction
    assert torch.allclose(dense, routed, atol=1e-5)


def test_routing_skipped_tokens_bypass_the_span():
    """Span 1..2 of a depth-4 model whose block 3 is the identity (zero adaLN: gates 0), so block 3's
    output shows the tokens as the span left them: the skipped ones are block 0's output unchanged.
    Block 2's own features are the kept tokens only (taken before the others are put back)."""
    torch.manual_seed(0)
    m = randomize(build_model("tiny", 24, hidden_size=32, num_heads=2, depth=4))
    torch.nn.init.zeros_(m.blocks[3].modulation.lin.weight)
    torch.nn.init.zeros_(m.blocks[3].modulation.lin.bias)
    x, t, txt, mask = inputs()
    keep = torch.tensor([[0, 2, 5], [1, 3, 4]])
    out = m(x, t, txt, mask, routing=Routing(keep, 1, 2), return_features=(0, 2, 3))
    before, after = out.features[0], out.features[3]
    assert out.features[2].shape == (2, 3, 32)
    for b in range(2):
        skipped = [i for i in range(12) if i not in keep[b].tolist()]
        assert torch.equal(after[b, skipped], before[b, skipped])
        assert torch.equal(after[b, keep[b]], out.features[2][b])
        assert not torch.allclose(after[b, keep[b]], before[b, keep[b]])


def test_matches_diffusers_prx_transformer():
    diffusers = pytest.importorskip("diffusers")
    m = randomize(build_model("tiny", 24, hidden_size=64, num_heads=2, depth=2, bottleneck_size=16))
    ref = diffusers.PRXTransformer2DModel(
        in_channels=3,
        patch_size=8,
        context_in_dim=24,
        hidden_size=64,
        mlp_ratio=3.5,
        num_heads=2,
        depth=2,
        axes_dim=[16, 16],
        bottleneck_size=16,
    )
    ref.load_state_dict(m.state_dict(), strict=True)  # same names, same shapes
    x, t, txt, mask = inputs()
    ours = m(x, t, txt, mask).prediction
    theirs = ref(x, t, txt, attention_mask=mask, return_dict=False)[0]
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_small_preset_parameter_count_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ours = count_parameters(build_model("small", 2304))
        ref = diffusers.PRXTransformer2DModel(
            in_channels=3,
            patch_size=32,
            context_in_dim=2304,
            hidden_size=1792,
            mlp_ratio=3.5,
            num_heads=28,
            depth=16,
            bottleneck_size=256,
        )
        theirs = sum(p.numel() for p in ref.parameters())
    print(f"small preset: {ours:,} parameters (diffusers: {theirs:,})")
    assert ours == theirs
    assert 1.1e9 < ours < 1.3e9


def test_presets_and_errors():
    assert set(PRESETS) == {"tiny", "base", "small", "prxpixel-7b"}
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("huge", 8)
    m = tiny()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        m(torch.zeros(1, 3, 30, 32), torch.zeros(1), torch.zeros(1, 2, 24))


def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients():
    from torch.utils.flop_counter import FlopCounterMode

    model = randomize(tiny())
    x, t, text, mask = inputs()

    def grads_and_flops(checkpointing: bool):
        model.activation_checkpointing = checkpointing
        model.zero_grad()
        with FlopCounterMode(display=False) as counter:
            model(x, t, text, mask).prediction.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()], counter.get_total_flops()

    plain, plain_flops = grads_and_flops(False)
    ckpt, ckpt_flops = grads_and_flops(True)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b)
    assert ckpt_flops > plain_flops  # the blocks' forward ran again in the backward
