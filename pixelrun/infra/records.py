"""The files a run leaves for other programs to read, as typed records: each a dataclass with a
format version, written and read only through this module, so a writer and its readers cannot
drift apart (renaming a field in the writer fails every reader loudly, not with a silent default).

    record.write(path)                 # whole or not at all, non-finite numbers as null
    EvalPoint.read(path)               # a typed object, or RecordError naming the file and field
    read_metrics(path)                 # the rows of a metrics.jsonl, a torn line skipped

The records: EvalPoint (points/step_XXXXXXXX.json, one evaluation with a GuidanceResult per guidance
scale), RunSummary (run-summary.json) and Provenance (provenance.json) in a run folder; AblationPlan
(an ablation's ablation.json, with its AblationBudget, AblationProtocol and an AblationRun per run).

A file without a ``format`` field predates the versioning and is read as format 1. An unknown
field, a missing one or a newer format is a RecordError naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pixelrun.config import RunFailed
from pixelrun.infra.files import write_atomic
from pixelrun.infra.tracking import json_row

R = TypeVar("R", bound="Record")


class RecordError(RunFailed):
    """A record file that cannot be read as its type: one line naming the file and what is wrong."""


@dataclasses.dataclass
class Record:
    """Base of every record: a dataclass whose fields are JSON values, nested records or lists and
    dicts of them. ``FORMAT`` is written into the file; bump it when a field changes meaning."""

    FORMAT: ClassVar[int] = 1
    KIND: ClassVar[str] = "record"

    def to_dict(self) -> dict:
        return {"format": self.FORMAT, **self.content()}

    def content(self) -> dict:
        """The fields as JSON values (nested records as objects), without the format."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(json_row(self.to_dict()), indent=indent, allow_nan=False) + "\n"

    def write(self, path: str | Path) -> Path:
        """Whole or not at all (a temporary file renamed over it)."""
        return write_atomic(Path(path), self.to_json())

    @classmethod
    def from_dict(cls: type[R], data: Any, source: str | Path = "<record>") -> R:
        if not isinstance(data, dict):
            raise RecordError(f"{source}: not a {cls.KIND} record (a JSON object was expected)")
        version = data.get("format", 1)
        if not isinstance(version, int) or version > cls.FORMAT:
            raise RecordError(
                f"{source}: {cls.KIND} record of format {version!r}; this pixelrun reads format "
                f"{cls.FORMAT} and older: upgrade pixelrun"
            )
        return _build(cls, {k: v for k, v in data.items() if k != "format"}, str(source), cls.KIND)

    @classmethod
    def read(cls: type[R], path: str | Path) -> R:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RecordError(f"{path}: cannot be read as a {cls.KIND} record ({e})") from None
        return cls.from_dict(data, path)


# ----------------------------------------------------------------------------- the records of a run


@dataclasses.dataclass
class GuidanceResult(Record):
    """One evaluation at one guidance scale: the metrics and each prompt's values."""

    KIND: ClassVar[str] = "guidance result"

    guidance: float
    guidance_mode: str
    metrics: dict[str, Any]  # metric -> a number, or {measure: number} (shapes: placed, exact_set, n, ...)
    per_prompt: dict[str, Any]  # metric -> {measure: [one value per prompt]}
    ema_decay: float | None = None  # the EMA sampled (ema.decays); None: raw weights, or written before ema.decays
    nfe: int | None = None  # model evaluations per generated image (sample.sampler, guidance, interval)

    def content(self) -> dict:
        """Without ema_decay and nfe where unknown: a point written before them reads back as written."""
        return {k: v for k, v in super().content().items() if v is not None or k not in ("ema_decay", "nfe")}


@dataclasses.dataclass
class EvalPoint(Record):
    """points/step_XXXXXXXX.json: one evaluation, against steps, images, FLOPs and training time; its
    first generated images are in points/step_XXXXXXXX/NNN.png (``image_folder``)."""

    KIND: ClassVar[str] = "evaluation point"

    step: int
    fraction: float  # of the run's train.steps
    images: int  # training images up to the step
    flops: float  # training FLOPs up to the step
    train_seconds: float  # time in training steps up to the step, over every session
    weights: str  # ema | raw
    sample_seed: int
    prompts: list[str]
    val: dict[str, float | None]  # val/flow/<bin>, val_ema/flow/<bin>
    results: list[GuidanceResult]  # sample.guidance first, then the eval.guidance sweep; then each further EMA's
    settings: dict[str, Any] | None  # the metric settings (eval/settings.json); None without metrics

    @staticmethod
    def file_name(step: int) -> str:
        return f"step_{step:08d}.json"

    @staticmethod
    def image_folder(path: str | Path) -> Path:
        """The folder of the point's images, beside its file."""
        return Path(path).with_suffix("")


@dataclasses.dataclass
class RunSummary(Record):
    """run-summary.json: what a finished run reached and what it cost."""

    KIND: ClassVar[str] = "run summary"

    status: str  # done
    steps: int
    images: int
    flops: float
    flops_per_image: float
    train_seconds: float  # time in training steps over every session
    images_per_s: float  # the median of the logged images/s
    step_seconds: float  # the last stage's global batch / images_per_s
    peak_memory_bytes: int
    device: str
    world_size: int
    # the machine's 1-minute load average and CPU count as the run ended (None: written before
    # they were recorded): images/s measured with the load above the CPUs was shared with other work
    load_1min: float | None = None
    cpus: int | None = None

    def content(self) -> dict:
        """Without the load where unknown: a summary written before it reads back as written."""
        return {k: v for k, v in super().content().items() if v is not None or k not in ("load_1min", "cpus")}


@dataclasses.dataclass
class Provenance(Record):
    """provenance.json: the code, packages, machine and command that produced a run."""

    KIND: ClassVar[str] = "provenance"

    git_commit: str | None
    git_dirty: bool | None
    packages: dict[str, str]
    python: str
    host: str
    device: str
    command: str


@dataclasses.dataclass
class AblationBudget(Record):
    """An ablation's budget (docs/ablations.md) and whether its runs train equal steps."""

    KIND: ClassVar[str] = "ablation budget"

    kind: str  # images | flops | minutes | target
    value: float
    metric: str | None  # target: the metric to reach
    target: float | str | None  # target: the value to reach, or "baseline" (its final score)
    equal_steps: bool
    cooldown: float


@dataclasses.dataclass
class AblationProtocol(Record):
    """How every run of an ablation is evaluated."""

    KIND: ClassVar[str] = "ablation protocol"

    metrics: list[str]
    prompts: int
    sample_steps: int
    guidance: list[float]
    primary_guidance: float
    guidance_mode: str
    weights: str
    val_images: int
    spacing: str
    sample_seed: str  # in words: each run's seed


@dataclasses.dataclass
class AblationRun(Record):
    """One (variant, seed) run as the plan has it."""

    KIND: ClassVar[str] = "ablation run"

    variant: str
    seed: int
    dir: str  # relative to the ablation's folder
    steps: int
    global_batch: int
    images: int
    flops_per_image: float
    point_steps: list[int]
    overrides: list[str]  # the variant's own
    config: str  # relative to the ablation's folder
    step_seconds_calibrated: float | None
    command: str  # for a scheduler


@dataclasses.dataclass
class AblationPlan(Record):
    """ablation.json: what `pixelrun ablate` planned, and what its report reads beside the run folders."""

    KIND: ClassVar[str] = "ablation plan"

    name: str
    spec_file: str | None
    baseline: str
    variants: list[str]
    seeds: list[int]
    budget: AblationBudget
    points: list[float]  # fractions of the budget
    protocol: AblationProtocol
    base: dict[str, Any]  # config, overrides
    machine: dict[str, Any]  # device, cpu, cores, host
    runs: list[AblationRun]


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl, each a JSON object with a numeric ``step``; a line that does not
    parse (the torn last line of a run killed mid-write) is skipped, a missing file has no rows."""
    rows: list[dict] = []
    try:
        text = Path(path).read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- reading and writing


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.content()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: Any, data: dict, source: str, where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RecordError(f"{source}: unknown field {where}.{unknown[0]} in a {cls.KIND} record")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"{source}: missing field {where}.{name} in a {cls.KIND} record")
            continue
        values[name] = _convert(hints[name], data[name], source, f"{where}.{name}")
    return cls(**values)


def _convert(hint: Any, value: Any, source: str, where: str) -> Any:
    """Nested records (also inside lists, dicts and optionals) become their dataclass; the rest stays
    as JSON gave it."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(inner[0], value, source, where) if len(inner) == 1 else value
    if isinstance(hint, type) and issubclass(hint, Record):
        if not isinstance(value, dict):
            raise RecordError(f"{source}: field {where} is not an object in a {hint.KIND} record")
        return _build(hint, value, source, where)
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(hint) or (Any,)
        return [_convert(item, v, source, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        _, item = typing.get_args(hint) or (Any, Any)
        return {k: _convert(item, v, source, f"{where}.{k}") for k, v in value.items()}
    return value


# --- checkpoint meta: helper "state" ---


@dataclasses.dataclass
class CheckpointMeta(Record):
    """``meta.pt`` of a checkpoint: what a resume needs besides the tensors (DCP's ``model.*``,
    ``optimizer.*``, ``ema.*``). A torch pickle, not JSON: ``torch_rng`` is a tensor. Each group of
    fields is the state of one part of the run (pixelrun/training/state.py): the counters, the
    schedule, the RNG, the data position and the run's identity (its config and text width).

    Format 1 is the meta of pixelrun before the parts (no ``format`` key; ``stage``,
    ``train_seconds`` and ``skipped_steps`` absent in the oldest, and two keys nothing read:
    ``trainable`` and ``optimizer_kind``, accepted and dropped). Format 2 lacks ``healthy`` (read
    as True: it was saved by a run that checked only for non-finite values)."""

    FORMAT: ClassVar[int] = 3
    KIND: ClassVar[str] = "checkpoint meta"
    LEGACY: ClassVar[tuple[str, ...]] = ("trainable", "optimizer_kind")

    step: int
    scheduler: dict[str, Any]
    torch_rng: Any  # a uint8 tensor (torch.get_rng_state())
    data: list[Any]  # each rank's batch source position, by rank
    world_size: int  # the ranks that saved it (a data position carries over to as many only)
    config: dict[str, Any]  # the whole config of the run (every stage)
    text_dim: int
    stage: int | None = None  # the stage it was saved in; None: saved before stages were recorded
    train_seconds: float = 0.0  # time in training steps over every session
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient norm, every session
    # whether the divergence detector (pixelrun/run/health.py) found the state healthy when it was
    # saved; rotation never deletes the newest healthy checkpoint
    healthy: bool = True

    @classmethod
    def from_dict(cls, data: Any, source: str | Path = "<record>") -> CheckpointMeta:
        if isinstance(data, dict) and data.get("format", 1) == 1:
            data = {k: v for k, v in data.items() if k not in cls.LEGACY}
        return super().from_dict(data, source)

    @classmethod
    def read(cls, path: str | Path) -> CheckpointMeta:
        """From a checkpoint directory or its ``meta.pt``."""
        import torch

        file = _meta_file(path)
        try:
            data = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # torch.load raises many kinds on a damaged file
            raise RecordError(f"{file}: cannot be read as a {cls.KIND} record ({type(e).__name__}: {e})") from None
        return cls.from_dict(data, file)

    def write(self, path: str | Path) -> Path:
        """``meta.pt`` in a checkpoint directory being written (or at ``path``, a ``meta.pt``)."""
        import io

        import torch

        buffer = io.BytesIO()
        torch.save(self.to_dict(), buffer)
        return write_atomic(_meta_file(path), buffer.getvalue())


def _meta_file(path: str | Path) -> Path:
    path = Path(path)
    return path if path.name == "meta.pt" else path / "meta.pt"
