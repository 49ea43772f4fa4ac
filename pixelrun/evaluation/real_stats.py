"""Statistics of real images, cached: the real side of each distribution metric (metrics.py) is
computed once per (dataset, resolution, n, network) and kept in an ``.npz`` file whose key is stored
inside it and checked on load, with the images' captions beside it (so an evaluation on a cache hit
loads no image)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable

import numpy as np
from torch import nn

from pixelrun.evaluation.metrics import RealImages, feature_stats, image_features
from pixelrun.infra.files import write_atomic


def stats_cache_path(cache_dir: str, dataset: str, resolution: int, n: int, network: str) -> str:
    """The ``.npz`` file holding real-image statistics for (dataset, resolution, n, network):
    a readable slug plus a hash of the exact key (so distinct dataset paths never collide)."""
    key = json.dumps([str(dataset), int(resolution), int(n), str(network)])
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    slug = re.sub(
        r"[^A-Za-z0-9._-]+",
        "_",
        f"{os.path.basename(str(dataset).rstrip('/')) or 'data'}-{int(resolution)}px-n{int(n)}-{network}",
    )[:120]
    return os.path.join(cache_dir, f"{slug}-{digest}.npz")


def _read_cached(path: str, key: str) -> dict[str, np.ndarray] | None:
    """The arrays stored at ``path`` if the file's stored ``key`` equals ``key``, else None."""
    if not os.path.exists(path):
        return None
    with np.load(path) as f:
        if "key" in f and str(f["key"]) == key:
            return {k: f[k] for k in f.files if k != "key"}
    return None


def _cached(path: str, key: str, compute: Callable[[], dict]) -> dict[str, np.ndarray]:
    """The arrays stored at ``path`` if the file's stored ``key`` equals ``key``; otherwise
    ``compute()``'s, written whole (`write_atomic`) with the key beside them."""
    arrays = _read_cached(path, key)
    if arrays is not None:
        return arrays
    arrays = compute()
    # numpy's stub fears a **dict naming savez's allow_pickle; the keys are array names
    write_atomic(path, lambda f: np.savez(f, key=np.array(key), **arrays))  # type: ignore[arg-type]
    return arrays


def _real_features(network: nn.Module, images: Callable[[], RealImages], n: int, batch: int, progress) -> np.ndarray:
    imgs = images()
    if len(imgs) != n:
        raise ValueError(f"asked for n={n} real images, the provider returned {len(imgs)}")
    return image_features(network, imgs, batch=batch, progress=progress)


def _network_name(network: nn.Module) -> str:
    return str(getattr(network, "name", type(network).__name__))


def _real_entry(
    cache_dir: str, dataset: str, resolution: int, n: int, network: nn.Module, embeddings: bool
) -> tuple[str, str]:
    """(file, key) of one real side: statistics (Fréchet) or ``"-embeddings"`` (MMD), so the two
    never share a file for the same network."""
    name = f"{_network_name(network)}-embeddings" if embeddings else _network_name(network)
    key = json.dumps([str(dataset), int(resolution), int(n), name])
    return stats_cache_path(cache_dir, dataset, resolution, n, name), key


def _with_captions(arrays: dict, captions) -> dict:
    return {**arrays, "captions": np.array(list(captions), dtype=str)} if captions is not None else arrays


def real_feature_stats(
    cache_dir: str,
    dataset: str,
    resolution: int,
    n: int,
    network: nn.Module,
    images: Callable[[], RealImages],
    *,
    batch: int = 64,
    progress=None,
    captions: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of ``network``'s features of ``n`` real images, from the cache if present.

    The cache key is (dataset, resolution, n, ``network.name``), stored inside the file and checked
    on load, so a stale or mismatched file is recomputed, never silently reused. ``images`` is called
    only on a cache miss and must return exactly ``n`` images (uint8 or floats in [0, 1], see
    :func:`image_features`). ``captions`` (those images' captions) are stored beside the statistics,
    so a later evaluation can read them back (:func:`cached_captions`) instead of loading the images.
    Writes are atomic (`write_atomic`).
    """
    path, key = _real_entry(cache_dir, dataset, resolution, n, network, embeddings=False)

    def compute():
        mu, sigma = feature_stats(_real_features(network, images, n, batch, progress))
        return _with_captions({"mu": mu, "sigma": sigma}, captions)

    arrays = _cached(path, key, compute)
    return arrays["mu"], arrays["sigma"]


def real_embeddings(
    cache_dir: str,
    dataset: str,
    resolution: int,
    n: int,
    network: nn.Module,
    images: Callable[[], RealImages],
    *,
    batch: int = 64,
    progress=None,
    captions: list[str] | None = None,
) -> np.ndarray:
    """``network``'s ``[n, D]`` embeddings of ``n`` real images (what an MMD needs: it has no
    sufficient statistics), cached like :func:`real_feature_stats`, captions included."""
    path, key = _real_entry(cache_dir, dataset, resolution, n, network, embeddings=True)
    arrays = _cached(
        path, key, lambda: _with_captions({"embeddings": _real_features(network, images, n, batch, progress)}, captions)
    )
    return arrays["embeddings"]


def cached_captions(
    cache_dir: str, dataset: str, resolution: int, n: int, network: nn.Module, *, embeddings: bool
) -> list[str] | None:
    """The captions stored with a cached real side (:func:`real_feature_stats` when ``embeddings``
    is False, :func:`real_embeddings` when True), or None: no such file, a file of another key, or
    one written without captions. What lets an evaluation skip the real images on a cache hit."""
    arrays = _read_cached(*_real_entry(cache_dir, dataset, resolution, n, network, embeddings))
    if arrays is None or "captions" not in arrays:
        return None
    return [str(c) for c in arrays["captions"]]
