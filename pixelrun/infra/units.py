"""Numbers for people, formatted by what they measure: the one formatter of the run report, the
ablation report and `ablate plan` (issue 30: `flops 1537736704000.0`, `train_seconds
229.49473762512207` and `3.998e+04` read like a dump).

    duration(229.49)           '3 min 49 s'
    size(881475584)            '841 MiB'       (powers of 1024, as memory is allocated)
    flop(1537736704000)        '1.54 TFLOP'    (powers of 1000, as peak FLOP/s are quoted)
    count(39980.0)             '39,980'
    number(0.0313245)          '0.03132'       (at most 4 significant digits)
    interval(0.543, 0.3965, 0.6855)  '0.5430 [0.3965, 0.6855]'

Every function takes None (or a non-finite float) and writes '–': a value that is not there.
"""

from __future__ import annotations

import math

MISSING = "–"
DIGITS = 4  # significant digits of a plain number


def _absent(x) -> bool:
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def number(x, digits: int = DIGITS) -> str:
    """At most `digits` significant digits; above 10**digits rounded to that many and written with
    thousands separators (39,980, not 3.998e+04), below 0.001 in scientific notation."""
    if _absent(x):
        return MISSING
    if isinstance(x, bool):
        return str(x)
    x = float(x)
    if x == 0:
        return "0"
    text = f"{x:.{digits}g}"
    if "e+" in text and abs(x) < 1e15:  # 39,980 reads where 3.998e+04 does not
        exponent = math.floor(math.log10(abs(x)))
        return f"{round(x, digits - 1 - exponent):,.0f}"
    return text


def signed(x, digits: int = DIGITS) -> str:
    """A difference: `number` with its sign always written (+0.129, -0.03)."""
    text = number(x, digits)
    return text if text == MISSING or text.startswith("-") else "+" + text


def count(x) -> str:
    """A count (steps, images, prompts): rounded to a whole number, with thousands separators."""
    return MISSING if _absent(x) else f"{round(float(x)):,}"


def duration(seconds) -> str:
    """A wall time: '0.381 s', '42 s', '3 min 49 s', '2 h 05 min'."""
    if _absent(seconds):
        return MISSING
    s = float(seconds)
    if s < 10:
        return f"{s:.3g} s"
    whole = round(s)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    minutes = round(s / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"


_BINARY = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_DECIMAL = ("", "k", "M", "G", "T", "P", "E")


def _scaled(x: float, base: int, units: tuple[str, ...], space: str) -> str:
    i = 0
    while abs(x) >= 999.5 and i < len(units) - 1:  # three digits at most: '0.999 GiB', not '1.02e+03 MiB'
        x /= base
        i += 1
    return f"{x:.3g}{space}{units[i]}"


def size(n) -> str:
    """Bytes in powers of 1024, three significant digits: '841 MiB', '4.37 GiB'."""
    return MISSING if _absent(n) else _scaled(float(n), 1024, _BINARY, " ")


def flop(x) -> str:
    """A FLOP count in powers of 1000, three significant digits: '1.54 TFLOP', '961 MFLOP'."""
    return MISSING if _absent(x) else _scaled(float(x), 1000, _DECIMAL, " ") + "FLOP"


def interval(estimate, low=None, high=None, *, sign: bool = False, digits: int = DIGITS) -> str:
    """'estimate [low, high]' with the three written to the same decimals: as many as give the
    largest of them `digits` significant digits (0.5430 [0.3965, 0.6855], not 0.543 [0.3965, 0.6855]).
    Without bounds, the estimate alone. `sign`: every number with its sign (a difference)."""
    if _absent(estimate):
        return MISSING
    values = [float(estimate)] + [float(v) for v in (low, high) if not _absent(v)]
    largest = max(abs(v) for v in values)
    if largest == 0 or largest >= 10**digits or largest < 1e-3:
        write = signed if sign else number  # scientific or grouped: decimals do not line up anyway
        text = write(estimate, digits)
        return text if _absent(low) or _absent(high) else f"{text} [{write(low, digits)}, {write(high, digits)}]"
    decimals = max(0, digits - 1 - math.floor(math.log10(largest)))
    spec = f"{'+' if sign else ''}.{decimals}f"

    def fixed(v: float) -> str:
        text = format(v, spec)
        return text.replace("-", "+", 1) if sign and float(text) == 0 and text.startswith("-") else text

    parts = [fixed(float(estimate))] + (
        [] if _absent(low) or _absent(high) else [fixed(float(low)), fixed(float(high))]
    )
    while decimals > 0 and all(p.endswith("0") for p in parts):  # zeros all three share say nothing
        parts = [p[:-1].removesuffix(".") for p in parts]
        decimals -= 1
    return parts[0] if len(parts) == 1 else f"{parts[0]} [{parts[1]}, {parts[2]}]"
