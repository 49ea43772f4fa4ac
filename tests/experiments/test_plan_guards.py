"""`pixelrun ablate plan` warns when its runs are too short for the EMA they are evaluated with
(issue 30: a 50-step study scored 0 on every metric for every variant, its EMA at decay 0.995 still
mostly its initialisation, and nothing said so)."""

from __future__ import annotations

import math

import pytest
from test_ablate import TOY, write_spec

from pixelrun.cli import main
from pixelrun.experiments.plan import ema_half_life


def test_half_life_by_hand():
    # 0.995 ** n = 1/2  <=>  n = ln 2 / -ln 0.995 = 0.693147 / 0.0050125 = 138.2826
    assert ema_half_life(0.995, 1) == pytest.approx(138.2826, abs=1e-4)
    assert ema_half_life(0.999, 10) == pytest.approx(10 * math.log(2) / -math.log(0.999))  # ~6,928 steps
    assert 0.995 ** ema_half_life(0.995, 1) == pytest.approx(0.5)
    assert ema_half_life(0.0, 1) == 0.0 and ema_half_life(1.0, 1) == math.inf


def test_plan_warns_of_a_run_shorter_than_three_half_lives(tmp_path, capsys):
    spec = write_spec(tmp_path, budget={"kind": "images", "value": 200})  # 50 steps of 4 images
    assert main(["ablate", "plan", str(spec)]) == 0
    out = capsys.readouterr().err  # the plan is said on stderr
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2  # both variants
    assert warnings[0].startswith(
        "warning: baseline: 50 steps are under 3 half-lives of its EMA (138 steps at ema.decay=0.995, every 1): "
        "the EMA weights evaluated still hold 78% of the initial ones"  # 0.5 ** (50 / 138.28) = 0.778
    )
    fast = write_spec(tmp_path, budget={"kind": "images", "value": 200}, base={"overrides": [*TOY, "ema.decay=0.9"]})
    assert main(["ablate", "plan", str(fast)]) == 0  # half-life 6.6 steps: nothing to say
    assert "warning:" not in capsys.readouterr().err
