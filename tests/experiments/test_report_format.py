"""The ablation report reads like a tool's output (issue 30): no raw float past 4 significant digits,
one interval format with '(no interval)' once per cell, a loss's interval clipped at 0, a metric the
same in every run and a run too short for its EMA marked in their cells and said once, images/s from
a loaded machine marked, the total loss compared only between variants summing the same terms, and
identical curves drawn so that neither hides the other."""

from __future__ import annotations

import json
import re

import pytest
from test_report import ablation, write_run  # noqa: F401  (the fixture and the folder writer it uses)

from pixelrun.cli import main
from pixelrun.experiments import figures
from pixelrun.experiments.figures import LeftOut
from pixelrun.experiments.render import (
    CONSTANT,
    LOADED,
    SHORT_EMA,
    ablation_blocks,
    marks,
    render_markdown,
    warning_lines,
)
from pixelrun.experiments.report import write_ablation_report
from pixelrun.experiments.summary import summarize_ablation

# a decimal number as a report writes it (not part of a word, a path or a version like 3.11.7)
DECIMAL = re.compile(r"(?<![\w./])[-+]?\d+\.\d+(?:e[-+]?\d+)?(?![\w./])")


def significant_digits(token: str) -> int:
    mantissa = token.lstrip("+-").split("e")[0].replace(".", "").lstrip("0")
    return len(mantissa)


def raw_numbers(text: str) -> list[str]:
    """Every decimal with more than 4 significant digits, and every bare integer of 5 digits or more
    (a count without its thousands separators), in `text`."""
    long = [t for t in DECIMAL.findall(text) if significant_digits(t) > 4]
    return long + re.findall(r"(?<![\w./,])\d{5,}(?![\w./,])", text)


def rewrite_points(out, change) -> None:
    for f in sorted(out.glob("runs/*/seed*/points/step_*.json")):
        point = json.loads(f.read_text())
        change(f, point)
        f.write_text(json.dumps(point))


def rewrite_json(path, **fields) -> None:
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


def report_md(out) -> str:
    """report.md's text without drawing the figures (the slow part; the tests here read the tables)."""
    return render_markdown(ablation_blocks(summarize_ablation(out), {}, LeftOut()), out)


def rows_of(md: str, variant: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith(f"| {variant} |")]


def test_no_raw_float_and_one_interval_format(ablation):  # noqa: F811
    write_ablation_report(ablation)
    md = (ablation / "report.md").read_text()
    assert raw_numbers(md) == []
    assert "e+" not in md  # 3.998e+04 was a count
    # the synthetic summaries' numbers, each by its kind
    tread = rows_of(md, "tread")[0]
    assert "| 0.04 s | 1 GFLOP | 1 GiB | 10 | 40 |" in tread
    # every cell of the main table: 'mean [low, high]', the variant's with '; Δ ±d [±l, ±h] verdict'
    interval = r"[-+]?\d[\d.,]* \[[-+]?\d[\d.,]*, [-+]?\d[\d.,]*\]"
    for cell in tread.split(" | ")[1:4]:
        assert re.fullmatch(rf"{interval}; Δ {interval} (better|worse|within noise)", cell), cell


def test_no_interval_is_written_once_per_cell(ablation):  # noqa: F811
    """One seed left: the t intervals are gone; each cell says so once, not three times."""
    plan = json.loads((ablation / "ablation.json").read_text())
    plan["seeds"] = [0]
    plan["runs"] = [r for r in plan["runs"] if r["seed"] == 0]
    (ablation / "ablation.json").write_text(json.dumps(plan))
    md = report_md(ablation)
    base, tread = rows_of(md, "baseline")[1], rows_of(md, "tread")[1]  # the validation table
    cell = tread.split(" | ")[1]
    assert cell.count("no interval") == 1 and cell.endswith(" (no interval)"), cell
    assert re.fullmatch(r"\d\.\d+; Δ [-+]\d\.\d+ \(no interval\)", cell), cell
    assert re.fullmatch(r"\d\.\d+ \(no interval\)", base.split(" | ")[1]), base


def test_a_loss_interval_is_clipped_at_zero_and_a_difference_is_not(ablation):  # noqa: F811
    """val/flow/low of the baseline 0.01 and 0.3 over its two seeds: the t interval, 0.155 ± 12.71 x
    0.145 (12.706 the 97.5 % t quantile with 1 degree of freedom, 0.145 = sd / sqrt 2), runs far
    below 0; the report clips it at 0 and says so."""
    values = {0: 0.01, 1: 0.3}

    def change(f, point):
        seed = int(f.parents[1].name.removeprefix("seed"))
        point["val"]["val/flow/low"] = values[seed] + (1.0 if "tread" in str(f) else 0.0)

    rewrite_points(ablation, change)
    s = summarize_ablation(ablation)
    mean = s["final"]["baseline"]["val/flow/low"]["mean"]
    assert mean["estimate"] == pytest.approx(0.155) and mean["low"] == 0.0
    assert mean["high"] == pytest.approx(0.155 + 12.7062 * 0.145, abs=1e-3)
    assert "clipped at 0" in mean["note"]
    delta = s["final"]["tread"]["val/flow/low"]["delta"]
    assert delta["estimate"] == pytest.approx(1.0)  # a difference may be negative: left as computed
    md = report_md(ablation)
    assert "0.155 [0.000, 1.997]" in rows_of(md, "baseline")[1]
    assert "is clipped at 0" in md


def test_a_metric_the_same_in_every_run_is_marked_and_said(ablation, capsys):  # noqa: F811
    """Every run scores shapes/exact_set 0 on every prompt (issue 30's 50-step study): each of its
    cells carries the mark, the warnings say it once, and `pixelrun ablate report` prints it."""

    def change(f, point):
        for r in point["results"]:
            r["metrics"]["shapes"]["exact_set"] = 0.0
            r["per_prompt"]["shapes"]["exact_set"] = [0.0] * len(r["per_prompt"]["shapes"]["exact_set"])

    rewrite_points(ablation, change)
    s = summarize_ablation(ablation)
    assert s["constant"] == {"shapes/exact_set": 0.0}
    assert main(["ablate", "report", str(ablation)]) == 0
    md = (ablation / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| variant | shapes/placed"))
    col = header.split(" | ").index("shapes/exact_set")
    for variant in ("baseline", "tread"):
        cells = rows_of(md, variant)[0].split(" | ")
        assert cells[col].endswith(CONSTANT) and not cells[col - 1].endswith(CONSTANT)
    assert md.count(f"- {CONSTANT}: shapes/exact_set is 0 in every run at the budget") == 1
    err = capsys.readouterr().err
    assert "warning: same in every run: shapes/exact_set is 0 in every run at the budget" in err


def test_a_50_step_study_is_flagged_too_short_for_its_ema(ablation):  # noqa: F811
    """Runs of 50 steps with ema.decay 0.995 (half-life 138.3 steps): the EMA still holds
    0.5 ** (50 / 138.28) = 78 % of the initial weights. Cells of EMA weights (the evaluation metrics,
    weights: ema, and val_ema/) carry the mark; val/ (the raw weights) does not."""
    plan = json.loads((ablation / "ablation.json").read_text())
    for r in plan["runs"]:
        r["steps"] = 50
        (ablation / r["config"]).parent.mkdir(parents=True, exist_ok=True)
        (ablation / r["config"]).write_text("ema:\n  decay: 0.995\n  every: 1\n  decays: []\n")
    (ablation / "ablation.json").write_text(json.dumps(plan))
    s = summarize_ablation(ablation)
    assert set(s["short_ema"]) == {"baseline", "tread"}
    assert s["short_ema"]["tread"]["half_life"] == pytest.approx(138.2826, abs=1e-4)
    assert s["short_ema"]["tread"]["held"] == pytest.approx(0.5 ** (50 / 138.2826))
    md = report_md(ablation)
    assert (
        f"- {SHORT_EMA}: tread: 50 steps are under 3 half-lives of its EMA (138 steps at decay 0.995): the EMA "
        "weights evaluated still hold 78% of the initial ones"
    ) in md
    main_row, val_row = rows_of(md, "tread")[:2]
    assert all(c.endswith(SHORT_EMA) for c in main_row.split(" | ")[1:4])
    val_header = next(line for line in md.splitlines() if line.startswith("| variant | val/"))
    for name, cell in zip(val_header.split(" | ")[1:], val_row.split(" | ")[1:]):
        assert cell.rstrip(" |").endswith(SHORT_EMA) == name.startswith("val_ema/"), (name, cell)
    # scores of the raw weights: the line says only the val_ema/ cells, and only those carry the mark
    s["protocol"]["weights"] = "raw"
    assert "so their cells (val_ema/ only) compare initialisations" in warning_lines(s)[0]
    assert marks(s, "tread", "shapes/placed") == () and marks(s, "tread", "val_ema/flow/low") == (SHORT_EMA,)
    # a decay the runs outlast: nothing to mark
    for r in plan["runs"]:
        (ablation / r["config"]).write_text("ema:\n  decay: 0.9\n  every: 1\n")
    assert summarize_ablation(ablation)["short_ema"] == {}


def test_images_per_s_from_a_loaded_machine_is_marked(ablation):  # noqa: F811
    for seed in (0, 1):
        rewrite_json(ablation / "runs" / "tread" / f"seed{seed}" / "run-summary.json", load_1min=3.5, cpus=2)
        rewrite_json(ablation / "runs" / "baseline" / f"seed{seed}" / "run-summary.json", load_1min=0.5, cpus=2)
    md = report_md(ablation)
    assert LOADED in rows_of(md, "tread")[0] and LOADED not in rows_of(md, "baseline")[0]
    assert f"- {LOADED}: tread: images/s measured with a 1-minute load average of 3.5 on 2 CPUs" in md


def test_the_total_loss_is_compared_only_between_the_same_terms(ablation, monkeypatch):  # noqa: F811
    """tread logs no repa term: its total loss sums other terms than the baseline's, so the loss
    panel is left out and the report says to compare the flow loss."""
    drawn = []
    real = figures.draw
    monkeypatch.setattr(figures, "draw", lambda panels, x: drawn.append([t for t, _ in panels]) or real(panels, x))
    write_ablation_report(ablation)
    assert ["loss", "flow", "repa"] in drawn  # the same terms: the total is drawn
    assert "total loss is not compared" not in (ablation / "report.md").read_text()
    for f in ablation.glob("runs/tread/seed*/metrics.jsonl"):
        rows = [json.loads(line) for line in f.read_text().splitlines()[:-1]]
        f.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "repa"}) + "\n" for r in rows))
    drawn.clear()
    write_ablation_report(ablation)
    assert ["flow", "repa"] in drawn and not any("loss" in titles for titles in drawn)
    md = (ablation / "report.md").read_text()
    assert "The total loss is not compared: the variants sum different terms (baseline: flow, repa; tread: flow)" in md


def test_identical_curves_differ_in_style_and_every_axis_is_labelled():
    same = ([1, 2, 3], [0.5, 0.4, 0.3], None, None)
    fig = figures.draw([("flow", [("baseline", *same), ("tread", *same)]), ("repa", [("tread", *same)])], "step")
    flow, repa = fig.axes
    a, b = flow.get_lines()
    assert a.get_linestyle() != b.get_linestyle() and a.get_marker() != b.get_marker()
    assert a.get_color() != b.get_color()
    assert repa.get_lines()[0].get_color() == b.get_color()  # tread looks the same in every panel
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes] == [("step", "flow"), ("step", "repa")]
