"""Progress bars in a log file (pixelrun/infra/progress.py): plain lines, no redraws, no cursor moves."""

from __future__ import annotations

import io

from pixelrun.infra import progress as progress_module
from pixelrun.infra.progress import _Lines, progress


def test_a_redraw_becomes_a_line_and_cursor_moves_and_blank_clears_are_dropped():
    out = io.StringIO()
    _Lines(out).write("\rtrain:  10%|#  | 1/10\rtrain:  20%|## | 2/10\x1b[A\r          \r\n")
    assert out.getvalue() == "train:  10%|#  | 1/10\ntrain:  20%|## | 2/10\n"


def test_a_bar_written_to_a_file_is_its_first_and_last_state_as_lines(monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 1e9)  # no line between the first and the last
    out = io.StringIO()  # not a terminal
    with progress(file=out, total=5, desc="sample", unit="step", leave=False, position=1) as bar:
        for _ in range(5):
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert len(lines) == 2 and "0/5" in lines[0] and "5/5" in lines[1] and lines[1].startswith("sample: 100%")
