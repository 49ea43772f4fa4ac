"""Decoding in worker processes (`data.workers=N`): one rank's loader is no longer bounded by the
Python thread of its training process.

This process keeps choosing which items form each batch, exactly as with N = 0, and the workers
only decode and resize whole batches, handed to them as plans through a `torch.utils.data.DataLoader`
(a map-style dataset indexed by plans, results in plan order, 2 plans per worker in flight,
pinned memory on CUDA runs). So the batches, the skipped items and the saved position are those
of N = 0, for any N.

A source that can run this way (every batch source of pixelrun.data) has:

* `plan()` -> (plan, before): the next batch as a picklable plan (a counted source's batch number,
  or a bucket and its items: indices of a folder, the encoded bytes of shard samples), moving the
  source past it as if it had decoded; `before` is the snapshot to go back to if it did not;
* `build(plan)` -> `Batch`, or `Rejected` naming the plan's items that did not decode. It runs in
  a worker, on the copy of the source the worker started with, so it reads only settings;
* `reject(plan, rejected)`: in the state `before`, count and drop those items;
* `snapshot()` / `restore(snapshot)`: a position in memory (`snapshot()[0]` is the `state_dict()`).

Plans run ahead of the batches handed out. When a worker rejects one (a file whose header read but
whose pixels do not), the source goes back to `before`, rejects the items as N = 0 does, and plans
again from there; the results of the plans made after it are dropped when they arrive. Broken files
are rare, so the wasted work is too.
"""

from __future__ import annotations

import atexit
import functools
import pickle
import signal
import time
import weakref
from collections import deque
from typing import Any

import torch

from pixelrun.config import ConfigError
from pixelrun.data import Batch, Rejected

_QUIET = {signal.SIGINT, signal.SIGTERM}


def _worker_init(worker_id: int) -> None:
    """Workers ignore Ctrl-C and SIGTERM: a terminal's Ctrl-C (or a scheduler's SIGTERM) reaches the
    whole process group, and a worker that died of it would make the DataLoader raise in the
    training process before it could save. The training process ends them (`WorkerLoader.close`)."""
    for sig in _QUIET:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _QUIET)  # blocked while it was started (see _start)


def _as_is(result):
    return result


class _PlanStream:
    """The DataLoader's sampler: plans made on demand, in this process, each recorded with the
    snapshots around it. It holds no reference to its WorkerLoader, so dropping the loader frees
    the DataLoader iterator at once, and with it the workers."""

    def __init__(self, source, inflight: deque):
        self.source, self.inflight, self.seq = source, inflight, 0

    def __iter__(self):
        while True:
            plan, before = self.source.plan()
            self.seq += 1
            self.inflight.append((self.seq, plan, before, self.source.snapshot()))
            yield self.seq, plan


def _close_if_alive(ref) -> None:
    loader = ref()
    if loader is not None:
        loader.close()


class _Plans(torch.utils.data.Dataset):
    """The workers' dataset: index (seq, plan) -> (seq, the batch or what was rejected)."""

    def __init__(self, source):
        self.source = source

    def __getitem__(self, job: tuple[int, Any]) -> tuple[int, Any]:
        seq, plan = job
        try:
            return seq, self.source.build(plan)
        except ConfigError as e:  # a one-line error for the user (a bad stored embedding), not a worker traceback
            return seq, _RaisedConfigError(e)


class _RaisedConfigError:
    """A ConfigError on its way from a worker: the error itself if it pickles, else its key and
    message (the base class does not pickle: its constructor takes two arguments)."""

    def __init__(self, e: ConfigError):
        try:
            self.error, self.parts = pickle.loads(pickle.dumps(e)), None
        except Exception:
            self.error, self.parts = None, (e.key, str(e).removeprefix(f"{e.key}: "))

    def raise_it(self):
        raise self.error if self.error is not None else ConfigError(*self.parts)


class WorkerLoader:
    """`source`'s batches, decoded in `workers` processes; the same batches and positions as the
    source alone. The processes start at the first batch and serve the whole stage (the plan
    stream never ends, so there are no epochs to restart them at); `close` ends them.

    `state_dict` is the position after the last batch handed out, so a checkpoint resumes with the
    batch the caller has not seen yet, whatever is in flight. `skipped` and `skipped_paths` are
    counted at that position too; anything else (`preview_captions`, `folder`, ...) is the source's.
    """

    def __init__(self, source, workers: int, pin_memory: bool = False, prefetch_factor: int = 2):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.source, self.workers = source, workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self._position = source.snapshot()  # after the last batch handed out
        self._inflight: deque[tuple[int, Any, Any, Any]] = deque()  # (seq, plan, before, after), in order
        self._it: Any = None  # torch's worker iterator, whose private _shutdown_workers and _workers close() uses
        self._at_exit = functools.partial(_close_if_alive, weakref.ref(self))

    def __iter__(self) -> WorkerLoader:
        return self

    def _start(self):
        loader = torch.utils.data.DataLoader(
            _Plans(self.source),
            batch_size=None,
            sampler=_PlanStream(self.source, self._inflight),
            num_workers=self.workers,
            collate_fn=_as_is,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            worker_init_fn=_worker_init,
        )
        # Started with Ctrl-C and SIGTERM blocked, so a signal can never reach a worker before it
        # ignores them; here they stay pending (or go to another thread) and are handled as usual.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _QUIET)
        try:
            it = iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        # Workers ignore SIGTERM, which is how multiprocessing ends leftover children at exit: end
        # them first (atexit runs handlers last-registered first).
        atexit.register(self._at_exit)
        return it

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = self._start()
        while True:
            seq, out = next(self._it)
            if not self._inflight or self._inflight[0][0] != seq:
                continue  # planned from a position that was given up (a rejection, load_state_dict)
            _, plan, before, after = self._inflight.popleft()
            if isinstance(out, _RaisedConfigError):
                out.raise_it()
            if isinstance(out, Rejected):
                self.source.restore(before)
                self.source.reject(plan, out)
                self._inflight.clear()  # later plans assumed this one decoded: plan them again
                continue
            self._position = after
            return out

    def state_dict(self) -> dict:
        return self._position[0]

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)
        self._position = self.source.snapshot()
        self._inflight.clear()

    @property
    def skipped(self) -> int:
        return self._position[0].get("skipped", 0)

    @property
    def skipped_paths(self) -> list[str]:
        return self._position[0].get("skipped_paths", [])

    def close(self) -> None:
        """End the worker processes (the plans in flight are dropped; the position stays). A later
        `next` starts new ones."""
        atexit.unregister(self._at_exit)
        it, self._it = self._it, None
        if it is not None:
            it._shutdown_workers()  # what the iterator's __del__ does, now rather than at collection
            for w in it._workers:  # one stuck in a decode outlived the join and ignores SIGTERM
                if w.is_alive():
                    w.kill()
                    w.join()
        self.source.restore(self._position)
        self._inflight.clear()

    def __getattr__(self, name: str):
        if name == "source":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)


def with_workers(source, workers: int, pin_memory: bool = False):
    """`source` as it is for 0 workers, else decoded in that many processes."""
    return WorkerLoader(source, workers, pin_memory) if workers > 0 else source


def measure_throughput(source, seconds: float) -> float:
    """Images per second that `source` delivers over about `seconds`, after one untimed batch (which
    opens the first file or shard and starts any workers)."""
    next(source)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += len(next(source).captions)
    return n / (time.perf_counter() - t0)
