"""Evaluation metrics of docs/recipe.md ("Evaluation"): distances between two sets of image embeddings.

The recipe's triad is FID (Inception-v3 pool features, Fréchet distance), CMMD (CLIP image
embeddings, RBF-kernel MMD with sigma 10 and scale 1000) and DINO-MMD (DINOv2 global embeddings,
same MMD). This module holds the distance math, which does not care where the features came from,
plus the embedding networks (one ships offline, FID's needs user-supplied weights):

* :func:`feature_stats` / :func:`frechet_distance`: the Fréchet (2-Wasserstein) distance between
  the Gaussians fitted to two feature sets. Lower is better, 0 for identical statistics; the unit is
  squared feature units, so values are only comparable for the same network, resolution,
  preprocessing and sample count (the estimate is biased upwards for small ``n``).
* :func:`mmd`: CMMD's kernel MMD^2 (Gaussian RBF kernel, ``sigma=10``, ``scale=1000``).
* :class:`EfficientNetLite0Embedder` + :func:`image_features` + ``real_stats.real_feature_stats``: the
  **efficientnet-lite0 Fréchet distance** — the Fréchet distance on 1280-d global-average-pooled
  head features of the offline EfficientNet-Lite0 ImageNet classifier that pixelrun already uses as a
  stand-in teacher. It is NOT FID (different network, features and scale: its numbers cannot be
  compared with any published FID) and must never be reported under that name. Real-image
  statistics are cached to ``.npz`` files keyed by (dataset, resolution, n, network) (real_stats.py).
* FID proper: :func:`image_features` with ``load_metric_network("fid-inception", weights_path=...)``
  (``pixelrun/evaluation/inception.py``, pytorch-fid's Inception-v3 with its TF-compatibility
  patches, weights brought by the user), then :func:`feature_stats` + :func:`frechet_distance`.
* CMMD: :class:`CLIPImageEmbedder` (``CLIPVisionModelWithProjection``, by local path or hub id,
  preprocessed as google-research ``cmmd/io_util.py`` does: centre crop, PIL bicubic with its
  antialiasing, ``/ 255``, CLIP mean / std) + ``real_stats.real_embeddings`` + :func:`mmd`.
* DINO-MMD: :class:`DinoImageEmbedder` (the DINOv2 CLS token, by default of DINOv2-L/14 with
  registers at 518px as PRX's callback, loaded by the REPA / P-DINO teacher loader) + the same MMD.

Input convention (the pitfall docs/recipe.md records for PRX): metric networks take **floats in [0, 1]**.
Reference FID code multiplies its input by 255 internally; feeding it uint8 images makes the
product wrap around in uint8 and the metric silently measures garbage. :func:`image_features`
therefore accepts uint8 (converted here, ``/ 255``, exactly once) or floats that must already lie in
[0, 1]; floats outside that range (a [-1, 1] model output, a 0..255 float array) are rejected
rather than guessed at.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pixelrun.teachers.features import IMAGENET_MEAN, IMAGENET_STD, TF_LITE_MEAN, TF_LITE_STD

if TYPE_CHECKING:
    from transformers import CLIPVisionModelWithProjection

    from pixelrun.teachers.features import HFDinoTeacher

# Real images from a provider: uint8 [N, H, W, 3] numpy or [N, 3, H, W] tensor (see image_features)
RealImages: TypeAlias = "np.ndarray | torch.Tensor"

__all__ = [
    "CMMD_SIGMA",
    "CMMD_SCALE",
    "feature_stats",
    "frechet_distance",
    "mmd",
    "EfficientNetLite0Embedder",
    "CLIPImageEmbedder",
    "DinoImageEmbedder",
    "cmmd_center_crop_and_resize",
    "CLIP_MEAN",
    "CLIP_STD",
    "load_metric_network",
    "image_features",
]

#: CMMD's RBF bandwidth and the factor that makes its numbers human-readable (Jayasumana et al. 2024).
CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0
#: OpenAI CLIP's input normalisation (``CLIPImageProcessor``'s image_mean / image_std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------------
# distance math


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of ``[N, D]`` features in float64: the mean ``[D]`` and the *unbiased*
    (``N - 1`` denominator, ``np.cov(rowvar=False)``) covariance ``[D, D]``, as pytorch-fid and the
    TensorFlow FID code compute them. Needs ``N >= 2``; with ``N <= D`` the covariance is singular,
    which :func:`frechet_distance` handles but which makes the distance a poor estimate."""
    f = _as_2d_float64(features, "features")
    if f.shape[0] < 2:
        raise ValueError(f"feature_stats needs at least 2 samples, got {f.shape[0]}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``:

        ``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})``

    (the squared 2-Wasserstein distance between the Gaussians; FID is this on Inception pool3
    statistics). 0 for identical statistics, never negative in exact arithmetic.

    Numerics, in float64, as pytorch-fid does it: ``scipy.linalg.sqrtm`` of the (non-symmetric)
    product ``sigma1 @ sigma2``. If that square root is not finite (nearly singular product, e.g.
    fewer samples than feature dimensions) ``eps`` is added to both diagonals and the root is
    recomputed. Round-off gives the root a tiny imaginary part; it is dropped (real part taken)
    unless an imaginary diagonal entry exceeds ``1e-3``, which means the inputs are not covariance
    matrices and raises ``ValueError``. A result slightly below zero from round-off is returned as is.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {sigma1.shape}, sigma2 {sigma2.shape}"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():  # "matrix is singular": handled by the finiteness check below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(d) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > 1e-3:
            raise ValueError(
                f"sqrtm(sigma1 @ sigma2) has imaginary component {imag}: are both inputs "
                f"symmetric positive semi-definite covariance matrices?"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def mmd(
    x, y, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE, *, unbiased: bool = False, block: int = 1024
) -> float:
    """Kernel maximum mean discrepancy MMD^2 between embedding sets ``x [n, D]`` and ``y [m, D]``,
    times ``scale``, with the Gaussian RBF kernel ``k(a, b) = exp(-||a - b||^2 / (2 sigma^2))``.

    Default (``unbiased=False``): exactly what CMMD's reference code (google-research ``cmmd/
    distance.py``) computes, the minimum-variance / *biased* V-statistic of Gretton et al. 2012
    Eq. (5): ``scale * (mean K_xx + mean K_yy - 2 mean K_xy)`` with the means over *all* pairs,
    diagonals included. It is >= 0 and exactly 0 for identical sets. CMMD = this on L2-normalised
    CLIP ViT-L/14-336 image embeddings with ``sigma=10, scale=1000`` (the defaults); DINO-MMD the
    same on DINOv2 global embeddings. Lower is better.

    ``unbiased=True``: the unbiased U-statistic (Gretton et al. Eq. (3)): ``K_xx`` and ``K_yy`` means
    exclude their diagonals (``n (n - 1)`` and ``m (m - 1)`` pairs), ``K_xy`` averages all ``n m``
    pairs. It can be negative (it is for identical sets), and is not what CMMD reports.

    Float64 throughout: the result cancels several digits between the three kernel means. Gram
    matrices are built ``block`` rows at a time, so memory stays ``O(block * max(n, m))``.
    """
    x = _as_2d_float64(x, "x")
    y = _as_2d_float64(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y have different feature dimensions: {x.shape[1]} vs {y.shape[1]}")
    n, m = x.shape[0], y.shape[0]
    if unbiased and (n < 2 or m < 2):
        raise ValueError("the unbiased MMD estimate needs at least 2 samples in each set")
    gamma = 1.0 / (2.0 * float(sigma) ** 2)

    def kernel_sum(a, b):
        a_sq, b_sq = (a * a).sum(1), (b * b).sum(1)
        total = 0.0
        for i in range(0, a.shape[0], block):
            d2 = a_sq[i : i + block, None] + b_sq[None, :] - 2.0 * a[i : i + block] @ b.T
            total += np.exp(-gamma * np.maximum(d2, 0.0)).sum()
        return total

    k_xx, k_yy, k_xy = kernel_sum(x, x), kernel_sum(y, y), kernel_sum(x, y)
    if unbiased:  # k(a, a) = 1: drop the n (resp. m) diagonal ones
        value = (k_xx - n) / (n * (n - 1)) + (k_yy - m) / (m * (m - 1)) - 2.0 * k_xy / (n * m)
    else:
        value = k_xx / (n * n) + k_yy / (m * m) - 2.0 * k_xy / (n * m)
    return float(scale * value)


def _as_2d_float64(a, what: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"{what}: expected a non-empty [N, D] array, got shape {a.shape}")
    return a


# --------------------------------------------------------------------------------------------
# the efficientnet-lite0 embedding network


class _FrozenEmbedder(nn.Module):
    """A metric network: no gradients, and always in eval mode (a `.train()` from an enclosing module
    must not switch BatchNorm or dropout back on)."""

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> _FrozenEmbedder:
        return super().train(False)


class EfficientNetLite0Embedder(_FrozenEmbedder):
    """Global image embedding of the offline EfficientNet-Lite0 ImageNet classifier: images as
    floats in [0, 1] ``[B, 3, H, W]`` -> bilinear (antialiased) resize to ``size`` x ``size``
    (224, its ImageNet resolution) -> TF-Lite normalisation ``(x - 127/255) / (128/255)`` (the
    teacher's, see ``EfficientNetLite0Teacher``) -> head feature map (1280 ch, stride 32, after
    BN + ReLU6) -> global average pool -> ``[B, 1280]`` fp32, the input of its ImageNet classifier.

    The Fréchet distance on these features is the "efficientnet-lite0 Fréchet distance", NOT FID.
    Frozen and always in eval mode (BatchNorm uses its running statistics).
    """

    dim = 1280

    def __init__(self, weights_path: str | None = None, *, size: int = 224):
        super().__init__()
        from pixelrun.teachers.features import load_efficientnet_lite0

        self.net, path = load_efficientnet_lite0(weights_path)
        self.size = int(size)
        self.name = f"efficientnet-lite0-gap{self.dim}-{self.size}px"
        self.weights_path = path
        self._freeze()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: floats in [0, 1], ``[B, 3, H, W]``. Returns ``[B, 1280]`` fp32."""
        x = images.float()
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        x = (x - TF_LITE_MEAN) / TF_LITE_STD
        return self.net.features(x, stride=32).mean((2, 3))


def cmmd_center_crop_and_resize(image: np.ndarray, size: int) -> np.ndarray:
    """One uint8 ``[H, W, 3]`` image -> float32 ``[size, size, 3]`` in [0, 1], exactly as CMMD's
    reference reads an image file: google-research ``cmmd/io_util.py`` ``_center_crop_and_resize``
    (the centre ``min(H, W)`` square, top / left offsets rounded down, then PIL's
    ``Image.resize((size, size), BICUBIC)``, which antialiases when it shrinks) and ``_read_image``
    (``np.asarray(im).astype(float32)``), then ``compute_embeddings_for_dir``'s ``/ 255``.
    ``cmmd/embedding.py`` ``_clip_preprocess`` then resizes to the size it already has (the identity)
    and normalises with CLIP's mean / std, which :meth:`CLIPImageEmbedder.preprocess` does next."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(image))
    w, h = im.size
    side = min(w, h)
    top, left = (h - side) // 2, (w - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((size, size), resample=Image.Resampling.BICUBIC)
    return np.asarray(im).astype(np.float32) / 255.0


class NormalisedEmbedder(_FrozenEmbedder):
    """Shared frame of the transformer embedders: frozen, always eval, ``forward`` = the subclass's
    ``preprocess`` (its reference's resize and ``(x - mean) / std``), its ``_embed``, then L2
    normalisation, in fp32."""

    preprocessing: str  # the subclass's steps as its reference takes them, with {size}
    mean: torch.Tensor  # buffers [1, 3, 1, 1]
    std: torch.Tensor

    def __init__(self, size: int, mean, std):
        super().__init__()
        self.size = int(size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Floats in [0, 1] ``[B, 3, H, W]`` -> the normalised ``[B, 3, size, size]`` network input."""
        raise NotImplementedError

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: floats in [0, 1], ``[B, 3, H, W]``. Returns unit-norm ``[B, dim]`` fp32."""
        return F.normalize(self._embed(self.preprocess(images)).float(), dim=-1)


class CLIPImageEmbedder(NormalisedEmbedder):
    """CMMD's embedding: CLIP's projected image embedding (``image_embeds`` of transformers'
    ``CLIPVisionModelWithProjection``), L2-normalised, as google-research/cmmd computes it.

    Preprocessing is the reference code's, so that numbers compare with published CMMD: each image
    as uint8, its centre square cropped (a wide image loses its sides, it is not squashed), resized
    with PIL's bicubic (antialiased) to ``image_size`` (336 for CMMD's
    ``openai/clip-vit-large-patch14-336``), ``/ 255``, then CLIP mean / std
    (:func:`cmmd_center_crop_and_resize`). Floats in [0, 1] are rounded to uint8 first, as the
    reference reads its images from PNG / JPEG files; uint8 images divided by 255 come back exactly.

    Loads from a local folder or a hub id through pixelrun's strict ``from_pretrained``; a full
    ``CLIPModel`` checkpoint (the hub's ``openai/clip-*``) works too, its text tower is skipped.
    """

    preprocessing = (
        "centre crop to a square, PIL bicubic resize (antialiased) to {size}px, uint8 / 255, CLIP "
        "mean / std (google-research cmmd/io_util.py _center_crop_and_resize)"
    )

    def __init__(self, model: CLIPVisionModelWithProjection, name: str):
        config = model.config
        if not isinstance(config.image_size, int):  # CLIP's own configs give one side
            raise ValueError(f"a CLIP vision config with image_size {config.image_size!r}: CMMD needs one square size")
        super().__init__(config.image_size, CLIP_MEAN, CLIP_STD)
        self.model = model
        self.dim = int(config.projection_dim)
        self.name = name
        self._freeze()

    @classmethod
    def from_pretrained(cls, spec: str, **hf_kwargs) -> CLIPImageEmbedder:
        from transformers import AutoConfig, CLIPVisionModelWithProjection

        from pixelrun.model.text import _from_pretrained

        config = AutoConfig.from_pretrained(spec, **hf_kwargs)
        if config.model_type == "clip":
            # A full CLIPModel checkpoint keeps projection_dim at the top level; the vision
            # sub-config would otherwise default to 512 and the projection (768 for ViT-L) mismatch.
            vision = config.vision_config
            vision.projection_dim = config.projection_dim
            config = vision
        elif config.model_type != "clip_vision_model":
            raise ValueError(f"{spec!r} has model_type {config.model_type!r}, not a CLIP model")
        model = _from_pretrained(CLIPVisionModelWithProjection, spec, config=config, dtype=torch.float32, **hf_kwargs)
        size = model.config.image_size
        # "-crop-pil" in the name keeps real embeddings cached under the old squash apart
        return cls(model.float(), name=f"clip-image-embeds-l2-{size}px-crop-pil ({spec})")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        u8 = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        crops = np.stack([cmmd_center_crop_and_resize(im, self.size) for im in u8])
        x = torch.from_numpy(crops).permute(0, 3, 1, 2).to(self.mean.device)
        return (x - self.mean) / self.std

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).image_embeds


class DinoImageEmbedder(NormalisedEmbedder):
    """DINO-MMD's embedding: the DINOv2 global embedding, i.e. the CLS token of the final
    layer-normed sequence (``pooler_output`` of transformers' ``Dinov2Model`` /
    ``Dinov2WithRegistersModel``; ``x_norm_clstoken``, what the torch-hub DINOv2 returns),
    L2-normalised.

    Defaults as PRX's callback (Photoroom/PRX ``callbacks/log_generation_metrics.py``,
    ``LogQualityMetrics``: ``dino_model_name="dinov2_vitl14_reg"``, ``dino_resize_size=518``,
    ``DINOFeatureExtractor(normalize_embeddings=True)``): DINOv2-L/14 with registers at 518px.
    That callback imports the extractor from ``callbacks/feature_extractors.py``, which was not
    available to read; an earlier version of the callback defined it inline
    (``DINOFeatureExtractor.forward``): uint8 / 255, ImageNet mean / std, then the whole image
    squashed to ``resize_size`` x ``resize_size`` with torch's bicubic (``align_corners=False``, no
    antialiasing), which :meth:`preprocess` does. (For the square images pixelrun evaluates,
    squashing and cropping are the same.)

    Why L2-normalised, beyond PRX doing it: the recipe's DINO-MMD uses "the same MMD" as CMMD,
    sigma 10, scale 1000, and that bandwidth was chosen for unit-norm CLIP embeddings (squared
    distances <= 4, far below 2 sigma^2 = 200). A raw layer-normed CLS token has a norm of about
    sqrt(hidden size) times the LayerNorm gains, so squared distances of hundreds would put most
    pairs in the kernel's flat tail. ``eval.dino_mmd_sigma`` / ``eval.dino_mmd_scale`` change them.
    """

    preprocessing = (
        "ImageNet mean / std, torch bicubic squash to {size}x{size} (align_corners=False, no "
        "antialiasing), CLS token L2-normalised (PRX callbacks/log_generation_metrics.py)"
    )

    def __init__(self, teacher: HFDinoTeacher, *, size: int = 518, name: str | None = None):
        super().__init__(size, IMAGENET_MEAN, IMAGENET_STD)
        self.model = teacher.model
        self.dim = int(teacher.dim)
        self.patch = int(teacher.patch)
        self.name = name or f"dino-cls-l2-{self.size}px-squash ({teacher.name})"
        self._freeze()

    @classmethod
    def from_pretrained(cls, spec: str, *, size: int = 518, **hf_kwargs) -> DinoImageEmbedder:
        from pixelrun.teachers.features import HFDinoTeacher

        teacher = HFDinoTeacher.from_pretrained(spec, compute_dtype=torch.float32, **hf_kwargs)
        # "-squash" in the name keeps real embeddings cached under the old short-side resize apart
        return cls(teacher, size=size, name=f"dino-cls-l2-{size}px-squash ({spec})")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).pooler_output


def load_metric_network(spec: str, **kwargs) -> nn.Module:
    """A frozen embedding network for :func:`image_features` by name.

    * ``"efficientnet-lite0"``: :class:`EfficientNetLite0Embedder` (``kwargs``: ``weights_path``,
      ``size``); the Fréchet distance on it is the "efficientnet-lite0 Fréchet distance".
    * ``"fid-inception"``: FID's Inception-v3 pool3 (``pixelrun.evaluation.inception``); needs
      ``weights_path=`` pointing at pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (nothing is
      downloaded). The Fréchet distance on it, with real statistics from enough images (FID is
      usually reported at 10k-50k), is FID.
    * ``"clip"``: :class:`CLIPImageEmbedder` from ``model=`` (a local path or hub id); CMMD's.
    * ``"dino"``: :class:`DinoImageEmbedder` from ``model=`` (a DINOv2 path or hub id) at ``size=``
      (default 518); DINO-MMD's.

    ``"clip"`` / ``"dino"`` pass other keywords (``local_files_only``, ``revision``...) to
    ``from_pretrained``.
    """
    if spec == "clip":
        return CLIPImageEmbedder.from_pretrained(kwargs.pop("model"), **kwargs)
    if spec == "dino":
        return DinoImageEmbedder.from_pretrained(kwargs.pop("model"), **kwargs)
    if spec == "efficientnet-lite0":
        return EfficientNetLite0Embedder(**kwargs)
    if spec == "fid-inception":
        from pixelrun.evaluation.inception import load_fid_inception

        if not kwargs.get("weights_path"):
            raise ValueError("'fid-inception' needs weights_path= (pt_inception-2015-12-05-6726825d.pth)")
        return load_fid_inception(kwargs["weights_path"])
    raise ValueError(
        f"unknown metric network {spec!r}; available: 'efficientnet-lite0', 'fid-inception', 'clip', 'dino'"
    )


def _to_float01_nchw(images) -> torch.Tensor:
    """uint8 (-> / 255) or float in [0, 1] images -> float32 ``[N, 3, H, W]``. Numpy arrays are
    ``[N, H, W, 3]`` (what ``evaluate.generate`` returns), tensors ``[N, 3, H, W]``."""
    if isinstance(images, torch.Tensor):
        x = images.detach()
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"image tensors must be [N, 3, H, W], got {tuple(x.shape)}")
    else:
        arr = np.asarray(images)
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"image arrays must be [N, H, W, 3], got {arr.shape}")
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise ValueError(f"images must be uint8 or floats in [0, 1], got dtype {x.dtype}")
    x = x.float()
    lo, hi = (x.min().item(), x.max().item()) if x.numel() else (0.0, 0.0)
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise ValueError(
            f"float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}] "
            f"(a [-1, 1] model output? map it with (x + 1) / 2; 0..255? pass uint8)"
        )
    return x.clamp(0.0, 1.0)


@torch.no_grad()
def image_features(network: nn.Module, images, batch: int = 64, progress=None) -> np.ndarray:
    """Global embeddings ``[N, D]`` (float64 numpy) of ``images`` under ``network``.

    ``images``: uint8 (``[N, H, W, 3]`` numpy or ``[N, 3, H, W]`` tensor; divided by 255 here) or
    floats already in [0, 1]. The network always receives floats in [0, 1] — never uint8, which a
    metric that multiplies by 255 would wrap (docs/recipe.md's PRX pitfall) — and does its own resize
    and normalisation. Runs in fp32 on the network's device, ``batch`` images at a time;
    ``progress`` (a tqdm bar, optional) advances by the images done.
    """
    x = _to_float01_nchw(images)
    try:
        device = next(network.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    out = []
    for i in range(0, x.shape[0], batch):
        out.append(network(x[i : i + batch].to(device)).float().cpu())
        if progress is not None:
            progress.update(out[-1].shape[0])
    return torch.cat(out).double().numpy()
