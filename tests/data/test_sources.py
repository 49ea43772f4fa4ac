"""The registry of data sources (pixelrun/data/sources.py): every name the config accepts has one
entry, what it builds is a BatchSource, and what it holds out for evaluation never overlaps what
it trains on."""

from __future__ import annotations

import pytest

from pixelrun.config import DATA_SOURCES, ConfigError, load_config
from pixelrun.data.sources import SOURCES, BatchSource, check_paths, source_kind


def test_the_registry_and_the_config_name_the_same_sources():
    assert set(SOURCES) == set(DATA_SOURCES)
    assert all(kind.name == name for name, kind in SOURCES.items())


@pytest.mark.parametrize("name", ["shapes", "emoji"])
def test_each_builtin_source_builds_a_batch_source_that_resumes(name):
    cfg = load_config(None, [f"data.source={name}", "train.batch_size=4"])
    source = source_kind(cfg).build(cfg, 0, 1, None)
    assert isinstance(source, BatchSource)
    next(source)
    state = source.state_dict()
    expected = next(source)
    again = source_kind(cfg).build(cfg, 0, 1, None)
    again.load_state_dict(state)
    assert next(again).captions == expected.captions


def test_held_out_keys_differ_by_source_and_by_what_fixes_the_images(tmp_path):
    keys = {
        name: SOURCES[name].held_out_key(load_config(None, [f"data.source={name}", f"data.path={tmp_path}"]))
        for name in SOURCES
    }
    assert len(set(keys.values())) == len(SOURCES)
    other_seed = load_config(None, ["eval.seed=7"])
    assert source_kind(other_seed).held_out_key(other_seed) != keys["shapes"]


def test_shapes_hold_out_the_eval_split_drawn_from_eval_seed():
    from pixelrun.data.shapes import fixed_prompts

    cfg = load_config(None, [])
    kind = source_kind(cfg)
    images, captions = kind.held_out(cfg, 8, False)
    assert images.shape == (8, 48, 48, 3)
    assert captions == kind.held_out_captions(cfg, 8) == fixed_prompts(8, seed=cfg.eval.seed, max_shapes=2)
    other = load_config(None, ["eval.seed=7"])
    assert kind.held_out_captions(other, 8) != captions
    assert kind.shapes_captions and not any(SOURCES[n].shapes_captions for n in SOURCES if n != "shapes")


@pytest.mark.parametrize("name, message", [("folder", "no such folder"), ("shards", "data.path")])
def test_a_missing_path_is_named_before_any_work(tmp_path, name, message):
    cfg = load_config(None, [f"data.source={name}", f"data.path={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError) as e:
        check_paths(cfg)
    assert e.value.key == "data.path" and (message in str(e.value) or message == e.value.key)
