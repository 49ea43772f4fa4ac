"""A held-out set of the user's own (issue 30): data.val_path (a folder or shards, read as data.path
is), or a seeded split of the folder that is the same on every construction and every rank, never
trained on; the evaluations and the validation loss read it; bad values are one line naming the key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import one_line_error
from PIL import Image

from pixelrun.cli import main
from pixelrun.config import ConfigError, load_config
from pixelrun.data.convert import convert
from pixelrun.data.sources import check_paths, describe_held_out, make_batch_source
from pixelrun.evaluation.heldout import dataset_key, real_images_and_prompts


def _folder(root: Path, n: int, word: str = "picture", broken: bool = False) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(len(word) + n)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"{word} {i}")
    if broken:
        (root / "zz.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
        (root / "zz.txt").write_text(f"{word} broken")
    return root


def _cfg(path: Path, *extra: str):
    base = ["data.source=folder", f"data.path={path}", "data.resolution=16", "train.batch_size=2", "eval.val_images=0"]
    return load_config(None, [*base, *extra])


def _seen(source, batches: int) -> set[str]:
    return {c for _ in range(batches) for c in next(source).captions}


def test_the_seeded_split_is_the_same_each_time_and_never_trained_on(tmp_path):
    root = _folder(tmp_path / "imgs", 20)
    cfg = _cfg(root, "eval.prompts=5")
    images, held = real_images_and_prompts(cfg, 5)
    assert images.shape == (5, 16, 16, 3) and len(set(held)) == 5
    assert real_images_and_prompts(_cfg(root, "eval.prompts=5"), 5)[1] == held  # a second construction
    assert held != [f"picture {i}" for i in range(5)]  # chosen by the seed, not the folder's first items
    other_seed = real_images_and_prompts(_cfg(root, "eval.prompts=5", "eval.seed=7"), 5)[1]
    assert other_seed != held and dataset_key(cfg).endswith(":heldout5-seed1234")
    # two ranks: the same training folder, the 15 others, which they train on between them
    ranks = [make_batch_source(cfg, rank, 2) for rank in (0, 1)]
    assert ranks[0].folder.captions == ranks[1].folder.captions
    trained = [_seen(s, 30) for s in ranks]  # 60 draws per rank over 15 images, 7-8 an epoch
    assert not (trained[0] | trained[1]) & set(held)
    assert trained[0] | trained[1] == {f"picture {i}" for i in range(20)} - set(held)
    assert describe_held_out(cfg) == (
        f"held out: 5 of the 20 captioned images of {root}, chosen by eval.seed=1234 (data.val_count null: as "
        "many as the evaluations use, at most half), never trained on"
    )


def test_val_count_sets_the_split_and_zero_trains_on_everything(tmp_path):
    root = _folder(tmp_path / "imgs", 10)
    three = _cfg(root, "data.val_count=3")
    held = real_images_and_prompts(three, 3)[1]
    assert held == real_images_and_prompts(_cfg(root, "data.val_count=3", "eval.prompts=2"), 3)[1]
    assert _seen(make_batch_source(three), 40) == {f"picture {i}" for i in range(10)} - set(held)
    everything = _cfg(root, "data.val_count=0")
    assert _seen(make_batch_source(everything), 40) == {f"picture {i}" for i in range(10)}
    assert real_images_and_prompts(everything, 3)[1] == ["picture 0", "picture 1", "picture 2"]
    assert "held out: none (data.val_count=0)" in describe_held_out(everything)
    # the default on a small folder holds out at most half of it (eval.prompts=64 is then refused by its key)
    assert "held out: 5 of the 10" in describe_held_out(_cfg(root))


def test_a_resume_under_another_split_is_one_line_naming_the_key(tmp_path):
    root = _folder(tmp_path / "imgs", 10)
    source = make_batch_source(_cfg(root, "data.val_count=3"))
    next(source)
    state = source.state_dict()
    again = make_batch_source(_cfg(root, "data.val_count=3"))
    again.load_state_dict(state)  # the same split: the same position
    assert next(again).captions == next(source).captions
    with pytest.raises(ConfigError, match="data.val_count: the checkpoint trained on 7 images of .*, 6 train now"):
        make_batch_source(_cfg(root, "data.val_count=4")).load_state_dict(state)


def test_val_path_is_the_held_out_folder_read_with_the_same_rules(tmp_path):
    train_root = _folder(tmp_path / "train", 6)
    val_root = _folder(tmp_path / "val", 3, word="held", broken=True)
    cfg = _cfg(train_root, f"data.val_path={val_root}", "eval.prompts=3")
    images, captions = real_images_and_prompts(cfg, 3)
    assert captions == ["held 0", "held 1", "held 2"] and images.shape == (3, 16, 16, 3)  # the broken file skipped
    assert _seen(make_batch_source(cfg), 20) == {f"picture {i}" for i in range(6)}  # all of data.path trains
    assert dataset_key(cfg) == f"folder:{val_root.resolve()}"
    assert (
        describe_held_out(cfg) == f"held out: folder {val_root}: 4 captioned images (data.val_path), never trained on"
    )
    with pytest.raises(ConfigError, match="eval.prompts: the held-out set of .* has 3 readable captioned images, 4"):
        real_images_and_prompts(cfg, 4)


def test_val_path_of_shards(tmp_path):
    def shards(name: str, n: int) -> Path:
        out = tmp_path / name
        convert(_folder(tmp_path / f"src-{name}", n, word=name), out, 16, patch=8, shard_size=4, progress=False)
        return out

    cfg = load_config(
        None,
        [
            "data.source=shards",
            f"data.path={shards('train', 6)}",
            f"data.val_path={shards('val', 4)}",
            "data.resolution=16",
        ],
    )
    check_paths(cfg)
    _, captions = real_images_and_prompts(cfg, 4)
    assert sorted(captions) == [f"val {i}" for i in range(4)]
    assert describe_held_out(cfg) == f"held out: shards {tmp_path / 'val'} (data.val_path), never trained on"


@pytest.mark.parametrize(
    ("over", "key", "words"),
    [
        (["data.val_path=/x"], "data.val_path", "holds out its own"),
        (["data.source=folder", "data.path=/x", "data.val_count=-1"], "data.val_count", ">= 0"),
        (["data.source=folder", "data.path=/x", "data.val_path=/y", "data.val_count=3"], "data.val_count", "one of"),
        (["data.source=shards", "data.path=/x", "data.val_count=3"], "data.val_count", "data.source is shards"),
    ],
)
def test_held_out_keys_that_cannot_apply_are_refused_on_load(over, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, over)
    assert e.value.key == key and words in str(e.value)


def test_a_split_that_leaves_nothing_and_a_missing_val_path_are_one_line(tmp_path, capsys):
    root = _folder(tmp_path / "imgs", 4)
    base = ["train", "data.source=folder", f"data.path={root}", f"run.dir={tmp_path / 'r'}"]
    assert main([*base, "data.val_count=4"]) == 2
    one_line_error(capsys, "data.val_count", "holding out 4 of the 4 captioned images", "leaves none to train on")
    assert main([*base, f"data.val_path={tmp_path / 'nope'}"]) == 2
    one_line_error(capsys, "data.val_path", "no such folder")
    assert not (tmp_path / "r").exists()
