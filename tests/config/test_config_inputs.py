"""Configs refused in one line before any work: an empty YAML config (it would train on every default
with no word) and a guidance scale past any sensible one (1e30 overflows to an all-black image)."""

from __future__ import annotations

import pytest

from pixelrun.config import ConfigError, load_config


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_an_empty_config_file_is_refused(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="holds no keys .* leave --config out to train on the defaults") as info:
        load_config(path)
    assert info.value.key == "--config"


@pytest.mark.parametrize(
    "override, key",
    [
        ("sample.guidance=1e30", "sample.guidance"),
        ("sample.guidance=101", "sample.guidance"),
        ("eval.guidance=[1,1e30]", "eval.guidance[1]"),
    ],
)
def test_a_guidance_past_the_maximum_is_refused(override, key):
    with pytest.raises(ConfigError, match="must be at most 100") as info:
        load_config(None, [override])
    assert info.value.key == key


def test_a_large_but_sensible_guidance_loads():
    assert load_config(None, ["sample.guidance=100"]).sample.guidance == 100
