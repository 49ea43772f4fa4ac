"""VGG LPIPS as a frozen perceptual loss (PixelGen: weight 0.1, whole image downsampled x0.5).

Why this file defines VGG16 itself: torchvision does not import beside the pinned torch here, and the
`lpips` / `stlpips_pytorch` packages both import torchvision. So the network is written out with the
exact layer indices of `torchvision.models.vgg16().features`, and weight files are loaded by key.

LPIPS (Zhang et al. 2018, "v0.1"), what `LPIPS.forward` computes for images in [-1, 1]:

    z      = (x - shift) / scale                 shift = [-.030, -.088, -.188], scale = [.458, .448, .450]
    f_l    = VGG16 activations after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3     (l = 0..4)
    n_l    = f_l / (||f_l||_channels + 1e-10)     unit-normalise each spatial position
    d_l    = (n_l(x_hat) - n_l(x)) ** 2
    LPIPS  = sum_l mean_{h,w} (w_l . d_l)         w_l: 1x1 conv, [1, C_l, 1, 1], no bias ("lin_l")

Two weight sources:

(a) Standard LPIPS: an ImageNet VGG16 state dict in torchvision layout (`features.N.weight/bias`,
    e.g. `vgg16-397923af.pth`) plus the LPIPS v0.1 heads file (`vgg.pth` from richzhang/
    PerceptualSimilarity, keys `lin{i}.model.1.weight`). Neither ships in any package installable
    here; users bring them (`LPIPS.from_files`, `load_lpips("path:VGG,LIN")`).

(b) Shift-tolerant LPIPS (Ghildyal & Liu, ECCV 2022), shipped by the PyPI wheel `stlpips-pytorch`
    0.0.2 as `stlpips_pytorch/weights/vST0.0/vgg_shift_tolerant.pth` (and `alex_shift_tolerant.pth`).
    The VGG file is ONE state dict holding everything: `scaling_layer.shift/scale`, the backbone as
    `net.slice{1..5}.{N}.weight/bias`, blur filters `net.slice{k}.{N}.filt`, and heads
    `lin{i}.model.1.weight`. Its backbone is NOT plain VGG16: every `MaxPool2d(2, 2)` is replaced by
    `MaxPool2d(2, stride=1)` followed by an anti-aliasing blur-pool (`Downsample`, adobe
    antialiased-cnns): reflection pad 2 on every side, depthwise 3x3 binomial filter
    [1,2,1]x[1,2,1]/16, stride 2. That shifts every later layer index by one per pool (conv layers at
    0,2,6,8,12,14,16,20,22,24,28,30,32; blur at 5,11,19,27; taps after 3,9,17,25,33), and the conv
    weights were trained for that network, so they must not be loaded into plain VGG16. It is built
    here as `VGG16Features(blurpool=True)` (`backbone="vgg16-blurpool"`). The package source is the
    reference for this: `invariant_networks.vggnet(variant="shift_tolerant")` ->
    `models_lpf.vgg.vgg16(filter_size=3, pad_more=True)`. Everything after the backbone (scaling
    layer, normalisation, heads, spatial mean, sum) is the same as LPIPS v0.1.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "LPIPS",
    "VGG16Features",
    "BlurPool",
    "load_lpips",
    "lpips_loss",
    "stlpips_weights_path",
]

# torchvision's vgg16 "D" configuration; "M" is a 2x2 max-pool.
_VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
_CHANNELS = (64, 128, 256, 512, 512)  # channels of the five taps
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class BlurPool(nn.Module):
    """Anti-aliased stride-2 downsampling of ST-LPIPS (`models_lpf.Downsample`, filt_size=3,
    pad_more=True): reflection pad 2 on each side, depthwise [1,2,1]x[1,2,1]/16 filter, stride 2.

    The filter is a buffer named `filt` ([C, 1, 3, 3]) so the state-dict key matches the shipped
    file; the file's values are loaded over the default (they are the same binomial filter)."""

    filt: torch.Tensor

    def __init__(self, channels: int):
        super().__init__()
        a = torch.tensor([1.0, 2.0, 1.0])
        filt = a[:, None] * a[None, :]
        self.register_buffer("filt", (filt / filt.sum())[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (2, 2, 2, 2), mode="reflect")
        return F.conv2d(x, self.filt.to(x.dtype), stride=2, groups=x.shape[1])


class VGG16Features(nn.Module):
    """VGG16 convolutional trunk whose `features` Sequential has torchvision's layer indices.

    With `blurpool=False` the keys are exactly torchvision's `vgg16().features` keys
    (`features.{0,2,5,...,28}.weight/bias`; 31 modules, the final max-pool at 30 is kept for
    layout fidelity but never run). With `blurpool=True` it is the ST-LPIPS trunk described in the
    module docstring (34 modules, ending at relu5_3 like the ST-LPIPS slices).
    `forward` returns the five LPIPS taps (relu1_2 ... relu5_3)."""

    def __init__(self, blurpool: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        taps: list[int] = []
        c_in = 3
        for j, v in enumerate(_VGG16_CFG):
            if v == "M":
                taps.append(len(layers) - 1)  # the ReLU just before each pool
                if blurpool and j == len(_VGG16_CFG) - 1:
                    # ST-LPIPS's slices end at relu5_3 and its file has no `35.filt`: the final
                    # pool + blur are never run, so they are left out of this trunk.
                    break
                if blurpool:
                    layers += [nn.MaxPool2d(kernel_size=2, stride=1), BlurPool(c_in)]
                else:
                    layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
            else:
                assert isinstance(v, int)
                # inplace ReLU is safe: the conv before it does not need its output for backward,
                # and nothing after a tap modifies it in place.
                layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.blurpool = blurpool
        self.taps = tuple(taps)
        # Smallest side that reaches relu5_3: plain, four /2 pools need 16; blur-pool maps a side n
        # to n//2 + 1 and its reflection pad of 2 needs more than 2 pixels after the stride-1
        # max-pool, which 17 (17 -> 9 -> 5 -> 3 -> pool 2) violates before relu5_3.
        self.min_size = 18 if blurpool else 16

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        if min(h, w) < self.min_size:
            raise ValueError(
                f"LPIPS VGG16{'-blurpool' if self.blurpool else ''} needs images of at least "
                f"{self.min_size}x{self.min_size} pixels after any downsampling, got {h}x{w}"
            )
        outs = []
        for i, layer in enumerate(list(self.features)[: self.taps[-1] + 1]):
            x = layer(x)
            if i in self.taps:
                outs.append(x)
        return outs


def _unit_normalize(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """LPIPS's `normalize_tensor`: divide by the channel L2 norm (+eps, not clamp, as the original)."""
    return f / (torch.sqrt(torch.sum(f * f, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """Frozen LPIPS distance. `forward(x_hat, x) -> [B]`, inputs in [-1, 1].

    The module is always frozen (no parameter requires grad, always in eval mode, `train()` is a
    no-op) because it is a fixed teacher: gradients flow *through* it into `x_hat` only. A plain
    constructor gives random-init weights with all heads = 1 (the un-calibrated "baseline" LPIPS);
    use `from_files` / `from_stlpips` / `load_lpips` for real weights. `source` says which weights
    were loaded.

    Normalisation, squared difference and the heads run in float32 even under autocast: the 1e-10
    epsilon and a sum of squares over 512 channels are not safe in bf16.
    """

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, backbone: str = "vgg16"):
        super().__init__()
        if backbone not in ("vgg16", "vgg16-blurpool"):
            raise ValueError(f"unknown LPIPS backbone {backbone!r}; use 'vgg16' or 'vgg16-blurpool'")
        self.backbone = backbone
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.net = VGG16Features(blurpool=backbone == "vgg16-blurpool")
        for i, c in enumerate(_CHANNELS):
            lin = nn.Conv2d(c, 1, kernel_size=1, bias=False)
            nn.init.ones_(lin.weight)
            self.add_module(f"lin{i}", lin)
        self.source = f"random-init {backbone}"
        self._freeze()

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> LPIPS:
        """Stays in eval mode whatever a parent module asks: this is a frozen teacher."""
        return super().train(False)

    @property
    def lins(self) -> list[nn.Conv2d]:
        return [getattr(self, f"lin{i}") for i in range(len(_CHANNELS))]

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x_hat.shape != x.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(x_hat.shape)} vs {tuple(x.shape)}")
        dtype = self.shift.dtype
        # Two passes rather than one concatenated batch, so no graph is kept for the target's
        # activations when x does not require grad.
        f0 = self.net((x_hat.to(dtype) - self.shift) / self.scale)
        f1 = self.net((x.to(dtype) - self.shift) / self.scale)
        total = x_hat.new_zeros(x_hat.shape[0], dtype=torch.float32)
        for a, b, lin in zip(f0, f1, self.lins):
            d = (_unit_normalize(a.float()) - _unit_normalize(b.float())) ** 2
            # mean_hw(sum_c w_c d_c) == sum_c w_c mean_hw(d_c); elementwise ops stay float32
            # under autocast, where a 1x1 conv would be cast to bf16.
            total = total + (d.mean(dim=(2, 3)) * lin.weight.float().view(1, -1)).sum(dim=1)
        return total

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_files(cls, vgg_path: str | os.PathLike, lin_path: str | os.PathLike) -> LPIPS:
        """Standard LPIPS v0.1: torchvision-layout VGG16 ImageNet weights + LPIPS `vgg.pth` heads.

        Classifier keys of the VGG file are ignored; anything else that is not a `features` conv
        weight/bias of plain VGG16 is an error (e.g. a vgg16_bn file), as is any missing key."""
        model = cls("vgg16")
        vgg_sd = _load_state_dict(vgg_path)
        feats = {}
        for k, v in vgg_sd.items():
            if k.startswith("classifier."):
                continue
            if not k.startswith("features."):
                raise ValueError(
                    f"{vgg_path}: unexpected key {k!r}; expected a torchvision VGG16 "
                    "state dict with features.N.weight/bias (and classifier.* keys)"
                )
            feats[k[len("features.") :]] = v
        _load_into(model.net.features, feats, vgg_path, lambda k: f"features.{k}")
        _load_heads(model, _load_state_dict(lin_path), lin_path)
        model.source = f"lpips-vgg16 v0.1: {os.fspath(vgg_path)} + {os.fspath(lin_path)}"
        return model

    @classmethod
    def from_stlpips(cls, variant: str = "vgg") -> LPIPS:
        """Shift-tolerant LPIPS from the installed `stlpips-pytorch` wheel, read as files only.

        Only the VGG file is wired ('vgg'): the project's recipe asks for VGG LPIPS. The wheel also
        ships `alex_shift_tolerant.pth` (an anti-aliased AlexNet with stride-1 first conv), which
        would need its own trunk."""
        if variant not in ("vgg", "vgg16"):
            raise ValueError(
                f"stlpips variant {variant!r} is not supported; only 'vgg' "
                "(the wheel's alex_shift_tolerant.pth needs an AlexNet trunk not built here)"
            )
        path = stlpips_weights_path("vgg")
        sd = _load_state_dict(path)
        model = cls("vgg16-blurpool")
        feats, heads = {}, {}
        for k, v in sd.items():
            if k in ("scaling_layer.shift", "scaling_layer.scale"):
                continue
            if k.startswith("net.slice"):
                # net.slice{s}.{N}.{param}: N is already the global index in `features`.
                _, _, rest = k.split(".", 2)
                feats[rest] = v
            elif k.startswith("lin"):
                heads[k] = v
            else:
                raise ValueError(f"{path}: unexpected key {k!r}")
        for name in ("shift", "scale"):
            key = f"scaling_layer.{name}"
            if key not in sd:
                raise ValueError(f"{path}: missing key {key!r}")
            getattr(model, name).copy_(sd[key].reshape(1, 3, 1, 1))
        taps = model.net.taps

        def file_key(k: str) -> str:  # features index N lives in slice 1 + (taps before N)
            return f"net.slice{1 + sum(int(k.split('.')[0]) > t for t in taps)}.{k}"

        _load_into(model.net.features, feats, path, file_key)
        _load_heads(model, heads, path)
        version = _stlpips_version()
        model.source = f"stlpips-vgg (shift-tolerant, vgg16-blurpool) stlpips-pytorch {version}: {path}"
        return model


# -------------------------------------------------------------------- loading helpers


def _load_state_dict(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LPIPS weights file not found: {path}")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: expected a state dict (mapping of name -> tensor), got {type(sd).__name__}")
    return sd


def _load_into(module: nn.Module, sd: Mapping[str, torch.Tensor], path, file_key: Callable[[str], str]) -> None:
    """Strict load with errors that name the file, the key as spelled in the file, and shapes."""
    own = module.state_dict()
    for k in own:
        if k not in sd:
            raise ValueError(f"{path}: missing key {file_key(k)!r} (expected shape {tuple(own[k].shape)})")
    for k, v in sd.items():
        if k not in own:
            raise ValueError(f"{path}: unexpected key {file_key(k)!r} (no such tensor in this trunk)")
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{path}: key {file_key(k)!r} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    module.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)


def _load_heads(model: LPIPS, sd: Mapping[str, torch.Tensor], path) -> None:
    """Heads as `lin{i}.model.1.weight` (original file; Dropout sits at .model.0) or `lin{i}.weight`.

    A full LPIPS module state dict also repeats them as `lins.{i}.model.1.weight` (ModuleList alias);
    those are accepted when they agree with the `lin{i}` copy."""
    found: dict[str, tuple[str, torch.Tensor]] = {}
    for k, v in sd.items():
        name = k.replace(".model.1.", ".")
        if name.startswith("lins."):
            name = "lin" + name[len("lins.") :]
        parts = name.split(".")
        if len(parts) != 2 or parts[1] != "weight" or parts[0] not in {f"lin{i}" for i in range(5)}:
            raise ValueError(
                f"{path}: unexpected key {k!r}; an LPIPS heads file holds "
                "lin0..lin4 as 'lin{i}.model.1.weight' or 'lin{i}.weight'"
            )
        if parts[0] in found:
            k0, v0 = found[parts[0]]
            if v0.shape != v.shape or not torch.equal(v0, v):
                raise ValueError(f"{path}: keys {k0!r} and {k!r} hold different weights for {parts[0]}")
            continue
        found[parts[0]] = (k, v)
    for i, lin in enumerate(model.lins):
        if f"lin{i}" not in found:
            raise ValueError(f"{path}: missing key 'lin{i}.model.1.weight' (or 'lin{i}.weight')")
        k, v = found[f"lin{i}"]
        if tuple(v.shape) != tuple(lin.weight.shape):
            raise ValueError(f"{path}: key {k!r} has shape {tuple(v.shape)}, expected {tuple(lin.weight.shape)}")
        lin.weight.copy_(v.float())


def _stlpips_version() -> str:
    try:
        return importlib.metadata.version("stlpips-pytorch")
    except importlib.metadata.PackageNotFoundError:
        return "?"


def stlpips_weights_path(variant: str = "vgg") -> str:
    """Path of the `.pth` shipped by `stlpips-pytorch`, found without importing the package
    (`find_spec` of a top-level package does not execute it; its modules import torchvision)."""
    spec = importlib.util.find_spec("stlpips_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "stlpips-pytorch is not installed: `pip install stlpips-pytorch` (it has no dependencies "
            "and ships the shift-tolerant LPIPS weights)"
        )
    root = list(spec.submodule_search_locations)[0]
    path = os.path.join(root, "weights", "vST0.0", f"{variant}_shift_tolerant.pth")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"stlpips-pytorch is installed at {root} but {path} is missing")
    return path


def load_lpips(spec: str) -> LPIPS:
    """Build a frozen LPIPS from a config string.

    - "stlpips-vgg": shift-tolerant VGG LPIPS from the `stlpips-pytorch` wheel.
    - "path:VGG.pth,LIN.pth": torchvision VGG16 state dict + LPIPS v0.1 heads file.
    - "path:DIR" or "DIR": a directory holding `vgg16.pth` (or one `vgg16-*.pth`, torchvision's
      download name) and the heads file `vgg.pth`.
    """
    spec = spec.strip()
    if spec in ("stlpips-vgg", "stlpips"):
        return LPIPS.from_stlpips("vgg")
    rest = spec[len("path:") :] if spec.startswith("path:") else spec
    if "," in rest:
        vgg, lin = (p.strip() for p in rest.split(",", 1))
        return LPIPS.from_files(os.path.expanduser(vgg), os.path.expanduser(lin))
    d = os.path.expanduser(rest)
    if os.path.isdir(d):
        vgg = os.path.join(d, "vgg16.pth")
        if not os.path.isfile(vgg):
            cands = sorted(glob.glob(os.path.join(d, "vgg16-*.pth")))
            if len(cands) != 1:
                raise FileNotFoundError(
                    f"{d}: expected vgg16.pth (or exactly one vgg16-*.pth), "
                    f"found {[os.path.basename(c) for c in cands]}"
                )
            vgg = cands[0]
        return LPIPS.from_files(vgg, os.path.join(d, "vgg.pth"))
    if spec.startswith("path:") or os.sep in rest:
        raise FileNotFoundError(
            f"LPIPS spec {spec!r}: no such directory {d!r} (use 'path:VGG.pth,LIN.pth' "
            "or a directory containing vgg16.pth and vgg.pth)"
        )
    raise ValueError(
        f"cannot read LPIPS spec {spec!r}: use 'stlpips-vgg', 'path:VGG.pth,LIN.pth' "
        "or a directory containing vgg16.pth and vgg.pth"
    )


def lpips_loss(lpips: LPIPS, x_hat: torch.Tensor, x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """Per-sample LPIPS [B] on the whole images downsampled by `scale` (docs/recipe.md: x0.5, bilinear).

    Antialiased bilinear resizing (area-like low-pass) so the half-resolution images are not aliased;
    it is differentiable, so the gradient reaches `x_hat`. scale=1 skips the resize. Images are
    resized in float32 (CPU has no bf16 antialiased resize; the net runs in float32 anyway)."""
    x_hat, x = x_hat.float(), x.float()
    if scale != 1.0:
        x_hat = F.interpolate(x_hat, scale_factor=scale, mode="bilinear", align_corners=False, antialias=True)
        x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False, antialias=True)
    return lpips(x_hat, x)
