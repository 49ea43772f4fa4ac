"""Files written whole or not at all: every file the package writes for readers (metrics, records,
reports, caches, evaluation results) goes through `write_atomic`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: Path | str, data: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Write beside, then swap in whole: a reader never sees half a file, a crash leaves the old one.
    The temporary name carries the pid, so two writers never share one. `data` is the content, or a
    function that writes it into the open file (large arrays: no second copy in memory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if callable(data):
            with open(tmp, "wb") as f:
                data(f)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or an interrupt leaves no half file beside
        raise
    return path
