"""A fast reader for the plain tar files that shards almost always are.

With worker processes (`data.workers`), the training process still reads every shard itself (so
the batches are those of N = 0), and Python's `tarfile`, which webdataset's `tar_file_iterator`
streams through, costs about 0.35 ms per sample of three members here: a third of that process's
whole share of the loading, which is what bounds the speed-up of adding workers on a small machine
(benchmarks/loader_shards.py). This reader parses the 512-byte ustar headers itself (about
0.05 ms per sample) and yields the same dicts as webdataset's `group_by_keys(tar_file_expander(...))`.

It only reads what it is sure of: regular members and directories with ustar or GNU magic, octal
sizes, valid checksums, ASCII names, no duplicate member in a sample, and an end-of-archive block.
Anything else (pax or GNU long-name headers, base-256 sizes, a damaged or truncated file, a
compressed one) raises `NotPlain` before the sample it is in is yielded, and the caller hands
the shard to webdataset, which knows every dialect and how to report damage
(`shards.read_samples`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

BLOCK = 512
_REGULAR, _DIRECTORY = (b"0", b"\0", b"7"), b"5"  # tarfile's REGULAR_TYPES without sparse files, DIRTYPE
_POSIX_MAGIC = b"ustar\x0000"  # only POSIX headers use the prefix field (tarfile.TarInfo.frombuf)
_GNU_MAGIC = b"ustar  \0"
# webdataset.tariterators: base_plus_ext splits a name, skip_meta drops `__name__` members
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")


class NotPlain(Exception):
    """Something this reader does not handle; webdataset reads the shard instead."""


def _field(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


def _size(header: bytes) -> int:
    raw = header[124:136]
    if raw[0] & 0x80:  # base-256, for members over 8 GiB
        raise NotPlain("base-256 size")
    try:
        return int(_field(raw).strip() or b"0", 8)
    except ValueError:
        raise NotPlain("size is not octal") from None


_NUMBERS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))  # mode .. mtime, devices


def _numbers_ok(header: bytes) -> bool:
    """The numeric fields this reader does not use parse as tarfile's `nti` parses them (octal;
    base-256 ones go to tarfile), or tarfile would refuse the header where this reader read on."""
    try:
        for a, b in _NUMBERS:
            raw = header[a:b]
            if raw[0] & 0x80:
                return False
            int(_field(raw).strip() or b"0", 8)
    except ValueError:
        return False
    return True


def _checksum_ok(header: bytes) -> bool:
    """tarfile's calc_chksums: the header's byte sum with the checksum field read as spaces,
    unsigned or signed."""
    try:
        stored = int(_field(header[148:156]).strip() or b"0", 8)
    except ValueError:
        return False
    rest = header[:148] + b" " * 8 + header[156:]
    return stored == sum(rest) or stored == sum(b - 256 if b > 127 else b for b in rest)


def _name(header: bytes) -> str:
    name = _field(header[:100])
    if header[345]:  # tarfile prepends a non-empty prefix field whatever the magic; GNU keeps times there
        if header[257:265] != _POSIX_MAGIC:
            raise NotPlain("GNU header with data in the prefix field")
        name = _field(header[345:500]) + b"/" + name
    try:
        return name.decode("ascii")
    except UnicodeDecodeError:  # tarfile decodes with the filesystem encoding: let it
        raise NotPlain("non-ASCII name") from None


def members(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular member of the tar file at `path`, in stored order."""
    with open(path, "rb", buffering=1 << 20) as f:
        while True:
            header = f.read(BLOCK)
            if len(header) < BLOCK:
                raise NotPlain("no end-of-archive block")
            if header == bytes(BLOCK):
                return
            magic = header[257:265] in (_POSIX_MAGIC, _GNU_MAGIC)
            if not (magic and _checksum_ok(header) and _numbers_ok(header)):
                raise NotPlain("not a valid ustar header")
            kind, size = header[156:157], _size(header)
            if kind not in _REGULAR and kind != _DIRECTORY or kind == _DIRECTORY and size:
                raise NotPlain(f"member type {kind!r} of size {size}")
            name = _name(header)
            if name.endswith("/") and size:  # tarfile takes it for a directory and reads no data
                raise NotPlain(f"{name}: a directory name with data")
            data = f.read(size)
            if len(data) < size:
                raise NotPlain("truncated member")
            f.seek(-size % BLOCK, 1)
            if kind in _REGULAR and not name.endswith("/"):
                yield name, data


def samples(path: str, url: str) -> Iterator[dict]:
    """The samples of one shard, grouped as webdataset's `group_by_keys` groups them: members
    whose names share what precedes the first dot of the last path component, suffixes lowercased."""
    current: dict | None = None
    for name, data in members(path):
        if _META.match(name):
            continue
        m = _KEY.match(name)
        if m is None:
            continue
        key, suffix = m.group(1), m.group(2).lower()
        if current is None or key != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
        if suffix in current:
            raise NotPlain(f"{name}: a second member with suffix {suffix}")
        current[suffix] = data
    if current is not None:
        yield current
