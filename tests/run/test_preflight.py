"""Every network a run loads is checked before any work and every unusable one is named in one
line (issue 30): offline, the speedrun's hub ids used to fail one per run, each after half a minute
of hub retries and a traceback."""

from __future__ import annotations

from conftest import one_line_error, tiny_overrides

from pixelrun.cli import main
from pixelrun.config import load_config
from pixelrun.run.preflight import networks, problem


def test_three_unreachable_networks_are_one_line_naming_each_key(tmp_path, tiny_encoder_dir, capsys):
    run = tmp_path / "run"
    over = tiny_overrides(
        run,
        "acme/not-a-cached-encoder",
        **{
            "repa.weight": 0.5,
            "repa.teacher": "acme/not-a-cached-teacher",
            "eval.metrics": "[cmmd]",
            "eval.clip_model": str(tmp_path / "no-clip-here"),
            "data.source": "emoji",
        },
    )
    assert main(["train", *over]) == 2
    err = one_line_error(
        capsys,
        "text.encoder, repa.teacher, eval.clip_model",
        "3 network(s) cannot be loaded",
        "text.encoder=acme/not-a-cached-encoder (not in the Hugging Face cache, and HF_HUB_OFFLINE is set)",
        "repa.teacher=acme/not-a-cached-teacher (not in the Hugging Face cache, and HF_HUB_OFFLINE is set)",
        f"eval.clip_model={tmp_path / 'no-clip-here'} (no such folder)",
    )
    assert "hf download" in err
    assert not run.exists()  # before any work


def test_what_is_checked_follows_the_switches(tmp_path, tiny_encoder_dir):
    base = tiny_overrides(tmp_path / "r", tiny_encoder_dir)
    cfg = load_config(None, base)
    assert networks(cfg) == [("text.encoder", tiny_encoder_dir)]  # REPA off, shapes score: nothing else
    assert problem(tiny_encoder_dir) is None
    on = tiny_overrides(
        tmp_path / "r",
        tiny_encoder_dir,
        **{
            "repa.weight": 0.5,
            "repa.teacher": "efficientnet-lite0",
            "perceptual.dino_weight": 0.1,
            "perceptual.dino_teacher": "facebook/dinov2-small",
        },
    )
    on = load_config(None, on)
    names = dict(networks(on))
    assert "repa.teacher" not in names  # the installed EfficientNet: nothing to fetch
    assert names["perceptual.dino_teacher"] == "facebook/dinov2-small"
    assert networks(load_config(None, tiny_overrides(tmp_path / "r", "minilm"))) == []  # installed with pixelrun
    (tmp_path / "empty").mkdir()
    assert problem(str(tmp_path / "empty")) == "a folder without config.json"


def test_model_init_is_checked_with_the_others(tmp_path, tiny_encoder_dir, capsys):
    """A released model that is not here is listed with the other networks, not found first on its
    own; a pipeline folder is a model folder by its transformer/config.json."""
    pipeline = tmp_path / "pipe"
    (pipeline / "transformer").mkdir(parents=True)
    assert problem(str(pipeline), ("transformer/config.json", "config.json")) is not None
    (pipeline / "transformer" / "config.json").write_text("{}")
    assert problem(str(pipeline), ("transformer/config.json", "config.json")) is None
    over = tiny_overrides(tmp_path / "run", "acme/not-a-cached-encoder", **{"model.init": "acme/not-a-released-model"})
    assert main(["train", *over]) == 2
    one_line_error(
        capsys,
        "model.init, text.encoder",
        "model.init=acme/not-a-released-model (not in the Hugging Face cache, and HF_HUB_OFFLINE is set)",
    )
