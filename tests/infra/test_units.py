"""pixelrun/infra/units.py against hand-written strings: the numbers of issue 30's reports, each
written as what it measures."""

from __future__ import annotations

import math

import pytest

from pixelrun.infra import units


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (229.49473762512207, "3 min 49 s"),  # issue 30's train_seconds
        (0.381, "0.381 s"),
        (4.2, "4.2 s"),
        (42.4, "42 s"),
        (59.6, "1 min 0 s"),
        (3600, "1 h 00 min"),
        (7530, "2 h 06 min"),  # 125.5 min rounds to 126
        (None, "–"),
        (math.nan, "–"),
    ],
)
def test_duration(seconds, text):
    assert units.duration(seconds) == text


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (881475584, "841 MiB"),  # issue 30's peak_memory_bytes: 840.6 MiB
        (2**30, "1 GiB"),
        (4.37 * 2**30, "4.37 GiB"),
        (512, "512 B"),
        (1073000000, "0.999 GiB"),  # 1023.3 MiB: three digits, not 1.02e+03 MiB
    ],
)
def test_size(n, text):
    assert units.size(n) == text


@pytest.mark.parametrize(
    ("x", "text"),
    [
        (1537736704000.0, "1.54 TFLOP"),
        (9.61e8, "961 MFLOP"),
        (3.84e13, "38.4 TFLOP"),
        (1e9, "1 GFLOP"),
        (12, "12 FLOP"),
    ],
)
def test_flop(x, text):
    assert units.flop(x) == text


def test_count_and_number():
    assert units.count(39980.0) == "39,980" and units.count(2093.5) == "2,094" and units.count(7) == "7"
    assert units.number(3.998e4) == "39,980"  # issue 30: not 3.998e+04
    assert units.number(39981.3) == "39,980"  # 4 significant digits, grouped
    assert units.number(9999.7) == "10,000"  # .4g would give 1e+04
    assert units.number(0.0313245) == "0.03132"
    assert units.number(41.9512) == "41.95"
    assert units.number(0.0) == "0" and units.number(1.2345e-5) == "1.234e-05"
    assert units.signed(0.129) == "+0.129" and units.signed(-0.03) == "-0.03"
    assert units.number(None) == "–" and units.number(math.inf) == "–"


@pytest.mark.parametrize(
    ("args", "kw", "text"),
    [
        ((0.543, 0.3965, 0.6855), {}, "0.5430 [0.3965, 0.6855]"),  # issue 30's mixed precision, aligned
        ((0.1289, 0.0176, 0.248), {"sign": True}, "+0.1289 [+0.0176, +0.2480]"),
        ((0.25, 0.25, 0.25), {"sign": True}, "+0.25 [+0.25, +0.25]"),  # zeros all three share are dropped
        ((1.316, 0.0, 3.358), {}, "1.316 [0.000, 3.358]"),  # a loss's interval clipped at 0
        ((4.895,), {}, "4.895"),  # no bounds: the estimate alone
        ((0.0, 0.0, 0.0), {}, "0 [0, 0]"),
        ((-1e-5, -0.5, 0.5), {"sign": True}, "+0.0 [-0.5, +0.5]"),  # no '-0.0'
        ((12345.6, 10000.0, 15000.0), {}, "12,350 [10,000, 15,000]"),
        ((None, 1.0, 2.0), {}, "–"),
    ],
)
def test_interval(args, kw, text):
    assert units.interval(*args, **kw) == text
