"""The files a run leaves for other programs to read, as typed records: each a dataclass with a
format version, written and read only through this module, so a writer and its readers cannot
drift apart (renaming a field in the writer fails every reader loudly, not with a silent default).

    record.write(path)                 # whole or not at all, non-finite numbers as null
    EvalPoint.read(path)               # a typed object, or RecordError naming the file and field

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
        return {"format": self.FORMAT, **{f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}}

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


def _plain(value):
    if isinstance(value, Record):
        return {k: v for k, v in value.to_dict().items() if k != "format"}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls, data: dict, source: str, where: str):
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


def _convert(hint, value, source: str, where: str):
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
    ``trainable`` and ``optimizer_kind``, accepted and dropped)."""

    FORMAT: ClassVar[int] = 2
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
