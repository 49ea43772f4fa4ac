"""`pixelrun export --format diffusers`: diffusers' PRXPixelPipeline loads the directory and, with
the same prompt, seed, steps and CFG scale, draws the image that `pixelrun sample` draws."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from PIL import Image

from pixelrun.cli import main
from pixelrun.config import load_config
from pixelrun.model.denoiser import PRXDenoiser
from pixelrun.run.train import train

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("ftfy", reason="PRXPixelPipeline cleans prompts with ftfy")

PROMPT = "a large red circle in the top left on a white background"


def _random_init(self):
    """Random normal weights everywhere (the real init zeroes the output layer and the adaLN, so a
    barely trained tiny model draws near-constant images and the comparison would mean little)."""
    g = torch.Generator().manual_seed(5)
    for p in self.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_encoder_dir):
    """A run saved by the real training code (2 steps), from random normal weights."""
    run = tmp_path_factory.mktemp("export-run")
    mp = pytest.MonkeyPatch()
    mp.setattr(PRXDenoiser, "reset_parameters", _random_init)
    try:
        train(
            load_config(
                None,
                tiny_overrides(
                    run,
                    tiny_encoder_dir,
                    **{"train.steps": 2, "eval.prompts": 0, "objective.noise_scale": 1.5, "sample.shift": 2.0},
                ),
            )
        )
    finally:
        mp.undo()
    return run


def test_pipeline_reproduces_pixelrun_sample(run_dir, tmp_path):
    out = tmp_path / "pipe"
    assert main(["export", "--checkpoint", str(run_dir), "--format", "diffusers", "--out", str(out)]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "PRXTransformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]

    steps, guidance, seed = 4, 3.0, 7
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(run_dir),
                "--prompt",
                PROMPT,
                "--out",
                str(tmp_path / "ours"),
                f"sample.steps={steps}",
                f"sample.guidance={guidance}",
                f"sample.seed={seed}",
            ]
        )
        == 0
    )
    ours = np.asarray(Image.open(tmp_path / "ours" / "000.png").convert("RGB")).astype(int)

    pipe = diffusers.PRXPixelPipeline.from_pretrained(str(out))
    assert pipe.config.noise_scale == 1.5 and pipe.config.prompt_max_tokens == 16
    assert pipe.config.default_sample_size == 32
    assert pipe.scheduler.config.shift == 2.0
    assert pipe.transformer.config.bottleneck_size is None and pipe.transformer.config.patch_size == 8
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(seed),
        use_resolution_binning=False,
    ).images[0]
    theirs = np.asarray(image.convert("RGB")).astype(int)

    assert ours.shape == theirs.shape == (32, 32, 3)
    assert ours.std() > 10 and len(np.unique(ours)) > 50  # not a constant (or near-constant) image
    diff = np.abs(ours - theirs).max()
    print(f"max pixel difference pipeline vs pixelrun sample: {diff}/255")
    assert diff <= 2
    # another seed draws another image in both: the seed reaches the noise the same way
    other = pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(seed + 1),
        use_resolution_binning=False,
    ).images[0]
    assert np.abs(np.asarray(other.convert("RGB")).astype(int) - theirs).max() > 20


def test_what_the_pipeline_cannot_express_is_one_error_line(run_dir, tmp_path, capsys):
    out = tmp_path / "pipe"
    for override, key in (("sample.spacing=linear", "sample.spacing"), ("objective.t_clamp=0.1", "objective.t_clamp")):
        capsys.readouterr()
        assert main(["export", "--checkpoint", str(run_dir), "--format", "diffusers", "--out", str(out), override]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"pixelrun: config error: {key}:"), err
        assert not out.exists()
    # overrides are for the diffusers export only
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out), "sample.shift=2"]) == 2
    assert "only --format diffusers" in capsys.readouterr().err


def test_t5gemma_encoder_exports_too(tmp_path):
    """The speedrun's encoder kind (T5Gemma, loaded encoder-only) goes into the pipeline as
    T5GemmaEncoderModel and encodes the same; here a tiny random one with the MiniLM tokenizer."""
    from transformers import AutoTokenizer, T5GemmaConfig, T5GemmaModel

    from pixelrun.diffusion.generate import generate
    from pixelrun.model.denoiser import build_model
    from pixelrun.model.text import TextEncoder, resolve_encoder
    from pixelrun.tools.export_diffusers import export_diffusers

    enc_dir = tmp_path / "t5gemma"
    layers = dict(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    torch.manual_seed(0)
    T5GemmaModel(T5GemmaConfig(encoder=layers, decoder=layers)).save_pretrained(enc_dir)
    AutoTokenizer.from_pretrained(resolve_encoder("minilm")).save_pretrained(enc_dir)
    encoder = TextEncoder(str(enc_dir), 16)
    cfg = load_config(
        None,
        [
            f"text.encoder={enc_dir}",
            "text.max_tokens=16",
            "model.hidden_size=32",
            "model.depth=2",
            "model.num_heads=2",
            "data.resolution=32",
            "sample.steps=3",
        ],
    )
    model = build_model("tiny", encoder.dim, hidden_size=32, depth=2, num_heads=2)
    _random_init(model)
    out = export_diffusers(model.eval(), encoder, cfg, tmp_path / "pipe")
    pipe = diffusers.PRXPixelPipeline.from_pretrained(str(out))
    assert type(pipe.text_encoder).__name__ == "T5GemmaEncoderModel"
    pipe.set_progress_bar_config(disable=True)
    ours = generate(model, encoder, [PROMPT], cfg, "cpu", seed=3)[0].astype(int)
    theirs = pipe(
        PROMPT,
        num_inference_steps=3,
        guidance_scale=4.0,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(3),
        use_resolution_binning=False,
    ).images[0]
    assert ours.std() > 10
    assert np.abs(ours - np.asarray(theirs.convert("RGB")).astype(int)).max() <= 2
