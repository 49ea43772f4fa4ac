"""A new user's first hour, as it was tried: no command destroys work it did not make, no result
is lost, a run is never silently continued by another one, and a mistake is one line naming what to
fix (exit 2), before any work."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line_error, tiny_overrides
from PIL import Image

from pixelrun.cli import main
from pixelrun.config import load_config
from pixelrun.infra import checkpoint as ckpt
from pixelrun.run.train import train

PROMPT = "a large red circle in the top left on a white background"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_encoder_dir):
    run = tmp_path_factory.mktemp("safety") / "run"
    train(load_config(None, tiny_overrides(run, tiny_encoder_dir, **{"train.steps": 2, "eval.prompts": 0})))
    return run


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- export never deletes


def test_export_into_its_own_run_is_refused_and_the_run_is_intact(tiny_run, capsys):
    before = _tree(tiny_run)
    assert main(["export", "--checkpoint", str(tiny_run), "--out", str(tiny_run)]) == 2
    one_line_error(capsys, "--out", "holds the checkpoint")
    assert main(["export", "--checkpoint", str(tiny_run), "--out", str(tiny_run / "checkpoints")]) == 2
    one_line_error(capsys, "--out")
    assert _tree(tiny_run) == before


def test_export_into_the_current_folder_or_a_foreign_one_is_refused(tiny_run, tmp_path, capsys, monkeypatch):
    here = tmp_path / "here"
    (here / "other").mkdir(parents=True)
    (here / "notes.txt").write_text("mine")
    (here / "other" / "data.bin").write_bytes(b"\x00\x01")
    before = _tree(here)
    monkeypatch.chdir(here)
    assert main(["export", "--checkpoint", str(tiny_run), "--out", "."]) == 2
    one_line_error(capsys, "--out", "current folder")
    assert main(["export", "--checkpoint", str(tiny_run), "--out", str(here)]) == 2
    one_line_error(capsys, "--out")
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--checkpoint", str(tiny_run), "--out", str(here)]) == 2
    one_line_error(capsys, "--out", "not empty", "not an earlier pixelrun export")
    assert _tree(here) == before


def test_export_writes_new_or_empty_folders_and_replaces_only_its_own(tiny_run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(tiny_run), "--out", str(out)]) == 0
    marker = json.loads((out / ckpt.EXPORT_MARKER).read_text())
    assert marker["format"] == "safetensors" and marker["checkpoint"].endswith("step_00000002")
    mode = stat.S_IMODE(os.stat(out / ckpt.EXPORT_FILE).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # readable by others as the user's umask allows, not 0600
    assert main(["export", "--checkpoint", str(tiny_run), "--out", str(out), "--weights", "raw"]) == 0
    assert json.loads((out / ckpt.EXPORT_MARKER).read_text())["weights"] == "raw"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", "--checkpoint", str(tiny_run), "--out", str(empty)]) == 0
    assert (empty / ckpt.EXPORT_FILE).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    capsys.readouterr()


def test_atomic_dir_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    out = tmp_path / "out"
    with ckpt.atomic_dir(out, {"format": "test"}) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with ckpt.atomic_dir(out, {"format": "test"}) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash while writing")
    assert (out / "a.txt").read_text() == "old"  # the old export, whole
    with ckpt.atomic_dir(out, {"format": "test"}) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == sorted([ckpt.EXPORT_MARKER, "b.txt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folder left


# ----------------------------------------------------------------------------- a resume continues the same run


def test_resume_with_another_model_or_data_is_refused_before_any_work(tmp_path, tiny_encoder_dir, capsys):
    run = tmp_path / "run"
    base = {"train.steps": 2, "eval.prompts": 0}
    assert main(["train", *tiny_overrides(run, tiny_encoder_dir, **base)]) == 0
    saved_yaml = (run / "config.yaml").read_text()
    capsys.readouterr()
    for change, key in (
        ({"model.depth": 6}, "model.depth"),
        ({"data.source": "emoji"}, "data.source"),
        ({"model.hidden_size": 64, "optimizer.name": "muon"}, "model.hidden_size, optimizer.name"),
    ):
        assert main(["train", *tiny_overrides(run, tiny_encoder_dir, **{**base, "train.steps": 4, **change})]) == 2
        err = one_line_error(capsys, key, "run.init_from")
        assert "step_00000002" in err
        assert (run / "config.yaml").read_text() == saved_yaml  # untouched
        assert ckpt.latest_checkpoint(run).name == "step_00000002"
    # a safe change goes on and says what changed; fewer steps than done says there is nothing to train
    assert (
        main(["train", *tiny_overrides(run, tiny_encoder_dir, **{**base, "train.steps": 3, "optimizer.lr": 0.002})])
        == 0
    )
    out = capsys.readouterr().out
    assert "changed since the checkpoint: optimizer.lr: 0.001 -> 0.002" in out
    assert main(["train", *tiny_overrides(run, tiny_encoder_dir, **{**base, "train.steps": 1})]) == 0
    assert "nothing to train: the checkpoint is at step 3 and train.steps is 1" in capsys.readouterr().out


def test_a_torn_last_line_of_metrics_does_not_stop_a_resume(tmp_path, tiny_encoder_dir):
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(run, tiny_encoder_dir, **{"train.steps": 4, "eval.prompts": 0}))
    train(cfg, stop_at_step=2)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.5, "fl')  # a crash (or a full disk) mid-write
    train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_an_image_folder_with_nothing_usable_is_one_line(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png")
    (folder / "a.txt").write_text("a caption")
    assert main(["train", "data.source=folder", f"data.path={folder}", f"run.dir={tmp_path / 'r'}"]) == 2
    one_line_error(capsys, "data.path", "could be loaded")
    (folder / "a.txt").unlink()
    assert main(["train", "data.source=folder", f"data.path={folder}", f"run.dir={tmp_path / 'r2'}"]) == 2
    one_line_error(capsys, "data.path", "no usable items")


# ----------------------------------------------------------------------------- sample


def test_sample_flags_and_overrides_fail_as_one_line_naming_them(tiny_run, tmp_path, capsys):
    out = str(tmp_path / "o")
    for args, flag in (
        (["--device", "gpu"], "--device"),
        (["sample.guidance=0"], "sample.guidance"),
        (["sample.guidance=0.5"], "sample.guidance"),
        (["sample.guidance_mode=self"], "sample.guidance_mode"),
        (["sample.nosuchkey=1"], "sample.nosuchkey"),
        (["eval.prompts=3"], "eval.prompts"),
        (["a", "red", "circle"], "a"),
        (["--steps", "2"], "--steps"),
    ):
        assert main(["sample", "--checkpoint", str(tiny_run), "--prompt", PROMPT, "--out", out, *args]) == 2, args
        err = one_line_error(capsys, f"config error: {flag}:")
        if flag == "sample.guidance_mode":
            assert "trained without routing" in err and "use sample.guidance_mode=cfg" in err
        if flag == "eval.prompts":
            assert "pixelrun sample changes only sample.* keys" in err
        if flag == "--steps":  # a former flag: the override to write instead
            assert "write sample.steps=2 instead of --steps 2" in err
    if not torch.cuda.is_available():
        assert (
            main(["sample", "--checkpoint", str(tiny_run), "--prompt", PROMPT, "--out", out, "--device", "cuda"]) == 2
        )
        one_line_error(capsys, "--device", "CUDA is not available")
    for size in ("big", "0x0", "32x-8"):
        assert main(["sample", "--checkpoint", str(tiny_run), "--prompt", PROMPT, "--out", out, "--size", size]) == 2
        one_line_error(capsys, "--size", repr(size))
    assert main(["sample", "--checkpoint", str(tiny_run), "--prompt", PROMPT, "--out", out, "sample.guidance=nan"]) == 2
    one_line_error(capsys, "sample.guidance", "finite")
    assert not Path(out).exists()


def test_sample_out_holds_only_this_call_and_prompts_file(tiny_run, tmp_path, capsys):
    out = tmp_path / "o"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n\na small blue square in the center on a black background\n")
    assert main(["sample", "--checkpoint", str(tiny_run), "--prompts-file", str(prompts), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "001.png", "grid.png", "prompts.json"]
    assert main(["sample", "--checkpoint", str(tiny_run), "--prompt", PROMPT, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "prompts.json"]  # the earlier call's files went
    assert json.loads((out / "prompts.json").read_text())["prompts"] == {"000.png": PROMPT}
    (out / "mine.txt").write_text("keep me")
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(tiny_run), "--prompt", PROMPT, "--out", str(out)]) == 2
    one_line_error(capsys, "--out", "mine.txt")
    assert (out / "mine.txt").read_text() == "keep me" and (out / "000.png").exists()


def test_a_diffusers_export_is_named_as_such(tiny_run, tmp_path, capsys):
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    assert main(["sample", "--checkpoint", str(pipe), "--prompt", PROMPT, "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "diffusers pipeline", "PRXPixelPipeline", "--format safetensors")


# ----------------------------------------------------------------------------- small things


def test_version_and_presets_with_both_text_widths(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("pixelrun ")
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "6,365,632" in out and "1,177,215,744" in out  # tiny with MiniLM (what train prints), small with T5Gemma


def test_cut_captions_are_warned_once_and_counted(tmp_path, tiny_encoder_dir):
    from pixelrun.model.text import TextEncoder

    enc = TextEncoder(tiny_encoder_dir, max_tokens=8)
    said = []
    enc.warn = said.append
    enc.encode(["a red square", "a very long caption that has far more than eight tokens in it for sure"])
    enc.encode(["another caption that is also much longer than the eight tokens allowed here"])
    assert enc.truncated == 2 and len(said) == 1 and "text.max_tokens=8" in said[0]


def test_grid_labels_show_missing_glyphs_visibly():
    from pixelrun.infra.grids import drawable, label_font

    font = label_font(11)
    assert drawable("a red circle", font) == "a red circle"
    assert drawable("猫 and \U0010fffd", font) == "? and ?"  # never an empty box


def test_stage_two_resolution_is_what_inference_uses(tmp_path, tiny_encoder_dir, capsys):
    """After a 32px then 48px run, sampling and exports default to 48px (the stage the checkpoint was
    last trained in), not the base config's 32."""
    from pixelrun.infra.inference import checkpoint_config

    run = tmp_path / "run"
    over = tiny_overrides(run, tiny_encoder_dir, **{"eval.prompts": 0})
    over = [o for o in over if not o.startswith("train.steps=")]
    stages = "stages=[{name: low, steps: 1, resolution: 32}, {name: high, steps: 1, resolution: 48}]"
    train(load_config(None, [*over, stages]))
    assert checkpoint_config(str(run))[0].data.resolution == 48
    assert main(["sample", "--checkpoint", str(run), "--prompt", PROMPT, "--out", str(tmp_path / "o")]) == 0
    assert np.asarray(Image.open(tmp_path / "o" / "000.png")).shape == (48, 48, 3)
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "x")]) == 0
    assert load_config(tmp_path / "x" / "config.yaml").data.resolution == 48
    capsys.readouterr()
