"""Every reader of a checkpoint verifies it, as training does: `pixelrun sample`, `eval` and `export`
skip a damaged newest checkpoint of a run with one line (moving nothing), refuse a damaged one asked
for by name in one line naming the file, turn a file DCP or torch.load cannot read into one line, and
never export a non-finite weight."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import one_line_error, tiny_overrides

from pixelrun.cli import main
from pixelrun.config import load_config
from pixelrun.infra import checkpoint as ckpt
from pixelrun.infra.checkpoint_save import save_checkpoint
from pixelrun.infra.checkpoint_verify import MANIFEST
from pixelrun.run.train import train

PROMPT = "a large red circle in the top left on a white background"
NEWEST, EARLIER = "step_00000002", "step_00000001"


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, tiny_encoder_dir) -> Path:
    """A 2-step run with checkpoints at steps 1 and 2, and the images of step 1 (sampled before any
    test harms a copy of it)."""
    run = tmp_path_factory.mktemp("readers") / "run"
    over = tiny_overrides(run, tiny_encoder_dir, **{"train.steps": 2, "cadence.checkpoint_every": 1, "eval.prompts": 0})
    train(load_config(None, over))
    out = run.parent / "earlier-images"
    assert (
        main(
            ["sample", "--checkpoint", str(ckpt.checkpoint_root(run) / EARLIER), "--prompt", PROMPT, "--out", str(out)]
        )
        == 0
    )
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _finite_garbage(folder: Path) -> None:
    """4 KB of b"A" (float32 12.08: finite) over the middle of the .distcp, as the issue did."""
    f = next(folder.glob("*.distcp"))
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4096] = b"A" * 4096
    f.write_bytes(bytes(data))


DAMAGE = {
    "finite bytes in the .distcp": (_finite_garbage, "__0_0.distcp"),
    "a truncated .distcp": (lambda p: os.truncate(next(p.glob("*.distcp")), 1000), "__0_0.distcp"),
    "a random meta.pt": (lambda p: (p / "meta.pt").write_bytes(os.urandom(4000)), "meta.pt"),
}


def _tree(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_sample_skips_a_damaged_newest_checkpoint_with_one_line(two_checkpoints, tmp_path, capsys):
    run = _copy(two_checkpoints, tmp_path)
    _finite_garbage(ckpt.checkpoint_root(run) / NEWEST)
    before = _tree(run)
    capsys.readouterr()
    out = tmp_path / "o"
    assert main(["sample", "--checkpoint", str(run), "--prompt", PROMPT, "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert len(lines) == 1 and NEWEST in lines[0] and "__0_0.distcp does not match its checksum" in lines[0], lines
    assert f"reading the earlier {EARLIER}" in lines[0]
    earlier = two_checkpoints.parent / "earlier-images"
    assert (out / "000.png").read_bytes() == (earlier / "000.png").read_bytes()
    assert json.loads((out / "prompts.json").read_text())["checkpoint"].endswith(EARLIER)
    assert _tree(run) == before  # a reader moves nothing: only training puts a damaged checkpoint aside


def test_eval_skips_a_damaged_newest_checkpoint_with_one_line(two_checkpoints, tmp_path, capsys):
    run = _copy(two_checkpoints, tmp_path)
    _finite_garbage(ckpt.checkpoint_root(run) / NEWEST)
    capsys.readouterr()
    report = tmp_path / "eval.json"
    args = ["eval", "--checkpoint", str(run), "--out", str(report), "eval.prompts=2", "eval.metrics=[shapes]"]
    assert main(args) == 0
    assert json.loads(report.read_text())["checkpoint"].endswith(EARLIER)
    lines = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert len(lines) == 1 and NEWEST in lines[0] and "__0_0.distcp" in lines[0], lines


# without a manifest (a checkpoint made before them) finite bytes cannot be told from weights: read as before
REFUSED = [(d, True) for d in DAMAGE] + [("a truncated .distcp", False), ("a random meta.pt", False)]


@pytest.mark.parametrize(("damage", "manifest"), REFUSED)
def test_export_refuses_a_damaged_checkpoint_asked_for_by_name(two_checkpoints, tmp_path, capsys, damage, manifest):
    run = _copy(two_checkpoints, tmp_path)
    newest = ckpt.checkpoint_root(run) / NEWEST
    if not manifest:
        (newest / MANIFEST).unlink()
    harm, file = DAMAGE[damage]
    harm(newest)
    capsys.readouterr()
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(newest), "--out", str(out)]) == 2
    one_line_error(capsys, "--checkpoint", NEWEST, file)
    assert not out.exists()


@pytest.mark.parametrize("damage", ["a truncated .distcp", "a random meta.pt"])
def test_an_unreadable_file_without_a_manifest_is_one_line_and_the_earlier_checkpoint_is_read(
    two_checkpoints, tmp_path, capsys, damage
):
    """No checksum to catch it: DCP's EOFError and torch.load's UnpicklingError become one line."""
    run = _copy(two_checkpoints, tmp_path)
    newest = ckpt.checkpoint_root(run) / NEWEST
    (newest / MANIFEST).unlink()
    harm, file = DAMAGE[damage]
    harm(newest)
    capsys.readouterr()
    out = tmp_path / "o"
    assert main(["sample", "--checkpoint", str(run), "--prompt", PROMPT, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "skipped" in line]
    assert len(lines) == 1 and NEWEST in lines[0] and file in lines[0] and EARLIER in lines[0], lines
    assert (out / "000.png").read_bytes() == (two_checkpoints.parent / "earlier-images" / "000.png").read_bytes()


def test_every_checkpoint_damaged_is_one_line(two_checkpoints, tmp_path, capsys):
    run = _copy(two_checkpoints, tmp_path)
    for folder in ckpt.list_checkpoints(run):
        _finite_garbage(folder)
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "export")]) == 2
    one_line_error(capsys, "--checkpoint", "no usable checkpoint", NEWEST, "__0_0.distcp")


def _with_a_nan_weight(src: Path, dest: Path) -> str:
    """A copy of checkpoint `src` (with its manifest) whose EMA holds a NaN: what a pixelrun before
    the finiteness checks could save. Returns the tensor's name in the model."""
    flat = ckpt.read_tensors(src)
    name = next(k for k in flat if k.startswith("ema.") and flat[k].is_floating_point())
    flat[name].view(-1)[0] = float("nan")
    meta = ckpt.load_meta(src)
    save_checkpoint(dest, meta.step, flat, meta, (src / "config.yaml").read_text())
    return name[len("ema.") :]


def test_export_never_writes_a_non_finite_weight(two_checkpoints, tmp_path, capsys):
    run = _copy(two_checkpoints, tmp_path)
    newest = ckpt.checkpoint_root(run) / NEWEST
    shutil.rmtree(newest)
    name = _with_a_nan_weight(ckpt.checkpoint_root(two_checkpoints) / NEWEST, run)
    out = tmp_path / "export"
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(newest), "--out", str(out)]) == 2
    one_line_error(capsys, "--checkpoint", NEWEST, "non-finite", name)
    assert not out.exists() and not list(tmp_path.glob(".tmp-export-*"))
    # from the run folder: the earlier checkpoint, said in one line
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert sum("skipped" in line and name in line for line in captured.err.splitlines()) == 1, captured.err
    assert EARLIER in captured.out
    # and the export itself refuses a NaN handed to it, naming the tensor, writing nothing
    from pixelrun.model.denoiser import model_from_config

    cfg, path, text_dim = load_cfg(newest)
    model = model_from_config(cfg, text_dim)
    with torch.no_grad():
        model.state_dict()[name].view(-1)[0] = float("inf")
    with pytest.raises(ckpt.CheckpointError, match=f"non-finite values \\({name}\\)"):
        ckpt.export_weights(path, tmp_path / "direct", model, "seed: 0\n", text_dim)
    assert not (tmp_path / "direct").exists()


def load_cfg(path: Path):
    from pixelrun.infra.inference import checkpoint_config

    return checkpoint_config(str(path))


def test_the_diffusers_export_never_writes_a_non_finite_weight(two_checkpoints, tmp_path):
    pytest.importorskip("diffusers")
    from pixelrun.infra.inference import load_for_inference
    from pixelrun.tools.export_diffusers import export_diffusers

    model, encoder, cfg, _ = load_for_inference(
        str(two_checkpoints), device="cpu", overrides=["sample.spacing=diffusers"]
    )
    name = next(iter(model.state_dict()))
    with torch.no_grad():
        model.state_dict()[name].view(-1)[0] = float("nan")
    with pytest.raises(ckpt.CheckpointError, match=f"non-finite values \\(transformer.{name}\\)"):
        export_diffusers(model, encoder, cfg, tmp_path / "pipeline")
    assert not (tmp_path / "pipeline").exists() and not list(tmp_path.glob(".tmp-*"))


# ----------------------------------------------------------------------------- run.init_from reads as they do


def _init_from(tmp_path, encoder_dir, source: Path, name: str = "new") -> int:
    over = tiny_overrides(tmp_path / name, encoder_dir, **{"train.steps": 1, "eval.prompts": 0})
    return main(["train", *over, f"run.init_from={source}"])


def test_init_from_a_run_skips_its_damaged_newest_checkpoint_with_one_line(
    two_checkpoints, tmp_path, tiny_encoder_dir, capsys
):
    run = _copy(two_checkpoints, tmp_path)
    _finite_garbage(ckpt.checkpoint_root(run) / NEWEST)
    capsys.readouterr()
    assert _init_from(tmp_path, tiny_encoder_dir, run) == 0
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if "skipped checkpoint" in line]
    assert len(skipped) == 1 and NEWEST in skipped[0] and f"reading the earlier {EARLIER}" in skipped[0], out
    assert f"initialised weights and EMA from {ckpt.checkpoint_root(run) / EARLIER}" in out


@pytest.mark.parametrize("damage", ["finite bytes in the .distcp", "a random meta.pt"])
def test_init_from_a_damaged_checkpoint_named_is_refused_in_one_line(
    two_checkpoints, tmp_path, tiny_encoder_dir, capsys, damage
):
    run = _copy(two_checkpoints, tmp_path)
    newest = ckpt.checkpoint_root(run) / NEWEST
    harm, file = DAMAGE[damage]
    harm(newest)
    capsys.readouterr()
    assert _init_from(tmp_path, tiny_encoder_dir, newest) == 2
    one_line_error(capsys, "run.init_from", NEWEST, file)
    assert not (tmp_path / "new").exists()  # refused before any work


def test_init_from_non_finite_weights_is_refused_in_one_line(two_checkpoints, tmp_path, tiny_encoder_dir, capsys):
    """Its files match their manifest (saved so by an older pixelrun): only the values tell."""
    run = _copy(two_checkpoints, tmp_path)
    newest = ckpt.checkpoint_root(run) / NEWEST
    shutil.rmtree(newest)
    name = _with_a_nan_weight(ckpt.checkpoint_root(two_checkpoints) / NEWEST, run)
    capsys.readouterr()
    assert _init_from(tmp_path, tiny_encoder_dir, newest) == 2
    one_line_error(capsys, "run.init_from", NEWEST, "non-finite", name)
    assert not (tmp_path / "new" / "config.yaml").exists()
