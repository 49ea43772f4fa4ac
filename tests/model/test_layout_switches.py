"""The model switches outside PRX's layout (model.pos_embed, model.pixel_head): each is kept on
resume, refused by the diffusers export and checked in one line naming its key."""

import pytest

from pixelrun.config import ConfigError, load_config
from pixelrun.run.resume import resume_changes
from pixelrun.tools.export_diffusers import check_config


@pytest.mark.parametrize(
    "key, value, default, bad, says",
    [("model.pos_embed", "sincos", "none", "learned", "sincos"), ("model.pixel_head", 32, 0, -1, ">= 0")],
)
def test_kept_on_resume_refused_by_the_diffusers_export_and_checked(key, value, default, bad, says):
    cfg = load_config(None, [f"{key}={value}"])
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    assert e.value.key == key and "\n" not in str(e.value) and "PRXTransformer2DModel" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={bad}"])
    assert e.value.key == key and says in str(e.value)
    refused, _ = resume_changes(load_config(None, []), cfg)
    assert refused[key] == (default, value)
