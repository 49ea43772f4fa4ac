"""Buckets, robust image loading, and the folder batch source (all files built on the fly, tiny)."""

import json
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from pixelrun.config import aspect_buckets
from pixelrun.data import Batch, NoUsableData, to_model_range
from pixelrun.data.buckets import nearest_bucket, resize_to_bucket, to_tensor
from pixelrun.data.folder import FolderBatchSource, ImageFolder, load_rgb, read_size

# ---------------------------------------------------------------- buckets


@pytest.mark.parametrize("res,count,lo,hi", [(512, 13, 240, 256), (1024, 27, 984, 1024)])
def test_bucket_counts_match_recipe(res, count, lo, hi):
    b = aspect_buckets(res, 32)
    tokens = [h * w // 32**2 for h, w in b]
    assert len(b) == len(set(b)) == count
    assert (min(tokens), max(tokens)) == (lo, hi)
    assert (res, res) in b
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in b)
    assert set(b) == {(w, h) for h, w in b}  # symmetric: every wide bucket has its tall twin
    ratios = [w / h for h, w in b]
    assert ratios == sorted(ratios)
    # Ratio bounds: exact at 512; at 1024 flooring the free side gives two buckets at 2.045.
    outside = {(h, w) for h, w in b if not 0.5 <= w / h <= 2.0}
    assert outside == (set() if res == 512 else {(22 * 32, 45 * 32), (45 * 32, 22 * 32)})
    assert all(0.5 / 1.05 <= r <= 2.0 * 1.05 for r in ratios)


def test_nearest_bucket_and_resize():
    b = aspect_buckets(512, 32)
    assert nearest_bucket(1000, 1000, b) == (512, 512)
    th, tw = nearest_bucket(2000, 1000, b)
    assert th > tw and (th, tw) == (704, 352)
    assert nearest_bucket(100, 205, b) == (352, 704)
    # Three vertical bands R|G|B on a 3:1 image: a square centre crop keeps the green band.
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, :100, 0] = a[:, 100:200, 1] = a[:, 200:, 2] = 255
    out = resize_to_bucket(Image.fromarray(a), 32, 32)
    assert out.size == (32, 32)
    m = np.asarray(out, np.float32)[4:-4, 4:-4].mean((0, 1))
    assert m[1] > 240 and m[0] < 15 and m[2] < 15
    t = to_tensor(Image.new("RGB", (5, 3), (255, 0, 128)))
    assert t.shape == (3, 3, 5) and t.dtype == torch.uint8
    assert t[0].eq(255).all() and t[1].eq(0).all() and t[2].eq(128).all()
    x = to_model_range(t)  # the training step's conversion: 255 -> 1, 0 -> -1, 128 -> 128/127.5 - 1
    assert x.dtype == torch.float32 and x[0].eq(1).all() and x[1].eq(-1).all()
    assert abs(x[2, 0, 0].item() - (128 / 127.5 - 1)) < 1e-7


# ---------------------------------------------------------------- loading


def png_header_only(path, w, h):
    """A valid PNG header declaring w x h with no real pixel data: a bomb that costs 60 bytes."""

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 8))
        + chunk(b"IEND", b"")
    )


def px(img, xy=(1, 1)):
    return img.getpixel(xy)


def close(a, b, tol=8):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def test_load_rgb_converts_odd_modes(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    g16 = np.full((8, 8), 65535, np.uint16)
    g16[:, 4:] = 32896  # 128 * 257
    Image.fromarray(g16).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # transparent red -> white, not red
    rgba.putpixel((5, 5), (0, 0, 255, 255))
    rgba.save(tmp_path / "rgba.png")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.putpixel((5, 5), 0)
    pal.save(tmp_path / "pal.gif", transparency=0)
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.png")
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "la.png")

    assert close(px(load_rgb(tmp_path / "cmyk.jpg")), (255, 0, 0))
    g = load_rgb(tmp_path / "g16.png")
    assert g.mode == "RGB" and px(g) == (255, 255, 255) and px(g, (6, 1)) == (128, 128, 128)
    r = load_rgb(tmp_path / "rgba.png")
    assert px(r) == (255, 255, 255) and px(r, (5, 5)) == (0, 0, 255)
    p = load_rgb(tmp_path / "pal.gif")
    assert px(p) == (0, 200, 0) and px(p, (5, 5)) == (255, 255, 255)
    assert px(load_rgb(tmp_path / "grey.png")) == (77, 77, 77)
    assert px(load_rgb(tmp_path / "la.png")) == (255, 255, 255)


def test_load_rgb_rejects_broken_and_enormous(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "ok.jpg", quality=95)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    png_header_only(tmp_path / "bomb.png", 100_000, 100_000)  # beyond PIL's hard limit: error
    png_header_only(tmp_path / "big.png", 10_000, 10_000)  # PIL only warns; our 64 MP limit skips
    limit_before = Image.MAX_IMAGE_PIXELS

    assert load_rgb(tmp_path / "ok.jpg").size == (64, 64)
    assert load_rgb(tmp_path / "ok.jpg", max_pixels=64 * 64 - 1) is None
    for name in ("trunc.jpg", "text.png", "bomb.png", "missing.png"):
        assert load_rgb(tmp_path / name) is None, name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert load_rgb(tmp_path / "big.png") is None and read_size(tmp_path / "big.png") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert load_rgb(tmp_path / "big.png", max_pixels=10**9) is None
    assert read_size(tmp_path / "bomb.png") is None and read_size(tmp_path / "text.png") is None
    assert Image.MAX_IMAGE_PIXELS == limit_before  # protection left on


def test_exif_rotation_and_draft(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed portrait
    Image.new("RGB", (400, 200), (10, 20, 30)).save(tmp_path / "rot.jpg", exif=exif)
    assert read_size(tmp_path / "rot.jpg") == (400, 200)  # (height, width) as displayed
    assert load_rgb(tmp_path / "rot.jpg").size == (200, 400)
    small = load_rgb(tmp_path / "rot.jpg", target=(120, 60))  # JPEG draft at 1/2 still covers
    assert small.size == (100, 200)


# ---------------------------------------------------------------- folder and batches


def make_folder(root, n_tall=5, n_wide=5, n_square=2, broken=True):
    """Captions name the shape, so a test can tell which bucket an item belongs to."""
    (root / "sub").mkdir(parents=True)
    jsonl = []
    rng = np.random.default_rng(1)
    for kind, size, n in (("tall", (24, 48), n_tall), ("wide", (48, 24), n_wide), ("square", (32, 32), n_square)):
        for i in range(n):
            a = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            if i % 2:
                Image.fromarray(a).save(root / f"{kind}{i}.png")
                (root / f"{kind}{i}.txt").write_text(f"{kind} {i}\n")
            else:
                Image.fromarray(a).save(root / "sub" / f"{kind}{i}.jpg")
                key = ("file", "caption") if i % 4 == 0 else ("image", "text")
                jsonl.append({key[0]: f"sub/{kind}{i}.jpg", key[1]: f"{kind} {i}"})
    if broken:
        (root / "bad.png").write_text("not an image")
        (root / "bad.txt").write_text("tall broken")
        png_header_only(root / "bomb.png", 100_000, 100_000)
        (root / "bomb.txt").write_text("wide bomb")
        Image.new("RGB", (8, 8)).save(root / "nocap.png")  # no caption anywhere: not an item
    (root / "captions.jsonl").write_text("\n".join(map(json.dumps, jsonl)) + "\n{oops\n")
    return root


BUCKETS = [(32, 16), (16, 16), (16, 32)]  # tall, square, wide


def test_image_folder_captions(tmp_path):
    f = ImageFolder(make_folder(tmp_path / "d"))
    caps = dict(zip((p.name for p in f.paths), f.captions))
    assert caps["tall1.png"] == "tall 1" and caps["tall0.jpg"] == "tall 0"
    assert caps["wide2.jpg"] == "wide 2"  # image/text keys
    assert len(f) == 14 and f.missing_captions == 1 and f.bad_caption_lines == 1
    assert f.size(f.paths.index(tmp_path / "d" / "tall1.png")) == (48, 24)
    (tmp_path / "empty").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "empty" / "x.png")
    with pytest.raises(ValueError, match="empty"):
        ImageFolder(tmp_path / "empty")


def test_batches_respect_buckets_and_skip_broken(tmp_path):
    src = FolderBatchSource(ImageFolder(make_folder(tmp_path / "d")), 3, BUCKETS, seed=3)
    assert iter(src) is src
    for _ in range(12):
        b = next(src)
        assert isinstance(b, Batch) and b.images.shape[0] == 3 == len(b.captions)
        assert b.images.dtype == torch.uint8
        kinds = {c.split()[0] for c in b.captions}
        h, w = b.images.shape[-2:]
        expected = "tall" if h > w else "wide" if w > h else "square"
        assert kinds == {expected}
    assert src.skipped == 2 and sorted(p.rsplit("/", 1)[1].split(" (")[0] for p in src.skipped_paths) == [
        "bad.png",
        "bomb.png",
    ]


def test_failure_at_decode_is_replaced(tmp_path):
    """The header reads fine but the pixels do not: the batch is refilled, never shrinks."""
    root = tmp_path / "d"
    root.mkdir()
    noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    for i in range(4):
        Image.fromarray(noise).save(root / f"{i}.jpg", quality=95)
        (root / f"{i}.txt").write_text(f"item {i}")
    data = (root / "0.jpg").read_bytes()
    (root / "0.jpg").write_bytes(data[: len(data) // 2])
    src = FolderBatchSource(ImageFolder(root), 4, [(16, 16)], seed=0)
    for _ in range(3):
        b = next(src)
        assert b.images.shape == (4, 3, 16, 16) and "item 0" not in b.captions
    assert src.skipped == 1


def test_fewer_images_than_batch_cycles(tmp_path):
    f = ImageFolder(make_folder(tmp_path / "d", n_tall=0, n_wide=0, n_square=2, broken=False))
    b = next(FolderBatchSource(f, 5, BUCKETS))
    assert b.images.shape == (5, 3, 16, 16) and set(b.captions) == {"square 0", "square 1"}


def test_all_broken_raises(tmp_path):
    (tmp_path / "a.png").write_text("no")
    (tmp_path / "a.txt").write_text("cap")
    with pytest.raises(NoUsableData, match="could be loaded"):  # the CLI: one line naming data.path
        next(FolderBatchSource(ImageFolder(tmp_path), 2, BUCKETS))


def test_state_dict_round_trip(tmp_path):
    f = ImageFolder(make_folder(tmp_path / "d"))
    a = FolderBatchSource(f, 3, BUCKETS, seed=7)
    states, ref = [], []
    for _ in range(10):
        states.append(json.loads(json.dumps(a.state_dict())))  # must survive a JSON checkpoint
        ref.append(next(a))
    assert any(any(s["fill"]) for s in states)  # some saves hold half-filled buckets
    for k in (1, 3, 4, 6):
        b = FolderBatchSource(ImageFolder(tmp_path / "d"), 3, BUCKETS, seed=7)
        b.load_state_dict(states[k])
        for x in ref[k:]:
            y = next(b)
            assert x.captions == y.captions and torch.equal(x.images, y.images)
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="different settings"):
        FolderBatchSource(f, 3, BUCKETS, seed=8).load_state_dict(states[2])


def test_ranks_disjoint_within_epoch(tmp_path):
    f = ImageFolder(make_folder(tmp_path / "d", broken=False))  # 12 items
    seen = []
    for rank in range(2):
        # batch 1 and one bucket: the batches are exactly the rank's epoch-0 stream
        src = FolderBatchSource(f, 1, [(16, 16)], seed=5, rank=rank, world_size=2)
        seen.append({next(src).captions[0] for _ in range(6)})
        assert src.epoch == 0
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 12


def test_malformed_caption_lines_are_reported_once_at_start(tmp_path, capsys):
    """Counted, and named with the file and the first bad line's number (worker processes:
    tests/data/test_loader.py)."""
    from pixelrun.config import load_config
    from pixelrun.data.sources import make_batch_source

    root = make_folder(tmp_path / "d", broken=False)  # its captions.jsonl ends with "{oops"
    lines = (root / "captions.jsonl").read_text().splitlines()
    lines[1:1] = ['["sub/tall0.jpg", "a list"]', '{"file": "sub/wide0.jpg"}', "", '{"file": 3, "caption": "x"}']
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    f = ImageFolder(root)
    assert f.bad_caption_lines == 4 and f.first_bad_caption_line == 2
    assert f.caption_note.startswith(
        f"warning: {root / 'captions.jsonl'}: 4 malformed line(s) skipped, the first at line 2 ("
    )
    assert ImageFolder(make_folder(tmp_path / "ok", broken=False)).caption_note is not None  # "{oops"
    (tmp_path / "ok" / "captions.jsonl").unlink()
    assert ImageFolder(tmp_path / "ok").caption_note is None
    cfg = load_config(None, ["data.source=folder", f"data.path={root}", "data.resolution=32", "model.patch_size=8"])
    capsys.readouterr()
    make_batch_source(cfg, say=print)  # training passes its rank-0 printer
    out = capsys.readouterr().out
    assert out.count("malformed line(s)") == 1 and "first at line 2" in out
