"""Progress bars that read well both on a terminal and in a log file.

On a terminal a bar redraws itself in place. Written to a file (`pixelrun train ... 2> train.log`,
a Slurm job's output, a CI log), tqdm's redraws become one long line of carriage returns and cursor
moves (`ESC[A`) that `less` and `grep` show as noise. There, each redraw is written as its own plain
line, at most every `LOG_INTERVAL_S` seconds (and at the end), without cursor moves.
"""

from __future__ import annotations

import io
import sys
from typing import IO, Any

#: Seconds between two lines of a bar written to a file (a terminal redraws every 0.1 s).
LOG_INTERVAL_S = 30.0
_CURSOR_UP = "\x1b[A"


class _Lines(io.TextIOBase):
    """A file as a bar's output: each carriage-return redraw becomes a line; cursor moves and the
    blank redraws that clear a closing bar are dropped."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.last = ""

    def write(self, s: str) -> int:
        for part in s.replace(_CURSOR_UP, "").split("\r"):
            line = part.rstrip("\n")
            if line.strip() and line != self.last:  # a closing bar redraws its last state once more
                self.stream.write(line + "\n")
                self.last = line
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def on_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def progress(file: IO[str] | None = None, **kwargs: Any):
    """A tqdm bar on `file` (stderr by default): as tqdm draws it on a terminal, one plain line per
    `LOG_INTERVAL_S` elsewhere. Takes tqdm's arguments."""
    from tqdm import tqdm

    stream = file if file is not None else sys.stderr
    if on_terminal(stream):
        return tqdm(file=stream, dynamic_ncols=True, **kwargs)
    kwargs.pop("position", None)  # no stacked bars in a file: each line says which bar it is
    kwargs.update(mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S, leave=True, ncols=100, ascii=True)
    return tqdm(file=_Lines(stream), **kwargs)
