"""Progress bars in a log file (pixelrun/infra/progress.py): plain lines, no redraws, no cursor moves."""

from __future__ import annotations

import io

import pytest
import torch

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


def test_the_generation_bar_restarts_per_chunk_and_reads_as_the_configured_steps():
    """Two chunks of 25 steps: the bar ends at 25/25 naming the chunk's images, not at 50/50."""
    from pixelrun.diffusion import generate as gen

    class Bar:
        def __init__(self):
            self.n, self.total, self.postfixes = 0, None, []

        def reset(self, total):
            self.n, self.total = 0, total

        def set_postfix_str(self, s):
            self.postfixes.append(s)

        def update(self, k):
            self.n += k

    class Encoder:
        def encode(self, prompts):
            return torch.zeros(len(prompts), 2, 4), torch.ones(len(prompts), 2, dtype=torch.bool)

    def fake_sample(*args, steps, progress, **kwargs):
        for _ in range(steps):
            progress.update(1)
        return torch.zeros(args[1].shape[0], 3, 8, 8)

    from pixelrun.config import load_config

    bar = Bar()
    cfg = load_config(None, ["sample.steps=25", "data.resolution=8"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gen, "sample", fake_sample)
        images = gen.generate(None, Encoder(), ["a"] * 40, cfg, "cpu", seed=0, chunk=32, progress=bar)
    assert images.shape[0] == 40
    assert (bar.n, bar.total) == (25, 25)
    assert bar.postfixes == ["images 1-32 of 40", "images 33-40 of 40"]


def test_a_closing_bar_redrawing_its_last_state_is_one_line():
    out = io.StringIO()
    lines = _Lines(out)
    lines.write("\rtrain: 100%|###| 2/2")
    lines.write("\rtrain: 100%|###| 2/2\n")  # tqdm's close with leave=True
    assert out.getvalue() == "train: 100%|###| 2/2\n"
