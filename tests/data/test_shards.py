"""WebDataset shards: `pixelrun data convert` / `inspect`, and the shard batch source (tiny images,
shards written on the fly)."""

import functools
import http.server
import io
import json
import shlex
import shutil
import threading

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from PIL import Image
from webdataset import TarWriter

from pixelrun.cli import main
from pixelrun.config import ConfigError, aspect_buckets, load_config, parse_captions
from pixelrun.data import NoUsableData
from pixelrun.data.buckets import resize_to_bucket, to_tensor
from pixelrun.data.convert import convert
from pixelrun.data.folder import load_rgb
from pixelrun.data.shards import (
    ShardBatchSource,
    caption_fields,
    choose_caption,
    embedding_match,
    expand_shards,
    read_index,
    read_samples,
)
from pixelrun.model.text import encoder_fingerprint

SIZES = [(32, 64), (64, 32), (48, 48)]  # (width, height): wide, tall, square
BUCKETS_32 = aspect_buckets(32, 8)  # 24x40, 32x32, 40x24


def make_folder(root, n=9, broken=True):
    """n random images of three shapes with .txt captions "picture i", and one broken file."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = SIZES[i % 3]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"picture {i}")
    if broken:
        (root / "zz.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
        (root / "zz.txt").write_text("broken")
    return root


def converted(tmp_path, n=9, fmt="png", shard_size=3, resolution=32, **kw):
    out = tmp_path / f"shards-{fmt}-{resolution}"
    convert(
        make_folder(tmp_path / f"src-{fmt}-{resolution}", n),
        out,
        resolution,
        patch=8,
        shard_size=shard_size,
        image_format=fmt,
        progress=False,
        **kw,
    )
    return out


def jpeg_bytes(rng, h=32, w=32):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# ---------------------------------------------------------------- convert and read back


def test_convert_reads_back_the_same_images_and_captions(tmp_path, capsys):
    src = make_folder(tmp_path / "src")
    out = tmp_path / "png"
    assert (
        main(
            [
                "data",
                "convert",
                "--src",
                str(src),
                "--out",
                str(out),
                "--resolution",
                "32",
                "--patch",
                "8",
                "--shard-size",
                "4",
                "--format",
                "png",
            ]
        )
        == 0
    )
    line = capsys.readouterr().out
    assert "wrote 9 samples in 3 shard(s)" in line and "skipped 1 of 10: 1 unreadable image (first: zz.png)" in line
    # The training command it prints is safe to paste into bash (issue 14): the folder, not a brace
    # pattern that bash would expand into several arguments, the last one winning.
    train = shlex.split(line.splitlines()[-1].removeprefix("train with: "))
    assert train[:3] == ["pixelrun", "train", "data.source=shards"] and f"data.path={out}" in train
    cfg = load_config(None, train[2:])
    assert expand_shards(cfg.data.path) == expand_shards(str(out)) and len(expand_shards(cfg.data.path)) == 3
    assert cfg.data.resolution == 32
    assert cfg.data.buckets  # written in three aspect buckets: the command trains in them (issue 30)
    index = json.loads((out / "index.json").read_text())
    assert index["count"] == 9 and index["buckets"] == {"24x40": 3, "32x32": 3, "40x24": 3}
    assert index["shards"] == ["00000.tar", "00001.tar", "00002.tar"] and index["unreadable"] == ["zz.png"]
    assert expand_shards(str(out / index["spec"])) == expand_shards(str(out))
    members = {s["__key__"]: s for u in expand_shards(str(out)) for s in read_samples(u)}
    assert sorted(members) == [f"{i:08d}" for i in range(9)]
    jpg = converted(tmp_path, fmt="jpg")
    jpg_members = {s["__key__"]: s for u in expand_shards(str(jpg)) for s in read_samples(u)}
    for key, s in members.items():
        i = int(key)
        assert set(s) == {"__key__", "__url__", "png", "txt", "json"}
        meta = json.loads(s["json"])
        assert s["txt"].decode() == meta["caption"] == f"picture {i}"
        orig = load_rgb(src / f"{i:02d}.png")
        assert meta["pixelrun"]["original_size"] == [orig.height, orig.width]
        expect = np.asarray(resize_to_bucket(orig, *meta["pixelrun"]["bucket"]))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), expect)  # PNG: exact
        got = np.asarray(Image.open(io.BytesIO(jpg_members[key]["jpg"])), np.float32)
        assert np.abs(got - expect).mean() < 6  # JPEG q95 4:4:4 of pure noise: within a few levels
    # Training at the stored resolution decodes exactly what was stored.
    src_batches = ShardBatchSource(str(out), 1, BUCKETS_32, seed=1)
    for _ in range(9):
        b = next(src_batches)
        i = int(b.captions[0].split()[1])
        key = f"{i:08d}"
        stored = to_tensor(Image.open(io.BytesIO(members[key]["png"])))
        assert torch.equal(b.images[0], stored)


def test_convert_in_processes_is_the_same_and_an_interrupted_one_starts_over(tmp_path):
    src = make_folder(tmp_path / "src")
    big = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 200, 3), dtype=np.uint8))
    big.save(src / "big.jpg", quality=90)  # decoded at a reduced JPEG scale: the header size is recorded
    (src / "big.txt").write_text("a big photo")
    one = tmp_path / "one"
    convert(src, one, 32, patch=8, shard_size=4, progress=False)
    many = tmp_path / "many"
    (many / ".partial").mkdir(parents=True)  # what an interrupted conversion leaves
    (many / ".partial" / "00000.tar").write_bytes(b"half a shard")
    convert(src, many, 32, patch=8, shard_size=4, progress=False, workers=2)
    assert sorted(p.name for p in many.iterdir()) == ["00000.tar", "00001.tar", "00002.tar", "index.json"]
    for a, b in zip(*(sorted(p.glob("*.tar")) for p in (one, many))):
        sa, sb = list(read_samples(str(a))), list(read_samples(str(b)))
        assert [{k: v for k, v in x.items() if k != "__url__"} for x in sa] == [
            {k: v for k, v in x.items() if k != "__url__"} for x in sb
        ]
    metas = [json.loads(s["json"])["pixelrun"] for u in expand_shards(str(many)) for s in read_samples(u)]
    assert [m["original_size"] for m in metas if m["source"] == "big.jpg"] == [[300, 200]]


def test_manifest_keeps_every_caption_field(tmp_path):
    root = tmp_path / "m"
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (40, 20), (200, 10, 10)).save(root / "img" / "a.png")
    Image.new("RGB", (20, 40), (10, 10, 200)).save(root / "img" / "b.png")
    lines = [
        {"image": "img/a.png", "caption": "red", "caption_long": "a wide red picture", "score": 3},
        {"file": "img/b.png", "caption_long": "a tall blue picture"},
        {"image": "img/none.png", "caption": "x"},
        {"caption": "no image path"},
    ]
    (root / "data.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\nnot json\n")
    index = convert(root / "data.jsonl", tmp_path / "out", 32, patch=8, progress=False)
    assert index["count"] == 2 and index["skipped_unreadable"] == 1 and index["skipped_without_caption"] == 2
    a, b = read_samples(str(tmp_path / "out" / "00000.tar"))
    ja, jb = json.loads(a["json"]), json.loads(b["json"])
    assert (ja["caption"], ja["caption_long"], "score" in ja) == ("red", "a wide red picture", False)
    assert a["txt"] == b"red" and b["txt"] == b"a tall blue picture"  # caption/text first, else the first field
    assert jb["pixelrun"]["source"] == "img/b.png" and jb["pixelrun"]["bucket"] == [40, 24]
    src = ShardBatchSource(str(tmp_path / "out"), 1, BUCKETS_32, captions="json.caption_long")
    assert {next(src).captions[0] for _ in range(2)} == {"a wide red picture", "a tall blue picture"}


def test_read_time_downsizing_and_pipe_spec(tmp_path):
    out = converted(tmp_path, resolution=64)
    stored = {s["txt"].decode(): s["png"] for u in expand_shards(str(out)) for s in read_samples(u)}
    src = ShardBatchSource(f"pipe:cat {out}/00000.tar::pipe:cat {out}/00001.tar", 3, BUCKETS_32)
    batches = [next(src) for _ in range(4)]
    assert {c for b in batches for c in b.captions} == {f"picture {i}" for i in range(6)}
    for b in batches:  # each image is the stored 64px one resized to its 32px bucket
        assert tuple(b.images.shape[2:]) in BUCKETS_32
        for cap, img in zip(b.captions, b.images):
            big = load_rgb(io.BytesIO(stored[cap]))
            assert big.height > img.shape[1] and torch.equal(img, to_tensor(resize_to_bucket(big, *img.shape[1:])))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http(s) shards through curl")
def test_http_shards_and_their_index(tmp_path):
    out = converted(tmp_path)
    handler = functools.partial(_QuietHandler, directory=str(out))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        spec = f"http://127.0.0.1:{server.server_address[1]}/{{00000..00002}}.tar"
        assert read_index(expand_shards(spec))["count"] == 9  # index.json beside the shards, over http
        remote, local = ShardBatchSource(spec, 3, BUCKETS_32), ShardBatchSource(str(out), 3, BUCKETS_32)
        for _ in range(4):
            a, b = next(remote), next(local)
            assert a.captions == b.captions and torch.equal(a.images, b.images)
        server.shutdown()


# ---------------------------------------------------------------- broken samples


def test_broken_members_are_skipped_counted_and_batches_stay_full(tmp_path):
    rng = np.random.default_rng(1)
    good = jpeg_bytes(rng)
    path = tmp_path / "d" / "00000.tar"
    path.parent.mkdir()
    with TarWriter(str(path)) as w:
        for i in range(6):
            w.write({"__key__": f"ok{i}", "jpg": jpeg_bytes(rng), "txt": f"good {i}"})
        w.write({"__key__": "truncated", "jpg": good[: len(good) // 2], "txt": "cut"})  # header fine, pixels not
        w.write({"__key__": "garbage", "jpg": b"\xff\xd8 nothing", "txt": "garbage"})
        w.write({"__key__": "noimage", "txt": "no image", "json": {"caption": "x"}})
        w.write({"__key__": "nocaption", "jpg": jpeg_bytes(rng), "txt": "  "})
    with TarWriter(str(path.parent / "00001.tar")) as w:
        for i in range(4):
            w.write({"__key__": f"late{i}", "jpg": jpeg_bytes(rng), "txt": f"good late {i}"})
    data = (path.parent / "00001.tar").read_bytes()
    (path.parent / "00001.tar").write_bytes(data[: len(data) * 2 // 3])  # a shard cut short by a failed copy
    src = ShardBatchSource(str(path.parent), 4, [(32, 32)])
    for _ in range(5):  # more than an epoch: bad samples are counted once
        b = next(src)
        assert b.images.shape == (4, 3, 32, 32) and all(c.startswith("good") for c in b.captions)
    assert src.skipped == 6  # the cut shard: its read error, and its last sample that lost its caption
    names = " ".join(src.skipped_paths)
    assert all(
        k in names
        for k in (
            "#truncated (image does not decode)",
            "#garbage (unreadable image)",
            "#noimage (no image member)",
            "#nocaption (none of the caption fields txt)",
            "00001.tar (read error",
        )
    )


def test_all_broken_raises_and_too_few_shards(tmp_path):
    (tmp_path / "d").mkdir()
    with TarWriter(str(tmp_path / "d" / "a.tar")) as w:
        w.write({"__key__": "x", "txt": "no image"})
    with pytest.raises(NoUsableData, match="no usable sample"):
        next(ShardBatchSource(str(tmp_path / "d"), 2, [(32, 32)]))
    with pytest.raises(ConfigError, match="data.path: 1 shard.* cannot be split over 2 ranks"):
        ShardBatchSource(str(tmp_path / "d"), 2, [(32, 32)], rank=1, world_size=2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ShardBatchSource(str(tmp_path / "d" / "{0..3}.tar"), 2, [(32, 32)])


# ---------------------------------------------------------------- captions


def test_caption_weights_and_fallback(tmp_path):
    fields = parse_captions("txt:0.3, json.long:0.7")
    assert fields == [("txt", 0.3), ("json.long", 0.7)]
    both = {"txt": "short", "json.long": "a long caption"}
    n = 2000
    hits = sum(choose_caption(both, fields, 0, 0, f"{k:06d}") == "txt" for k in range(n))
    assert abs(hits - 0.3 * n) < 4 * (n * 0.3 * 0.7) ** 0.5, hits
    assert choose_caption(both, fields, 0, 0, "k") == choose_caption(both, fields, 0, 0, "k")  # deterministic
    assert choose_caption({"json.long": "x"}, fields, 0, 0, "k") == "json.long"  # falls back to what is there
    assert choose_caption({"json.other": "x"}, fields, 0, 0, "k") is None
    img2dataset_json = json.dumps({"caption": "a dog", "url": "http://x/1.jpg", "status": "success", "width": 64})
    assert caption_fields({"json": img2dataset_json.encode(), "txt": b" a dog "}) == {
        "txt": "a dog",
        "json.caption": "a dog",
    }
    assert parse_captions("txt") == [("txt", 1.0)]
    # Through the source: json captions and the same weights.
    (tmp_path / "d").mkdir()
    rng = np.random.default_rng(0)
    with TarWriter(str(tmp_path / "d" / "a.tar")) as w:
        for i in range(40):
            w.write(
                {"__key__": f"s{i}", "jpg": jpeg_bytes(rng, 8, 8), "txt": f"short {i}", "json": {"long": f"long {i}"}}
            )
    src = ShardBatchSource(str(tmp_path / "d"), 8, [(8, 8)], captions="txt:0.3,json.long:0.7")
    caps = [c for _ in range(25) for c in next(src).captions]  # 5 epochs of 40
    share = sum(c.startswith("short") for c in caps) / len(caps)
    assert abs(share - 0.3) < 4 * (0.21 / len(caps)) ** 0.5


@pytest.mark.parametrize("value", ["txt:abc", "caption", "txt:-1", "txt,txt", "json.", "txt:0"])
def test_bad_captions_config_names_the_key(value):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.source=shards", "data.path=/d", f"data.captions={value}"])
    assert e.value.key == "data.captions"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.source=shards"])
    assert e.value.key == "data.path"


# ---------------------------------------------------------------- ranks, workers, resume


def test_ranks_see_disjoint_samples_covering_the_epoch(tmp_path):
    out = converted(tmp_path, n=12, shard_size=3)  # 4 shards of 3
    seen = []
    for rank in range(2):
        # batch 1, one bucket: the batches are the rank's stream itself
        src = ShardBatchSource(str(out), 1, [(32, 32)], seed=5, rank=rank, world_size=2)
        seen.append([next(src).captions[0] for _ in range(6)])
        assert src.epoch == 0
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 12
    # worker processes: tests/data/test_loader.py


def test_resume_from_state_dict_is_exact(tmp_path):
    out = converted(tmp_path, n=12, shard_size=3)
    with TarWriter(str(out / "00004.tar")) as w:  # a shard with a broken sample among good ones
        rng = np.random.default_rng(3)
        w.write({"__key__": "bad", "jpg": b"junk", "txt": "bad"})
        w.write({"__key__": "fine", "jpg": jpeg_bytes(rng, 24, 40), "txt": "fine"})

    def make():
        return ShardBatchSource(str(out), 3, BUCKETS_32, seed=7)

    a = make()
    states, ref = [], []
    for _ in range(14):  # over two epochs of 13 usable samples
        states.append(json.loads(json.dumps(a.state_dict())))  # must survive a JSON checkpoint
        ref.append(next(a))
    assert any(any(s["fill"]) for s in states) and states[-1]["epoch"] >= 2
    for k in (1, 4, 6, 9):
        b = make()
        b.load_state_dict(states[k])
        for x in ref[k:]:
            y = next(b)
            assert x.captions == y.captions and torch.equal(x.images, y.images)
        assert a.state_dict() == b.state_dict()
    assert a.skipped == 1
    with pytest.raises(ValueError, match="different settings"):
        ShardBatchSource(str(out), 3, BUCKETS_32, seed=8).load_state_dict(states[2])


# ---------------------------------------------------------------- stored text embeddings, inspect, training


def test_stored_embeddings_used_when_they_match(tmp_path, tiny_encoder_dir, capsys):
    from pixelrun.model.text import TextEncoder

    out = converted(tmp_path, text_encoder=tiny_encoder_dir, max_tokens=16)
    fp = encoder_fingerprint(tiny_encoder_dir)
    index = json.loads((out / "index.json").read_text())
    assert index["text_embeddings"]["fingerprint"] == fp and index["text_embeddings"]["max_tokens"] == 16
    src = ShardBatchSource(str(out), 3, BUCKETS_32, text_encoder=(fp, 16))
    assert src.use_embeddings and "training on the stored text embeddings" in src.text_note
    b = next(src)
    emb, mask = TextEncoder(tiny_encoder_dir, 16).encode(b.captions)
    assert torch.equal(b.text_mask, mask) and b.text.shape == emb.shape
    # bfloat16 by default: the encoder's output rounded to 8 significant bits
    assert index["text_embeddings"]["dtype"] == "bfloat16"
    assert torch.allclose(b.text[mask], emb[mask], rtol=2**-8, atol=0) and not b.text[~mask].any()
    assert not torch.equal(b.text[mask], emb[mask])  # it is the rounded value, not a re-encoding
    other = ShardBatchSource(str(out), 3, BUCKETS_32, text_encoder=("minilm(x):d384", 16))
    assert not other.use_embeddings and "not text.encoder minilm(x):d384" in other.text_note
    assert next(other).text is None
    assert "not text.max_tokens 24" in embedding_match(index, fp, 24)[1]
    assert main(["data", "inspect", str(out), "--contact-sheet", str(tmp_path / "sheet.png"), "--n", "4"]) == 0
    report = capsys.readouterr().out
    assert (
        "3 shard(s), 9 samples, 0 broken" in report
        and "stored sizes), HxW: samples: 24x40: 3, 32x32: 3, 40x24: 3" in report
    )
    # json.caption repeats txt's text: its embedding is stored once, as txt's
    assert f"text embeddings: {fp}, bfloat16; samples per stored field: txt: 9 (a json field equal" in report
    assert "txt" in report and "9 / 9.0 / 9 / 9" in report and "2 / 2.0 / 2 / 2" in report  # "picture i"
    with Image.open(tmp_path / "sheet.png") as im:
        assert im.width > 4 * 128


def test_inspect_counts_broken_samples(tmp_path):
    from pixelrun.data.inspection import inspect_shards

    out = converted(tmp_path, n=3)
    with TarWriter(str(out / "00001.tar")) as w:
        w.write({"__key__": "a", "txt": "a longer caption of six words", "jpg": jpeg_bytes(np.random.default_rng(0))})
        w.write({"__key__": "b", "txt": "no image"})
    r = inspect_shards(str(out))
    assert (r["samples"], r["broken"], r["embeddings"]["fields"]) == (4, 1, {})
    assert r["broken_examples"] == [f"{out / '00001.tar'}#b (no image member)"]
    assert r["captions"]["txt"]["words"] == {"min": 2, "mean": 3.0, "median": 2.0, "max": 6}
    assert r["captions"]["txt"]["chars"]["max"] == len("a longer caption of six words")
    at64 = inspect_shards(str(out), resolution=64, patch=8)["buckets"]
    assert sum(at64.values()) == 4 and {tuple(map(int, k.split("x"))) for k in at64} <= set(aspect_buckets(64, 8))


def test_training_on_stored_embeddings_gives_the_same_losses(tmp_path, tiny_encoder_dir, capsys, monkeypatch):
    from pixelrun.model.text import TextEncoder
    from pixelrun.run.train import train

    calls = []  # the batch sizes the text encoder is asked to encode during training
    encode = TextEncoder.encode
    monkeypatch.setattr(
        TextEncoder, "encode", lambda self, captions: calls.append(len(captions)) or encode(self, captions)
    )

    def run(name, **kw):
        shards = converted(tmp_path / name, n=8, shard_size=4, **kw)
        with TarWriter(str(shards / "00002.tar")) as w:  # a broken sample, reported at the end
            w.write({"__key__": "broken", "png": b"junk", "txt": "broken"})
        over = tiny_overrides(
            tmp_path / name / "run",
            tiny_encoder_dir,
            **{
                "data.source": "shards",
                "data.path": str(shards),
                "data.buckets": "true",
                "train.batch_size": 2,
                "train.steps": 4,
                "objective.caption_dropout": 0.3,
                "eval.prompts": 0,
                "sample.grid_prompts": 1,
            },
        )
        calls.clear()
        summary = train(load_config(None, over))
        losses = [json.loads(ln)["loss"] for ln in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()]
        return summary, losses, capsys.readouterr().out, calls.count(2)  # batches of 2 (grids encode 1 or "")

    plain, plain_losses, plain_out, plain_encoded = run("plain")
    stored, stored_losses, stored_out, stored_encoded = run(
        "stored", text_encoder=tiny_encoder_dir, max_tokens=16, embedding_dtype="float32"
    )
    # plain: the 4 trained batches and the one in flight in the prefetch thread when the run ends
    assert (plain_encoded, stored_encoded) == (5, 0)
    assert "stored text embeddings" not in plain_out
    assert "shards: training on the stored text embeddings" in stored_out
    assert len(plain_losses) == 4 and np.allclose(plain_losses, stored_losses, rtol=1e-3, atol=0), (
        plain_losses,
        stored_losses,
    )
    assert plain["skipped_images"] == stored["skipped_images"] == 1 and "#broken (unreadable image)" in stored_out


def test_interrupted_shard_run_resumes_exactly(tmp_path, tiny_encoder_dir):
    from pixelrun.infra import checkpoint as ckpt
    from pixelrun.run.train import train

    shards = converted(tmp_path, n=10, shard_size=3)
    extra = {
        "data.source": "shards",
        "data.path": str(shards),
        "data.buckets": "true",
        "train.batch_size": 2,
        "train.steps": 6,
        "eval.prompts": 0,
        "sample.grid_prompts": 1,
    }
    full, part = tmp_path / "full", tmp_path / "part"
    train(load_config(None, tiny_overrides(full, tiny_encoder_dir, **extra)))
    cfg = load_config(None, tiny_overrides(part, tiny_encoder_dir, **extra))
    assert train(cfg, stop_at_step=2)["step"] == 2
    meta = ckpt.load_meta(ckpt.latest_checkpoint(part))
    assert any(meta.data[0]["fill"])  # the saved position has samples waiting in buckets
    train(cfg)
    a, b = ((json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()) for run in (full, part))
    assert [(r["step"], r["loss"]) for r in a] == [(r["step"], r["loss"]) for r in b]


# ---------------------------------------------------------------- issue 14: what convert and training say


def test_resolution_patch_and_caption_fields_are_said_before_any_work(tmp_path, capsys):
    src = make_folder(tmp_path / "src", n=3, broken=False)
    # 48px is the default training resolution; the default tiny model has patch 8, --patch defaults to 32
    assert main(["data", "convert", "--src", str(src), "--out", str(tmp_path / "o"), "--resolution", "48"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "pixelrun: config error: --resolution: 48 is not a multiple of --patch 32; the default tiny model "
        "has patch 8: pass --patch 8 (32 is the patch of the base and small presets)"
    )
    assert not (tmp_path / "o").exists()
    out = converted(tmp_path, n=3, resolution=32)
    same = ShardBatchSource(str(out), 1, BUCKETS_32)
    assert same.text_note is None
    up = ShardBatchSource(str(out), 1, aspect_buckets(64, 8))
    assert up.text_note == (
        "shards: converted at 32px, below data.resolution 64: every image is enlarged when read "
        "(blurry); convert again with --resolution 64"
    )
    down = ShardBatchSource(str(out), 1, [(16, 16)])  # data.buckets=false at 16px
    assert down.text_note.startswith("shards: converted at 32px, data.resolution is 16: every image is resized again")
    # a caption field that no sample has is refused by name, not reported as unreadable images
    with pytest.raises(ConfigError) as e:
        ShardBatchSource(str(out), 1, BUCKETS_32, captions="json.prompt")
    assert e.value.key == "data.captions" and "they have json.caption (3), txt (3)" in str(e.value)
    assert next(ShardBatchSource(str(out), 1, BUCKETS_32, captions="json.prompt,txt")).captions[0].startswith("picture")
