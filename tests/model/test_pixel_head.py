"""model.pixel_head: two 3x3 convolutions over the unpatchified prediction, after the patch head."""

import pytest
import torch
import torch.nn.functional as F

from pixelrun.model.denoiser import PIXEL_FEATURES, build_model, patchify


def _inputs(b=2, h=16, w=24, text_dim=16):
    torch.manual_seed(1)
    return torch.randn(b, 3, h, w), torch.rand(b), torch.randn(b, 5, text_dim)


def test_zero_initialised_head_is_the_patch_head():
    """At step 0 the pixel head adds nothing: the prediction is the patch head's first 3 channels."""
    torch.manual_seed(0)
    model = build_model("tiny", 16, hidden_size=32, num_heads=2, depth=2, pixel_head=8)
    head = model.final_layer.linear
    assert head.out_features == 8 * 8 * (3 + PIXEL_FEATURES)
    with torch.no_grad():  # a patch head that predicts something, so "adds nothing" is not 0 == 0
        head.weight.normal_(0, 0.1)
    x, t, txt = _inputs()
    tokens = []
    model.final_layer.register_forward_hook(lambda m, i, o: tokens.append(o))
    got = model(x, t, txt).prediction
    first3 = tokens[0][..., : 3 * 64]
    assert got.abs().max() > 0.1
    torch.testing.assert_close(patchify(got, 8), first3, rtol=0, atol=0)


@pytest.mark.parametrize("hidden", [4, 8])
def test_head_by_hand(hidden):
    """The head's output written out from its definition: conv3x3 over [prediction, pixel features,
    noisy image, t-plane], GELU, conv3x3, added to the prediction. The convolution is done as a sum
    of shifted images (independent of F.conv2d), so a mistake in the channel order shows."""
    torch.manual_seed(0)
    model = build_model("tiny", 16, hidden_size=32, num_heads=2, depth=2, pixel_head=hidden)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    x, t, txt = _inputs()
    out = []
    model.final_layer.register_forward_hook(lambda m, i, o: out.append(o))
    got = model(x, t, txt).prediction
    b, _, h, w = x.shape

    def pixels(seq, c):  # tokens [B, N, c*64] in (c, y, x) order -> [B, c, H, W]
        return seq.reshape(b, h // 8, w // 8, c, 8, 8).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    pred = pixels(out[0][..., : 3 * 64], 3)
    feats = pixels(out[0][..., 3 * 64 :], PIXEL_FEATURES)
    inp = torch.cat([pred, feats, x, t[:, None, None, None].expand(b, 1, h, w)], dim=1)

    def conv3x3(z, weight, bias):  # cross-correlation with zero padding, tap by tap
        zp = F.pad(z, (1, 1, 1, 1))
        acc = bias[None, :, None, None].expand(b, -1, h, w).clone()
        for dy in range(3):
            for dx in range(3):
                acc = acc + torch.einsum("bchw,oc->bohw", zp[:, :, dy : dy + h, dx : dx + w], weight[:, :, dy, dx])
        return acc

    head = model.pixel_head
    hid = F.gelu(conv3x3(inp, head.conv_in.weight, head.conv_in.bias))
    expected = pred + conv3x3(hid, head.conv_out.weight, head.conv_out.bias)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pixel_head, reaches_next_patch", [(0, False), (8, True)])
def test_a_pixel_sees_the_neighbouring_patch(pixel_head, reaches_next_patch):
    """Why the head exists: without it a pixel's prediction depends on its own token's output
    only; with it, the last pixel column of a patch depends on the next patch's token."""
    torch.manual_seed(0)
    model = build_model("tiny", 16, hidden_size=32, num_heads=2, depth=2, pixel_head=pixel_head)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    outputs = []

    def keep(module, inputs, out):
        out.retain_grad()
        outputs.append(out)

    model.final_layer.register_forward_hook(keep)
    x, t, txt = _inputs(b=1)
    model(x, t, txt).prediction[0, 0, 3, 7].backward()  # the last column of the first patch
    grad = outputs[0].grad[0]
    assert grad[0].abs().sum() > 0
    assert bool(grad[1].abs().sum() > 0) == reaches_next_patch  # token 1: the patch to its right
