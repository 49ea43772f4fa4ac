"""Heun, a guidance interval and two EMAs through the commands: a tiny run resumed from a checkpoint
of one EMA with two decays, its evaluation points (every EMA x guidance, each with its NFE), `pixelrun
sample`, `eval` and `export` choosing an EMA by --ema-decay (decay 0 is the raw weights, so its
images are the raw weights' bit for bit), and `pixelrun report` showing the sweep."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import one_line_error, tiny_overrides
from PIL import Image

from pixelrun.cli import main
from pixelrun.infra.records import EvalPoint

SAMPLER = ["sample.sampler=heun", "sample.guidance_interval=[0,0.9]", "eval.guidance=[1,4]", "eval.every=3"]
# sample.steps=3 on the diffusers grid: t = 1, 0.9?, ... evaluated; (0, 0.9] leaves t = 1 unguided.
# Heun: (1 + 2) + (2 + 2) + the last step's Euler 2 = 9 at guidance 4; 2 x 2 + 1 = 5 at guidance 1.
NFE = {4.0: 9, 1.0: 5}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_encoder_dir):
    root = tmp_path_factory.mktemp("samplers")
    run_dir = root / "run"
    first = tiny_overrides(run_dir, tiny_encoder_dir, **{"train.steps": 3, "ema.decay": 0.9})
    assert main(["train", *first]) == 0  # a run of one EMA, as every run before ema.decays
    more = tiny_overrides(run_dir, tiny_encoder_dir, **{"ema.decays": "[0.9,0]"})
    return root, run_dir, more


def test_a_run_of_one_ema_resumes_with_two_and_evaluates_each(run, capsys):
    root, run_dir, more = run
    assert main(["train", *more, *SAMPLER]) == 0
    out = capsys.readouterr().out
    assert "EMA 0: not in the checkpoint (it keeps 0.9); starts from its EMA 0.9" in out
    assert "9 model evaluations per image" in out and "EMA 0 at guidance 1: " in out
    point = EvalPoint.read(run_dir / "points" / "step_00000006.json")
    pairs = [(r.ema_decay, r.guidance, r.nfe) for r in point.results]
    assert pairs == [(0.9, 4.0, 9), (0.9, 1.0, 5), (0.0, 4.0, 9), (0.0, 1.0, 5)]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "eval/shapes/placed" in r][-1]  # metrics.jsonl keeps the first EMA's numbers
    assert last["eval/shapes/placed"] == point.results[0].metrics["shapes"]["placed"]
    assert main(["report", str(run_dir)]) == 0
    html = (run_dir / "report" / "report.html").read_text()
    assert "Evaluation at step 6: EMA x guidance" in html and "<th>NFE</th>" in html and "EMA 0.9" in html


def _png(folder) -> np.ndarray:
    return np.asarray(Image.open(folder / "000.png"))


def test_sample_eval_and_export_choose_an_ema_by_decay(run, capsys):
    root, run_dir, more = run
    ckpt = str(run_dir)
    args = ["sample", "--checkpoint", ckpt, "--prompt", "a red circle", *SAMPLER[:2]]
    assert main([*args, "--out", str(root / "zero"), "--ema-decay", "0"]) == 0
    assert main([*args, "--out", str(root / "raw"), "--weights", "raw"]) == 0
    assert main([*args, "--out", str(root / "first")]) == 0
    assert np.array_equal(_png(root / "zero"), _png(root / "raw"))  # EMA decay 0: the raw weights
    assert not np.array_equal(_png(root / "first"), _png(root / "raw"))
    written = json.loads((root / "zero" / "prompts.json").read_text())
    assert (written["sampler"], written["nfe"], written["ema_decay"]) == ("heun", 9, 0.0)
    capsys.readouterr()
    assert main([*args, "--out", str(root / "none"), "--ema-decay", "0.7"]) == 2
    one_line_error(capsys, "--ema-decay:", "keeps the EMA of decay 0.9, 0, not 0.7")

    assert main(["eval", "--checkpoint", ckpt, "--ema-decay", "0", "--out", str(root / "e.json"), *SAMPLER[:2]]) == 0
    result = json.loads((root / "e.json").read_text())
    assert (result["ema_decay"], result["nfe"], result["settings"]["sampler"]) == (0.0, 9, "heun")

    assert main(["export", "--checkpoint", ckpt, "--out", str(root / "exp"), "--ema-decay", "0"]) == 0
    assert (
        main(["sample", "--checkpoint", str(root / "exp"), "--prompt", "a red circle", "--out", str(root / "x")]) == 0
    )
    assert np.array_equal(_png(root / "x"), _png(root / "raw"))
