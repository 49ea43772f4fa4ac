"""`pixelrun data convert` from Parquet, Arrow and Hugging Face datasets (pixelrun/data/parquet.py),
and stored caption embeddings in bfloat16. Every table is built here with pyarrow; nothing downloads."""

import io
import json
import shlex
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from pixelrun.cli import main
from pixelrun.config import ConfigError, aspect_buckets, load_config
from pixelrun.data.convert import convert, format_bytes
from pixelrun.data.shards import ShardBatchSource, decode_embedding, expand_shards, read_samples
from pixelrun.model.text import encoder_fingerprint

BUCKETS_32 = aspect_buckets(32, 8)  # (h, w): 24x40, 32x32, 40x24
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the datasets Image feature's storage
HF_META = {
    b"huggingface": json.dumps(
        {
            "info": {
                "features": {
                    "image": {"_type": "Image"},
                    "prompt": {"dtype": "string", "_type": "Value"},
                    "llava": {"dtype": "string", "_type": "Value"},
                    "score": {"dtype": "int64", "_type": "Value"},
                }
            }
        }
    ).encode()
}


def encoded(w, h, fmt="JPEG", mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (h, w, len(mode)), dtype=np.uint8), mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def alpha_png(w=32, h=64):
    """Left half fully transparent red, right half opaque blue."""
    a = np.zeros((h, w, 4), np.uint8)
    a[:, : w // 2] = (255, 0, 0, 0)
    a[:, w // 2 :] = (0, 0, 255, 255)
    buf = io.BytesIO()
    Image.fromarray(a, "RGBA").save(buf, "PNG")
    return buf.getvalue()


def write_tables(root):
    """root/a.parquet: the datasets Image layout in three row groups of two rows, with a null image,
    a truncated JPEG, an RGBA PNG and a row without captions; root/sub/c.parquet: plain binary
    images and no llava column. 8 rows, 5 usable."""
    root.mkdir(parents=True, exist_ok=True)
    good = encoded(64, 32, seed=1)
    rows = [  # image, prompt, llava
        ({"bytes": good, "path": None}, "p0", "l0"),
        (None, "p1", "l1"),  # a null image
        ({"bytes": encoded(48, 48, seed=2)[:-600], "path": None}, "p2", "l2"),  # header intact, pixels cut
        ({"bytes": alpha_png(), "path": None}, None, "l3"),
        ({"bytes": encoded(48, 48, seed=3), "path": None}, None, "  "),  # no caption at all
        ({"bytes": encoded(40, 40, seed=4), "path": None}, "p5", ""),
    ]
    table = pa.table(
        {
            "image": pa.array([r[0] for r in rows], IMAGE_STRUCT),
            "prompt": [r[1] for r in rows],
            "llava": [r[2] for r in rows],
            "score": list(range(6)),
        }
    ).replace_schema_metadata(HF_META)
    pq.write_table(table, root / "a.parquet", row_group_size=2)
    (root / "sub").mkdir()
    pq.write_table(
        pa.table(
            {"image": pa.array([encoded(32, 64, seed=5), encoded(64, 32, seed=6)], pa.binary()), "prompt": ["c0", "c1"]}
        ),
        root / "sub" / "c.parquet",
    )
    return root


def samples_of(out):
    return [s for url in expand_shards(str(out)) for s in read_samples(url)]


def test_parquet_rows_to_shards_with_every_kind_of_row(tmp_path, capsys):
    src = write_tables(tmp_path / "data")
    assert pq.ParquetFile(src / "a.parquet").num_row_groups == 3
    out = tmp_path / "out"
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
                "--captions",
                "prompt:0.7,llava:0.3",
                "--format",
                "png",
                "--shard-size",
                "3",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    a = src / "a.parquet"
    assert "wrote 5 samples in 2 shard(s)" in text and "skipped 3 of 8: " in text
    for part in (
        f"1 without an image (first: {a} row 1)",
        f"1 image does not decode (first: {a} row 2)",
        f"1 without a caption (first: {a} row 4)",
    ):
        assert part in text
    samples = samples_of(out)
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(5)]
    metas = [json.loads(s["json"]) for s in samples]
    assert [m["pixelrun"]["source"] for m in metas] == [
        f"{a} row 0",
        f"{a} row 3",
        f"{a} row 5",
        f"{src / 'sub' / 'c.parquet'} row 0",
        f"{src / 'sub' / 'c.parquet'} row 1",
    ]
    # Every chosen column the row has is in the json (never the int column); txt is the first of them.
    assert [{k: v for k, v in m.items() if k != "pixelrun"} for m in metas] == [
        {"prompt": "p0", "llava": "l0"},
        {"llava": "l3"},
        {"prompt": "p5"},
        {"prompt": "c0"},
        {"prompt": "c1"},
    ]
    assert [s["txt"].decode() for s in samples] == ["p0", "l3", "p5", "c0", "c1"]
    # Buckets (h, w) from the original sizes: 64x32 wide, 32x64 tall, 40x40 square.
    assert [m["pixelrun"]["bucket"] for m in metas] == [[24, 40], [40, 24], [32, 32], [40, 24], [24, 40]]
    assert [m["pixelrun"]["original_size"] for m in metas] == [[32, 64], [64, 32], [40, 40], [64, 32], [32, 64]]
    # The PNG's transparent half is composited on white, its opaque half stays blue.
    alpha = np.asarray(Image.open(io.BytesIO(samples[1]["png"])), np.float32)
    assert alpha.shape == (40, 24, 3)
    assert np.abs(alpha[:, :4] - 255).max() < 3 and np.abs(alpha[:, -4:] - [0, 0, 255]).max() < 3
    index = json.loads((out / "index.json").read_text())
    assert index["count"] == 5 and index["read"] == 8 and index["file_count"] == 2
    assert index["buckets"] == {"24x40": 2, "32x32": 1, "40x24": 2} and index["image_column"] == "image"
    assert index["caption_fields"] == {"json.llava": 2, "json.prompt": 4, "txt": 5}
    assert index["skipped_names"]["without an image"] == [f"{a} row 1"]
    # The printed command trains on exactly these shards with the columns' weights.
    train = shlex.split(text.splitlines()[-1].removeprefix("train with: "))
    assert "data.captions=json.prompt:0.7,json.llava:0.3" in train
    cfg = load_config(None, train[2:])
    source = ShardBatchSource(cfg.data.path, 1, BUCKETS_32, captions=cfg.data.captions)
    seen = {next(source).captions[0] for _ in range(5)}
    assert seen <= {"p0", "l0", "l3", "p5", "c0", "c1"} and {"l3", "p5", "c0", "c1"} <= seen
    # inspect shows the caption columns and their lengths
    assert main(["data", "inspect", str(out)]) == 0
    report = capsys.readouterr().out
    assert "caption columns at conversion (weight): prompt (0.7), llava (0.3)" in report
    assert "json.llava" in report and "json.prompt" in report


def test_workers_write_the_same_bytes_and_limit_counts_rows(tmp_path):
    src = write_tables(tmp_path / "data")
    one, many = tmp_path / "one", tmp_path / "many"
    convert(str(src), one, 32, patch=8, shard_size=2, captions="prompt,llava", progress=False)
    convert(str(src), many, 32, patch=8, shard_size=2, captions="prompt,llava", progress=False, workers=2)
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in many.iterdir()) and len(names) == 4  # 3 shards + index.json
    for name in names:
        assert (one / name).read_bytes() == (many / name).read_bytes(), name
    first = convert(str(src / "a.parquet"), tmp_path / "lim", 32, patch=8, captions="prompt", limit=3, progress=False)
    assert first["read"] == 3 and first["count"] == 1  # rows 0-2: one good, a null and a truncated image


@pytest.mark.parametrize(
    "flags, key, words",
    [
        (["--captions", "prompt,caption_long"], "--captions", "'caption_long' is in none of the 2 file(s)"),
        (["--captions", "score"], "--captions", "column 'score' of"),
        (["--captions", "prompt:-1"], "--captions", "must be a positive number"),
        (["--image-column", "llava2"], "--image-column", "has no column 'llava2'"),
        (["--limit", "0"], "--limit", "must be >= 1"),
    ],
)
def test_column_errors_stop_before_any_work(tmp_path, capsys, flags, key, words):
    src = write_tables(tmp_path / "data")
    out = tmp_path / "out"
    assert (
        main(["data", "convert", "--src", str(src), "--out", str(out), "--resolution", "32", "--patch", "8", *flags])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"pixelrun: config error: {key}: ") and words in err
    assert not out.exists()


def test_default_columns_and_their_errors(tmp_path):
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"id": [1], "jpg": pa.array([encoded(32, 32)], pa.binary()), "caption": ["hi"]}), plain)
    index = convert(str(plain), tmp_path / "o1", 32, patch=8, progress=False)
    assert (index["image_column"], index["caption_columns"], index["captions"]) == ("jpg", {"caption": 1.0}, None)
    odd = tmp_path / "odd.parquet"
    pq.write_table(pa.table({"img": pa.array([encoded(32, 32)], pa.binary()), "caption_detail": ["x"]}), odd)
    with pytest.raises(ConfigError, match="--captions: no column named caption, prompt, text.*--captions caption_det"):
        convert(str(odd), tmp_path / "o2", 32, patch=8, progress=False)
    textonly = tmp_path / "t.parquet"
    pq.write_table(pa.table({"caption": ["x"]}), textonly)
    with pytest.raises(ConfigError, match="--image-column: .* has no image column"):
        convert(str(textonly), tmp_path / "o3", 32, patch=8, progress=False)
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "photos" / "x.png")
    with pytest.raises(ConfigError, match="--src: .*photos is not Parquet, Arrow or a Hub dataset; only those can be"):
        convert(f"{plain}::{tmp_path / 'photos'}", tmp_path / "o4", 32, patch=8, progress=False)
    with pytest.raises(ConfigError, match="--image-column: .*odd.parquet has no column 'jpg'"):
        convert(f"{tmp_path}/p*.parquet::{odd}", tmp_path / "o5", 32, patch=8, progress=False)
    both = convert(f"{tmp_path}/p*.parquet::{plain}", tmp_path / "o6", 32, patch=8, progress=False)
    assert both["count"] == 2 and both["file_count"] == 2
    with pytest.raises(ValueError, match=r"\(skipped 1 of 1: 1 enormous image \(first: .*plain.parquet row 0\)\)"):
        convert(str(plain), tmp_path / "o7", 32, patch=8, progress=False, max_pixels=32 * 32 - 1)
    assert not (tmp_path / "o7" / ".partial").exists()


def test_saved_datasets_layout_by_hand(tmp_path):
    """The layout `datasets` save_to_disk writes (state.json listing Arrow IPC stream files, the
    features in the schema metadata), built with pyarrow alone, and a DatasetDict by split."""
    table = pa.table(
        {
            "image": pa.array([{"bytes": encoded(64, 32), "path": None}, None], IMAGE_STRUCT),
            "prompt": ["first", "second"],
        }
    ).replace_schema_metadata(HF_META)
    split = tmp_path / "saved" / "train"
    split.mkdir(parents=True)
    with (
        pa.OSFile(str(split / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as writer,
    ):
        writer.write_table(table, max_chunksize=1)
    (split / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (tmp_path / "saved" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    index = convert(str(tmp_path / "saved"), tmp_path / "out", 32, patch=8, progress=False)
    assert index["count"] == 1
    assert index["skipped_names"] == {"without an image": [f"{split}/data-00000-of-00001.arrow row 1"]}
    with pytest.raises(ConfigError, match="--split: .* holds the splits train, not 'test'"):
        convert(str(tmp_path / "saved"), tmp_path / "o2", 32, patch=8, progress=False, split="test")
    single = convert(str(split / "data-00000-of-00001.arrow"), tmp_path / "o3", 32, patch=8, progress=False)
    assert single["count"] == 1


def test_saved_and_hub_datasets_through_datasets(tmp_path, monkeypatch):
    """The same rows written by `datasets` itself (save_to_disk), and a dataset id resolved by
    load_dataset (a local folder here: the offline stand-in for a Hub id, through the same code)."""
    datasets = pytest.importorskip("datasets")
    from pixelrun.data.parquet import _hub_dataset

    features = datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": encoded(64, 32), "path": None}, None], "prompt": ["first", "second"]}, features=features
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    index = convert(str(tmp_path / "saved"), tmp_path / "out", 32, patch=8, progress=False)
    assert index["count"] == 1 and index["skipped"] == {"without an image": 1}
    (tmp_path / "hub").mkdir()
    ds.to_parquet(str(tmp_path / "hub" / "train-00000-of-00001.parquet"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    files = _hub_dataset(str(tmp_path / "hub"), "train")
    assert files and all(f.kind == "arrow" and f.rows for f in files)
    assert sum(f.rows for f in files) == 2


def test_hub_id_without_datasets_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    assert (
        main(
            [
                "data",
                "convert",
                "--src",
                "someone/some-set",
                "--out",
                str(tmp_path / "o"),
                "--resolution",
                "32",
                "--patch",
                "8",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err == (
        "pixelrun: config error: --src: someone/some-set is not a local path; reading it as a Hugging "
        "Face dataset id needs the datasets package: pip install 'pixelrun[hub]' (or download the "
        "Parquet files and pass their folder)"
    )


# ---------------------------------------------------------------- stored embeddings


@pytest.fixture(scope="module")
def loud_encoder_dir(tiny_encoder_dir, tmp_path_factory):
    """The tiny BERT with its last LayerNorm scaled by 1e6: outputs beyond float16's 65504, as
    T5-family activations can be. A real network saved and loaded by path, not a mock."""
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(tiny_encoder_dir)
    with torch.no_grad():
        model.encoder.layer[-1].output.LayerNorm.weight.mul_(1e6)
    path = tmp_path_factory.mktemp("loud-bert")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_encoder_dir).save_pretrained(path)
    return str(path)


def test_bfloat16_embeddings_by_default_and_float16_overflow_refused(
    tmp_path, tiny_encoder_dir, loud_encoder_dir, capsys
):
    from pixelrun.model.text import TextEncoder

    src = write_tables(tmp_path / "data")
    out = tmp_path / "out"
    assert (
        main(
            [
                "data",
                "convert",
                "--src",
                str(src / "a.parquet"),
                "--out",
                str(out),
                "--resolution",
                "32",
                "--patch",
                "8",
                "--captions",
                "prompt,llava",
                "--text-encoder",
                tiny_encoder_dir,
                "--max-tokens",
                "16",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "text embeddings: bfloat16, at most 16 tokens x 32 = 1.0 KB per caption text" in captured.err
    index = json.loads((out / "index.json").read_text())
    assert index["text_embeddings"]["dtype"] == "bfloat16" and index["text_embeddings"]["stored_as"] == "uint16"
    per_sample = index["bytes_per_sample"]["text_embeddings"]
    assert per_sample > 0 and f"(text embeddings {format_bytes(per_sample)}, bfloat16" in captured.out
    assert "data.captions=json.prompt,json.llava " in captured.out  # weights of 1 need no spelling out
    encoder = TextEncoder(tiny_encoder_dir, 16)
    sample = samples_of(out)[0]  # row 0: prompt p0, llava l0
    assert {k for k in sample if k.startswith("emb.")} == {"emb.txt.npy", "emb.json.llava.npy"}  # prompt == txt
    raw = np.load(io.BytesIO(sample["emb.json.llava.npy"]))
    assert raw.dtype == np.uint16
    emb, mask = encoder.encode(["l0"])
    assert torch.equal(
        decode_embedding(sample["emb.json.llava.npy"], "bfloat16", "x"), emb[0][mask[0]].bfloat16().float()
    )
    # float16 overflows on the loud encoder: one line naming the sample, nothing left behind
    bad = tmp_path / "bad"
    assert (
        main(
            [
                "data",
                "convert",
                "--src",
                str(src / "a.parquet"),
                "--out",
                str(bad),
                "--resolution",
                "32",
                "--patch",
                "8",
                "--text-encoder",
                loud_encoder_dir,
                "--max-tokens",
                "16",
                "--embedding-dtype",
                "float16",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("pixelrun: config error: --embedding-dtype: sample 00000000 (") and "a.parquet row 0)" in err
    assert "use --embedding-dtype bfloat16" in err and not any(bad.glob("**/*.tar"))
    # bfloat16 keeps float32's range: the same encoder converts
    ok = convert(
        str(src / "a.parquet"),
        tmp_path / "loud",
        32,
        patch=8,
        text_encoder=loud_encoder_dir,
        max_tokens=16,
        progress=False,
    )  # the prompt column only: rows 0 and 5
    assert ok["count"] == 2
    big = decode_embedding(samples_of(tmp_path / "loud")[0]["emb.txt.npy"], "bfloat16", "x")
    assert torch.isfinite(big).all() and big.abs().max() > 65504


def test_non_finite_stored_embedding_is_one_error_naming_the_sample(tmp_path, tiny_encoder_dir):
    fp = encoder_fingerprint(tiny_encoder_dir)
    d = tmp_path / "d"
    d.mkdir()
    good = np.full((3, 32), 0x3F80, np.uint16)  # bfloat16 1.0
    nan = good.copy()
    nan[1, 5] = 0x7FC0  # bfloat16 NaN
    with TarWriter(str(d / "00000.tar")) as w:
        for key, emb in (("fine", good), ("broken", nan)):
            buf = io.BytesIO()
            np.save(buf, emb)
            w.write({"__key__": key, "jpg": encoded(32, 32), "txt": key, "emb.txt.npy": buf.getvalue()})
    (d / "index.json").write_text(
        json.dumps({"text_embeddings": {"fingerprint": fp, "max_tokens": 16, "dtype": "bfloat16"}})
    )
    source = ShardBatchSource(str(d), 2, [(32, 32)], text_encoder=(fp, 16))
    with pytest.raises(ConfigError) as e:
        next(source)
    assert e.value.key == "data.path" and "00000.tar#broken: its stored text embedding has 1 non-finite" in str(e.value)
    ok = ShardBatchSource(str(d), 1, [(32, 32)], text_encoder=(fp, 16))
    batch = next(ok)
    assert batch.captions == ["fine"] and torch.equal(batch.text[0, :3], torch.ones(3, 32))
    assert not batch.text[0, 3:].any() and batch.text_mask[0].tolist() == [True] * 3 + [False] * 13
