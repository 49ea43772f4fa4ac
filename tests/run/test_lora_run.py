"""A LoRA fine-tune as a user runs it (docs/lora.md): `run.init_from` gives the frozen weights, the
checkpoints hold the adapters alone, a run killed with SIGKILL inside a checkpoint write and run
again has the losses and tensors of one never interrupted, a resume that changes the adapters is
refused, and `pixelrun export` merges them (W + alpha / rank * B @ A, by hand here) into the
safetensors and diffusers exports or writes them alone (`--format lora`) in the layout peft loads
into diffusers' PRXTransformer2DModel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import one_line_error, tiny_overrides
from PIL import Image

from pixelrun.cli import main
from pixelrun.config import load_config
from pixelrun.infra import checkpoint as ckpt
from pixelrun.infra.faults import ENV
from pixelrun.run.train import train

ROOT = Path(__file__).parents[2]
STEPS, EVERY, RANK, ALPHA = 6, 3, 2, 4.0
CLOCKS = {"images_per_s", "train_seconds", "step_seconds"}


def _lora_overrides(run: Path, enc: str, base: Path, **extra) -> list[str]:
    over = {
        "run.init_from": str(base),
        "train.lora.rank": RANK,
        "train.lora.alpha": ALPHA,
        "train.steps": STEPS,
        "cadence.checkpoint_every": EVERY,
        "cadence.keep_checkpoints": 5,
        "eval.prompts": 0,
        "optimizer.name": "muon",
        "optimizer.muon_precision": "fp32",
        "ema.every": 1,
        "ema.decay": 0.5,  # the EMA adapters (what export merges) move as far as the raw ones, nearly
        "optimizer.lr": 0.01,
        "hardware.threads": 1,
        **extra,
    }
    return tiny_overrides(run, enc, **over)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_encoder_dir):
    """A base run of 2 steps, and a LoRA fine-tune of it never interrupted."""
    root = tmp_path_factory.mktemp("lora")
    threads = torch.get_num_threads()
    try:
        train(
            load_config(None, tiny_overrides(root / "base", tiny_encoder_dir, **{"train.steps": 2, "eval.prompts": 0}))
        )
        train(load_config(None, _lora_overrides(root / "whole", tiny_encoder_dir, root / "base")))
    finally:
        torch.set_num_threads(threads)  # hardware.threads=1 set it for this process
    return root


def _losses(run: Path) -> dict[int, dict]:
    """Each step's logged row (the last one written: a killed session's steps are trained again)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: {k: v for k, v in r.items() if k not in CLOCKS} for r in rows}


def test_checkpoints_hold_the_adapters_and_a_killed_run_resumes_exactly(runs, tiny_encoder_dir):
    whole = ckpt.read_tensors(ckpt.latest_checkpoint(runs / "whole"))
    assert whole and all(".lora_A." in k or ".lora_B." in k for k in whole), sorted(whole)[:5]
    assert {k.split(".")[0] for k in whole} == {"model", "ema", "optimizer"}

    run = runs / "killed"
    over = _lora_overrides(run, tiny_encoder_dir, runs / "base")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", ENV: f"save-placed:{EVERY}"}
    proc = subprocess.run([sys.executable, "-m", "pixelrun", "train", *over], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL once the checkpoint of step EVERY is in place
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(run)] == [EVERY]
    threads = torch.get_num_threads()
    try:
        summary = train(load_config(None, over))  # the same command again
    finally:
        torch.set_num_threads(threads)
    assert summary["steps_this_session"] == STEPS - EVERY  # resumed from the adapters of step EVERY
    assert _losses(run) == _losses(runs / "whole")
    again = ckpt.read_tensors(ckpt.latest_checkpoint(run))
    assert again.keys() == whole.keys()
    for k in whole:
        assert torch.equal(again[k], whole[k]), k


def test_a_resume_with_other_adapters_is_refused(runs, tiny_encoder_dir, capsys):
    over = _lora_overrides(runs / "whole", tiny_encoder_dir, runs / "base", **{"train.lora.rank": RANK + 1})
    assert main(["train", *over]) == 2
    one_line_error(capsys, "train.lora.rank", f"({RANK} -> {RANK + 1})")


def _by_hand(runs: Path) -> dict[str, torch.Tensor]:
    """The merged EMA weights computed here: the base run's EMA, plus alpha / rank * B @ A of the
    LoRA run's EMA adapters on each adapted linear."""
    base = ckpt.read_tensors(ckpt.latest_checkpoint(runs / "base"))
    lora = ckpt.read_tensors(ckpt.latest_checkpoint(runs / "whole"))
    out = {k.removeprefix("ema."): v for k, v in base.items() if k.startswith("ema.")}
    adapted = {k.removeprefix("ema.").split(".lora_A.")[0] for k in lora if k.startswith("ema.") and ".lora_A." in k}
    for m in adapted:
        a, b = lora[f"ema.{m}.lora_A.default.weight"], lora[f"ema.{m}.lora_B.default.weight"]
        assert (b @ a).abs().max() > 1e-5, m  # the adapters moved past the tolerance below: not the base again
        out[f"{m}.weight"] = out[f"{m}.weight"] + (ALPHA / RANK) * (b @ a)
    assert len(adapted) == 12
    return out


def test_export_merges_the_adapters_and_sample_is_the_same(runs, tmp_path):
    from safetensors.torch import load_file

    merged = tmp_path / "merged"
    assert main(["export", "--checkpoint", str(runs / "whole"), "--out", str(merged)]) == 0
    weights = load_file(str(merged / "model.safetensors"))
    expected = _by_hand(runs)
    assert weights.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(weights[k], v, rtol=0, atol=1e-6, msg=k)
    assert yaml.safe_load((merged / "config.yaml").read_text())["train"]["lora"]["rank"] is None

    prompt = "a large red circle in the top left on a white background"
    for src, dst in ((runs / "whole", "from_run"), (merged, "from_export")):
        assert main(["sample", "--checkpoint", str(src), "--prompt", prompt, "--out", str(tmp_path / dst)]) == 0
    a, b = (np.asarray(Image.open(next((tmp_path / d).glob("*.png")))) for d in ("from_run", "from_export"))
    assert np.array_equal(a, b)


def test_export_lora_writes_the_adapters_alone_for_peft_and_diffusers(runs, tmp_path):
    from diffusers import PRXTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open

    out = tmp_path / "adapters"
    assert main(["export", "--checkpoint", str(runs / "whole"), "--out", str(out), "--format", "lora"]) == 0
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no mapping)
    lora = ckpt.read_tensors(ckpt.latest_checkpoint(runs / "whole"))
    expected = {
        "transformer." + k.removeprefix("ema.").replace(".default.", "."): v
        for k, v in lora.items()
        if k.startswith("ema.")
    }
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    assert meta["transformer.r"] == RANK and meta["transformer.lora_alpha"] == ALPHA

    # the file through peft into diffusers' transformer (as diffusers' PeftAdapterMixin.load_lora_adapter
    # does) computes what the merged diffusers export computes
    pipe_dir = tmp_path / "pipe"
    assert main(["export", "--checkpoint", str(runs / "whole"), "--out", str(pipe_dir), "--format", "diffusers"]) == 0
    merged = PRXTransformer2DModel.from_pretrained(str(pipe_dir / "transformer")).eval()
    base_dir = tmp_path / "base-pipe"
    assert main(["export", "--checkpoint", str(runs / "base"), "--out", str(base_dir), "--format", "diffusers"]) == 0
    adapted = PRXTransformer2DModel.from_pretrained(str(base_dir / "transformer")).eval()
    config = {k.removeprefix("transformer."): v for k, v in meta.items()}
    inject_adapter_in_model(LoraConfig(**config), adapted)
    result = set_peft_model_state_dict(adapted, {k.removeprefix("transformer."): v for k, v in state.items()})
    assert not result.unexpected_keys
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0.3, 0.8])
    txt, mask = torch.randn(2, 4, 32, generator=g), torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        ours = merged(x, t, txt, attention_mask=mask, return_dict=False)[0]
        theirs = adapted(x, t, txt, attention_mask=mask, return_dict=False)[0]
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)

    # the merged pipeline draws what `pixelrun sample` draws from the LoRA checkpoint (as
    # tests/tools/test_export_diffusers.py checks for a full run)
    from diffusers import PRXPixelPipeline

    prompt, steps, guidance, seed = "a small blue square in the center on a white background", 3, 3.0, 7
    settings = [f"sample.steps={steps}", f"sample.guidance={guidance}", f"sample.seed={seed}"]
    assert (
        main(
            ["sample", "--checkpoint", str(runs / "whole"), "--prompt", prompt, "--out", str(tmp_path / "s"), *settings]
        )
        == 0
    )
    mine = np.asarray(Image.open(tmp_path / "s" / "000.png").convert("RGB")).astype(int)
    pipe = PRXPixelPipeline.from_pretrained(str(pipe_dir))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(seed),
        use_resolution_binning=False,
    ).images[0]
    assert np.abs(np.asarray(image.convert("RGB")).astype(int) - mine).max() == 0  # 0/255, as a full run


def test_export_lora_of_a_full_run_is_refused(runs, tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["export", "--checkpoint", str(runs / "base"), "--out", str(out), "--format", "lora"]) == 2
    one_line_error(capsys, "--format", "trained every weight")
    assert not out.exists()


def test_a_lora_checkpoint_as_init_from_is_refused_and_its_export_is_taken(runs, tiny_encoder_dir, tmp_path, capsys):
    """A LoRA checkpoint lacks the base: loading it as whole weights would leave them random."""
    over = {"run.init_from": str(runs / "whole"), "train.steps": 1, "eval.prompts": 0}
    assert main(["train", *tiny_overrides(tmp_path / "full", tiny_encoder_dir, **over)]) == 2
    one_line_error(capsys, "run.init_from:", "LoRA run", "export it")
    merged = tmp_path / "merged"
    assert main(["export", "--checkpoint", str(runs / "whole"), "--out", str(merged)]) == 0
    threads = torch.get_num_threads()
    try:
        over["run.init_from"] = str(merged)
        train(load_config(None, tiny_overrides(tmp_path / "full", tiny_encoder_dir, **over, **{"hardware.threads": 1})))
    finally:
        torch.set_num_threads(threads)
    assert f"initialised weights and EMA from {merged}" in capsys.readouterr().out
