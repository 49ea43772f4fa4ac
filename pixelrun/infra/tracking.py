"""Where a run's numbers and pictures go: ``metrics.jsonl`` and TensorBoard always, Weights & Biases
as well with ``log.wandb=true``. One sink, so every row reaches every destination the same way.

How the training loop uses it (built once per run, after the checkpoint is restored, on every rank;
only the main rank writes, the others get a sink that does nothing)::

    tracker = Tracker(cfg, run_dir, start_step=step, enabled=ctx.is_main)
    tracker.scalars(step, {"loss": .., "flow": .., "lr": ..}, prefix="train/")  # a training row
    tracker.scalars(step, {"eval/fd-effnet": .., "val/flow/low": ..})          # evaluation rows
    tracker.image("samples/ema", grid_png_path, step)
    tracker.close()

* ``metrics.jsonl``: one JSON object per call, ``{"step": step, **values}`` with the keys as given
  (no prefix); a non-finite number is written as ``null``. A resumed run (``start_step > 0``)
  first drops the rows past its checkpoint and any torn last line, so the file reads as one
  uninterrupted run. The file is held open for the run: deleted mid-run, it is written again
  whole from that open copy at the next row (every row, those from before a resume included), with
  one line on stderr saying so.
* TensorBoard (``run_dir/tensorboard``): each value as ``prefix + key``; resuming purges the events
  past ``start_step``; the resolved config as the text ``config``.
* W&B (``log.wandb``; ``log.wandb_project``, ``log.wandb_name`` (default: the run directory's
  name), ``log.wandb_entity``): the same tags as TensorBoard, against the training step, plotted on
  a ``step`` axis of its own (W&B drops rows logged with a smaller ``step=`` than it has seen, which
  a resume after a crash would otherwise do); the sample grids as images; the resolved config as the
  run's config. The W&B run id is kept in ``run_dir/wandb_run_id``, so a resume continues the same
  W&B run. ``WANDB_MODE=offline`` writes it under ``run_dir/wandb`` for ``wandb sync`` later.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from pixelrun.config import Config, ConfigError, to_dict, to_yaml
from pixelrun.infra.files import write_atomic

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows of ``path`` whose step is at most ``step`` (whole lines only), atomically."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a crash or a full disk: only a log line
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line)
    write_atomic(path, "".join(line + "\n" for line in keep))


def json_row(row):
    """A row (or any nest of dicts and lists) that is valid JSON: a NaN or an infinity (a step whose
    update was skipped) becomes null (JSON has no such numbers; Python would write bare NaN /
    Infinity that other readers reject)."""
    if isinstance(row, float) and not math.isfinite(row):
        return None
    if isinstance(row, dict):
        return {k: json_row(v) for k, v in row.items()}
    if isinstance(row, (list, tuple)):
        return [json_row(v) for v in row]
    return row


class Tracker:
    """The sink of one run's scalars, images and config (see the module docstring)."""

    def __init__(self, cfg: Config, run_dir: str | Path, *, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.writer: SummaryWriter | None = None
        self._metrics: IO[str] | None = None
        self.wandb_run = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / "metrics.jsonl"
        if start_step:
            truncate_metrics(self.metrics_path, start_step)
        else:
            self.metrics_path.write_text("")
        self._metrics = open(self.metrics_path, "a+")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)
        self.writer.add_text("config", f"```yaml\n{to_yaml(cfg)}```", start_step)
        if cfg.log.wandb:
            self.wandb_run = _start_wandb(cfg, run_dir, resume=start_step > 0)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        """One row: ``{"step": step, **values}`` in metrics.jsonl; ``prefix + key`` elsewhere."""
        if not self.enabled:
            return
        f = self._metrics_file()
        f.write(json.dumps(json_row({"step": step, **values}), allow_nan=False) + "\n")
        f.flush()
        for k, v in values.items():
            self._tensorboard().add_scalar(prefix + k, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log({"step": step, **{prefix + k: v for k, v in values.items()}})

    def image(self, tag: str, image: str | Path | np.ndarray, step: int, caption: str | None = None) -> None:
        """A picture (a PNG's path, or uint8 ``[H, W, 3]``) under ``tag`` at ``step``."""
        if not self.enabled:
            return
        if not isinstance(image, np.ndarray):
            from PIL import Image

            with Image.open(image) as im:
                image = np.asarray(im.convert("RGB"))
        self._tensorboard().add_image(tag, image, step, dataformats="HWC")
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({"step": step, tag: wandb.Image(image, caption=caption)})

    def _metrics_file(self) -> IO[str]:
        """The open metrics.jsonl. Deleted since the last row (by hand, a cleanup script): its rows are
        still readable through the open file, so they are written again in a new file, and said in
        one line. Replaced by another file: that one is appended to."""
        f = self._metrics
        if f is None:
            raise RuntimeError("this tracker is closed")
        try:
            same = os.stat(self.metrics_path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            f.seek(0)
            rows = f.read()
            f.close()
            write_atomic(self.metrics_path, rows)
            lines = rows.splitlines()
            print(
                f"note: {self.metrics_path} was deleted during the run; written again whole from the copy "
                f"this run held open ({len(lines)} rows{_step_range(lines)}), none lost",
                file=sys.stderr,
            )
            same = False
        if not same:
            f.close()
            self._metrics = f = open(self.metrics_path, "a+")
        return f

    def _tensorboard(self) -> SummaryWriter:
        if self.writer is None:
            raise RuntimeError("this tracker is closed")
        return self.writer

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close every destination; safe to call twice."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _step_range(lines: list[str]) -> str:
    """ ", steps A to B" of the first and last rows of metrics.jsonl lines, or "" when unreadable."""
    try:
        return f", steps {json.loads(lines[0])['step']} to {json.loads(lines[-1])['step']}"
    except (IndexError, ValueError, KeyError, TypeError):
        return ""


_NO_WANDB = (
    "is true but the wandb package is not installed: pip install wandb "
    "(or pip install 'pixelrun[wandb]'), or set log.wandb=false"
)


def check_wandb(cfg: Config) -> None:
    """With `log.wandb`, the wandb package must be installed on the machine that runs the job."""
    if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb", _NO_WANDB)


def _start_wandb(cfg: Config, run_dir: Path, resume: bool):
    """A W&B run for this run directory: the same W&B run again when resuming (its id is kept in
    ``run_dir/wandb_run_id``), a new one otherwise. A W&B that cannot start (not logged in, no
    network in online mode) is a ConfigError naming ``log.wandb``."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("log.wandb", _NO_WANDB) from None
    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if resume and id_file.exists() else secrets.token_hex(4)
    write_atomic(id_file, run_id + "\n")
    log = cfg.log
    try:
        run = wandb.init(
            project=log.wandb_project,
            entity=log.wandb_entity,
            name=log.wandb_name or run_dir.resolve().name,
            config=to_dict(cfg),
            dir=str(run_dir),
            id=run_id,
            resume="allow",
        )
    except Exception as e:  # wandb raises its own error types, several of them
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            "log.wandb",
            f"Weights & Biases did not start ({reason}): run `wandb login`, set "
            f"WANDB_MODE=offline, or set log.wandb=false",
        ) from e
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run
