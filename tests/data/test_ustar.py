"""The training process's fast shard reader (pixelrun/data/ustar.py): the same samples as
webdataset, which stays the reference, on every dialect; the fast path taken on plain files,
webdataset's on anything else."""

import gzip
import io
import tarfile

import pytest
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from pixelrun.data import ustar
from pixelrun.data.shards import read_samples


def webdataset_samples(url):
    """What read_samples returned before it had a fast path: webdataset's own grouping."""

    def keep_going(exn):
        return True

    return list(
        group_by_keys(
            tar_file_expander(url_opener([{"url": url}], handler=keep_going), handler=keep_going), handler=keep_going
        )
    )


def write_tar(path, members, fmt=tarfile.PAX_FORMAT, directories=()):
    with tarfile.open(path, "w", format=fmt) as tf:
        for d in directories:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def sample_members(n=5, prefix=""):
    out = []
    for i in range(n):
        out += [
            (f"{prefix}{i:04d}.jpg", bytes([i]) * (300 + 97 * i)),
            (f"{prefix}{i:04d}.TXT", f"caption {i}".encode()),
            (f"{prefix}{i:04d}.emb.txt.npy", b"\x93NUMPY" + bytes(i)),
        ]
    return out


def fast_path_taken(path, url):
    try:
        return list(ustar.samples(path, url))
    except ustar.NotPlain:
        return None


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT])
def test_plain_tars_are_read_fast_and_equal_webdataset(tmp_path, fmt):
    nested = "a/" + "b" * 60 + "/" + "c" * 30 + "/"  # > 100 characters: the ustar prefix field
    members = sample_members(4) + [("__meta__", b"skipped"), ("noext", b"no key")] + sample_members(2, "sub/dir/")
    if fmt == tarfile.USTAR_FORMAT:
        members += sample_members(2, nested)
    path = write_tar(tmp_path / "s.tar", members, fmt, directories=["sub/", "sub/dir/"])
    fast = fast_path_taken(path, path)
    assert fast is not None
    assert fast == webdataset_samples(path) == list(read_samples(path))
    assert fast[0]["txt"] == b"caption 0" and "TXT" not in fast[0]  # suffixes lowercased, as webdataset does
    assert [s["__key__"] for s in fast][-2:] == (
        [f"{nested}0000", f"{nested}0001"] if fmt == tarfile.USTAR_FORMAT else ["sub/dir/0000", "sub/dir/0001"]
    )


def with_header_bytes(data, at, offset, new):
    """The tar bytes with the header at `at` changed at `offset` and its checksum made right again."""
    h = bytearray(data[at : at + 512])
    h[offset : offset + len(new)] = new
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return data[:at] + bytes(h) + data[at + 512 :]


@pytest.mark.parametrize(
    "case",
    [
        "pax long name",
        "gnu long name",
        "non-ascii name",
        "truncated",
        "bad checksum",
        "gzip",
        "duplicate member",
        "no end blocks",
        "gnu times in the prefix field",
        "directory name with data",
        "mtime not octal",
    ],
)
def test_other_tars_go_to_webdataset_with_the_same_samples(tmp_path, case):
    members = sample_members(6)
    long = "x" * 120 + "/0099"
    fmt = tarfile.PAX_FORMAT
    if case == "pax long name":
        members.insert(6, (long + ".jpg", b"long"))
    if case == "gnu long name":
        members.insert(6, (long + ".jpg", b"long"))
        fmt = tarfile.GNU_FORMAT
    if case == "non-ascii name":
        members.insert(6, ("café.jpg", b"accent"))
    if case == "duplicate member":
        members.insert(7, members[6])
    path = write_tar(tmp_path / "s.tar", members, fmt)
    data = open(path, "rb").read()
    if case == "truncated":
        data = data[: data.index(b"caption 4") + 3]  # inside a member (the end is zeros of padding)
    if case == "bad checksum":
        data = data[:2048] + b"\x01" + data[2049:]  # a byte of the first sample's third header
        assert data[2048 + 257 : 2048 + 262] == b"ustar"  # (so it is a header: the test's own check)
    if case == "gnu times in the prefix field":  # tarfile would prepend them to the name
        data = with_header_bytes(with_header_bytes(data, 2048, 257, b"ustar  \0"), 2048, 345, b"14000000000")
    if case == "directory name with data":  # type NUL and a trailing slash: tarfile reads it as a directory, no data
        data = with_header_bytes(with_header_bytes(data, 2048, 0, b"0001/\0"), 2048, 156, b"\0")
    if case == "mtime not octal":  # a valid checksum over a field tarfile cannot read: it stops there
        data = with_header_bytes(data, 2048, 136, b"9999")
    if case == "gzip":
        data = gzip.compress(data)
    if case == "no end blocks":
        data = data.rstrip(b"\0")
        data += bytes(-len(data) % 512)
    open(path, "wb").write(data)
    assert fast_path_taken(path, path) is None
    expected = webdataset_samples(path)
    assert list(read_samples(path, lambda exn: True)) == expected
    assert len(expected) >= 1
