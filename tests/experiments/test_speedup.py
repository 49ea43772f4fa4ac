"""Time to target (pixelrun/experiments/speedup.py, the summary's `speedup` and the report's sentences):
crossings and speed-ups equal hand computations, the interval's bounds are the hand-computed ratios of
the seed draws, an unreached target leaves the bound open instead of inventing one, `target:
baseline` resolves to the baseline's final mean, and the SPEC refuses any other word."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from pixelrun.cli import main
from pixelrun.config import ConfigError
from pixelrun.experiments.folders import StudyRun
from pixelrun.experiments.render import _speedup_blocks, ablation_blocks
from pixelrun.experiments.spec import load_spec
from pixelrun.experiments.speedup import crossings, order_bounds, speedup
from pixelrun.experiments.summary import summarize_ablation
from pixelrun.infra.records import EvalPoint

PROMPTS = 4


def point(fraction: float, value: float | list[float], flops: float, seconds: float, per_prompt: bool = True) -> dict:
    """An evaluation point's record: shapes/placed `value` (one per prompt, or one for every prompt)."""
    values = value if isinstance(value, list) else [value] * PROMPTS
    return {
        "step": round(fraction * 100),
        "fraction": fraction,
        "images": round(fraction * 1600),
        "flops": flops,
        "train_seconds": seconds,
        "weights": "ema",
        "sample_seed": 0,
        "prompts": [f"p{i}" for i in range(len(values))],
        "val": {},
        "results": [
            {
                "guidance": 4.0,
                "guidance_mode": "cfg",
                "metrics": {"shapes": {"placed": float(np.mean(values)), "n": len(values)}},
                "per_prompt": {"shapes": {"placed": values}} if per_prompt else {},
            }
        ],
        "settings": None,
    }


def run(variant: str, seed: int, values, flops=(1.0, 2.0), seconds=(10.0, 20.0), **kw) -> StudyRun:
    """A run evaluated at fractions 0.5 and 1 (or as many as `values`), in memory."""
    fractions = [(i + 1) / len(values) for i in range(len(values))]
    points = {f: EvalPoint.from_dict(point(f, v, x, t, **kw)) for f, v, x, t in zip(fractions, values, flops, seconds)}
    return StudyRun(variant, seed, f"runs/{variant}/seed{seed}", status="done", points=points)


def compare(mine: list[StudyRun], base: list[StudyRun], target="baseline", **kw) -> dict:
    return speedup(mine, base, "shapes/placed", target, guidance=4.0, higher=True, final=1.0, resamples=2000, **kw)


def test_crossing_is_the_linear_interpolation_after_the_first_point_at_the_target():
    assert crossings([1, 2, 3], [0.1, 0.3, 0.5], 0.5) == pytest.approx([3.0])
    assert crossings([1, 2], [0.2, 0.6], 0.5) == pytest.approx([1.75])  # 1 + (0.5 - 0.2) / (0.6 - 0.2)
    assert crossings([1, 2], [0.6, 0.7], 0.5) == pytest.approx([1.0])  # at the first point: its cost
    assert crossings([1, 2, 3], [3.0, 2.0, 1.0], 1.5, higher=False) == pytest.approx([2.5])  # a loss
    assert np.isnan(crossings([1, 2], [0.2, 0.3], 0.5)).all()
    # one target per row
    both = crossings([[1, 2], [1, 2]], [[0.2, 0.6], [0.2, 0.6]], [0.5, 0.3])
    assert both == pytest.approx([1.75, 1.25])


def test_hand_computed_speedup_with_the_seed_draws_as_its_interval():
    """The baseline 0.25 -> 0.5 at FLOPs 1 -> 2 in both seeds: the target (its final mean) 0.5 is
    reached at 2. The variant's seeds 0.25 -> 0.75 and 0.5 -> 1: their mean crosses 0.5 at 1.25
    (speed-up 1.6); the draws of two seeds give the curve of seed 0 (crossing 1.5: 4/3), of both
    (1.6) or of seed 1 (1: 2), a quarter of the draws each at the ends, so the 95% interval is [4/3, 2].
    In seconds the variant's points are at 20 and 40 against the baseline's 10 and 20: 20 / 25 = 0.8."""
    base = [run("baseline", s, [0.25, 0.5]) for s in (0, 1)]
    mine = [
        run("recipe", 0, [0.25, 0.75], seconds=(20.0, 40.0)),
        run("recipe", 1, [0.5, 1.0], seconds=(20.0, 40.0)),
    ]
    r = compare(mine, base)
    assert r["target"] == 0.5 and r["target_from"] == "baseline" and r["seeds"] == [0, 1] and r["prompts"] == PROMPTS
    assert r["interval_over"] == "seeds and prompts (paired)"
    f = r["flops"]
    assert (f["baseline_cost"], f["variant_cost"]) == pytest.approx((2.0, 1.25))
    assert (f["estimate"], f["low"], f["high"]) == pytest.approx((1.6, 4 / 3, 2.0)) and f["bounded"]
    s = r["seconds"]
    assert (s["estimate"], s["low"], s["high"]) == pytest.approx((20 / 25, 20 / 30, 20 / 20))
    assert f["unreached"] == {"baseline": 0.0, "variant": 0.0}


def test_the_same_seed_and_prompt_draw_for_both_variants():
    """Paired: a variant equal to the baseline prompt by prompt has a speed-up of exactly 1 in every
    draw, however much the prompts and seeds differ."""
    rng = np.random.default_rng(0)
    curves = {s: [sorted(rng.random(PROMPTS).tolist()) for _ in range(2)] for s in (0, 1)}
    curves = {s: [c[0], [v + 0.5 for v in c[1]]] for s, c in curves.items()}  # rising
    base = [run("baseline", s, curves[s]) for s in (0, 1)]
    mine = [run("same", s, curves[s]) for s in (0, 1)]
    f = compare(mine, base)["flops"]
    assert f["estimate"] == f["low"] == f["high"] == pytest.approx(1.0)


def test_a_variant_that_never_reaches_the_target_is_not_given_a_number():
    base = [run("baseline", s, [0.25, 0.5]) for s in (0, 1)]
    mine = [run("slow", s, [0.25, 0.375]) for s in (0, 1)]
    f = compare(mine, base)["flops"]
    assert f["estimate"] is None and f["low"] is None and f["high"] is None and not f["bounded"]
    assert f["at_most"] == pytest.approx(1.0)  # the baseline's 2 over the variant's whole budget of 2
    assert f["unreached"]["variant"] == 1.0
    summary = {"speedup": {"slow": compare(mine, base)}, "baseline": "baseline", "confidence": 0.95}
    (_, (_, (line, _))) = _speedup_blocks(summary)
    assert line == (
        "slow does not reach the baseline's final shapes/placed (0.5) within its budget: its speed-up is "
        "below 1x in training FLOPs and below 1x in training time (cannot be bounded below)"
    )


def test_a_bound_left_open_where_too_many_draws_miss_the_target():
    """Seed 1 of the variant never reaches 0.5: a quarter of the draws (seed 1 twice) never cross,
    more than 2.5%, so the lower bound is open; the upper is seed 0's 2 / 1.5."""
    base = [run("baseline", s, [0.25, 0.5]) for s in (0, 1)]
    mine = [run("v", 0, [0.25, 0.75]), run("v", 1, [0.25, 0.25])]
    r = compare(mine, base)
    f = r["flops"]
    assert f["estimate"] == pytest.approx(1.0)  # the mean 0.25 -> 0.5 reaches it at 2
    assert f["low"] is None and f["high"] == pytest.approx(4 / 3) and not f["bounded"]
    assert 0.2 < f["unreached"]["variant"] < 0.3
    summary = {"speedup": {"v": r}, "baseline": "baseline", "confidence": 0.95, "time_to_target": []}
    (_, (_, (line, _))) = _speedup_blocks(summary)
    assert re.search(
        r"^v reaches the baseline's final shapes/placed \(0\.5\) at a speed-up of 1x \(at most 1\.3x; the other bound ",
        line,
    )
    assert "v missed the target in 2" in line


def test_a_numeric_target_the_baseline_never_reaches_leaves_the_upper_bound_open():
    base = [run("baseline", s, [0.25, 0.5]) for s in (0, 1)]
    mine = [run("fast", s, [0.5, 1.0]) for s in (0, 1)]
    f = compare(mine, base, target=0.75)["flops"]
    assert f["estimate"] is None and f["at_least"] == pytest.approx(2 / 1.5) and f["high"] is None


def test_one_seed_or_no_per_prompt_scores_says_what_the_interval_covers():
    base = [run("baseline", 0, [0.25, 0.5])]
    r = compare([run("v", 0, [[0.0, 0.5, 0.5, 1.0], [0.5, 1.0, 1.0, 1.0]])], base)
    assert r["interval_over"] == "prompts only (one seed: seed-to-seed noise left out)" and r["resamples"] == 2000
    assert r["flops"]["estimate"] == pytest.approx(2.0)  # the variant's mean is at 0.5 at its first point
    r = compare([run("v", 0, [0.5, 1.0], per_prompt=False)], [run("baseline", 0, [0.25, 0.5], per_prompt=False)])
    assert r["interval_over"].startswith("nothing") and r["resamples"] == 0
    assert r["flops"]["estimate"] == pytest.approx(2.0) and r["flops"]["low"] is None
    two = [run("baseline", s, [0.25, 0.5], per_prompt=False) for s in (0, 1)]
    r = compare([run("v", s, [0.5, 1.0], per_prompt=False) for s in (0, 1)], two)
    assert r["interval_over"] == "seeds only (no per-prompt scores; paired)" and r["prompts"] is None
    # per-prompt scores on one side only: both curves fall back to the points' numbers
    r = compare([run("v", s, [0.5, 1.0]) for s in (0, 1)], two)
    assert r["interval_over"] == "seeds only (no per-prompt scores; paired)" and r["flops"]["estimate"] == 2.0


def write_study(out, budget: dict, curves: dict[str, list[list[float]]]) -> None:
    """An ablation folder: ablation.json and each run's point files (FLOPs 1e12 per point step)."""
    runs = []
    for v, per_seed in curves.items():
        for seed, values in enumerate(per_seed):
            d = out / "runs" / v / f"seed{seed}" / "points"
            d.mkdir(parents=True)
            for i, value in enumerate(values):
                f = (i + 1) / len(values)
                record = point(f, value, 1e12 * (i + 1), 10.0 * (i + 1))
                (d / f"step_{record['step']:08d}.json").write_text(json.dumps(record))
            runs.append(
                {
                    "variant": v,
                    "seed": seed,
                    "dir": f"runs/{v}/seed{seed}",
                    "steps": 100,
                    "global_batch": 16,
                    "images": 1600,
                    "flops_per_image": 1e9,
                    "point_steps": [50, 100],
                    "overrides": [],
                    "config": f"configs/{v}-seed{seed}.yaml",
                    "step_seconds_calibrated": None,
                    "command": "c",
                }
            )
    plan = {
        "name": "speedup",
        "spec_file": None,
        "baseline": "baseline",
        "variants": list(curves),
        "seeds": [0, 1],
        "budget": {"kind": "target", "value": 1600.0, "equal_steps": True, "cooldown": 0.2, **budget},
        "points": [0.5, 1.0],
        "protocol": {
            "metrics": ["shapes"],
            "prompts": PROMPTS,
            "sample_steps": 5,
            "guidance": [4.0],
            "primary_guidance": 4.0,
            "guidance_mode": "cfg",
            "weights": "ema",
            "val_images": 0,
            "spacing": "diffusers",
            "sample_seed": 0,
        },
        "base": {"config": None, "overrides": []},
        "machine": {"device": "cpu"},
        "runs": runs,
    }
    (out / "ablation.json").write_text(json.dumps(plan))


def test_target_baseline_resolves_to_its_final_mean_in_the_summary_and_report(tmp_path):
    """The baseline ends at 0.5 and 0.75 (mean 0.625): that is the target of the budget line, the
    per-run table and the speed-up; the recipe's mean 0.5 -> 1.0 crosses it at 1.25e12."""
    write_study(
        tmp_path,
        {"metric": "shapes/placed", "target": "baseline"},
        {"baseline": [[0.25, 0.5], [0.25, 0.75]], "recipe": [[0.5, 1.0], [0.5, 1.0]]},
    )
    summary = summarize_ablation(tmp_path)
    assert summary["budget_line"].startswith(
        "Budget: training until shapes/placed reaches the baseline's final score (0.625) (at most 1600)"
    )
    r = summary["speedup"]["recipe"]
    assert r["target"] == 0.625 and r["flops"]["variant_cost"] == pytest.approx(1.25e12)
    assert r["flops"]["estimate"] == pytest.approx(2e12 / 1.25e12)
    reached = {(t["variant"], t["seed"]): t["reached"] for t in summary["time_to_target"]}
    assert reached[("baseline", 0)] is None and reached[("baseline", 1)]["value"] == 0.75
    text = json.dumps(ablation_blocks(summary, {}))
    assert "recipe reaches the baseline's final shapes/placed (0.625) at a speed-up of 1.6x [" in text
    assert "Time to reach shapes/placed 0.625 (the baseline's final score)" in text


def test_other_budgets_have_no_speedup(tmp_path):
    write_study(tmp_path, {"metric": None, "target": None}, {"baseline": [[0.25, 0.5]] * 2, "v": [[0.5, 1.0]] * 2})
    plan = json.loads((tmp_path / "ablation.json").read_text())
    plan["budget"]["kind"] = "images"
    (tmp_path / "ablation.json").write_text(json.dumps(plan))
    assert "speedup" not in summarize_ablation(tmp_path)


def spec_file(tmp_path, target) -> str:
    spec = {
        "variants": {"baseline": [], "recipe": ["repa.weight=0.5"]},
        "out": str(tmp_path / "out"),
        "budget": {"kind": "target", "value": 1600, "metric": "shapes/placed", "target": target},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return str(tmp_path / "spec.yaml")


def test_the_spec_takes_a_number_or_the_word_baseline(tmp_path, capsys):
    assert load_spec(spec_file(tmp_path, "baseline")).budget.target == "baseline"
    assert load_spec(spec_file(tmp_path, 0.5)).budget.target == 0.5
    assert load_spec(spec_file(tmp_path, "1e-3")).budget.target == pytest.approx(1e-3)  # YAML 1.1's string
    with pytest.raises(ConfigError, match=r"^spec\.budget\.target: must be a number or `baseline`"):
        load_spec(spec_file(tmp_path, "best"))
    assert main(["ablate", "plan", spec_file(tmp_path, "Baseline")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pixelrun: config error: spec.budget.target: "), err
    assert not (tmp_path / "out").exists()


def test_a_target_budget_without_a_target_names_it(tmp_path):
    spec = yaml.safe_load(Path(spec_file(tmp_path, 0.5)).read_text())
    del spec["budget"]["target"]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"^spec\.budget\.target: .*target: baseline"):
        load_spec(tmp_path / "spec.yaml")


def test_interval_ends_are_order_statistics():
    """floor(0.025 * 40) + 1 = the 2nd smallest and the 2nd largest; 0 and inf leave a side open."""
    x = np.arange(1.0, 41.0)
    assert order_bounds(x, x, 0.95) == (2.0, 39.0)
    assert order_bounds(np.r_[0.0, 0.0, x[2:]], np.r_[x[:-2], np.inf, np.inf], 0.95) == (None, None)
    assert order_bounds(np.r_[0.0, x[1:]], np.r_[x[:-1], np.inf], 0.95) == (2.0, 39.0)


def test_the_cpu_recipe_spec_asks_for_the_baselines_final_score():
    spec = load_spec(Path(__file__).resolve().parents[2] / "configs" / "ablations" / "speedup-cpu.yaml")
    assert (spec.budget.kind, spec.budget.value, spec.budget.target) == ("target", 32000, "baseline")
    assert spec.baseline == "plain" and list(spec.variants) == ["plain", "recipe"] and spec.seeds == [0, 1]
