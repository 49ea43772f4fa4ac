"""Evaluation (pixelrun/evaluate.py, the embedders of pixelrun/metrics.py): CMMD's CLIP and DINO-MMD's
DINOv2 loaded through the real from_pretrained path from tiny random checkpoints saved here, real
images and captions per data source, `pixelrun eval --metrics`, cached real statistics, failures
before any work, and evaluation rows written during training."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import tiny_overrides
from pixelrun.cli import main
from pixelrun.config import load_config
from pixelrun.metrics import CLIP_MEAN, CLIP_STD, CMMD_SCALE, CMMD_SIGMA, load_metric_network, mmd


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> str:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16)
    path = tmp_path_factory.mktemp("tiny-clip")
    CLIPVisionModelWithProjection(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_dino_dir(tmp_path_factory) -> str:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       patch_size=14, image_size=224)
    path = tmp_path_factory.mktemp("tiny-dinov2")
    Dinov2Model(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_encoder_dir) -> Path:
    """A 2-step shapes run (no end-of-run evaluation) to evaluate."""
    run = tmp_path_factory.mktemp("eval-run") / "run"
    assert main(["train", *tiny_overrides(run, tiny_encoder_dir, **{"train.steps": 2, "eval.prompts": 0})]) == 0
    return run


def _smooth_image(rng, h, w) -> np.ndarray:
    """uint8 [h, w, 3] without pixel noise (a bilinear upsampling of a coarse random grid), so
    bicubic kernels of different libraries land close together."""
    coarse = rng.integers(0, 256, size=(max(2, h // 6), max(2, w // 6), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR))


# ---------------------------------------------------------------------------------------------
# the embedders


def test_clip_embedder_loads_by_path_and_preprocesses_like_cmmd(tiny_clip_dir, tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModelWithProjection

    clip = load_metric_network("clip", model=tiny_clip_dir)
    assert clip.size == 32 and clip.dim == 16 and not clip.training
    assert not any(p.requires_grad for p in clip.parameters())
    # google-research/cmmd's pipeline as the reference: torch bicubic squash to the model's size,
    # then CLIPImageProcessor normalising only (no resize, no crop, no rescale)
    processor = CLIPImageProcessor()
    rng = np.random.default_rng(0)
    for h, w in [(32, 32), (32, 44), (64, 96), (20, 24)]:  # as is, squash, downscale, upscale
        image = torch.from_numpy(_smooth_image(rng, h, w).copy()).permute(2, 0, 1)[None].float() / 255
        squashed = F.interpolate(image, size=(32, 32), mode="bicubic", align_corners=False)
        ref = processor(images=squashed[0].permute(1, 2, 0).numpy(), do_resize=False, do_center_crop=False,
                        do_rescale=False, return_tensors="pt")["pixel_values"]
        got = clip.preprocess(image)
        assert got.shape == ref.shape == (1, 3, 32, 32)
        assert torch.allclose(got, ref, atol=1e-5), (h, w)
    # squashed, not cropped: the black left and white right halves of a wide image both survive
    wide = torch.cat([torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32)], dim=3)
    x = clip.preprocess(wide) * clip.std + clip.mean
    assert x[..., :14].max() < 0.05 and x[..., 18:].min() > 0.95
    # the embedding: image_embeds of the saved (never loaded) model's weights, L2-normalised
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    emb = clip(images)
    assert emb.shape == (3, 16)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    original = CLIPVisionModelWithProjection.from_pretrained(tiny_clip_dir).eval()
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    x = F.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False)
    with torch.no_grad():
        ref = F.normalize(original(pixel_values=(x - mean) / std).image_embeds, dim=-1)
    assert torch.allclose(emb, ref, atol=1e-5)
    # a full CLIPModel checkpoint (what the hub's openai/clip-* are) loads too: its projection_dim
    # lives at the top level of the config, the text tower is skipped
    full = CLIPModel(CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, vocab_size=99, bos_token_id=0,
                                                 eos_token_id=1, pad_token_id=1),
                                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=8),
                                projection_dim=24))
    full.save_pretrained(tmp_path / "full-clip")
    from_full = load_metric_network("clip", model=str(tmp_path / "full-clip"))
    with torch.no_grad():
        ref = F.normalize(full.visual_projection(full.vision_model(pixel_values=(x - mean) / std).pooler_output), dim=-1)
    assert torch.allclose(from_full(images), ref, atol=1e-5)


def test_dino_embedder_is_the_layernormed_cls_token(tiny_dino_dir):
    from transformers import Dinov2Model

    from pixelrun.teachers.features import IMAGENET_MEAN, IMAGENET_STD

    dino = load_metric_network("dino", model=tiny_dino_dir)
    assert dino.size == 224 and dino.dim == 32 and not dino.training
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    emb = dino(images)
    assert emb.shape == (2, 32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    original = Dinov2Model.from_pretrained(tiny_dino_dir).eval()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():  # the CLS token (index 0) after the final LayerNorm, by hand
        hidden = original(pixel_values=(images - mean) / std, output_hidden_states=True).hidden_states[-1]
        ref = F.normalize(original.layernorm(hidden)[:, 0], dim=-1)
    assert torch.allclose(emb, ref, atol=1e-5)
    # other sizes are resized to 224 first (a square image: a plain bicubic resize)
    small = images[:, :, :64, :64]
    x = F.interpolate(small, size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1)
    assert torch.allclose(dino(small), dino(x), atol=1e-5)


def test_cmmd_of_a_set_with_itself_is_zero(tiny_clip_dir):
    from pixelrun.metrics import image_features

    clip = load_metric_network("clip", model=tiny_clip_dir)
    rng = np.random.default_rng(3)
    a = image_features(clip, np.stack([_smooth_image(rng, 32, 32) for _ in range(6)]))
    b = image_features(clip, np.full((6, 32, 32, 3), 255, np.uint8))  # blank white images
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-6)
    assert (CMMD_SIGMA, CMMD_SCALE) == (10.0, 1000.0)
    assert mmd(a, a) == pytest.approx(0.0, abs=1e-9)
    assert mmd(a, b) > 1e-3


# ---------------------------------------------------------------------------------------------
# real images and captions


def test_real_images_and_prompts_per_source(tmp_path):
    from pixelrun.data.emoji import fixed_prompts as emoji_prompts
    from pixelrun.data.shapes import fixed_prompts as shapes_prompts
    from pixelrun.evaluate import draw_real_images, real_images_and_prompts
    from pixelrun.shapes_score import score_images
    from pixelrun.train import make_batch_source

    cfg = load_config(None, ["data.resolution=32"])
    images, prompts = real_images_and_prompts(cfg, 5)
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
    assert prompts == shapes_prompts(5, seed=cfg.eval.seed)  # the shapes score's captions
    assert score_images(list(images), prompts)["placed"] == 1.0  # and their true images

    images, prompts = real_images_and_prompts(load_config(None, ["data.source=emoji", "data.resolution=32"]), 3)
    assert images.shape == (3, 32, 32, 3) and prompts == emoji_prompts(3)

    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    (data / "0.png").write_bytes(b"not an image")  # unreadable: skipped
    (data / "0.txt").write_text("broken")
    for i in range(1, 5):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"picture {i}")
    folder_cfg = load_config(None, ["data.source=folder", f"data.path={data}", "data.resolution=32",
                                    "train.batch_size=3"])
    images, prompts = real_images_and_prompts(folder_cfg, 3)
    assert images.shape == (3, 32, 32, 3) and prompts == ["picture 1", "picture 2", "picture 3"]
    # any other source: the first n items its training batch source yields, across batches
    images, prompts = draw_real_images(make_batch_source(folder_cfg), 4)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8 and len(prompts) == 4
    assert set(prompts) <= {f"picture {i}" for i in range(1, 5)}


# ---------------------------------------------------------------------------------------------
# pixelrun eval


def _eval(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["eval", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_cli_shapes_and_fd_effnet_with_cached_real_stats(tiny_run, tmp_path, capsys):
    from pixelrun.evaluate import checkpoint_config, dataset_key
    from pixelrun.metrics import stats_cache_path

    cache = tmp_path / "cache"
    args = ["--checkpoint", str(tiny_run), "--metrics", "shapes,fd-effnet", "--samples", "4", "--steps", "2",
            "--cache-dir", str(cache)]
    report = _eval(capsys, *args)
    assert set(report["metrics"]) == {"shapes", "fd-effnet"}
    assert 0 <= report["metrics"]["shapes"]["placed"] <= 1 and report["score"] == report["metrics"]["shapes"]
    assert np.isfinite(report["metrics"]["fd-effnet"]) and report["metrics"]["fd-effnet"] > 0
    s = report["settings"]
    assert (s["prompts"], s["steps"], s["sample_seed"], s["resolution"], s["guidance_mode"]) == (4, 2, 0, 32, "cfg")
    assert s["networks"]["fd-effnet"]["network"].startswith("efficientnet-lite0")
    assert s["networks"]["fd-effnet"]["weights"].endswith(".pth") and s["cache_dir"] == str(cache)
    # the real statistics were written once, keyed by dataset, resolution, n and network ...
    cfg = checkpoint_config(str(tiny_run))[0]
    path = stats_cache_path(str(cache), dataset_key(cfg), 32, 4, "efficientnet-lite0-gap1280-224px")
    assert os.path.isfile(path)
    before = os.stat(path).st_mtime_ns
    # ... and a second evaluation reads them (file untouched) and gives the same numbers
    again = _eval(capsys, *args)
    assert os.stat(path).st_mtime_ns == before and len(os.listdir(cache)) == 1
    assert again["metrics"] == report["metrics"]
    # the default is unchanged: the checkpoint's eval.metrics ([shapes]) on 64 prompts
    default = _eval(capsys, "--checkpoint", str(tiny_run), "--samples", "3", "--steps", "2")
    assert set(default["metrics"]) == {"shapes"} and default["settings"]["prompts"] == 3
    assert default["real_images"]["placed"] == 1.0 and default["settings"]["networks"] == {}


def test_eval_cli_cmmd_and_dino_mmd(tiny_run, tiny_clip_dir, tiny_dino_dir, tmp_path, capsys):
    report = _eval(capsys, "--checkpoint", str(tiny_run), "--metrics", "cmmd,dino-mmd", "--samples", "3",
                   "--steps", "1", "--clip-model", tiny_clip_dir, "--dino-model", tiny_dino_dir,
                   "--cache-dir", str(tmp_path / "cache"))
    assert set(report["metrics"]) == {"cmmd", "dino-mmd"}
    assert all(np.isfinite(v) and v >= 0 for v in report["metrics"].values())
    nets = report["settings"]["networks"]
    assert nets["cmmd"]["weights"] == tiny_clip_dir and (nets["cmmd"]["sigma"], nets["cmmd"]["scale"]) == (10.0, 1000.0)
    assert nets["dino-mmd"]["weights"] == tiny_dino_dir and nets["dino-mmd"]["network"].startswith("dino-cls-l2-224px")
    assert len(os.listdir(tmp_path / "cache")) == 2  # one file of real embeddings per network
    # eval.dino_mmd_scale is read: the MMD is linear in its scale (same images, cached real side)
    doubled = _eval(capsys, "--checkpoint", str(tiny_run), "--metrics", "dino-mmd", "--samples", "3", "--steps", "1",
                    "--dino-model", tiny_dino_dir, "--cache-dir", str(tmp_path / "cache"), "--dino-mmd-scale", "2000")
    assert doubled["metrics"]["dino-mmd"] == pytest.approx(2 * report["metrics"]["dino-mmd"], rel=1e-9)
    assert doubled["settings"]["networks"]["dino-mmd"]["scale"] == 2000.0


@pytest.mark.parametrize("args, key", [
    (["--metrics", "fid"], "eval.fid_weights"),
    (["--metrics", "fid", "--fid-weights", "/no/such/pt_inception.pth"], "eval.fid_weights"),
    (["--metrics", "cmmd", "--clip-model", "/no/such/clip"], "eval.clip_model"),
    (["--metrics", "dino-mmd", "--dino-model", "no-such-org/no-such-dino"], "eval.dino_model"),  # offline hub id
    (["--metrics", "shapes,fd-effnet,nonsense"], "--metrics"),
])
def test_eval_missing_network_fails_before_any_work(tiny_run, tmp_path, capsys, monkeypatch, args, key):
    import pixelrun.evaluate

    def no_generation(*a, **k):
        raise AssertionError("images were generated before the check")

    monkeypatch.setattr(pixelrun.evaluate, "generate", no_generation)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tiny_run), "--samples", "2", "--cache-dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pixelrun: config error: {key}:"), err


def test_fid_network_comes_from_eval_fid_weights(tmp_path):
    from pixelrun.config import ConfigError
    from pixelrun.evaluate import load_metric_networks
    from pixelrun.teachers.inception import FIDInceptionV3

    torch.save(FIDInceptionV3().state_dict(), tmp_path / "pt_inception.pth")
    cfg = load_config(None, [f"eval.fid_weights={tmp_path / 'pt_inception.pth'}"])
    networks = load_metric_networks(cfg, ["shapes", "fid"], "cpu")
    assert list(networks) == ["fid"] and networks["fid"].name == "fid-inception-v3-pool3"
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pth")  # not the FID network: names the key
    with pytest.raises(ConfigError, match=r"^eval\.fid_weights: the fid metric's network did not load"):
        load_metric_networks(load_config(None, [f"eval.fid_weights={tmp_path / 'other.pth'}"]), ["fid"], "cpu")


def test_training_fails_before_any_work_on_a_missing_network(tmp_path, tiny_encoder_dir, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides(run, tiny_encoder_dir, **{"eval.metrics": "[shapes,cmmd]",
                                                                     "eval.clip_model": str(tmp_path / "none")})]) == 2
    assert "eval.clip_model" in capsys.readouterr().err and not run.exists()


# ---------------------------------------------------------------------------------------------
# during training


def test_training_writes_eval_rows(tmp_path, tiny_encoder_dir):
    from pixelrun.train import train

    run, cache = tmp_path / "run", tmp_path / "cache"
    cfg = load_config(None, tiny_overrides(run, tiny_encoder_dir, **{
        "train.steps": 4, "eval.every": 2, "eval.prompts": 3, "sample.steps": 1,
        "eval.metrics": "[shapes,fd-effnet]", "eval.cache_dir": str(cache)}))
    summary = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/fd-effnet" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert 0 <= r["eval/shapes/placed"] <= 1 and np.isfinite(r["eval/fd-effnet"]) and "loss" not in r
    settings = json.loads((run / "eval" / "settings.json").read_text())
    assert settings["metrics"] == ["shapes", "fd-effnet"] and settings["prompts"] == 3 and settings["steps"] == 1
    assert len(os.listdir(cache)) == 1  # the real statistics, computed once for both evaluations
    assert summary["eval"]["fd-effnet"] == evals[-1]["eval/fd-effnet"] and "score" in summary
    assert json.loads((run / "eval.json").read_text())["metrics"]["fd-effnet"] == evals[-1]["eval/fd-effnet"]
