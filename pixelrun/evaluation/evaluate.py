"""Evaluation: images generated for held-out captions, compared with the real images of the same
captions (docs/recipe.md "Evaluation"), and the shapes score of docs/recipe.md.

Metrics (``eval.metrics``; ``pixelrun eval 'eval.metrics=[...]'``):

* ``auto`` (the default): the data's own, the shapes score on shapes data and fd-effnet on any other.
* ``shapes``: the shapes score; needs no real images, only the shapes data's captions.
* ``fd-effnet``: the Fréchet distance on EfficientNet-Lite0 features (offline; NOT FID).
* ``fid``: FID, the Fréchet distance on pytorch-fid's Inception-v3 (``eval.fid_weights``).
* ``cmmd``: CMMD, the MMD (sigma 10, scale 1000) of CLIP image embeddings (``eval.clip_model``).
* ``dino-mmd``: the same MMD of DINOv2 CLS embeddings (``eval.dino_model``, ``eval.dino_mmd_*``).

One evaluation: ``eval.prompts`` captions of held-out real data and their real images
(:func:`pixelrun.evaluation.heldout.real_images_and_prompts`), one generated image per caption with the noise ``pixelrun
sample`` draws for the same seed, then each metric. The real side is computed once per dataset,
resolution, count and network and cached on disk (``eval.cache_dir``) with its captions; when every
metric's real side is cached, only those captions are read and no real image is loaded. Everything
that can fail (an unknown metric, a missing weights file, a network that does not load, a hub model
that is neither cached nor reachable) fails before the first image is generated, as a
``ConfigError`` naming the key to fix.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import numpy as np
import torch

from pixelrun.config import Config, ConfigError, to_dict, with_overrides
from pixelrun.data.sources import eval_prompts, source_kind
from pixelrun.diffusion.generate import evaluations_per_image, generate
from pixelrun.evaluation.heldout import dataset_key, held_out_captions, real_images_and_prompts
from pixelrun.infra import hub

#: what ``pixelrun eval`` computes on data other than shapes when eval.metrics has nothing for it
OFFLINE_DEFAULT_METRICS = ["fd-effnet"]
_FRECHET = ("fd-effnet", "fid")  # compared through (mu, sigma); the MMDs need every real embedding


def resolve_metrics(cfg: Config, metrics: list[str] | None = None) -> list[str]:
    """``metrics`` (default: eval.metrics) with ``auto`` replaced by the data's own measure: the shapes
    score on shapes data (which costs nothing but sampling), the offline fd-effnet on any other."""
    own = "shapes" if source_kind(cfg).shapes_captions else OFFLINE_DEFAULT_METRICS[0]
    names = cfg.eval.metrics if metrics is None else metrics
    return list(dict.fromkeys(own if m == "auto" else m for m in names))


def applicable_metrics(cfg: Config) -> list[str]:
    """``eval.metrics`` as they apply to this config's data: ``auto`` resolved, and the shapes score
    dropped on other data (it parses shapes captions) where a list names it explicitly."""
    return [m for m in resolve_metrics(cfg) if m != "shapes" or source_kind(cfg).shapes_captions]


def cli_default_metrics(cfg: Config) -> list[str]:
    """What ``pixelrun eval`` computes without an eval.metrics override: the checkpoint's eval.metrics
    that apply to its data, or, when none does (the default [shapes] on emoji, folder or shard data),
    the offline :data:`OFFLINE_DEFAULT_METRICS`."""
    return applicable_metrics(cfg) or list(OFFLINE_DEFAULT_METRICS)


def check_metrics(cfg: Config, metrics: list[str], key: str = "eval.metrics") -> None:
    """What can be checked without loading anything: the shapes score on shapes data, enough samples
    for a covariance, and the network of each metric named (and, if it is a path, present; if it is
    a hub id, cached or reachable)."""
    metrics = resolve_metrics(cfg, metrics)
    if "shapes" in metrics and not source_kind(cfg).shapes_captions:
        raise ConfigError(key, f"the shapes score needs data.source=shapes, this run's is {cfg.data.source}")
    if "shapes" in metrics and cfg.eval.prompts_file is not None:
        raise ConfigError(
            "eval.prompts_file",
            "the shapes score grades images of the held-out shapes captions it draws; leave eval.prompts_file "
            "null, or evaluate with another metric ('eval.metrics=[fd-effnet]')",
        )
    if any(m in _FRECHET for m in metrics) and cfg.eval.prompts < 2:
        raise ConfigError(
            "eval.prompts",
            f"a Fréchet distance needs at least 2 samples, got {cfg.eval.prompts} (set eval.prompts=2 or more)",
        )
    if "fid" in metrics:
        if not cfg.eval.fid_weights:
            raise ConfigError(
                "eval.fid_weights",
                "the fid metric needs pytorch-fid's pt_inception-2015-12-05-6726825d.pth: set eval.fid_weights=PATH",
            )
        if not os.path.isfile(os.path.expanduser(cfg.eval.fid_weights)):
            raise ConfigError("eval.fid_weights", f"no such file: {cfg.eval.fid_weights}")
    for metric, model_key, spec in (
        ("cmmd", "eval.clip_model", cfg.eval.clip_model),
        ("dino-mmd", "eval.dino_model", cfg.eval.dino_model),
    ):
        if metric in metrics:
            _check_model_source(model_key, spec, metric)
            _hub_kwargs(model_key, spec, metric)


def _check_model_source(key: str, spec: str, metric: str) -> None:
    """A path must be a model folder; a hub id is checked by :func:`_hub_kwargs`."""
    if not spec:
        raise ConfigError(key, f"the {metric} metric needs a model: a local path or Hugging Face id")
    path = os.path.expanduser(spec)
    if hub.is_local(spec) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(key, f"the {metric} metric's model {spec!r} is not a model folder (no {path}/config.json)")


def _hub_kwargs(key: str, spec: str, metric: str) -> dict:
    """``from_pretrained`` keywords for a metric network named by a hub id, decided before any work.

    Without a network (HF_HUB_OFFLINE set, or the hub endpoint not answering one request), a model
    in the Hugging Face cache loads with ``local_files_only=True`` and one that is not cached is a
    ConfigError at once: otherwise huggingface_hub retries for about half a minute before failing."""
    if hub.is_local(spec):
        return {}
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except ValueError:  # not a valid repo id: from_pretrained will say so
        return {}
    offline = constants.HF_HUB_OFFLINE
    if not offline and hub.reachable(constants.ENDPOINT):
        return {}
    if cached:
        return {"local_files_only": True}
    why = "HF_HUB_OFFLINE is set" if offline else f"{constants.ENDPOINT} does not answer"
    raise ConfigError(
        key,
        f"the {metric} metric's model {spec!r} is neither a local model folder nor in the Hugging "
        f"Face cache ({constants.HF_HUB_CACHE}), and {why}: download it where there is a network "
        f"(hf download {spec}) or give a local path",
    )


def _network_spec(cfg: Config, metric: str) -> tuple[str, dict, str]:
    """(load_metric_network name, its arguments, the config key that chooses it)."""
    e = cfg.eval
    specs: dict[str, Callable[[], tuple[str, dict, str]]] = {
        "fd-effnet": lambda: ("efficientnet-lite0", {}, "eval.metrics"),
        "fid": lambda: (
            "fid-inception",
            {"weights_path": _user_path("eval.fid_weights", e.fid_weights)},
            "eval.fid_weights",
        ),
        "cmmd": lambda: ("clip", {"model": os.path.expanduser(e.clip_model)}, "eval.clip_model"),
        "dino-mmd": lambda: (
            "dino",
            {"model": os.path.expanduser(e.dino_model), "size": e.dino_resolution},
            "eval.dino_model",
        ),
    }
    return specs[metric]()


def _user_path(key: str, path: str | None) -> str:
    """A path setting that `check_metrics` has required, with ~ expanded."""
    if path is None:
        raise ConfigError(key, "is not set")
    return os.path.expanduser(path)


def load_metric_networks(cfg: Config, metrics: list[str], device) -> dict[str, torch.nn.Module]:
    """The frozen embedding network of each distribution metric, on ``device``. One that does not load
    (no weights offline, wrong architecture) is a ConfigError naming its key."""
    from pixelrun.evaluation.metrics import DinoImageEmbedder, load_metric_network

    networks = {}
    for metric in metrics:
        if metric == "shapes":
            continue
        kind, kwargs, key = _network_spec(cfg, metric)
        if kind in ("clip", "dino"):
            kwargs.update(_hub_kwargs(key, kwargs["model"], metric))
        try:
            networks[metric] = load_metric_network(kind, **kwargs).to(device)
        except (OSError, ValueError, RuntimeError, ImportError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(key, f"the {metric} metric's network did not load: {reason}") from e
    dino = networks.get("dino-mmd")
    if isinstance(dino, DinoImageEmbedder) and cfg.eval.dino_resolution % dino.patch:
        raise ConfigError(
            "eval.dino_resolution",
            f"{cfg.eval.dino_resolution} is not a multiple of the DINO model's patch {dino.patch} (PRX: 518 = 37 x 14)",
        )
    return networks


def sample_size_warnings(metrics: list[str], networks: dict, n: int) -> list[str]:
    """One line per Fréchet distance whose sample count is below its feature dimension: the
    covariance estimate is then singular and the distance mostly estimation bias."""
    out = []
    for m in metrics:
        dim = getattr(networks.get(m), "dim", None)
        if m in _FRECHET and dim and n < dim:
            out.append(
                f"{m} on {n} samples, fewer than its {dim} feature dimensions: the covariance is singular "
                f"and the number mostly estimation bias; compare it only with numbers at the same sample "
                f"count, or raise eval.prompts to {dim} or more (FID is usually "
                f"reported at 10k-50k)"
            )
    return out


def _bar(enabled: bool, **kwargs):
    from pixelrun.infra.progress import progress

    return progress(disable=not enabled, leave=False, **kwargs)


class Evaluator:
    """The evaluations of one model: the metric networks (loaded once, at construction, so a bad one
    fails before any image is generated), the held-out captions and real images, and the real side of
    each metric (computed once, cached on disk under ``eval.cache_dir`` with its captions).

    Real images are read only when some metric's real side is not cached yet: on a cache hit the
    captions come from the cache file (several GB of images at FID scale are never loaded).
    ``compute=False`` (ranks other than 0 in training) only generates: a sharded model's forward is
    collective, so every rank samples, but only one computes and reports the metrics; those ranks
    read only the captions (:func:`pixelrun.evaluation.heldout.held_out_captions`).
    """

    def __init__(
        self,
        cfg: Config,
        metrics: list[str],
        device,
        *,
        compute: bool = True,
        progress: bool = False,
        key: str = "eval.metrics",
    ):
        metrics = resolve_metrics(cfg, metrics)
        check_metrics(cfg, metrics, key)
        self.metrics, self.device, self.compute, self.progress = list(metrics), torch.device(device), compute, progress
        # eval.prompts_file: the captions generated for; the real side stays the held-out images
        self.own_prompts = eval_prompts(cfg) if cfg.eval.prompts_file is not None else None
        self.networks = load_metric_networks(cfg, metrics, self.device) if compute else {}
        self._data: dict[tuple, tuple[np.ndarray | None, list[str]]] = {}
        self._real: dict[tuple, object] = {}
        self._real_data(cfg)  # now, so too few real images also fail before any work
        for line in sample_size_warnings(self.metrics, self.networks, cfg.eval.prompts):
            print(f"pixelrun: warning: {line}", file=sys.stderr)

    def _data_key(self, cfg: Config) -> tuple:
        return dataset_key(cfg), cfg.data.resolution, cfg.eval.prompts

    def _real_data(self, cfg: Config) -> tuple[np.ndarray | None, list[str]]:
        """(real images or None, captions): None when no metric here needs them (every real side is
        cached, or held in memory, or this rank does not compute)."""
        key = self._data_key(cfg)
        if key not in self._data:
            with_real_side = [m for m in self.networks if m != "shapes"]
            captions = self._cached_captions(cfg, with_real_side) if with_real_side else None
            if captions is not None or not with_real_side:
                self._data[key] = (None, captions if captions is not None else held_out_captions(cfg, cfg.eval.prompts))
            else:
                self._data[key] = real_images_and_prompts(cfg, cfg.eval.prompts)
        return self._data[key]

    def _cached_captions(self, cfg: Config, metrics: list[str]) -> list[str] | None:
        """The captions stored with every metric's cached real side, or None if any is missing."""
        from pixelrun.evaluation.real_stats import cached_captions

        found = [
            cached_captions(
                os.path.expanduser(cfg.eval.cache_dir),
                dataset_key(cfg),
                cfg.data.resolution,
                cfg.eval.prompts,
                self.networks[m],
                embeddings=m not in _FRECHET,
            )
            for m in metrics
        ]
        if any(c is None for c in found) or any(c != found[0] for c in found):
            return None
        return found[0]

    def _reference(self, metric: str, cfg: Config, real: np.ndarray | None, prompts: list[str]):
        """The real side of ``metric``: (mu, sigma) for a Fréchet distance, embeddings for an MMD.
        ``real`` None (the captions came from the cache): the images are read only if the cache file
        went missing since."""
        from pixelrun.evaluation.real_stats import real_embeddings, real_feature_stats

        key = (metric, *self._data_key(cfg))
        if key not in self._real:
            fn = real_feature_stats if metric in _FRECHET else real_embeddings
            images = (lambda: real) if real is not None else (lambda: real_images_and_prompts(cfg, cfg.eval.prompts)[0])
            with _bar(self.progress, total=cfg.eval.prompts, desc=f"eval: real images, {metric}", unit="img") as bar:
                self._real[key] = fn(
                    os.path.expanduser(cfg.eval.cache_dir),
                    dataset_key(cfg),
                    cfg.data.resolution,
                    cfg.eval.prompts,
                    self.networks[metric],
                    images,
                    progress=bar,
                    captions=prompts,
                )
        return self._real[key]

    def _metric(
        self, metric: str, cfg: Config, images: np.ndarray, prompts: list[str], real: np.ndarray | None, captions
    ):
        """``metric`` of ``images`` (generated for ``prompts``) against the real side of the held-out
        images, whose ``captions`` name it in the cache."""
        from pixelrun.evaluation.metrics import feature_stats, frechet_distance, image_features, mmd

        if metric == "shapes":
            from pixelrun.evaluation.shapes_score import score_each

            each = score_each(list(images), prompts)
            return {**{k: float(np.mean(v)) for k, v in each.items()}, "n": len(prompts)}, each
        reference = self._reference(metric, cfg, real, captions)
        with _bar(self.progress, total=len(images), desc=f"eval: generated images, {metric}", unit="img") as bar:
            fake = image_features(self.networks[metric], images, progress=bar)
        if metric in _FRECHET:
            return frechet_distance(*feature_stats(fake), *reference)
        sigma, scale = _kernel(cfg, metric)
        return mmd(reference, fake, sigma=sigma, scale=scale)

    def __call__(self, model, encoder, cfg: Config, *, sample_seed: int, keep_images: int = 0) -> dict | None:
        """Generate one image per held-out caption with ``cfg.sample``'s settings and ``sample_seed``,
        then every metric: ``{"metrics", "settings", "per_prompt", "prompts"}`` (plus ``score`` and
        ``real_images`` with the shapes score; ``images``, the first ``keep_images`` generated, when
        asked), or None where ``compute`` is off. ``per_prompt`` holds each prompt's value of the
        metrics that have one (the shapes score's measures): what paired comparisons resample."""
        from pixelrun.evaluation.shapes_score import real_image_sanity

        real, captions = self._real_data(cfg)
        prompts = captions if self.own_prompts is None else self.own_prompts[: cfg.eval.prompts]
        was_training = model.training
        model.eval()
        with _bar(self.progress, total=cfg.sample.steps, desc="eval: generate", unit="step") as bar:
            images = generate(model, encoder, prompts, cfg, self.device, seed=sample_seed, progress=bar)
        model.train(was_training)
        if not self.compute:
            self._data[self._data_key(cfg)] = (None, captions)  # this rank only needs the captions
            return None
        values, per_prompt = {}, {}
        for m in self.metrics:
            value = self._metric(m, cfg, images, prompts, real, captions)
            values[m], each = value if isinstance(value, tuple) else (value, None)
            if each is not None:
                per_prompt[m] = each
        # Every metric's real side is now held in memory: the real images (n x R x R x 3 bytes, GBs
        # for an FID-sized n at 512px) are not needed again.
        self._data[self._data_key(cfg)] = (None, captions)
        result = {
            "metrics": values,
            "settings": self.settings(cfg, sample_seed),
            "per_prompt": per_prompt,
            "prompts": list(prompts),
        }
        if keep_images:
            result["images"] = images[:keep_images]
        if "shapes" in values:  # the keys `pixelrun eval` printed before there were other metrics
            result["score"] = values["shapes"]
            result["real_images"] = real_image_sanity(n=len(prompts), size=cfg.data.resolution)
        return result

    def settings(self, cfg: Config, sample_seed: int) -> dict:
        """Everything that produced the numbers: data, sampling and each metric's network."""
        s = cfg.sample
        return {
            "metrics": self.metrics,
            "prompts": cfg.eval.prompts,
            "prompts_file": cfg.eval.prompts_file,
            "data": dataset_key(cfg),
            "prompt_seed": cfg.eval.seed if source_kind(cfg).shapes_captions else None,
            "sample_seed": sample_seed,
            "steps": s.steps,
            "guidance": s.guidance,
            "guidance_mode": s.guidance_mode,
            "sampler": s.sampler,
            "guidance_interval": list(s.guidance_interval) or None,
            "nfe": evaluations_per_image(cfg),  # model evaluations per image: the score's cost
            "spacing": s.spacing,
            "shift": s.shift,
            "resolution": cfg.data.resolution,
            "networks": {m: self._describe_network(cfg, m) for m in self.networks},
            "cache_dir": os.path.expanduser(cfg.eval.cache_dir) if self.networks else None,
        }

    def _describe_network(self, cfg: Config, metric: str) -> dict:
        from pixelrun.evaluation.metrics import NormalisedEmbedder

        net = self.networks[metric]
        kind, kwargs, _ = _network_spec(cfg, metric)
        out = {
            "network": getattr(net, "name", kind),
            "weights": kwargs.get("weights_path") or kwargs.get("model") or getattr(net, "weights_path", None),
        }
        if isinstance(net, NormalisedEmbedder):  # the transformer embedders: resolution and their reference's steps
            out["resolution"] = net.size
            out["preprocessing"] = net.preprocessing.format(size=net.size)
        if metric not in _FRECHET:
            out["sigma"], out["scale"] = _kernel(cfg, metric)
        return out


def guidance_sweep(evaluator: Evaluator, model, encoder, cfg: Config, *, keep_images: int = 0, each=None) -> list:
    """An evaluation over the guidance sweep, as training's evaluations and `pixelrun eval` both run
    it: sample.guidance first (the top-level result), then each other scale of eval.guidance, with
    the same prompts and noise (sample.seed). Only the first keeps ``keep_images`` generated images.
    ``each(cfg_at_scale, result)``, when given, sees each result as it comes."""
    results: list = []
    for g in dict.fromkeys([cfg.sample.guidance, *cfg.eval.guidance]):
        cfg_g = cfg if g == cfg.sample.guidance else with_overrides(to_dict(cfg), [f"sample.guidance={g}"])
        results.append(
            evaluator(model, encoder, cfg_g, sample_seed=cfg.sample.seed, keep_images=0 if results else keep_images)
        )
        if each is not None:
            each(cfg_g, results[-1])
    return results


def ema_guidance_sweep(
    evaluator: Evaluator, models: list, encoder, cfg: Config, *, keep_images: int = 0, each=None
) -> list:
    """The guidance sweep of each EMA, `models` as (decay, model) with the run's first EMA first (or
    [(None, the raw model)]), so the first result is the one a run of one EMA gives. Each result
    carries its ``ema_decay``; ``each(decay, cfg_at_scale, result)`` sees each as it comes."""
    results: list = []
    for decay, model in models:
        for r in guidance_sweep(
            evaluator,
            model,
            encoder,
            cfg,
            keep_images=0 if results else keep_images,
            each=None if each is None else (lambda c, r, d=decay: each(d, c, r)),
        ):
            if r is not None:
                r["ema_decay"] = decay
            results.append(r)
    return results


def _kernel(cfg: Config, metric: str) -> tuple[float, float]:
    """(sigma, scale) of an MMD metric: CMMD's are part of its definition, DINO-MMD's are knobs."""
    from pixelrun.evaluation.metrics import CMMD_SCALE, CMMD_SIGMA

    return (CMMD_SIGMA, CMMD_SCALE) if metric == "cmmd" else (cfg.eval.dino_mmd_sigma, cfg.eval.dino_mmd_scale)


def flat_metrics(values: dict) -> dict[str, float]:
    """``{"eval/<metric>": number}``, the shapes score's measures as ``eval/shapes/<measure>``: the
    rows of metrics.jsonl and the TensorBoard tags."""
    out = {}
    for name, value in values.items():
        if isinstance(value, dict):
            out.update({f"eval/{name}/{k}": v for k, v in value.items()})
        else:
            out[f"eval/{name}"] = value
    return out


def describe_metrics(values: dict) -> str:
    """One line: "shapes score 0.633 (placed; kind 0.297), fd-effnet 12.4"."""
    return ", ".join(describe_shapes(v) if k == "shapes" else f"{k} {v:.4g}" for k, v in values.items())


def describe_shapes(score: dict, *more: str) -> str:
    """ "shapes score 0.633 (placed; kind 0.297, MORE...)": the placed score is never written without
    the kind measure beside it, so a model drawing blobs in the right cells (placed high, kind low)
    cannot pass for one drawing the shapes (issue 31)."""
    return f"shapes score {score['placed']:.3f} (placed; " + ", ".join([f"kind {score['kind']:.3f}", *more]) + ")"
