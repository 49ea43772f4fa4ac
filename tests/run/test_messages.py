"""The shapes score's placed measure is never printed without its kind measure beside it (issue 31):
the line that ends `pixelrun train` and the evaluation lines of training and `pixelrun eval`."""

from __future__ import annotations

from pathlib import Path

from pixelrun.config import load_config
from pixelrun.evaluation.evaluate import describe_metrics
from pixelrun.run.messages import summary_line

SCORE = {"placed": 0.727, "exact_set": 0.656, "kind": 0.352, "size": 0.656, "n": 64}


def test_an_evaluation_line_gives_kind_beside_placed():
    assert describe_metrics({"shapes": SCORE, "fd-effnet": 12.4}) == (
        "shapes score 0.727 (placed; kind 0.352), fd-effnet 12.4"
    )
    assert describe_metrics({"fd-effnet": 12.4}) == "fd-effnet 12.4"


def test_the_last_line_of_a_run_gives_kind_beside_placed():
    cfg = load_config(None, ["eval.prompts=64"])
    summary = {"score": SCORE, "eval": {"shapes": SCORE}, "skipped_images": 0, "truncated_captions": 0}
    line = summary_line(
        cfg, 2000, summary, Path("runs/demo/checkpoints/step_2000"), Path("runs/demo/samples/final.png"), 691.0
    )
    assert line == (
        "done: 2000 steps (11 min 31 s this session); checkpoint runs/demo/checkpoints/step_2000; samples "
        "runs/demo/samples/; shapes score 0.727 (placed; kind 0.352, exact set 0.656, EMA, 64 prompts, "
        "eval.json in the run)"
    )
    raw = load_config(None, ["eval.prompts=8", "eval.weights=raw"])
    other = {"eval": {"fd-effnet": 12.4}, "skipped_images": 0, "truncated_captions": 0}
    assert summary_line(raw, 5, other, Path("c"), Path("s/final.png"), 3.0).endswith(
        "; fd-effnet 12.4 (RAW, 8 prompts, eval.json in the run)"
    )
