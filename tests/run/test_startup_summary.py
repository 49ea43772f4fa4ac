"""What a run says before its first step (issue 30): what it trains on (images, captions, the ones
dropped and the key that keeps them), at what size, how much in all, where it writes, what it
evaluates or that it evaluates nothing and why; and an estimate of the time left."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import tiny_overrides
from PIL import Image

from pixelrun.config import batch_split, load_config, stage_plan
from pixelrun.data.sources import describe_source, make_batch_source
from pixelrun.evaluation.evaluate import applicable_metrics
from pixelrun.run.messages import describe_plan, estimate_line


def _folder(root: Path, n: int = 9, uncaptioned=(0, 4)) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"{i}.png")
        if i not in uncaptioned:
            (root / f"{i}.txt").write_text(f"picture {i}")
    return root


def _cfg(tmp_path, **extra):
    over = {"data.source": "folder", "data.resolution": 16, "data.path": tmp_path / "imgs", **extra}
    return load_config(None, tiny_overrides(tmp_path / "run", "minilm", **over))


def test_a_folder_run_names_its_images_the_dropped_ones_and_the_key(tmp_path):
    _folder(tmp_path / "imgs")
    # every captioned image trains here (the held-out split: tests/data/test_val_split.py)
    cfg = _cfg(tmp_path, **{"data.val_count": 0})
    line = describe_source(cfg, make_batch_source(cfg))
    assert line == (
        f"data: folder {tmp_path / 'imgs'}: 7 images, 7 captioned, 2 without a caption skipped "
        "(data.uncaptioned=empty trains them with an empty caption); 16px, square; each image scaled to "
        "cover its size and centre-cropped"
    )
    kept = _cfg(tmp_path, **{"data.uncaptioned": "empty", "data.val_count": 0})
    source = make_batch_source(kept)
    assert describe_source(kept, source).startswith(
        f"data: folder {tmp_path / 'imgs'}: 9 images, 7 captioned, 2 without a caption trained with the empty one;"
    )
    captions = {c for _ in range(6) for c in next(source).captions}  # 24 draws over 9 images: all seen
    assert "" in captions and len(captions) == 8


def test_the_plan_line_counts_images_and_says_when_nothing_is_evaluated(tmp_path):
    cfg = _cfg(tmp_path, **{"train.steps": 30, "train.batch_size": 4})
    plan = stage_plan(cfg)
    splits = [batch_split(c, 1) for _, _, c in plan]
    lines = describe_plan(cfg, plan, splits, tmp_path / "run", applicable_metrics(cfg))
    assert lines[0] == f"plan: 30 steps, 120 images in all (global batch 4); run folder {tmp_path / 'run'}"
    assert lines[1] == (  # the default, eval.metrics=[auto]: the offline Fréchet distance on a folder
        "evaluation: fd-effnet on 4 prompts (ema weights), at the end (eval.metrics=[auto]: the shapes score on "
        "shapes data, fd-effnet on other data)"
    )
    only_shapes = _cfg(tmp_path, **{"eval.metrics": "[shapes]", "train.steps": 30, "train.batch_size": 4})
    lines = describe_plan(only_shapes, plan, splits, tmp_path / "run", applicable_metrics(only_shapes))
    assert lines[1].startswith("evaluation: none: eval.metrics=['shapes'] does not apply to data.source=folder")
    assert "eval.metrics=[fd-effnet]" in lines[1]
    on = _cfg(tmp_path, **{"eval.metrics": "[fd-effnet]", "eval.every": 10})
    assert describe_plan(on, plan, splits, tmp_path, ["fd-effnet"])[1] == (
        "evaluation: fd-effnet on 4 prompts (ema weights), every 10 steps and at the end"
    )


def test_the_estimate_is_the_mean_step_time_times_the_steps_left():
    assert estimate_line(4, 10.0, 70) == (
        "estimate: 2.5 s/step over the first 4 steps: about 2 min 55 s for the 70 left, plus sample grids, "
        "evaluations and checkpoints"
    )


def test_the_training_bar_shows_each_term_by_name_not_the_mixed_total():
    from pixelrun.run.train import bar_postfix

    shown = bar_postfix({"loss": -0.31, "flow": 0.2153, "repa": -0.5253, "lpips": 0.0}, 12.34)
    assert shown == {"flow": "0.2153", "repa": "-0.5253", "lpips": "0", "img/s": "12.3"}
    assert bar_postfix({"loss": 0.5}, 1234.5) == {"loss": "0.5", "img/s": "1234"}


def test_the_own_data_config_needs_only_a_folder(tmp_path):
    from pixelrun.config import ConfigError

    config = Path(__file__).parents[2] / "configs" / "own-data-cpu.yaml"
    try:
        load_config(config)
    except ConfigError as e:
        assert e.key == "data.path"
    else:
        raise AssertionError("data.path is required")
    cfg = load_config(config, [f"data.path={tmp_path}"])
    assert cfg.data.source == "folder" and cfg.eval.metrics == ["auto"] and applicable_metrics(cfg) == ["fd-effnet"]
