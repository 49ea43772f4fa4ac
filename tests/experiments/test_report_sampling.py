"""The ablation report with several EMAs (ema.decays) and the NFE: the main table's numbers stay the
first EMA's, with its NFE beside them, and the EMA x guidance sweep at the budget lists every pair
with its NFE and the mean over seeds of each metric, as recomputed here from the points."""

from __future__ import annotations

import json

import numpy as np
from test_report import ablation, write_run  # noqa: F401  (the fixture and the folder writer it uses)

from pixelrun.experiments.report import write_ablation_report
from pixelrun.experiments.summary import summarize_ablation

NFE = {1.0: 5, 4.0: 9}
SECOND = 0.9999  # a second EMA whose every number is the first's + 0.5


def _add_second_ema(out) -> None:
    for point_file in sorted(out.glob("runs/*/seed*/points/step_*.json")):
        point = json.loads(point_file.read_text())
        first = point["results"]
        for r in first:
            r.update(ema_decay=0.999, nfe=NFE[r["guidance"]])
        second = [
            {**r, "ema_decay": SECOND, "metrics": {**r["metrics"], "fd-effnet": r["metrics"]["fd-effnet"] + 0.5}}
            for r in first
        ]
        point["results"] = first + second
        point_file.write_text(json.dumps(point))


def test_the_main_table_keeps_the_first_ema_and_the_sweep_lists_every_pair(ablation):  # noqa: F811
    before = summarize_ablation(ablation)
    assert "nfe" not in before and "ema_guidance" not in before  # points without an NFE: as it was
    _add_second_ema(ablation)
    write_ablation_report(ablation)
    summary = json.loads((ablation / "summary.json").read_text())
    assert summary["final"] == json.loads(json.dumps(before["final"]))  # the first EMA's numbers, unchanged
    assert summary["nfe"] == {"baseline": 9, "tread": 9}  # at the primary guidance 4

    sweep = summary["ema_guidance"]["tread"]
    assert [(c["ema_decay"], c["guidance"], c["nfe"]) for c in sweep] == [
        (0.999, 1.0, 5),
        (0.999, 4.0, 9),
        (SECOND, 1.0, 5),
        (SECOND, 4.0, 9),
    ]
    for cell in sweep:
        fds = []
        for seed in (0, 1):
            point = json.loads(
                (ablation / "runs" / "tread" / f"seed{seed}" / "points" / "step_00000010.json").read_text()
            )
            fds += [
                r["metrics"]["fd-effnet"]
                for r in point["results"]
                if r["ema_decay"] == cell["ema_decay"] and r["guidance"] == cell["guidance"]
            ]
        assert cell["means"]["fd-effnet"] == float(np.mean(fds)) and cell["seeds"] == 2
    assert np.isclose(sweep[2]["means"]["fd-effnet"] - sweep[0]["means"]["fd-effnet"], 0.5)

    md = (ablation / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| variant | shapes/placed"))
    assert "| NFE |" in header
    assert "## EMA x guidance at the budget (mean over seeds)" in md
    assert "| tread | 0.9999 | 4 | 9 |" in md
