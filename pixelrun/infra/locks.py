"""One writer per folder: `pixelrun train` holds a lock on its run directory, `pixelrun data convert`
and `pixelrun sample` on their output folders, so a second process on the same folder is refused in
one line instead of interleaving its files with the first one's.

The lock is `fcntl.flock` on `<folder>/.pixelrun.lock` (for `sample`, whose folder is swapped in whole,
`<parent>/.<folder>.pixelrun.lock` beside it), which holds the holder's pid and host for the
refusal message. The kernel drops a flock when its process dies, however it dies (kill -9
included), so a lock file left by a dead process is simply taken over. flock is per machine: on a
network filesystem shared by several hosts it may not exclude a process on another host.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

from pixelrun.config import ConfigError

LOCK_FILE = ".pixelrun.lock"


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "another process"
    return f"pid {text.replace(' ', ' on host ', 1)}" if text else "another process"


def _acquire(path: Path) -> int:
    """An open descriptor of `path` holding its exclusive flock; OSError(EWOULDBLOCK) when held elsewhere."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        try:  # the holder before us may have removed the file between our open and our flock
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def lock_holder(folder: str | Path) -> str | None:
    """Who holds `folder`'s lock ("pid N on host H"), or None when no live process does. Creates
    nothing: a folder or lock file that is missing is free."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # conflicts only with a holder's exclusive lock
    except BlockingIOError:
        return _holder(path)
    except OSError:
        return None
    finally:
        os.close(fd)  # drops the shared lock, if taken
    return None


@contextlib.contextmanager
def folder_lock(folder: str | Path, key: str, what: str, enabled: bool = True, beside: bool = False):
    """Hold the lock of `folder` (created if missing) for the block. Held elsewhere: a ConfigError
    naming `key`, before any work. A folder this lock created and that is still empty when the block
    ends is removed again, so a refused or failed start leaves nothing behind.

    `beside`: for a folder that is replaced whole (`pixelrun sample --out`, swapped in by
    `atomic_dir`), the lock file is `<parent>/.<name>.pixelrun.lock` beside it, and only the parent is
    created."""
    if not enabled:
        yield
        return
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(key, f"{folder} is not a folder")
    where = folder.parent if beside else folder
    created = not where.exists()
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(key, f"cannot create the folder {where}: {e.strerror}") from None
    path = where / (f".{folder.name}{LOCK_FILE}" if beside else LOCK_FILE)
    try:
        fd = _acquire(path)
    except BlockingIOError:
        raise ConfigError(
            key,
            f"{folder} is in use by another {what} ({_holder(path)}); wait for it to finish or choose another folder",
        ) from None
    except OSError as e:
        raise ConfigError(key, f"cannot lock {folder}: {e.strerror}") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding it: a process waiting on this file retries on the new one
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                where.rmdir()  # only when empty
