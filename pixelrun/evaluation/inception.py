"""FID's Inception-v3: the network whose pool3 features define the Fréchet Inception Distance.

FID (Heusel et al. 2017) is the Fréchet distance between Gaussians fitted to the 2048-d pool3
features of one specific network: the TensorFlow ``inception-2015-12-05`` graph. pytorch-fid
ported those weights to ``pt_inception-2015-12-05-6726825d.pth``; its numbers match the TF
reference only with the exact structure of that graph, which differs from torchvision's
Inception-v3 in three places (the "FIDInceptionA / C / E" patches):

* the 3x3 average pools in the A, C and first E blocks do **not** count zero padding
  (``count_include_pad=False``, TensorFlow's behaviour);
* the last block (``Mixed_7c``) pools its ``branch_pool`` with a 3x3 **max** pool, not an average;
* the classifier has 1008 outputs (unused for FID).

:class:`FIDInceptionV3` is that network written out here (no torchvision: it does not work beside
the pinned torch), with the pytorch-fid / torchvision attribute names so the published state dict
loads key for key (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch_pool.bn.running_mean``, ...,
``fc.weight``). Nothing is downloaded: :func:`load_fid_inception` takes the ``.pth`` by path.

Input: images as **floats in [0, 1]**, ``[B, 3, H, W]``. They are resized to 299x299 bilinearly
(``align_corners=False``, no antialiasing, as pytorch-fid does) and mapped to [-1, 1] inside. Never
pass uint8: reference FID code multiplies by 255 and uint8 arithmetic wraps (docs/recipe.md's PRX
pitfall). Output: ``[B, 2048]`` pool3 features (global average of ``Mixed_7c``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FID_WEIGHTS_FILE", "FIDInceptionV3", "load_fid_inception"]

#: file name of pytorch-fid's port of the TF FID Inception weights (bring it yourself).
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


class _Conv(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU; keys ``conv.weight``, ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3_tf(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's 3x3 / stride 1 / SAME average pool: padded zeros are not averaged in."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | TF avg pool-1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1 = _Conv(cin, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg3_tf(x)),
            ],
            1,
        )


class _BlockB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | max pool 3x3/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            1,
        )


class _BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..e), TF avg pool branch."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg3_tf(x))], 1)


class _BlockD(nn.Module):
    """17 -> 8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool 3x3/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _BlockE(nn.Module):
    """8x8 block with split 1x3 / 3x1 branches (Mixed_7b, Mixed_7c). ``max_pool``: the FID graph's
    Mixed_7c pools its pool branch with a 3x3 max pool; Mixed_7b uses the TF average pool."""

    def __init__(self, cin: int, *, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg3_tf(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(bd),
                self.branch3x3dbl_3b(bd),
                self.branch_pool(pooled),
            ],
            1,
        )


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 (pytorch-fid's ``fid_inception_v3`` structure), frozen, eval mode.

    ``forward(images)``: floats in [0, 1] ``[B, 3, H, W]`` -> ``[B, 2048]`` fp32 pool3 features.
    A freshly constructed network has PyTorch's default random init; use :func:`load_fid_inception`
    for the real weights.
    """

    dim = 2048
    size = 299
    name = "fid-inception-v3-pool3"
    weights_path: str | None = None  # the file the weights came from (load_fid_inception)

    def __init__(self, num_classes: int = 1008):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _BlockA(192, 32)
        self.Mixed_5c = _BlockA(256, 64)
        self.Mixed_5d = _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, 128)
        self.Mixed_6c = _BlockC(768, 160)
        self.Mixed_6d = _BlockC(768, 160)
        self.Mixed_6e = _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, max_pool=False)
        self.Mixed_7c = _BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, num_classes)  # ImageNet logits; kept so the state dict matches
        self.freeze()

    def freeze(self) -> FIDInceptionV3:
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> FIDInceptionV3:
        """Always eval: BatchNorm must use the stored running statistics."""
        return super().train(False)

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """Network input in [-1, 1] (any size >= 75) -> ``[B, 2048]`` pool3 features."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return x.mean((2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Floats in [0, 1] ``[B, 3, H, W]`` -> bilinear resize to 299 -> ``2x - 1`` -> pool3."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(
                f"FID Inception takes floats in [0, 1], got dtype {images.dtype} (uint8 must be divided by 255 first)"
            )
        x = images.float()
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.pool3(2.0 * x - 1.0).float()


def load_fid_inception(path: str) -> FIDInceptionV3:
    """:class:`FIDInceptionV3` with the state dict at ``path`` (pytorch-fid's
    ``pt_inception-2015-12-05-6726825d.pth`` or any file in its key layout).

    Every parameter and BatchNorm statistic must come from the file and every key in the file must
    be used (a mismatch raises, it never leaves random weights behind); only BatchNorm's
    ``num_batches_tracked`` counters, which files saved before PyTorch 0.4.1 lack and which
    eval-mode BatchNorm never reads, may be absent.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    with torch.device("meta"):
        net = FIDInceptionV3()
    expected = net.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{path}: not an FID Inception state dict: missing {missing[:6]}"
            f"{'...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
            f"{'...' if len(unexpected) > 6 else ''}"
        )
    state = dict(state)
    for k in expected:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros((), dtype=torch.long)
    net.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True, assign=True
    )
    net.weights_path = path
    return net.freeze()
