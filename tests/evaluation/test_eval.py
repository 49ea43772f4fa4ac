"""Evaluation (pixelrun/evaluation/evaluate.py, the embedders of pixelrun/evaluation/metrics.py): CMMD's CLIP and DINO-MMD's
DINOv2 loaded through the real from_pretrained path from tiny random checkpoints saved here, real
images and captions per data source, `pixelrun eval` (its eval.* and sample.* overrides), cached real
statistics, failures before any work, and evaluation rows written during training."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import one_line_error, tiny_overrides
from PIL import Image

from pixelrun.cli import main
from pixelrun.config import load_config
from pixelrun.evaluation.metrics import CLIP_MEAN, CLIP_STD, CMMD_SCALE, CMMD_SIGMA, load_metric_network, mmd


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> str:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    path = tmp_path_factory.mktemp("tiny-clip")
    CLIPVisionModelWithProjection(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_dino_dir(tmp_path_factory) -> str:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=224
    )
    path = tmp_path_factory.mktemp("tiny-dinov2")
    Dinov2Model(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_dino_reg_dir(tmp_path_factory) -> str:
    """A randomly initialised Dinov2WithRegistersModel (4 registers, patch 14, 518px position table):
    the architecture of PRX's dinov2_vitl14_reg, a thousand times narrower."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    cfg = Dinov2WithRegistersConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=518,
        num_register_tokens=4,
    )
    path = tmp_path_factory.mktemp("tiny-dinov2-reg")
    Dinov2WithRegistersModel(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_encoder_dir) -> Path:
    """A 2-step shapes run (no end-of-run evaluation) to evaluate."""
    run = tmp_path_factory.mktemp("eval-run") / "run"
    assert main(["train", *tiny_overrides(run, tiny_encoder_dir, **{"train.steps": 2, "eval.prompts": 0})]) == 0
    return run


def _cmmd_reference_input(image: np.ndarray, size: int) -> np.ndarray:
    """google-research cmmd's input, its steps written out here with PIL and numpy: io_util.py
    _center_crop_and_resize (centre square, offsets rounded down; PIL bicubic), _read_image
    (asarray, float32), compute_embeddings_for_dir (/ 255), embedding.py _clip_preprocess (a resize to
    the size it already has, then CLIP's normalize_image). [3, size, size] float32."""
    im = Image.fromarray(image)
    w, h = im.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    x = np.asarray(im.crop(box).resize((size, size), resample=Image.BICUBIC)).astype(np.float32) / 255.0
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return x.transpose(2, 0, 1)


def _high_frequency_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 [h, w, 3]: a one-pixel checkerboard plus noise, the worst case for aliasing."""
    checker = ((np.arange(h)[:, None] + np.arange(w)[None, :]) % 2 * 160).astype(np.int16)
    noise = np.random.default_rng(seed).integers(0, 96, size=(h, w, 3))
    return (checker[..., None] + noise).clip(0, 255).astype(np.uint8)


def _as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255


# ---------------------------------------------------------------------------------------------
# the embedders


def test_clip_preprocessing_is_cmmd_reference_on_a_high_frequency_1024px_image(tiny_clip_dir):
    clip = load_metric_network("clip", model=tiny_clip_dir)
    assert clip.size == 32 and clip.dim == 16 and not clip.training
    image = _high_frequency_image(1024, 1024)
    got = clip.preprocess(_as_tensor(image))[0].numpy()
    ref = _cmmd_reference_input(image, 32)
    assert got.shape == ref.shape == (3, 32, 32)
    assert np.abs(got - ref).max() < 1e-5  # float32 rounding of the normalisation, nothing more
    # The antialiasing is what the old torch squash lacked: on this image it moves pixels by a large
    # part of the range, while torch's own antialiased bicubic (an independent implementation of
    # PIL's filter) lands within a few uint8 steps of the reference.
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    for antialias, bound in ((True, 3 / 255), (False, None)):
        x = F.interpolate(_as_tensor(image), size=(32, 32), mode="bicubic", align_corners=False, antialias=antialias)
        other = ((x[0] - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / std).numpy()
        diff = (np.abs(other - ref) * std.numpy()).max()  # in [0, 1] pixel units
        assert diff < bound if antialias else diff > 0.2, (antialias, diff)


@pytest.mark.parametrize(
    "h, w, band",
    [
        (1024, 1536, (slice(None), np.r_[:256, 1280:1536])),  # wide
        (1536, 1024, (np.r_[:256, 1280:1536], slice(None))),  # tall
        (1024, 1027, (slice(None), np.r_[:1, 1025:1027])),
    ],
)  # offset rounded down
def test_clip_preprocessing_crops_a_non_square_image(tiny_clip_dir, h, w, band):
    clip = load_metric_network("clip", model=tiny_clip_dir)
    image = np.full((h, w, 3), 255, np.uint8)
    image[band] = 0  # black outside the centre square
    image[h // 2 - 100 : h // 2 + 100, w // 2 - 100 : w // 2 + 100] = (200, 128, 128)  # something inside it
    got = clip.preprocess(_as_tensor(image))[0]
    pixels = got * clip.std[0] + clip.mean[0]
    assert pixels.min() > 0.45  # no black: the bands were cut off, not squashed in
    np.testing.assert_allclose(got.numpy(), _cmmd_reference_input(image, 32), atol=1e-5)
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    centre = image[top : top + side, left : left + side]
    np.testing.assert_array_equal(got.numpy(), clip.preprocess(_as_tensor(centre))[0].numpy())


def test_clip_embedder_loads_by_path_and_embeds_the_reference_input(tiny_clip_dir, tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

    clip = load_metric_network("clip", model=tiny_clip_dir)
    assert not any(p.requires_grad for p in clip.parameters())
    images = np.random.default_rng(1).integers(0, 256, size=(3, 40, 48, 3), dtype=np.uint8)
    emb = clip(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    assert emb.shape == (3, 16)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    ref_input = torch.from_numpy(np.stack([_cmmd_reference_input(im, 32) for im in images]))
    original = CLIPVisionModelWithProjection.from_pretrained(tiny_clip_dir).eval()  # the saved weights
    with torch.no_grad():
        ref = F.normalize(original(pixel_values=ref_input).image_embeds, dim=-1)
    assert torch.allclose(emb, ref, atol=1e-5)
    # a full CLIPModel checkpoint (what the hub's openai/clip-* are) loads too: its projection_dim
    # lives at the top level of the config, the text tower is skipped
    full = CLIPModel(
        CLIPConfig(
            text_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                vocab_size=99,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            ),
            projection_dim=24,
        )
    )
    full.save_pretrained(tmp_path / "full-clip")
    from_full = load_metric_network("clip", model=str(tmp_path / "full-clip"))
    with torch.no_grad():
        ref = F.normalize(full.visual_projection(full.vision_model(pixel_values=ref_input).pooler_output), dim=-1)
    assert torch.allclose(from_full(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255), ref, atol=1e-5)


def _dino_by_hand(model, images: torch.Tensor, size: int) -> torch.Tensor:
    """PRX's DINOFeatureExtractor on [0, 1] images: ImageNet mean / std, bicubic squash to size
    (no antialiasing), then the CLS token after the final LayerNorm, L2-normalised."""
    from pixelrun.teachers.features import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = F.interpolate((images - mean) / std, size=(size, size), mode="bicubic", align_corners=False)
    with torch.no_grad():
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        return F.normalize(model.layernorm(hidden)[:, 0], dim=-1)


def test_dino_with_registers_loads_by_path_at_prx_settings(tiny_dino_reg_dir):
    from transformers import Dinov2WithRegistersModel

    from pixelrun.config import Config

    e = Config().eval  # the defaults are PRX's callback's: dinov2_vitl14_reg, resize 518
    assert (e.dino_model, e.dino_resolution) == ("facebook/dinov2-with-registers-large", 518)
    dino = load_metric_network("dino", model=tiny_dino_reg_dir, size=e.dino_resolution)
    assert dino.size == 518 and dino.dim == 32 and dino.patch == 14 and not dino.training
    assert type(dino.model).__name__ == "Dinov2WithRegistersModel" and "518px" in dino.name
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    emb = dino(images)
    assert emb.shape == (2, 32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    # index 0 is the CLS token, before the 4 registers: the saved (never reloaded) weights, by hand
    original = Dinov2WithRegistersModel.from_pretrained(tiny_dino_reg_dir).eval()
    assert torch.allclose(emb, _dino_by_hand(original, images, 518), atol=1e-5)


def test_dino_embedder_at_224_is_the_layernormed_cls_token(tiny_dino_dir):
    from transformers import Dinov2Model

    dino = load_metric_network("dino", model=tiny_dino_dir, size=224)
    assert dino.size == 224 and dino.dim == 32 and not dino.training
    original = Dinov2Model.from_pretrained(tiny_dino_dir).eval()
    for side in (224, 64, 300):  # as is, up, down: a squash with torch's bicubic, no antialiasing
        images = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(side))
        assert torch.allclose(dino(images), _dino_by_hand(original, images, 224), atol=1e-5), side


def test_cmmd_of_a_set_with_itself_is_zero(tiny_clip_dir):
    from pixelrun.evaluation.metrics import image_features

    clip = load_metric_network("clip", model=tiny_clip_dir)
    a = image_features(clip, np.stack([_high_frequency_image(32, 32, seed) for seed in range(6)]))
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
    from pixelrun.data.sources import make_batch_source
    from pixelrun.evaluation.heldout import draw_real_images, held_out_captions, real_images_and_prompts
    from pixelrun.evaluation.shapes_score import score_images

    cfg = load_config(None, ["data.resolution=32"])
    images, prompts = real_images_and_prompts(cfg, 5)
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
    assert prompts == shapes_prompts(5, seed=cfg.eval.seed)  # the shapes score's captions
    assert score_images(list(images), prompts)["placed"] == 1.0  # and their true images

    assert held_out_captions(cfg, 5) == prompts  # the same captions without rendering
    emoji_cfg = load_config(None, ["data.source=emoji", "data.resolution=32"])
    images, prompts = real_images_and_prompts(emoji_cfg, 3)
    assert images.shape == (3, 32, 32, 3) and prompts == emoji_prompts(3) == held_out_captions(emoji_cfg, 3)

    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    (data / "0.png").write_bytes(b"not an image")  # unreadable: skipped
    (data / "0.txt").write_text("broken")
    for i in range(1, 5):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"picture {i}")
    folder_cfg = load_config(
        None,  # no held-out split: the folder's first items (the split: tests/data/test_val_split.py)
        ["data.source=folder", f"data.path={data}", "data.resolution=32", "train.batch_size=3", "data.val_count=0"],
    )
    images, prompts = real_images_and_prompts(folder_cfg, 3)
    assert images.shape == (3, 32, 32, 3) and prompts == ["picture 1", "picture 2", "picture 3"]
    assert held_out_captions(folder_cfg, 3) == prompts
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
    from pixelrun.evaluation.heldout import dataset_key
    from pixelrun.evaluation.real_stats import stats_cache_path
    from pixelrun.infra.inference import checkpoint_config

    cache = tmp_path / "cache"
    args = [
        "--checkpoint",
        str(tiny_run),
        "eval.metrics=[shapes,fd-effnet]",
        "eval.prompts=4",
        "sample.steps=2",
        f"eval.cache_dir={cache}",
    ]
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
    # shapes data: the score of predictions from the held-out images, the same on every call
    assert list(report["denoise"]) == ["0.05", "0.2", "0.5"] and again["denoise"] == report["denoise"]
    # the default is unchanged: the checkpoint's eval.metrics ([shapes]) on 64 prompts
    default = _eval(capsys, "--checkpoint", str(tiny_run), "eval.prompts=3", "sample.steps=2")
    assert set(default["metrics"]) == {"shapes"} and default["settings"]["prompts"] == 3
    assert default["real_images"]["placed"] == 1.0 and default["settings"]["networks"] == {}


def test_eval_cli_cmmd_and_dino_mmd(tiny_run, tiny_clip_dir, tiny_dino_reg_dir, tiny_dino_dir, tmp_path, capsys):
    report = _eval(
        capsys,
        "--checkpoint",
        str(tiny_run),
        "eval.metrics=[cmmd,dino-mmd]",
        "eval.prompts=3",
        "sample.steps=1",
        f"eval.clip_model={tiny_clip_dir}",
        f"eval.dino_model={tiny_dino_reg_dir}",
        f"eval.cache_dir={tmp_path / 'cache'}",
    )
    assert set(report["metrics"]) == {"cmmd", "dino-mmd"}
    assert all(np.isfinite(v) and v >= 0 for v in report["metrics"].values())
    nets = report["settings"]["networks"]
    # the settings name each model, its input resolution and its reference's preprocessing
    assert nets["cmmd"]["weights"] == tiny_clip_dir and (nets["cmmd"]["sigma"], nets["cmmd"]["scale"]) == (10.0, 1000.0)
    assert nets["cmmd"]["resolution"] == 32 and "centre crop" in nets["cmmd"]["preprocessing"]
    assert "PIL bicubic" in nets["cmmd"]["preprocessing"] and "cmmd/io_util.py" in nets["cmmd"]["preprocessing"]
    assert nets["dino-mmd"]["weights"] == tiny_dino_reg_dir and nets["dino-mmd"]["resolution"] == 518
    assert nets["dino-mmd"]["network"].startswith("dino-cls-l2-518px") and "squash" in nets["dino-mmd"]["preprocessing"]
    assert len(os.listdir(tmp_path / "cache")) == 2  # one file of real embeddings per network
    # eval.dino_mmd_scale is read: the MMD is linear in its scale (same images, cached real side)
    doubled = _eval(
        capsys,
        "--checkpoint",
        str(tiny_run),
        "eval.metrics=[dino-mmd]",
        "eval.prompts=3",
        "sample.steps=1",
        f"eval.dino_model={tiny_dino_reg_dir}",
        f"eval.cache_dir={tmp_path / 'cache'}",
        "eval.dino_mmd_scale=2000",
    )
    assert doubled["metrics"]["dino-mmd"] == pytest.approx(2 * report["metrics"]["dino-mmd"], rel=1e-9)
    assert doubled["settings"]["networks"]["dino-mmd"]["scale"] == 2000.0
    # the 224px base model stays a setting; its real side is a file of its own
    base = _eval(
        capsys,
        "--checkpoint",
        str(tiny_run),
        "eval.metrics=[dino-mmd]",
        "eval.prompts=3",
        "sample.steps=1",
        f"eval.dino_model={tiny_dino_dir}",
        "eval.dino_resolution=224",
        f"eval.cache_dir={tmp_path / 'cache'}",
    )
    assert base["settings"]["networks"]["dino-mmd"]["resolution"] == 224 and len(os.listdir(tmp_path / "cache")) == 3


def test_dino_resolution_must_fit_the_patch(tiny_dino_reg_dir):
    from pixelrun.config import ConfigError
    from pixelrun.evaluation.evaluate import load_metric_networks

    cfg = load_config(None, [f"eval.dino_model={tiny_dino_reg_dir}", "eval.dino_resolution=500"])
    with pytest.raises(ConfigError, match=r"^eval\.dino_resolution: 500 is not a multiple of .* patch 14"):
        load_metric_networks(cfg, ["dino-mmd"], "cpu")


@pytest.mark.parametrize(
    "args, key",
    [
        (["eval.metrics=[fid]"], "eval.fid_weights"),
        (["eval.metrics=[fid]", "eval.fid_weights=/no/such/pt_inception.pth"], "eval.fid_weights"),
        (["eval.metrics=[cmmd]", "eval.clip_model=/no/such/clip"], "eval.clip_model"),
        (["eval.metrics=[dino-mmd]", "eval.dino_model=no-such-org/no-such-dino"], "eval.dino_model"),  # offline hub id
        (["eval.metrics=[shapes,fd-effnet,nonsense]"], "eval.metrics[2]"),
        (["eval.metrics=[]"], "eval.metrics"),
    ],
)
def test_eval_missing_network_fails_before_any_work(tiny_run, tmp_path, capsys, monkeypatch, args, key):
    import pixelrun.evaluation.evaluate

    def no_generation(*a, **k):
        raise AssertionError("images were generated before the check")

    monkeypatch.setattr(pixelrun.evaluation.evaluate, "generate", no_generation)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tiny_run), "eval.prompts=2", f"eval.cache_dir={tmp_path}", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pixelrun: config error: {key}:"), err


@pytest.fixture(scope="module")
def emoji_run(tmp_path_factory, tiny_encoder_dir) -> Path:
    """A 1-step run on the emoji data, whose eval.metrics stay the default [shapes]."""
    run = tmp_path_factory.mktemp("emoji-run") / "run"
    assert (
        main(
            [
                "train",
                *tiny_overrides(run, tiny_encoder_dir, **{"data.source": "emoji", "train.steps": 1, "eval.prompts": 0}),
            ]
        )
        == 0
    )
    return run


def test_eval_on_emoji_defaults_to_fd_effnet_writes_out_and_reads_no_real_image_on_a_cache_hit(
    emoji_run, tmp_path, capsys, monkeypatch
):
    import pixelrun.evaluation.evaluate

    loads = []
    real_loader = pixelrun.evaluation.evaluate.real_images_and_prompts

    def counting_loader(cfg, n):  # the real loader, counted
        loads.append(n)
        return real_loader(cfg, n)

    monkeypatch.setattr(pixelrun.evaluation.evaluate, "real_images_and_prompts", counting_loader)
    out = tmp_path / "new" / "dir" / "e.json"
    args = [
        "eval",
        "--checkpoint",
        str(emoji_run),
        "eval.prompts=3",
        "sample.steps=1",
        f"eval.cache_dir={tmp_path / 'cache'}",
        "--out",
        str(out),
    ]
    capsys.readouterr()
    assert main(args) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    # the folder was created, and the same result was printed and written
    assert json.loads(out.read_text()) == printed and not list(out.parent.glob(".*tmp"))
    # the default [auto] is the offline fd-effnet on emoji, with the warning that 3 samples are far
    # fewer than its 1280 feature dimensions
    assert set(printed["metrics"]) == {"fd-effnet"} and printed["settings"]["data"] == "emoji-heldout"
    assert "denoise" not in printed  # the shapes scorer reads only shapes
    assert "do not apply" not in captured.err
    assert "warning: fd-effnet on 3 samples, fewer than its 1280 feature dimensions" in captured.err
    assert loads == [3]  # the real images, once, for the real statistics
    # again: the real side is cached, so only its captions are read; the numbers are the same
    assert main(args) == 0
    assert loads == [3] and json.loads(capsys.readouterr().out)["metrics"] == printed["metrics"]


@pytest.mark.parametrize(
    "args, key",
    [
        (["eval.prompts=0"], "eval.prompts"),
        (["--out", "."], "--out"),
        (["eval.nosuchkey=1"], "eval.nosuchkey"),  # validated like `pixelrun train` overrides
        (["eval.prompt=3"], "eval.prompt"),  # with a hint: did you mean eval.prompts?
        (["sample.guidance=0.5"], "sample.guidance"),
        (["sample.guidance_mode=self"], "sample.guidance_mode"),  # a checkpoint trained without routing
        (["model.depth=3"], "model.depth"),  # the checkpoint fixes the model
        (["--samples", "3", "--steps", "2"], "--samples"),  # a former flag names the override to write
    ],
)
def test_eval_bad_override_or_out_is_one_line_before_any_work(tiny_run, capsys, monkeypatch, args, key):
    import pixelrun.evaluation.evaluate

    def no_work(*a, **k):
        raise AssertionError("work started before the check")

    monkeypatch.setattr(pixelrun.evaluation.evaluate, "generate", no_work)
    monkeypatch.setattr(pixelrun.evaluation.evaluate, "real_images_and_prompts", no_work)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tiny_run), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pixelrun: config error: {key}:"), err


def test_eval_override_errors_say_what_to_write(tiny_run, capsys, monkeypatch):
    """An unknown key gets the config's hint, a key the checkpoint fixes says so, and the flags that
    used to set config keys are refused with the overrides to write instead (quoted for the shell)."""
    import pixelrun.evaluation.evaluate

    def no_work(*a, **k):
        raise AssertionError("work started before the check")

    monkeypatch.setattr(pixelrun.evaluation.evaluate, "generate", no_work)
    capsys.readouterr()
    line = ["eval", "--checkpoint", str(tiny_run)]
    assert main([*line, "eval.prompt=3"]) == 2
    one_line_error(capsys, "pixelrun: config error: eval.prompt: unknown key; did you mean eval.prompts?")
    assert main([*line, "model.depth=3"]) == 2
    one_line_error(capsys, "model.depth: pixelrun eval changes only eval.* and sample.* keys")
    assert main([*line, "sample.guidance_mode=self"]) == 2
    one_line_error(capsys, "sample.guidance_mode:", "trained without routing", "use sample.guidance_mode=cfg")
    assert (
        main(
            [
                *line,
                "--samples",
                "256",
                "--metrics",
                "shapes,fd-effnet",
                "--guidance",
                "1,2,4",
                "--clip-model",
                "/my models/clip",
            ]
        )
        == 2
    )
    one_line_error(
        capsys,
        "config error: --samples: sets a config key",
        "write eval.prompts=256 "
        "'eval.metrics=[shapes,fd-effnet]' sample.guidance=1 'eval.guidance=[2,4]' "
        "'eval.clip_model=/my models/clip' instead of --samples 256",
    )


def test_eval_of_a_run_that_evaluated_nothing_takes_64_captions(tiny_run, capsys, monkeypatch):
    """tiny_run trained with eval.prompts=0 (no evaluations): `pixelrun eval` without an eval.prompts
    override evaluates the key's default 64, and says so; an override is taken as given."""
    import pixelrun.evaluation.evaluate

    seen = []

    class Stop(Exception):
        pass

    def evaluator(cfg, metrics, device, **kwargs):
        seen.append((cfg.eval.prompts, metrics))
        raise Stop

    monkeypatch.setattr(pixelrun.evaluation.evaluate, "Evaluator", evaluator)
    capsys.readouterr()
    with pytest.raises(Stop):
        main(["eval", "--checkpoint", str(tiny_run)])
    assert seen == [(64, ["shapes"])]
    assert "the checkpoint's eval.prompts is 0; evaluating 64 captions" in capsys.readouterr().err
    with pytest.raises(Stop):
        main(["eval", "--checkpoint", str(tiny_run), "eval.prompts=5", "eval.metrics=[fd-effnet]"])
    assert seen[-1] == (5, ["fd-effnet"]) and "evaluating 64" not in capsys.readouterr().err


def test_hub_model_neither_cached_nor_reachable_fails_at_once(tmp_path, tiny_clip_dir, monkeypatch):
    import shutil

    from huggingface_hub import constants

    import pixelrun.infra.hub
    from pixelrun.config import ConfigError
    from pixelrun.evaluation.evaluate import load_metric_networks

    probes = []

    def unreachable(endpoint, timeout=5.0):  # what one HEAD request answers without a network
        probes.append(endpoint)
        return False

    monkeypatch.setattr(pixelrun.infra.hub, "reachable", unreachable)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = load_config(None, ["eval.clip_model=someorg/tiny-clip"])
    with pytest.raises(
        ConfigError,
        match=r"^eval\.clip_model: .* neither a local model folder nor in the Hugging "
        r"Face cache .* does not answer",
    ):
        load_metric_networks(cfg, ["cmmd"], "cpu")
    assert probes == [constants.ENDPOINT]  # one probe and no download tried: nothing waits on the network
    # the same id in the Hugging Face cache loads from it, with no request
    repo = tmp_path / "hub" / "models--someorg--tiny-clip"
    shutil.copytree(tiny_clip_dir, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    assert load_metric_networks(cfg, ["cmmd"], "cpu")["cmmd"].name.endswith("(someorg/tiny-clip)")
    # HF_HUB_OFFLINE: no probe at all
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    probes.clear()
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        load_metric_networks(load_config(None, ["eval.dino_model=someorg/no-such-dino"]), ["dino-mmd"], "cpu")
    assert probes == []


def test_fid_network_comes_from_eval_fid_weights(tmp_path):
    from pixelrun.config import ConfigError
    from pixelrun.evaluation.evaluate import load_metric_networks
    from pixelrun.evaluation.inception import FIDInceptionV3

    torch.save(FIDInceptionV3().state_dict(), tmp_path / "pt_inception.pth")
    cfg = load_config(None, [f"eval.fid_weights={tmp_path / 'pt_inception.pth'}"])
    networks = load_metric_networks(cfg, ["shapes", "fid"], "cpu")
    assert list(networks) == ["fid"] and networks["fid"].name == "fid-inception-v3-pool3"
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pth")  # not the FID network: names the key
    with pytest.raises(ConfigError, match=r"^eval\.fid_weights: the fid metric's network did not load"):
        load_metric_networks(load_config(None, [f"eval.fid_weights={tmp_path / 'other.pth'}"]), ["fid"], "cpu")


def test_training_fails_before_any_work_on_a_missing_network(tmp_path, tiny_encoder_dir, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *tiny_overrides(
                    run,
                    tiny_encoder_dir,
                    **{"eval.metrics": "[shapes,cmmd]", "eval.clip_model": str(tmp_path / "none")},
                ),
            ]
        )
        == 2
    )
    assert "eval.clip_model" in capsys.readouterr().err and not run.exists()


# ---------------------------------------------------------------------------------------------
# during training


def test_training_writes_eval_rows(tmp_path, tiny_encoder_dir):
    from pixelrun.run.train import train

    run, cache = tmp_path / "run", tmp_path / "cache"
    cfg = load_config(
        None,
        tiny_overrides(
            run,
            tiny_encoder_dir,
            **{
                "train.steps": 4,
                "eval.every": 2,
                "eval.prompts": 3,
                "sample.steps": 1,
                "eval.metrics": "[shapes,fd-effnet]",
                "eval.cache_dir": str(cache),
            },
        ),
    )
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


def test_eval_guidance_sweep_prints_a_row_per_scale(tiny_run, capsys):
    """sample.guidance=1 'eval.guidance=[3]' evaluates at each scale with the same prompts and noise: the
    first scale's result is the plain `sample.guidance=1` result, and each scale gets one printed row."""
    args = ["--checkpoint", str(tiny_run), "eval.prompts=3", "sample.steps=2"]
    capsys.readouterr()
    assert main(["eval", *args, "sample.guidance=1", "eval.guidance=[3]"]) == 0
    printed = capsys.readouterr()
    sweep = json.loads(printed.out)
    rows = [line for line in printed.err.splitlines() if line.startswith("guidance ")]
    assert [r["guidance"] for r in sweep["guidance_sweep"]] == [1.0, 3.0] and len(rows) == 2
    single = _eval(capsys, *args, "sample.guidance=1")
    assert sweep["guidance_sweep"][0]["metrics"] == single["metrics"] == sweep["metrics"]
    assert "per_prompt" not in single and "prompts" not in single
    assert main(["eval", *args, "sample.guidance=1", "eval.guidance=[0.5]"]) == 2
    assert "config error: eval.guidance[0]: must be >= 1" in capsys.readouterr().err
