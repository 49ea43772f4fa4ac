"""`model.init`: a diffusers PRXTransformer2DModel (here a tiny random one with the bottleneck and the
resolution embedder, saved by diffusers inside a PRXPixelPipeline) starts a run; `pixelrun sample` of
it draws the pipeline's pixels, and the export gives its tensors back bit for bit. The resolution
embedder against a hand computation and against diffusers' own module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import one_line_error, tiny_overrides
from PIL import Image

from pixelrun.cli import main
from pixelrun.config import ConfigError

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("ftfy", reason="PRXPixelPipeline cleans prompts with ftfy")
from safetensors.torch import load_file, save_file  # noqa: E402

PROMPTS = [
    "a large red circle in the top left on a white background",
    "a small blue square",
    "two green triangles",
    "a yellow star in the middle",
    "a purple circle and an orange square",
    "",
    "a black background",
    "a cyan triangle at the bottom right",
]
# The released model's layout, tiny: pixel patches through a bottleneck, the resolution embedder.
TINY = dict(
    in_channels=3,
    patch_size=8,
    context_in_dim=32,  # the tiny BERT of conftest
    hidden_size=32,
    mlp_ratio=2.0,  # not the tiny preset's 3.5: the architecture must come from config.json
    num_heads=2,
    depth=2,
    axes_dim=[8, 8],
    bottleneck_size=16,
    resolution_embeds=True,
)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Random normal weights everywhere (a zero-initialised output would draw a constant image)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)


@pytest.fixture(scope="module")
def released(tmp_path_factory, tiny_encoder_dir):
    """A PRXPixelPipeline folder as diffusers saves one, around a random tiny transformer."""
    from transformers import AutoTokenizer, BertModel

    transformer = diffusers.PRXTransformer2DModel(**TINY)
    _randomise(transformer, 11)
    pipe = diffusers.PRXPixelPipeline(
        transformer=transformer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        text_encoder=BertModel.from_pretrained(tiny_encoder_dir),
        tokenizer=AutoTokenizer.from_pretrained(tiny_encoder_dir),
        default_sample_size=32,
        prompt_max_tokens=16,
        noise_scale=2.0,
    )
    out = tmp_path_factory.mktemp("released") / "pipe"
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def _overrides(run, encoder, init, **extra) -> list[str]:
    # One step at a learning rate below any fp32 weight's half ulp (AdamW's first update is about
    # lr * sign(g)): the run's weights and its EMA stay the imported ones, bit for bit.
    more = {"model.init": init, "train.steps": 1, "optimizer.lr": 1e-30, "eval.prompts": 0}
    more |= {"objective.noise_scale": 2.0, "sample.grid_prompts": 0, "cadence.log_every": 1, **extra}
    return tiny_overrides(run, encoder, **more)


def _pipe_images(folder, seed: int) -> np.ndarray:
    """The pipeline's images of PROMPTS, drawn from the noise one call with all 8 prompts and
    `generator=torch.Generator().manual_seed(seed)` would draw. Called one prompt at a time with that
    noise as `latents`: the installed PRXPixelPipeline passes a timestep of batch 2 with 2N images under
    CFG, which its transformer cannot broadcast for N > 1 (the export's own test uses one prompt)."""
    pipe = diffusers.PRXPixelPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(len(PROMPTS), 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2.0
    out = []
    for i, prompt in enumerate(PROMPTS):
        image = pipe(
            prompt,
            num_inference_steps=4,
            guidance_scale=3.0,
            height=32,
            width=32,
            latents=noise[i : i + 1],
            use_resolution_binning=False,
        ).images[0]
        out.append(np.asarray(image.convert("RGB")).astype(int))
    return np.stack(out)


def test_imported_model_samples_as_the_pipeline_and_exports_back_bit_for_bit(
    released, tiny_encoder_dir, tmp_path, capsys
):
    run = tmp_path / "run"
    assert main(["train", *_overrides(run, tiny_encoder_dir, str(released))]) == 0
    saved = (run / "config.yaml").read_text()
    assert f"init: {released}" in saved and "bottleneck_size: 16" in saved and "resolution_embeds: vec" in saved

    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    sample = ["sample", "--checkpoint", str(run), *prompts, "sample.steps=4", "sample.guidance=3", "sample.seed=7"]
    assert main([*sample, "--out", str(tmp_path / "ours")]) == 0
    ours = np.stack([np.asarray(Image.open(tmp_path / "ours" / f"{i:03d}.png").convert("RGB")) for i in range(8)])
    ours = ours.astype(int)
    theirs = _pipe_images(released, 7)
    assert ours.shape == theirs.shape == (8, 32, 32, 3)
    assert ours.std() > 10 and len(np.unique(ours)) > 50  # not a constant image
    d = np.abs(ours - theirs)
    with capsys.disabled():  # shown with -s (capsys reads the resume's output below)
        print(f"max pixel difference, pixelrun sample vs the released pipeline: {d.max()}/255 over {d.size} values")
    assert d.max() == 0

    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run), "--format", "diffusers", "--out", str(out)]) == 0
    back = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    given = load_file(str(released / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert sorted(back) == sorted(given) and any(k.startswith("resolution_embedder.") for k in back)
    assert all(torch.equal(back[k], given[k]) and back[k].dtype == given[k].dtype for k in given)
    exported = diffusers.PRXPixelPipeline.from_pretrained(str(out)).transformer.config
    assert exported.resolution_embeds is True and exported.bottleneck_size == 16
    # the same command, one step longer, resumes the run's own checkpoint (its config.yaml holds the
    # architecture as explicit model.* values, which model.init's config.json gives again)
    assert main(["train", *_overrides(run, tiny_encoder_dir, str(released), **{"train.steps": 2})]) == 0
    assert "resuming from" in capsys.readouterr().out


def test_a_latent_checkpoint_is_refused_in_one_line(tmp_path, tiny_encoder_dir, capsys):
    latent = tmp_path / "latent"
    lat = dict(TINY, in_channels=16, patch_size=2, bottleneck_size=None, resolution_embeds=False, depth=1)
    diffusers.PRXTransformer2DModel(**lat).save_pretrained(str(latent))
    assert main(["train", *_overrides(tmp_path / "run", tiny_encoder_dir, str(latent))]) == 2
    one_line_error(capsys, "model.init:", "latent-space", "in_channels 16", "pixel space", "cannot train it")
    assert not (tmp_path / "run").exists()


def test_an_explicit_other_architecture_is_refused_naming_both(released, tmp_path, tiny_encoder_dir, capsys):
    run = tmp_path / "run"
    assert main(["train", *_overrides(run, tiny_encoder_dir, str(released), **{"model.depth": 3})]) == 2
    one_line_error(capsys, "model.depth: is 3 but model.init", "has depth 2")
    assert main(["train", *_overrides(run, tiny_encoder_dir, str(released), **{"model.preset": "small"})]) == 2
    one_line_error(capsys, "model.preset: small has mlp_ratio 3.5 but model.init", "has mlp_ratio 2.0")
    # a position table the released model was not trained with (and could not export back to)
    assert main(["train", *_overrides(run, tiny_encoder_dir, str(released), **{"model.pos_embed": "sincos"})]) == 2
    one_line_error(capsys, "model.pos_embed: is sincos but model.init", "has pos_embed none")
    assert main(["train", *_overrides(run, tiny_encoder_dir, str(released), **{"model.pixel_head": 16})]) == 2
    one_line_error(capsys, "model.pixel_head: is 16 but model.init", "has pixel_head 0")
    assert not run.exists()
    # the text encoder must give the width the transformer's text projection takes
    assert main(["train", *_overrides(run, "minilm", str(released))]) == 2
    one_line_error(capsys, "model.init:", "takes 32-wide embeddings (context_in_dim)", "gives 384-wide ones")
    assert not (run / "config.yaml").exists()


def test_a_missing_tensor_is_refused_naming_it(released, tmp_path, tiny_encoder_dir, capsys):
    import shutil

    bare = tmp_path / "bare"  # a bare PRXTransformer2DModel folder this time
    shutil.copytree(released / "transformer", bare)
    weights = bare / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    del state["blocks.1.attention.norm_added_k.weight"]
    save_file(state, str(weights))
    run = tmp_path / "run"
    assert main(["train", *_overrides(run, tiny_encoder_dir, str(bare))]) == 2
    one_line_error(capsys, "model.init:", "tensor blocks.1.attention.norm_added_k.weight [16]", "is missing")
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()


def test_a_cached_hub_id_offline_is_read_from_the_cache(released, tmp_path, monkeypatch):
    """A hub id resolves to its snapshot in the Hugging Face cache (laid out as huggingface_hub lays
    it out), the pipeline's transformer/ inside it, with no network."""
    import shutil

    from huggingface_hub import constants

    from pixelrun.model.import_diffusers import architecture, locate

    cache, rev = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-prxpixel"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    shutil.copytree(released / "transformer", repo / "snapshots" / rev / "transformer")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder = locate("someone/tiny-prxpixel")
    assert folder == repo / "snapshots" / rev / "transformer"
    fields, text_dim = architecture(folder)
    assert fields["bottleneck_size"] == 16 and fields["resolution_embeds"] == "vec" and text_dim == 32


def test_an_uncached_hub_id_offline_is_one_line(tmp_path, tiny_encoder_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["train", *_overrides(tmp_path / "run", tiny_encoder_dir, "Photoroom/prxpixel-t2i")]) == 2
    # the preflight finds it with every other network (pixelrun/run/preflight.py)
    one_line_error(
        capsys, "model.init=Photoroom/prxpixel-t2i (not in the Hugging Face cache, and HF_HUB_OFFLINE is set)"
    )
    from pixelrun.model.import_diffusers import locate  # the import's own reading, for sample and export

    with pytest.raises(ConfigError, match="is neither a local folder") as e:
        locate("Photoroom/prxpixel-t2i")
    assert "HF_HUB_OFFLINE is set" in str(e.value)


def test_prxpixel_7b_preset_is_the_released_layout_in_diffusers():
    """The preset builds the layout of the port that loads Photoroom/prxpixel-t2i (see PRESETS), with
    diffusers' parameter count; on the meta device, so no memory."""
    from pixelrun.model.denoiser import build_model, count_parameters

    with torch.device("meta"):
        ours = build_model("prxpixel-7b", 2048)
        ref = diffusers.PRXTransformer2DModel(
            in_channels=3,
            patch_size=16,
            context_in_dim=2048,
            hidden_size=3584,
            mlp_ratio=3.5,
            num_heads=28,
            depth=24,
            axes_dim=[64, 64],
            bottleneck_size=768,
            resolution_embeds=True,
        )
    names = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert names == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    print(f"prxpixel-7b: {count_parameters(ours):,} parameters")
    assert 6.5e9 < count_parameters(ours) < 7.5e9


def test_a_lora_fine_tune_of_the_released_model(released, tmp_path, tiny_encoder_dir, capsys):
    """LoRA on model.init's weights: they stay frozen (the merged export differs from them only by
    alpha / rank * B @ A on each adapted linear, by hand), the checkpoint holds the adapters alone, and
    `sample` of the checkpoint (which reads the released weights again) draws what the export draws."""
    from safetensors.torch import load_file

    from pixelrun.infra import checkpoint as ckpt

    run, merged = tmp_path / "lora", tmp_path / "merged"
    lora = {"train.lora.rank": 2, "train.lora.alpha": 4.0, "train.steps": 3, "optimizer.lr": 0.02}
    lora |= {"ema.decay": 0.0, "optimizer.name": "adamw"}  # the EMA adapters are the last ones
    assert main(["train", *_overrides(run, tiny_encoder_dir, str(released), **lora)]) == 0
    assert "LoRA: the adapters start fresh on the frozen weights of" in capsys.readouterr().out
    saved = ckpt.read_tensors(ckpt.latest_checkpoint(run))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved), sorted(saved)[:4]

    assert main(["export", "--checkpoint", str(run), "--out", str(merged)]) == 0
    weights = load_file(str(merged / "model.safetensors"))
    base = load_file(str(released / "transformer" / "diffusion_pytorch_model.safetensors"))
    adapted = {k.removeprefix("ema.").split(".lora_A.")[0] for k in saved if k.startswith("ema.") and ".lora_A." in k}
    assert len(adapted) == 12  # 6 linears in each of 2 blocks
    for name, w in weights.items():
        m = name.removesuffix(".weight")
        if m in adapted:
            a, b = saved[f"ema.{m}.lora_A.default.weight"], saved[f"ema.{m}.lora_B.default.weight"]
            assert (b @ a).abs().max() > 1e-5, m  # the adapters trained
            torch.testing.assert_close(w, base[name] + 2.0 * (b @ a), rtol=0, atol=1e-6, msg=name)
        else:
            assert torch.equal(w, base[name]), name  # frozen, bit for bit

    prompt = PROMPTS[0]
    for src, dst in ((run, "from_run"), (merged, "from_export")):
        assert main(["sample", "--checkpoint", str(src), "--prompt", prompt, "--out", str(tmp_path / dst)]) == 0
    a, b = (np.asarray(Image.open(next((tmp_path / d).glob("*.png")))) for d in ("from_run", "from_export"))
    assert np.array_equal(a, b)


def test_imported_on_two_ranks_under_fsdp2_is_the_released_model(released, tiny_encoder_dir, tmp_path):
    """model.init into a model sharded by FSDP2 on 2 gloo ranks (each rank reads the file, the shards
    are its slices): one step at lr 1e-30 and the export gives the released tensors back bit for bit."""
    import os
    import subprocess
    import sys

    run, out = tmp_path / "run", tmp_path / "export"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pixelrun"]
    proc = subprocess.run(
        [*cmd, "train", *_overrides(run, tiny_encoder_dir, str(released), **{"train.batch_size": 2})],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["export", "--checkpoint", str(run), "--format", "diffusers", "--out", str(out)]) == 0
    back = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    given = load_file(str(released / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert sorted(back) == sorted(given) and all(torch.equal(back[k], given[k]) for k in given)
