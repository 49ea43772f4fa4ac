"""LPIPS teacher: torchvision key layout, the real loading code, the shipped ST-LPIPS weights, a hand
computation of one tap, and that gradients reach x_hat but never the frozen network."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelrun.teachers.lpips import LPIPS, load_lpips, lpips_loss

# torchvision.models.vgg16().features keys, written out by hand (not derived from our code).
TV_CONV = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
TV_KEYS = [f"{i}.{p}" for i in TV_CONV for p in ("weight", "bias")]
# ST-LPIPS blur-pool trunk: conv indices and blur filters as found in vgg_shift_tolerant.pth.
ST_CONV = [0, 2, 6, 8, 12, 14, 16, 20, 22, 24, 28, 30, 32]
ST_BLUR = [5, 11, 19, 27]

HAS_STLPIPS = importlib.util.find_spec("stlpips_pytorch") is not None


@pytest.fixture(scope="module")
def rand_lpips() -> LPIPS:
    torch.manual_seed(0)
    m = LPIPS()
    for lin in m.lins:  # non-negative like trained heads, but not all equal
        lin.weight.uniform_(0.1, 1.0)
    return m


def _images(b=2, h=16, w=16, seed=0):  # 16x16: the smallest VGG16 input, cheap on 2 cores
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def test_vgg16_features_key_layout_matches_torchvision():
    m = LPIPS()
    assert list(m.net.features.state_dict()) == TV_KEYS
    assert len(m.net.features) == 31
    assert m.net.taps == (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    for i in (4, 9, 16, 23, 30):
        assert isinstance(m.net.features[i], nn.MaxPool2d)
    for i in TV_CONV:
        assert isinstance(m.net.features[i], nn.Conv2d)
    assert [tuple(lin.weight.shape) for lin in m.lins] == [(1, c, 1, 1) for c in (64, 128, 256, 512, 512)]


def test_blurpool_trunk_layout():
    m = LPIPS("vgg16-blurpool")
    want = {f"{i}.{p}" for i in ST_CONV for p in ("weight", "bias")} | {f"{i}.filt" for i in ST_BLUR}
    assert set(m.net.features.state_dict()) == want
    assert len(m.net.features) == 34
    assert m.net.taps == (3, 9, 17, 25, 33)


def test_random_weights_round_trip_through_files(rand_lpips, tmp_path):
    """Save torchvision-layout files, load them back through `load_lpips`, get identical outputs."""
    vgg = {f"features.{k}": v for k, v in rand_lpips.net.features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(4, 4)  # ignored, as in torchvision files
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save({f"lin{i}.model.1.weight": lin.weight for i, lin in enumerate(rand_lpips.lins)}, tmp_path / "vgg.pth")
    x, y = _images(seed=1), _images(seed=2)
    want = rand_lpips(x, y)
    loaded = load_lpips(f"path:{tmp_path / 'vgg16.pth'},{tmp_path / 'vgg.pth'}")
    assert "vgg16.pth" in loaded.source and "vgg.pth" in loaded.source
    assert torch.equal(loaded(x, y), want)

    # directory form, with the short `lin{i}.weight` head keys
    torch.save({f"lin{i}.weight": lin.weight for i, lin in enumerate(rand_lpips.lins)}, tmp_path / "vgg.pth")
    assert torch.equal(load_lpips(str(tmp_path))(x, y), want)


def test_load_errors_name_file_and_key(rand_lpips, tmp_path):
    # stride-0 tensors keep the files tiny (torch.save stores the 1-element storage once)
    one = torch.zeros(1)
    good = {f"features.{k}": one.expand(v.shape) for k, v in rand_lpips.net.features.state_dict().items()}
    heads = {f"lin{i}.model.1.weight": one.expand(lin.weight.shape) for i, lin in enumerate(rand_lpips.lins)}
    torch.save(heads, tmp_path / "lin.pth")
    cases = {
        "missing.pth": ({k: v for k, v in good.items() if k != "features.28.bias"}, "features.28.bias"),
        "extra.pth": ({**good, "features.1.weight": torch.zeros(1)}, "features.1.weight"),
        "shape.pth": ({**good, "features.0.bias": torch.zeros(3)}, "features.0.bias"),
    }
    for name, (sd, key) in cases.items():
        torch.save(sd, tmp_path / name)
        with pytest.raises(ValueError, match=rf"{name}.*{key}"):
            LPIPS.from_files(tmp_path / name, tmp_path / "lin.pth")
    torch.save(good, tmp_path / "vgg.pth")
    torch.save({k: v for k, v in heads.items() if not k.startswith("lin4")}, tmp_path / "lin3.pth")
    with pytest.raises(ValueError, match=r"lin3\.pth.*lin4"):
        LPIPS.from_files(tmp_path / "vgg.pth", tmp_path / "lin3.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        LPIPS.from_files(tmp_path / "nope.pth", tmp_path / "lin.pth")
    with pytest.raises(ValueError, match="cannot read LPIPS spec"):
        load_lpips("alexnet-please")


@pytest.mark.skipif(not HAS_STLPIPS, reason="stlpips-pytorch is not installed (pip install stlpips-pytorch)")
def test_stlpips_shipped_weights_load_and_match_reference_value():
    m = LPIPS.from_stlpips("vgg")
    assert m.source.startswith("stlpips-vgg") and m.backbone == "vgg16-blurpool"
    assert all(not p.requires_grad for p in m.parameters())
    # Smooth deterministic patterns; the expected value was computed with the package's own
    # stlpips.LPIPS(net="vgg", variant="shift_tolerant") (run once with stub torchvision/IPython
    # modules, which that code path never uses); ours agreed to 1e-9.
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")

    def pattern(k):
        return torch.stack(
            [torch.sin(0.3 * xx * (c + 1) + 0.2 * yy * k) * torch.cos(0.17 * yy * (c + 2) - 0.1 * k) for c in range(3)]
        )[None]

    with torch.no_grad():
        a, b = pattern(1), pattern(2)
        assert m(a, b).item() == pytest.approx(0.14196771383285522, rel=1e-5)
        assert m(a, a).item() < 1e-6


def test_identity_is_zero_and_difference_positive(rand_lpips):
    x, y = _images(seed=3), _images(seed=4)
    with torch.no_grad():
        assert rand_lpips(x, x).abs().max().item() < 1e-6
        d = rand_lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()


def test_gradient_reaches_x_hat_only(rand_lpips):
    x_hat = _images(h=32, w=32, seed=5).requires_grad_(True)
    x = _images(h=32, w=32, seed=6)
    rand_lpips.train()  # a parent's .train() must not unfreeze the teacher
    assert not rand_lpips.training
    loss = lpips_loss(rand_lpips, x_hat, x, scale=0.5)
    assert loss.shape == (2,)
    loss.sum().backward()
    assert x_hat.grad is not None and torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in rand_lpips.parameters())


def test_lpips_loss_downsamples_with_antialias(rand_lpips):
    x_hat, x = _images(h=32, w=32, seed=7), _images(h=32, w=32, seed=8)
    down = lambda t: F.interpolate(t, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        assert torch.allclose(lpips_loss(rand_lpips, x_hat, x), rand_lpips(down(x_hat), down(x)))
        with pytest.raises(ValueError, match="at least 16x16"):
            lpips_loss(rand_lpips, x_hat[..., :24, :24], x[..., :24, :24])


def test_single_tap_hand_computation():
    """lin0 = 1, lin1..4 = 0: LPIPS = mean_hw sum_c (n(f(x_hat)) - n(f(x)))^2 for f = relu1_2,
    recomputed here in float64 numpy from the two conv weights, not through the module."""
    torch.manual_seed(1)
    m = LPIPS()
    for i, lin in enumerate(m.lins):
        lin.weight.fill_(1.0 if i == 0 else 0.0)
    x_hat, x = _images(seed=9), _images(seed=10)
    with torch.no_grad():
        got = m(x_hat, x).numpy()

    feats = m.net.features
    w0, b0 = feats[0].weight.double(), feats[0].bias.double()
    w2, b2 = feats[2].weight.double(), feats[2].bias.double()
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)

    def relu1_2(img):
        z = (img.double() - shift) / scale
        h = torch.clamp(F.conv2d(z, w0, b0, padding=1), min=0)
        return torch.clamp(F.conv2d(h, w2, b2, padding=1), min=0).numpy()

    a, b = relu1_2(x_hat), relu1_2(x)
    na = a / (np.sqrt((a**2).sum(axis=1, keepdims=True)) + 1e-10)
    nb = b / (np.sqrt((b**2).sum(axis=1, keepdims=True)) + 1e-10)
    want = ((na - nb) ** 2).sum(axis=1).mean(axis=(1, 2))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert not math.isclose(float(want[0]), 0.0)
