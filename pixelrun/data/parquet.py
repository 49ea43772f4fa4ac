"""Parquet files and Hugging Face `datasets` as the source of `pixelrun data convert`.

Most text-to-image sets on the Hub, the speedrun's three among them, are Parquet files with one row
per sample: the image in a column of the `datasets` Image feature (a struct of `bytes` and `path`)
or plain binary, the captions in string columns. `--src` may name, several joined by `::`:

  a .parquet file; a folder (every .parquet file under it, in path order; hidden folders such as
  the Hub's .cache are left out); a glob (`data/train-*.parquet`, `**` allowed); a folder written
  by `datasets`' `save_to_disk` (its .arrow files, read here with pyarrow, so `datasets` is not
  needed; a DatasetDict folder by --split); an .arrow file; or a Hub id (`owner/name`), which
  `datasets` downloads and prepares into its cache (optional dependency: `pixelrun[hub]`).

Everything about the columns is checked on the files' schemas (their footers) before any row is
read: the image column exists in every file, each caption column in at least one (a file without
one of them leaves it out of its samples), each is text.

Memory: files are read one row group at a time (an Arrow record batch for .arrow files, which are
memory-mapped). pyarrow materialises a whole row group's column chunk, so the peak is about twice
the largest row group's bytes, whatever the file size: `datasets` writes row groups of at most
100 MB (`datasets.config.MAX_ROW_GROUP_SIZE`; older versions 100 rows for images, as in
FLUX-Reason-6M's files); a file written with huge row groups is reported before the work starts.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pixelrun.config import ConfigError, parse_weights
from pixelrun.data import SourceImage

READ_ROWS = 64  # rows handed on at a time (a row group is read whole, then sliced)
PRIMARY_CAPTION_COLUMNS = ("caption", "prompt", "text")  # the default --captions, first found
BIG_ROW_GROUP = 512 << 20  # bytes; above this a row group's memory cost is worth a line
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_GLOB_CHARS = frozenset("*?[")


@dataclass
class TableFile:
    path: Path
    kind: str  # "parquet" or "arrow"
    schema: pa.Schema
    rows: int
    largest_group: int = 0  # bytes of the largest row group (Parquet metadata), for the memory note


# ----------------------------------------------------------------------------- what --src names


def _is_table_part(part: str) -> bool:
    p = Path(part)
    if p.is_file():
        return p.suffix in (".parquet", ".arrow")
    if p.is_dir():
        # Two levels down is where the Hub puts them (data/train-*.parquet, Subset/part-*.parquet);
        # an image folder is not walked in full just to find out.
        return any((p / marker).is_file() for marker in ("state.json", "dataset_dict.json")) or any(
            next(p.glob(pattern), None) is not None for pattern in ("*.parquet", "*/*.parquet", "*/*/*.parquet")
        )
    return bool(_GLOB_CHARS & set(part)) or bool(_HUB_ID.match(part))


def is_table_source(src: str) -> bool:
    """Whether `--src` names Parquet / Arrow tables or a Hub dataset rather than an image folder or
    a JSONL manifest. A mix of both kinds is refused."""
    parts = [p.strip() for p in str(src).split("::")]
    kinds = [_is_table_part(p) for p in parts]
    if len(parts) > 1 and not all(kinds):
        other = parts[kinds.index(False)]
        raise ConfigError("--src", f"{other} is not Parquet, Arrow or a Hub dataset; only those can be joined by '::'")
    return kinds[0]


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _parquet(path: Path) -> TableFile:
    try:
        meta = pq.ParquetFile(path).metadata
        schema = meta.schema.to_arrow_schema()
    except Exception as e:  # a truncated download, not Parquet at all
        raise ConfigError("--src", f"{path} is not a readable Parquet file ({_first_line(e)})") from None
    groups = [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
    return TableFile(path, "parquet", schema, meta.num_rows, max(groups, default=0))


def _open_ipc(source):
    """datasets writes the Arrow IPC stream format; the file format is accepted too."""
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source)


def _ipc_batches(reader) -> Iterator:
    if hasattr(reader, "num_record_batches"):  # file format
        return (reader.get_batch(i) for i in range(reader.num_record_batches))
    return iter(reader)


def _arrow(path: Path) -> TableFile:
    try:
        with pa.memory_map(str(path)) as source:
            reader = _open_ipc(source)
            rows = sum(b.num_rows for b in _ipc_batches(reader))  # memory-mapped: no data is copied
            return TableFile(path, "arrow", reader.schema, rows)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError("--src", f"{path} is not a readable Arrow file ({_first_line(e)})") from None


def _saved_dataset(folder: Path, split: str) -> list[TableFile]:
    """The .arrow files of a `save_to_disk` folder, in the order its state.json lists them."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        if split not in splits:
            raise ConfigError("--split", f"{folder} holds the splits {', '.join(splits)}, not {split!r}")
        folder = folder / split
    state = json.loads((folder / "state.json").read_text())
    return [_arrow(folder / f["filename"]) for f in state["_data_files"]]


def _hub_dataset(name: str, split: str) -> list[TableFile]:
    """A Hub id through `datasets`, which downloads and prepares it into its cache as .arrow files
    (about the dataset's size on disk); those files are then read like a saved dataset's."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "--src",
            f"{name} is not a local path; reading it as a Hugging Face dataset id needs the "
            f"datasets package: pip install 'pixelrun[hub]' (or download the Parquet files and "
            f"pass their folder)",
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, no such dataset, no such split: datasets' own words
        raise ConfigError(
            "--src",
            f"{name} is no local path, and datasets could not load it as a Hub dataset "
            f"(split {split!r}): {_first_line(e)}",
        ) from None
    files = [Path(f["filename"]) for f in ds.cache_files]
    if not files:
        raise ConfigError(
            "--src",
            f"datasets loaded {name} into memory, not into cache files; save it with save_to_disk and pass that folder",
        )
    return [_arrow(f) for f in files]


def _resolve_part(part: str, split: str) -> list[TableFile]:
    p = Path(part)
    if p.is_file():
        return [_parquet(p) if p.suffix == ".parquet" else _arrow(p)]
    if p.is_dir():
        if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            return _saved_dataset(p, split)
        found = sorted(f for f in p.rglob("*.parquet") if not any(s.startswith(".") for s in f.relative_to(p).parts))
        if not found:
            raise ConfigError("--src", f"no .parquet files under {part}")
        return [_parquet(f) for f in found]
    if _GLOB_CHARS & set(part):
        matches = [
            Path(m)
            for m in sorted(globlib.glob(part, recursive=True))
            if m.endswith((".parquet", ".arrow")) and os.path.isfile(m)
        ]
        if not matches:
            raise ConfigError("--src", f"{part!r} matches no .parquet or .arrow file")
        return [_parquet(m) if m.suffix == ".parquet" else _arrow(m) for m in matches]
    return _hub_dataset(part, split)


def resolve_tables(src: str, split: str = "train") -> list[TableFile]:
    """Every table file `--src` names, in order, with its schema and row count (footers only)."""
    return [f for part in str(src).split("::") for f in _resolve_part(part.strip(), split)]


# ----------------------------------------------------------------------------- columns


def _is_text(t) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_image_like(t) -> bool:
    """Binary, or a struct with a binary `bytes` field (the `datasets` Image feature's storage)."""

    def binary(u) -> bool:
        return pa.types.is_binary(u) or pa.types.is_large_binary(u)

    if pa.types.is_struct(t):
        return t.get_field_index("bytes") >= 0 and binary(t.field("bytes").type)
    return binary(t)


def _hf_image_features(schema) -> list[str]:
    """Columns that `datasets` declared as Image in the schema metadata it writes."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        features = json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return []
    return [
        name
        for name, feat in features.items()
        if isinstance(feat, dict) and feat.get("_type") == "Image" and name in schema.names
    ]


def _columns_text(schema) -> str:
    return ", ".join(f"{f.name} ({str(f.type)})" for f in schema)


def choose_image_column(files: list[TableFile], name: str | None) -> str:
    """`name`, which every file must have; by default the first column `datasets` declared as an
    Image, else the first binary or {bytes, path} column of the first file."""
    if name is None:
        schema = files[0].schema
        candidates = _hf_image_features(schema) or [f.name for f in schema if _is_image_like(f.type)]
        if not candidates:
            raise ConfigError(
                "--image-column",
                f"{files[0].path} has no image column (an Image feature, binary or "
                f"{{bytes, path}}); its columns: {_columns_text(schema)}",
            )
        name = candidates[0]
    for f in files:
        if name not in f.schema.names:
            raise ConfigError(
                "--image-column", f"{f.path} has no column {name!r}; its columns: {_columns_text(f.schema)}"
            )
        t = f.schema.field(name).type
        if not (_is_image_like(t) or _is_text(t)):
            raise ConfigError(
                "--image-column",
                f"column {name!r} of {f.path} is {str(t)}: neither image bytes, a {{bytes, path}} struct nor a path",
            )
    return name


def choose_caption_columns(files: list[TableFile], spec: str | None) -> list[tuple[str, float]]:
    """[(column, weight)] from `spec` (`prompt:0.7,caption_long:0.3`, the syntax of data.captions);
    by default the first of caption / prompt / text that some file has. A column that is in no file,
    or is not text where it is, stops the conversion here, before any work."""
    text_columns = list(dict.fromkeys(fld.name for f in files for fld in f.schema if _is_text(fld.type)))
    listing = ", ".join(text_columns) or "none"
    if spec is None:
        column = next((c for c in PRIMARY_CAPTION_COLUMNS if c in text_columns), None)
        if column is None:
            raise ConfigError(
                "--captions",
                f"no column named {', '.join(PRIMARY_CAPTION_COLUMNS)}: name the caption "
                f"columns, e.g. --captions {text_columns[0] if text_columns else 'NAME'} "
                f"(text columns: {listing})",
            )
        return [(column, 1.0)]
    try:
        columns = parse_weights(spec)
    except ValueError as e:
        raise ConfigError("--captions", str(e)) from None
    for column, _ in columns:
        holders = [f for f in files if column in f.schema.names]
        if not holders:
            raise ConfigError(
                "--captions", f"column {column!r} is in none of the {len(files)} file(s) (text columns: {listing})"
            )
        for f in holders:
            if not _is_text(f.schema.field(column).type):
                raise ConfigError(
                    "--captions", f"column {column!r} of {f.path} is {str(f.schema.field(column).type)}, not text"
                )
    return columns


# ----------------------------------------------------------------------------- rows


def _record_batches(f: TableFile, columns: list[str], on_error: Callable[[str, int], None]) -> Iterator:
    """(index of its first row in the file, record batch of at most READ_ROWS rows), one row group
    (Arrow batch) in memory at a time. A row group that cannot be read is reported through
    on_error(what, rows) and passed over: one damaged group must not end a conversion of millions."""
    start = 0
    if f.kind == "parquet":
        pf = pq.ParquetFile(f.path)
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            try:
                table = pf.read_row_group(g, columns=columns)
            except Exception as e:
                on_error(f"{f.path} rows {start}-{start + n - 1} (row group {g} unreadable: {_first_line(e)})", n)
                start += n
                continue
            for batch in table.to_batches(max_chunksize=READ_ROWS):
                yield start, batch
                start += batch.num_rows
            del table
        return
    with pa.memory_map(str(f.path)) as source:
        for batch in _ipc_batches(_open_ipc(source)):
            batch = batch.select(columns)
            for offset in range(0, batch.num_rows, READ_ROWS):
                yield start + offset, batch.slice(offset, READ_ROWS)
            start += batch.num_rows


def _images(column) -> tuple[list, list]:
    """(bytes or None, path or None) per row of an image column of any accepted type."""
    n = len(column)
    t = column.type
    if pa.types.is_struct(t):
        names = [t.field(i).name for i in range(t.num_fields)]
        null = column.is_null().to_pylist()
        data = column.field("bytes").to_pylist() if "bytes" in names else [None] * n
        paths = column.field("path").to_pylist() if "path" in names else [None] * n
        return ([None if z else d for d, z in zip(data, null)], [None if z else p for p, z in zip(paths, null)])
    if _is_text(t):
        return [None] * n, column.to_pylist()
    return column.to_pylist(), [None] * n


def _local_image(path: str | None, table: Path) -> Path | None:
    """An image stored by path only (a `datasets` Image of local files): absolute, or relative to
    the table's folder; None when it is not there."""
    if not path:
        return None
    p = Path(path)
    for candidate in (p, table.parent / p):
        if candidate.is_file():
            return candidate
    return None


def table_rows(
    files: list[TableFile],
    image_column: str,
    captions: list[tuple[str, float]],
    limit: int | None,
    on_error: Callable[[str, int], None],
) -> Iterator[SourceImage]:
    """One SourceImage per row, in file and row order (at most `limit` rows): the image bytes (or a
    local path), every non-empty caption column under its name, and `FILE row N` as its name."""
    seen = 0
    for f in files:
        present = [c for c, _ in captions if c in f.schema.names]
        for row, batch in _record_batches(f, [image_column, *present], on_error):
            data, paths = _images(batch.column(image_column))
            texts = {c: batch.column(c).to_pylist() for c in present}
            for i in range(batch.num_rows):
                if limit is not None and seen >= limit:
                    return
                caps = {c: v[i].strip() for c, v in texts.items() if isinstance(v[i], str) and v[i].strip()}
                image = data[i] or None  # b"" is no image either
                path = None if image is not None else _local_image(paths[i], f.path)
                yield SourceImage(path, f"{f.path} row {row + i}", caps, image)
                seen += 1


def memory_notes(files: list[TableFile]) -> list[str]:
    """A line when row groups are big enough for their memory cost to matter."""
    big = max(files, key=lambda f: f.largest_group)
    if big.largest_group <= BIG_ROW_GROUP:
        return []
    return [
        f"note: {big.path} has row groups of up to {big.largest_group / 2**30:.1f} GiB; pyarrow reads a row "
        f"group whole, so memory peaks at about twice that"
    ]
