"""The README's results table is rendered from the kept studies' summary.json files
(pixelrun/experiments/headline.py, issue 31): the committed README holds exactly that table, with the
shapes score's kind measure beside its placed one, so the table cannot disagree with the reports."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pixelrun.config import ConfigError
from pixelrun.experiments.headline import (
    MARK,
    budget_text,
    fixed,
    load_listing,
    main,
    render,
    replace_in,
)

ROOT = Path(__file__).resolve().parents[2]
LISTING = ROOT / "benchmarks" / "results" / "ablations" / "headline.yaml"
REGENERATE = "python -m pixelrun.experiments.headline benchmarks/results/ablations/headline.yaml README.md"


def test_the_readme_holds_the_table_the_kept_summaries_give():
    table = render(load_listing(LISTING))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert replace_in(readme, table) == readme, f"README.md's results table is stale: run {REGENERATE}"
    assert table in readme
    # the rows of the issue: a placed verdict beside a kind verdict that differs from it
    assert "| | Muon, lr 1e-3 | 0.063 [0.041, 0.088] | +0.020 [-0.007, +0.047] | 0.182 [0.139, 0.227] | " in table
    assert table.count("within noise / better") == 1


def _cell(estimate, low, high, delta=None, verdict=None) -> dict:
    mean = {"estimate": estimate, "low": low, "high": high}
    return {"mean": mean, "delta": delta and dict(zip(("estimate", "low", "high"), delta)), "verdict": verdict}


SUMMARY = {
    "name": "toy",
    "baseline": "base",
    "variants": ["base", "trick", "other"],
    "seeds": [0, 1],
    "budget": {"kind": "flops", "value": 3.844e13, "cooldown": 0.2, "metric": None, "target": None},
    "primary_guidance": 4.0,
    "confidence": 0.95,
    "incomplete": [],
    "protocol": {"weights": "ema", "prompts": 256, "guidance_mode": "cfg"},
    "final": {
        "base": {"shapes/placed": _cell(0.0850, 0.0586, 0.1152), "shapes/kind": _cell(0.25, 0.2, 0.3)},
        "trick": {
            "shapes/placed": _cell(0.0771, 0.0430, 0.1152, (-0.0078125, -0.04296875, 0.0322265625), "within noise"),
            "shapes/kind": _cell(0.5, 0.4444, 0.5556, (0.25, 0.1, 0.4), "better"),
        },
        "other": {"shapes/placed": _cell(0.1, 0.05, 0.15, (0.015, 0.001, 0.03), "better")},
    },
}


def _listing(tmp_path: Path, summaries: dict[str, dict], variants: dict[str, str] | None = None) -> Path:
    lines = ["studies:"]
    for folder, summary in summaries.items():
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "summary.json").write_text(json.dumps(summary))
        lines += [f"  - folder: {folder}", f"    title: Study {folder}", "    variants:"]
        lines += [f"      {k}: {v}" for k, v in (variants or {"base": "baseline", "trick": "the trick"}).items()]
    (tmp_path / "headline.yaml").write_text("\n".join(lines) + "\n")
    return tmp_path / "headline.yaml"


def test_a_known_summary_gives_known_rows(tmp_path):
    table = render(load_listing(_listing(tmp_path, {"toy": SUMMARY})))
    assert table.splitlines()[-4:] == [
        "| study (budget) | variant | placed | Δ placed | kind | Δ kind | verdict (placed / kind) |",
        "|---|---|---|---|---|---|---|",
        "| Study toy (3.84e13 FLOPs) | baseline | 0.085 [0.059, 0.115] | | 0.250 [0.200, 0.300] | | |",
        "| | the trick | 0.077 [0.043, 0.115] | -0.008 [-0.043, +0.032] | 0.500 [0.444, 0.556] | "
        "+0.250 [+0.100, +0.400] | within noise / better |",
    ]
    lead = " ".join(table.split("\n\n")[0].split())  # the sentence, unwrapped
    assert lead.startswith(
        "Shapes score of the EMA weights (unless a study's budget names others) on 256 held-out prompts at "
        "guidance 4 (cfg), mean of 2 seeds; every "
        "study at an equal budget whose last 20% is a cooldown."
    )
    assert "**kind**" in lead and "95% bootstrap interval" in lead
    assert all(len(line) <= 100 for line in table.split("\n\n")[0].splitlines())


def test_numbers_and_budgets_as_the_table_writes_them():
    assert fixed(0.396484375) == "0.396" and fixed(0.021484375, sign=True) == "+0.021"
    assert fixed(-0.0004, sign=True) == "+0.000" and fixed(-0.0006, sign=True) == "-0.001" and fixed(None) == "–"
    assert budget_text({"kind": "flops", "value": 2.307e13}) == "2.31e13 FLOPs"
    assert budget_text({"kind": "images", "value": 9600.0}) == "9,600 images"
    assert budget_text({"kind": "minutes", "value": 6.0}) == "6 min of step time"
    target = {"kind": "target", "value": 40000.0, "metric": "shapes/placed", "target": 0.5}
    assert budget_text(target) == "shapes/placed to 0.5, at most 40,000 images"


def _refused(tmp_path, summaries, match, variants=None):
    with pytest.raises(ConfigError, match=match) as e:
        render(load_listing(_listing(tmp_path, summaries, variants)))
    assert "\n" not in str(e.value)


def test_a_listing_that_cannot_make_a_true_table_is_refused_in_one_line(tmp_path):
    _refused(
        tmp_path / "a",
        {"toy": SUMMARY},
        r"studies\[0\].variants: must list the baseline, base, first",
        {"trick": "t", "base": "b"},
    )
    _refused(
        tmp_path / "b",
        {"toy": SUMMARY},
        r"studies\[0\].variants: \['nope'\] are not variants of toy",
        {"base": "b", "nope": "n"},
    )
    _refused(tmp_path / "c", {"toy": SUMMARY}, r"toy's other has no shapes/kind", {"base": "b", "other": "o"})
    _refused(tmp_path / "f", {"toy": SUMMARY}, r"studies\[0\]: a title or label holds '\|'", {"base": "b|c"})
    fewer = copy.deepcopy(SUMMARY) | {"name": "fewer", "protocol": dict(SUMMARY["protocol"], prompts=64)}
    _refused(tmp_path / "d", {"toy": SUMMARY, "fewer": fewer}, r"studies\[1\]: fewer has prompts 64, toy 256")
    # the weights scored may differ: the study says which after its budget
    raw = copy.deepcopy(SUMMARY) | {"name": "raw", "protocol": dict(SUMMARY["protocol"], weights="raw")}
    table = render(load_listing(_listing(tmp_path / "g", {"toy": SUMMARY, "raw": raw})))
    assert "| Study toy (3.84e13 FLOPs) | baseline |" in table
    assert "| Study raw (3.84e13 FLOPs, RAW weights) | baseline |" in table
    unfinished = SUMMARY | {"incomplete": [{"variant": "trick", "seed": 1}]}
    _refused(tmp_path / "e", {"toy": unfinished}, r"studies\[0\]: toy has 1 incomplete run")


def test_the_table_is_replaced_in_place_between_its_mark_and_its_last_row(tmp_path, capsys):
    listing = _listing(tmp_path, {"toy": SUMMARY})
    page = tmp_path / "page"
    page.write_text(f"# Title\n\n{MARK} x -->\nold sentence\n\n| old | table |\n|---|---|\n\nprose after\n")
    assert main([str(listing), str(page)]) == 0
    assert page.read_text() == f"# Title\n\n{MARK} x -->\n" + render(load_listing(listing)) + "\nprose after\n"
    assert main([str(listing), str(page)]) == 0 and page.read_text().count("| Study toy") == 1  # idempotent
    page.write_text("no mark here\n")
    assert main([str(listing), str(page)]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("headline: TARGET: holds no line starting")


def test_a_time_to_target_study_states_its_speed_up_above_the_table(tmp_path):
    """A `target` budget's speed-up (its report's sentence, with the listing's labels) stands in the
    block the README regenerates, so the number there cannot drift from the study's summary."""

    def ratio(estimate, low, high):
        return {"estimate": estimate, "low": low, "high": high, "unreached": {"baseline": 0.0, "variant": 0.0}}

    target = copy.deepcopy(SUMMARY) | {
        "budget": {
            "kind": "target",
            "value": 32000.0,
            "cooldown": 0.2,
            "metric": "shapes/placed",
            "target": "baseline",
        },
        "speedup": {
            "trick": {
                "metric": "shapes/placed",
                "target": 0.085,
                "target_from": "baseline",
                "flops": ratio(2.5, 1.5, 4.0),
                "seconds": ratio(2.0, 1.2, 3.0),
            }
        },
    }
    table = render(load_listing(_listing(tmp_path, {"toy": target})))
    paragraph = " ".join(table.split("\n\n")[1].split())
    assert paragraph == (
        "**Time to target** (Study toy): the trick reaches the baseline's final shapes/placed (0.085) at a "
        "speed-up of 2.5x [1.5x, 4x] in training FLOPs and 2x [1.2x, 3x] in training time."
    )
    assert "| Study toy (shapes/placed to the baseline's final score, at most 32,000 images) | baseline |" in table
    assert len(render(load_listing(_listing(tmp_path / "plain", {"toy": SUMMARY}))).split("\n\n")) == 2  # none
