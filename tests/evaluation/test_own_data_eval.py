"""A folder run evaluates by default (issue 30): eval.metrics=[auto] is the offline Fréchet distance
on the folder's held-out images, in the final line and eval.json, the very number `pixelrun eval`
computes on the same checkpoint; the sample grids and the evaluations take prompts files."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line_error, tiny_overrides
from PIL import Image

from pixelrun.cli import main
from pixelrun.config import load_config
from pixelrun.run.train import train


def _folder(root: Path, n: int = 12) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"picture {i}")
    return root


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, tiny_encoder_dir):
    """A folder run with the default eval.metrics, its grid prompts from sample.prompts_file."""
    tmp = tmp_path_factory.mktemp("own")
    images = _folder(tmp / "imgs")
    grid = tmp / "grid.txt"
    grid.write_text("a red kite\n\n  ein grüner Vogel  \na blue door\n", encoding="utf-8")
    run = tmp / "run"
    over = tiny_overrides(
        run,
        tiny_encoder_dir,
        **{
            "data.source": "folder",
            "data.path": images,
            "train.steps": 2,
            "eval.cache_dir": tmp / "cache",
            "sample.prompts_file": grid,
        },
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = train(load_config(None, over))
    return run, summary, tmp, out.getvalue().strip().splitlines()


def test_a_folder_run_ends_with_the_fd_effnet_pixelrun_eval_computes(folder_run, capsys):
    run, summary, tmp, _ = folder_run
    assert set(summary["eval"]) == {"fd-effnet"} and summary["eval"]["fd-effnet"] > 0
    saved = json.loads((run / "eval.json").read_text())
    assert saved["metrics"] == summary["eval"] and saved["settings"]["data"].endswith(":heldout4-seed1234")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["metrics"]["fd-effnet"] == pytest.approx(summary["eval"]["fd-effnet"], rel=1e-6)
    assert again["settings"]["data"] == saved["settings"]["data"]


def test_the_start_names_the_evaluation_and_the_held_out_set_and_the_final_line_the_figure(folder_run):
    _, summary, tmp, out = folder_run
    assert out[-1].startswith("done: 2 steps")
    assert f"fd-effnet {summary['eval']['fd-effnet']:.4g} (EMA, 4 prompts" in out[-1]
    assert any(
        line.startswith("evaluation: fd-effnet on 4 prompts (ema weights), at the end (eval.metrics=[auto]: ")
        for line in out
    )
    assert f"held out: 4 of the 12 captioned images of {tmp / 'imgs'}, chosen by eval.seed=1234" in "\n".join(out)


def test_the_grid_shows_the_prompts_file_lines(folder_run):
    run, *_ = folder_run
    with Image.open(run / "samples" / "final.png") as grid:
        assert json.loads(grid.text["captions"]) == ["a red kite", "ein grüner Vogel", "a blue door"]


def test_the_evaluations_generate_for_eval_prompts_file(folder_run):
    from pixelrun.evaluation.evaluate import Evaluator
    from pixelrun.infra.inference import load_for_inference

    run, _, tmp, _ = folder_run
    own = tmp / "eval.txt"
    own.write_text("\n".join(f"my prompt {i}" for i in range(6)), encoding="utf-8")
    model, encoder, cfg, _ = load_for_inference(str(run), "ema", "cpu", [f"eval.prompts_file={own}"])
    result = Evaluator(cfg, list(cfg.eval.metrics), "cpu")(model, encoder, cfg, sample_seed=cfg.sample.seed)
    assert result["prompts"] == [f"my prompt {i}" for i in range(4)]  # the first eval.prompts lines
    assert result["settings"]["prompts_file"] == str(own) and result["settings"]["data"].endswith("seed1234")


@pytest.mark.parametrize(
    ("key", "content", "words"),
    [
        ("sample.prompts_file", b"\xff\xfe bad", "not a UTF-8 text file"),
        ("sample.prompts_file", b"a\x00b\n", "NUL bytes"),
        ("eval.prompts_file", b"\n  \n", "holds no prompt"),
        ("eval.prompts_file", b"one\ntwo\n", "holds 2 prompts, eval.prompts=4 asked for"),
        ("sample.prompts_file", b"".join(b"p%d\n" % i for i in range(65)), "at most 64"),
    ],
)
def test_a_bad_prompts_file_is_one_line_naming_its_key(tmp_path, capsys, key, content, words):
    images = _folder(tmp_path / "imgs", n=8)
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(content)
    over = tiny_overrides(tmp_path / "run", "minilm", **{"data.source": "folder", "data.path": images, key: bad})
    capsys.readouterr()
    assert main(["train", *over]) == 2
    one_line_error(capsys, key, words)
    assert not (tmp_path / "run").exists()


def test_missing_prompts_file_and_shapes_with_prompts_file(tmp_path, capsys):
    over = tiny_overrides(tmp_path / "run", "minilm", **{"sample.prompts_file": tmp_path / "nope.txt"})
    assert main(["train", *over]) == 2
    one_line_error(capsys, "sample.prompts_file", "cannot read")
    own = tmp_path / "p.txt"
    own.write_text("a\nb\nc\nd\n")
    over = tiny_overrides(tmp_path / "run", "minilm", **{"eval.prompts_file": own})  # shapes data: auto = shapes
    assert main(["train", *over]) == 2
    one_line_error(capsys, "eval.prompts_file", "shapes score")
