"""Images under the patch size and captions that are not UTF-8: never trained on, counted and named
(issue 33). Before, a 1x1 image was upscaled to a flat bucket and a caption of Latin-1 bytes became
U+FFFD characters, both without a word."""

import io

import numpy as np
from PIL import Image
from webdataset import TarWriter

from pixelrun.config import load_config
from pixelrun.data.folder import FolderBatchSource, ImageFolder
from pixelrun.data.shards import ShardBatchSource
from pixelrun.data.sources import make_batch_source

LATIN1 = "caf\xe9 au lait".encode("latin-1")  # b"caf\xe9": not UTF-8


def _image(root, name, size, caption: bytes | str):
    rng = np.random.default_rng(len(name))
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"{name}.png")
    data = caption if isinstance(caption, bytes) else caption.encode()
    (root / f"{name}.txt").write_bytes(data)


def _folder(root):
    root.mkdir()
    for i in range(4):
        _image(root, f"ok{i}", (16, 16), f"good {i}")
    _image(root, "dot", (1, 1), "one pixel")
    _image(root, "thin", (16, 3), "a strip three pixels high")
    _image(root, "latin", (16, 16), LATIN1)
    return root


def test_folder_skips_tiny_images_and_names_them(tmp_path):
    src = FolderBatchSource(ImageFolder(_folder(tmp_path / "d")), 2, [(16, 16)], seed=1, min_side=8)
    captions = {c for _ in range(8) for c in next(src).captions}  # two epochs and more
    assert captions == {f"good {i}" for i in range(4)}
    assert src.skipped == 2
    assert sorted(p.rsplit("/", 1)[1] for p in src.skipped_paths) == [
        "dot.png (1x1 pixels, a side under the patch size 8)",
        "thin.png (16x3 pixels, a side under the patch size 8)",
    ]
    # at the patch size itself an image is kept: 3 is the smallest side there
    kept = FolderBatchSource(ImageFolder(tmp_path / "d"), 2, [(16, 16)], seed=1, min_side=3)
    assert {c for _ in range(8) for c in next(kept).captions} >= {"a strip three pixels high"}
    assert [p.rsplit("/", 1)[1] for p in kept.skipped_paths] == ["dot.png (1x1 pixels, a side under the patch size 3)"]


def test_folder_caption_that_is_not_utf8_is_counted_named_and_unused(tmp_path):
    root = _folder(tmp_path / "d")
    f = ImageFolder(root)
    assert "caf" not in " ".join(f.captions) and "\ufffd" not in " ".join(f.captions)
    assert f.undecodable_captions == [root / "latin.txt"] and f.missing_captions == 1
    assert f.caption_note == (
        f"warning: 1 caption file(s) are not UTF-8 text and were not used, the first {str(root / 'latin.txt')!r} "
        "(save them as UTF-8)"
    )
    # a captions.jsonl entry still serves the image whose .txt is unreadable; a non-UTF-8 line is malformed
    (root / "captions.jsonl").write_bytes(
        b'{"file": "latin.png", "caption": "a cafe"}\n{"file": "ok0.png", "caption": "' + LATIN1 + b'"}\n'
    )
    f = ImageFolder(root)
    assert f.captions[f.paths.index(root / "latin.png")] == "a cafe"
    assert f.bad_caption_lines == 1 and f.first_bad_caption_line == 2


def test_training_source_says_so_and_skips_under_the_configured_patch(tmp_path, capsys):
    root = _folder(tmp_path / "d")
    cfg = load_config(
        None,
        [
            "data.source=folder",
            f"data.path={root}",
            "data.resolution=16",
            "model.patch_size=4",
            "train.batch_size=2",
            "data.val_count=0",  # every image trains: the skipped ones among them
        ],
    )
    src = make_batch_source(cfg, say=print)
    assert "1 caption file(s) are not UTF-8" in capsys.readouterr().out
    for _ in range(8):
        next(src)
    assert sorted(p.rsplit("/", 1)[1].split(" (")[0] for p in src.skipped_paths) == ["dot.png", "thin.png"]


def _png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_shards_skip_tiny_images_and_undecodable_captions_by_name(tmp_path):
    (tmp_path / "d").mkdir()
    with TarWriter(str(tmp_path / "d" / "00000.tar")) as w:
        for i in range(4):
            w.write({"__key__": f"ok{i}", "png": _png((16, 16)), "txt": f"good {i}"})
        w.write({"__key__": "dot", "png": _png((1, 1)), "txt": "one pixel"})
        w.write({"__key__": "latin", "png": _png((16, 16)), "txt": LATIN1})
    src = ShardBatchSource(str(tmp_path / "d"), 2, [(16, 16)], min_side=4)
    assert {c for _ in range(6) for c in next(src).captions} == {f"good {i}" for i in range(4)}
    names = sorted(p.rsplit("#", 1)[1] for p in src.skipped_paths)
    assert names == ["dot (1x1 pixels, a side under the patch size 4)", "latin (its txt caption is not UTF-8 text)"]
