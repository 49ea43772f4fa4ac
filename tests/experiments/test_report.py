"""pixelrun/experiments/report.py (and the folders, summary, render and figures modules it joins) on synthetic folders laid out as `pixelrun ablate` and `pixelrun train` write
them: the report's numbers equal those recomputed here from the files, every output is written and
self-contained, an incomplete ablation is reported rather than fatal, and `pixelrun report RUN`."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelrun.cli import main
from pixelrun.experiments import stats
from pixelrun.experiments.figures import is_loss_term, row_panels
from pixelrun.experiments.folders import StudyRun
from pixelrun.experiments.render import jsonable
from pixelrun.experiments.report import write_ablation_report, write_run_report
from pixelrun.experiments.summary import summarize_ablation
from pixelrun.infra.records import RecordError, read_metrics

PROMPTS = [f"a red circle in cell {i}" for i in range(8)]
VAL = ("val/flow/low", "val/flow/mid", "val/flow/high", "val_ema/flow/low", "val_ema/flow/mid", "val_ema/flow/high")


def write_run(
    d,
    rng,
    *,
    shift: float = 0.0,
    fd_shift: float = 0.0,
    fractions=(0.5, 1.0),
    steps: int = 10,
    batch: int = 4,
    base=None,
):
    """A run folder: metrics.jsonl (training and evaluation rows, a torn last line), one points/ file
    and image folder per fraction, run-summary.json, provenance.json and sample grids. `base` (the
    baseline's per-prompt 'placed' values and fd-effnet by fraction and guidance) plus `shift` and
    `fd_shift` makes a variant paired with it."""
    d.mkdir(parents=True)
    rows = [
        {
            "step": s,
            "loss": 1 / s + rng.random() * 0.1,
            "flow": 1 / s,
            "repa": 0.5 / s,
            "grad_norm": 1 + rng.random(),
            "lr": 1e-3 * s / steps,
            "images_per_s": 100 + rng.random(),
            "train_seconds": 0.5 * s,
        }
        for s in range(1, steps + 1)
    ]
    rows += [{"step": s, **{k: rng.random() for k in VAL}, "eval/shapes/placed": rng.random()} for s in (5, 10)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 11, "loss"')
    placed_by_fraction = {}
    for f in fractions:
        step = round(f * steps)
        results = []
        for g in (1.0, 4.0):
            if base:
                placed, fd = base[f][g][0] + shift, base[f][g][1] + fd_shift
            else:
                placed, fd = rng.choice([0.0, 0.5], size=len(PROMPTS)), 10.0 - g + rng.random()
            exact = rng.choice([0.0, 1.0], size=len(PROMPTS))
            placed_by_fraction.setdefault(f, {})[g] = placed, fd
            results.append(
                {
                    "guidance": g,
                    "guidance_mode": "cfg",
                    "metrics": {
                        "shapes": {"placed": float(placed.mean()), "exact_set": float(exact.mean()), "n": len(PROMPTS)},
                        "fd-effnet": fd,
                    },
                    "per_prompt": {"shapes": {"placed": placed.tolist(), "exact_set": exact.tolist()}},
                }
            )
        point = {
            "step": step,
            "fraction": f,
            "images": step * batch,
            "flops": step * batch * 1e9,
            "train_seconds": 0.5 * step + rng.random(),
            "weights": "ema",
            "sample_seed": 0,
            "prompts": PROMPTS,
            "val": {k: rng.random() for k in VAL},
            "results": results,
            "settings": {"guidance": 1.0, "prompts": len(PROMPTS)},
        }
        (d / "points").mkdir(exist_ok=True)
        (d / "points" / f"step_{step:08d}.json").write_text(json.dumps(point))
        for i in range(3):
            img = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
            (d / "points" / f"step_{step:08d}").mkdir(exist_ok=True)
            Image.fromarray(img).save(d / "points" / f"step_{step:08d}" / f"{i:03d}.png")
    (d / "run-summary.json").write_text(
        json.dumps(
            {
                "status": "done",
                "steps": steps,
                "images": steps * batch,
                "flops": steps * batch * 1e9,
                "train_seconds": 5.0 + rng.random(),
                "images_per_s": 100 + rng.random(),
                "step_seconds": 0.04,
                "peak_memory_bytes": 2**30,
                "flops_per_image": 1e9,
                "device": "cpu",
                "world_size": 1,
            }
        )
    )
    (d / "provenance.json").write_text(
        json.dumps(
            {
                "git_commit": "abc",
                "git_dirty": False,
                "packages": {},
                "device": "cpu",
                "host": "h",
                "python": "3.11",
                "command": "x",
            }
        )
    )
    (d / "samples").mkdir()
    for name in ("step_00000005.png", "final.png", "denoise.png"):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(d / "samples" / name)
    return placed_by_fraction


@pytest.fixture
def ablation(tmp_path):
    """baseline and tread, seeds 0 and 1. tread's 'placed' is the baseline's + 0.25 on every prompt
    (better, with a zero-width interval) and its fd-effnet the baseline's + 1 (worse)."""
    out = tmp_path / "abl"
    rng = np.random.default_rng(0)
    runs = []
    for seed in (0, 1):
        base = write_run(out / "runs" / "baseline" / f"seed{seed}", rng)
        write_run(out / "runs" / "tread" / f"seed{seed}", rng, shift=0.25, fd_shift=1.0, base=base)
        runs += [
            {
                "variant": v,
                "seed": seed,
                "dir": f"runs/{v}/seed{seed}",
                "steps": 10,
                "global_batch": 4,
                "images": 40,
                "flops_per_image": 1e9,
                "point_steps": [5, 10],
                "overrides": [],
                "config": f"configs/{v}-seed{seed}.yaml",
                "step_seconds_calibrated": None,
                "command": "c",
            }
            for v in ("baseline", "tread")
        ]
    spec = {
        "name": "tread-vs-dense",
        "spec_file": None,
        "baseline": "baseline",
        "variants": ["baseline", "tread"],
        "seeds": [0, 1],
        "budget": {
            "kind": "images",
            "value": 40.0,
            "metric": None,
            "target": None,
            "equal_steps": True,
            "cooldown": 0.2,
        },
        "points": [0.5, 1.0],
        "protocol": {
            "metrics": ["shapes", "fd-effnet"],
            "prompts": 8,
            "sample_steps": 5,
            "guidance": [1.0, 4.0],
            "primary_guidance": 4.0,
            "guidance_mode": "cfg",
            "weights": "ema",
            "val_images": 4,
            "spacing": "diffusers",
            "sample_seed": 0,
        },
        "base": {"config": None, "overrides": []},
        "machine": {"device": "cpu", "cpu": "test cpu", "host": "h"},
        "runs": runs,
    }
    (out / "ablation.json").write_text(json.dumps(spec))
    return out


def point_of(out, variant, seed, step=10):
    return json.loads((out / "runs" / variant / f"seed{seed}" / "points" / f"step_{step:08d}.json").read_text())


def at_guidance(point, g=4.0):
    return next(r for r in point["results"] if r["guidance"] == g)


def test_summary_numbers_equal_those_recomputed_from_the_files(ablation):
    s = summarize_ablation(ablation)
    placed = {
        v: [at_guidance(point_of(ablation, v, seed))["metrics"]["shapes"]["placed"] for seed in (0, 1)]
        for v in ("baseline", "tread")
    }
    fd = {
        v: [at_guidance(point_of(ablation, v, seed))["metrics"]["fd-effnet"] for seed in (0, 1)]
        for v in ("baseline", "tread")
    }
    base, tread = s["final"]["baseline"], s["final"]["tread"]
    assert base["shapes/placed"]["mean"]["estimate"] == pytest.approx(np.mean(placed["baseline"]))
    assert tread["shapes/placed"]["mean"]["estimate"] == pytest.approx(np.mean(placed["tread"]))
    assert tread["fd-effnet"]["mean"]["estimate"] == pytest.approx(np.mean(fd["tread"]))
    # paired per prompt: every prompt moved by exactly 0.25, so the interval has no width
    delta = tread["shapes/placed"]["delta"]
    assert (delta["estimate"], delta["low"], delta["high"]) == pytest.approx((0.25, 0.25, 0.25))
    assert (delta["method"], delta["n"], delta["prompts"]) == ("two-level bootstrap", 2, len(PROMPTS))
    assert tread["shapes/placed"]["verdict"] == "better"
    # one number per seed: the paired t interval over the two seeds; +1 distance is worse
    assert tread["fd-effnet"]["delta"] == stats.paired_t(fd["tread"], fd["baseline"]).as_dict()
    assert tread["fd-effnet"]["verdict"] == "worse"
    assert base["shapes/placed"]["delta"] is None
    # the noise floor is the baseline's seed-to-seed spread
    assert s["noise_floor"]["shapes/placed"]["range"] == pytest.approx(
        abs(placed["baseline"][0] - placed["baseline"][1])
    )
    val = [point_of(ablation, "baseline", seed)["val"]["val_ema/flow/mid"] for seed in (0, 1)]
    assert base["val_ema/flow/mid"]["mean"]["estimate"] == pytest.approx(np.mean(val))
    # every point, not just the budget
    half = [at_guidance(point_of(ablation, "tread", seed, step=5))["metrics"]["shapes"]["exact_set"] for seed in (0, 1)]
    assert s["by_point"]["0.5"]["tread"]["shapes/exact_set"]["mean"]["estimate"] == pytest.approx(np.mean(half))


def test_guidance_curve_best_guidance_and_throughput(ablation):
    s = summarize_ablation(ablation)
    curve = s["guidance"]["baseline"]["fd-effnet"]
    assert [c["guidance"] for c in curve] == [1.0, 4.0]
    g1 = [at_guidance(point_of(ablation, "baseline", seed), 1.0)["metrics"]["fd-effnet"] for seed in (0, 1)]
    assert curve[0]["mean"]["estimate"] == pytest.approx(np.mean(g1))
    assert s["best_guidance"]["baseline"]["fd-effnet"] == 4.0  # the synthetic distance falls with guidance
    summaries = [
        json.loads((ablation / "runs" / "tread" / f"seed{seed}" / "run-summary.json").read_text()) for seed in (0, 1)
    ]
    tp = s["throughput"]["tread"]
    assert tp["images_per_s"] == pytest.approx(np.mean([x["images_per_s"] for x in summaries]))
    assert (tp["step_reached"], tp["images_reached"], tp["flops_reached"]) == (10, 40, 40e9)
    assert s["equal_steps"] and "equal steps: every run 10 steps at global batch 4" in s["budget_line"]
    assert s["incomplete"] == []


def test_report_files_are_written_and_the_html_is_self_contained(ablation):
    written = write_ablation_report(ablation)
    names = {p.relative_to(ablation).as_posix() for p in written}
    assert {
        "report.md",
        "summary.csv",
        "summary.json",
        "report.html",
        "report/eval_vs_images.png",
        "report/eval_vs_flops.png",
        "report/eval_vs_seconds.png",
        "report/training_losses.png",
        "report/validation.png",
        "report/guidance.png",
        "report/samples.png",
    } == names
    for p in written:
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            Image.open(p).verify()
    assert not list(ablation.rglob(".*.tmp"))
    html = (ablation / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', html)
    assert len(sources) == 7 and all(src.startswith("data:image/png;base64,") for src in sources)
    assert "href=" not in html
    md = (ablation / "report.md").read_text()
    assert "equal steps" in md and "Noise floor" in md and "- cpu: test cpu" in md and "- guidance: 1.0, 4.0" in md
    tread_row = next(line for line in md.splitlines() if line.startswith("| tread |"))
    assert "Δ +0.25 [+0.25, +0.25] better" in tread_row
    summary = summarize_ablation(ablation)
    assert (
        json.loads((ablation / "summary.json").read_text())["final"]["tread"]["shapes/placed"]["delta"]
        == summary["final"]["tread"]["shapes/placed"]["delta"]
    )
    with open(ablation / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    row = next(
        r for r in rows if (r["point"], r["variant"], r["metric"], r["guidance"]) == ("1", "tread", "fd-effnet", "4.0")
    )
    cell = summary["final"]["tread"]["fd-effnet"]
    assert float(row["mean"]) == pytest.approx(cell["mean"]["estimate"])
    assert float(row["delta"]) == pytest.approx(cell["delta"]["estimate"])
    assert row["verdict"] == "worse"
    assert any(r["guidance"] == "1.0" for r in rows)  # the rest of the guidance curve is in the CSV too


def test_a_missing_and_an_unfinished_run_are_listed_not_fatal(ablation):

    shutil.rmtree(ablation / "runs" / "tread" / "seed1")
    unfinished = ablation / "runs" / "baseline" / "seed1"
    (unfinished / "points" / "step_00000010.json").unlink()
    (unfinished / "run-summary.json").unlink()
    write_ablation_report(ablation)
    s = summarize_ablation(ablation)
    assert [(r["variant"], r["seed"], r["status"]) for r in s["incomplete"]] == [
        ("baseline", 1, "unfinished"),
        ("tread", 1, "missing"),
    ]
    assert s["incomplete"][0]["reason"] == "no evaluation at the budget (fraction 1); points reached: 0.5"
    # one seed left on each side: the per-prompt interval covers prompts only, the t interval is absent
    cell = s["final"]["tread"]
    assert cell["shapes/placed"]["delta"]["n"] == 1 and "not seed-to-seed" in cell["shapes/placed"]["delta"]["note"]
    assert cell["fd-effnet"]["delta"]["low"] is None and cell["fd-effnet"]["verdict"] == "no interval"
    md = (ablation / "report.md").read_text()
    assert "tread seed 1 (runs/tread/seed1, missing): no run folder" in md


def test_an_ablation_folder_without_its_spec_is_a_config_error(tmp_path):
    from pixelrun.config import ConfigError

    with pytest.raises(ConfigError, match=r"OUT: .* has no readable ablation.json"):
        summarize_ablation(tmp_path)


def test_pixelrun_report_writes_a_run_report(ablation, capsys):
    run = ablation / "runs" / "baseline" / "seed0"
    assert main(["report", str(run)]) == 0
    printed = capsys.readouterr().out.split()
    expected = [
        run / "report" / n for n in ("losses.png", "validation.png", "eval.png", "optimizer.png", "report.html")
    ]
    assert printed == [str(p) for p in expected]
    html = expected[-1].read_text()
    sources = re.findall(r'src="([^"]*)"', html)
    assert len(sources) == 4 + 3 and all(s.startswith("data:image/png;base64,") for s in sources)  # curves, grids
    assert "step 5" in html and "final" in html and "at each noise level" in html  # samples/denoise.png too
    other = ablation / "elsewhere"
    assert main(["report", str(run), "--out", str(other)]) == 0
    assert (other / "report.html").is_file()


def test_pixelrun_report_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"pixelrun: config error: RUN: {tmp_path} has no metrics.jsonl: not a pixelrun run folder\n"


def test_run_report_curves_read_every_loss_term(tmp_path):
    """The loss panel holds every training term the rows carry, and nothing of optimizer or evaluation."""
    run = tmp_path / "run"
    write_run(run, np.random.default_rng(3))
    rows = read_metrics(run / "metrics.jsonl")
    assert len(rows) == 12  # the torn last line is skipped
    panels = row_panels([StudyRun("r", 0, ".", rows=rows)], ["r"], is_loss_term, lambda r, step: step)
    assert [title for title, _ in panels] == ["loss", "flow", "repa"]
    ((_, x, mean, low, high),) = panels[1][1]
    assert low is None and high is None  # one run: no seed band
    assert x == list(range(1, 11)) and mean == pytest.approx([1 / s for s in range(1, 11)])
    assert write_run_report(run)[-1] == run / "report" / "report.html"


def test_an_ablation_before_any_run_finished_still_gets_a_report(ablation):

    shutil.rmtree(ablation / "runs")
    written = write_ablation_report(ablation)
    assert [p.name for p in written] == ["report.md", "summary.csv", "summary.json", "report.html"]
    s = summarize_ablation(ablation)
    assert len(s["incomplete"]) == 4 and s["final"] == {"baseline": {}, "tread": {}}
    assert "baseline seed 0 (runs/baseline/seed0, missing): no run folder" in (ablation / "report.md").read_text()


def test_a_long_noisy_curve_is_drawn_as_a_moving_average():
    """400 logged losses alternating 0, 1: a window of 4 (1 % of the length) averages every pair to
    0.5; the learning rate is drawn as logged."""
    rows = [{"step": s, "loss": float(s % 2), "lr": s * 1e-4} for s in range(1, 401)]
    panels = dict(
        row_panels([StudyRun("r", 0, ".", rows=rows)], ["r"], lambda k: k in ("loss", "lr"), lambda r, step: step)
    )
    ((_, x, mean, _, _),) = panels["loss (moving average of 4)"]
    assert x == list(range(4, 401)) and mean == pytest.approx([0.5] * 397)
    ((_, x, mean, _, _),) = panels["lr"]
    assert len(x) == 400 and mean == pytest.approx([s * 1e-4 for s in range(1, 401)])


def test_a_target_budget_reports_when_each_run_reached_it(ablation):
    """The first point at which shapes/placed reached the target, per run, from the point files."""
    spec = json.loads((ablation / "ablation.json").read_text())
    spec["budget"].update(kind="target", metric="shapes/placed", target=0.0)
    (ablation / "ablation.json").write_text(json.dumps(spec))
    first = {(v, s): point_of(ablation, v, s, 5) for v in ("baseline", "tread") for s in (0, 1)}
    target = summarize_ablation(ablation)["time_to_target"]
    assert [(t["variant"], t["seed"]) for t in target] == [("baseline", 0), ("tread", 0), ("baseline", 1), ("tread", 1)]
    for t in target:  # every value is >= 0: reached at the first point, with that point's images
        p = first[(t["variant"], t["seed"])]
        assert t["reached"]["step"] == p["step"] == 5 and t["reached"]["images"] == p["images"]
    spec["budget"]["target"] = 2.0  # a fraction of prompts never exceeds 1
    (ablation / "ablation.json").write_text(json.dumps(spec))
    assert all(t["reached"] is None for t in summarize_ablation(ablation)["time_to_target"])
    write_ablation_report(ablation)
    assert "## Time to reach shapes/placed 2.0" in (ablation / "report.md").read_text()


KEPT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "ablations"


@pytest.mark.parametrize("study", sorted(p.name for p in KEPT.glob("*") if (p / "runs").is_dir()))
def test_each_kept_study_report_rebuilds_from_its_run_folders(study, tmp_path):
    """The numbers of a kept study (benchmarks/results/ablations/*/) are what its run folders give:
    its summary is rebuilt from a copy of the folders and compared with the one kept."""
    copy = tmp_path / study
    shutil.copytree(KEPT / study, copy, ignore=shutil.ignore_patterns("report*", "summary.*"))
    rebuilt = json.loads(json.dumps(jsonable(summarize_ablation(copy))))
    kept = json.loads((KEPT / study / "summary.json").read_text())
    assert rebuilt["final"] and rebuilt["variants"] == kept["variants"]
    for key in ("final", "by_point", "noise_floor", "throughput", "confidence", "budget_line"):
        assert rebuilt[key] == kept[key], key


def test_a_point_with_a_renamed_field_stops_the_report_naming_the_file(ablation):
    """A writer that renamed `per_prompt` fails the reader loudly, not with a silent default."""
    f = ablation / "runs" / "tread" / "seed0" / "points" / "step_00000010.json"
    point = json.loads(f.read_text())
    point["results"][0]["per_prompts"] = point["results"][0].pop("per_prompt")
    f.write_text(json.dumps(point))
    with pytest.raises(RecordError, match=rf"^{re.escape(str(f))}: unknown field .*results\[0\]\.per_prompts"):
        summarize_ablation(ablation)


@pytest.mark.parametrize("study", sorted(p.name for p in KEPT.glob("*") if (p / "runs").is_dir()))
def test_each_kept_study_rebuilds_byte_identical_text(study, tmp_path):
    """report.md, summary.json, summary.csv and report.html of a kept study, rebuilt from a copy of
    its folder, are the kept files byte for byte."""
    copy = tmp_path / study
    shutil.copytree(KEPT / study, copy)
    write_ablation_report(copy)
    for name in ("report.md", "summary.json", "summary.csv", "report.html"):
        assert (copy / name).read_bytes() == (KEPT / study / name).read_bytes(), name
