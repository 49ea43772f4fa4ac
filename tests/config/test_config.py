import subprocess
import sys
from pathlib import Path

import pytest

from pixelrun.cli import main
from pixelrun.config import Config, ConfigError, load_config, to_dict

ROOT = Path(__file__).resolve().parents[2]


def test_demo_yaml_is_exactly_the_defaults():
    assert to_dict(load_config(ROOT / "configs" / "demo.yaml")) == to_dict(Config())


@pytest.mark.parametrize("name", ["stage1-512.yaml", "stage2-1024.yaml"])
def test_speedrun_configs_load_and_validate(name):
    cfg = load_config(ROOT / "configs" / "speedrun" / name)
    assert cfg.model.preset == "small" and cfg.train.grad_clip == 0.2 and cfg.ema.decay == 0.999 and cfg.ema.every == 10
    assert cfg.data.resolution == (512 if "512" in name else 1024)
    assert cfg.routing.ratio == 0.5 and (cfg.routing.start, cfg.routing.end) == (2, 12)
    assert cfg.optimizer.name == "muon" and cfg.sample.guidance_mode == "self" and cfg.sample.guidance == 3.5
    assert cfg.perceptual.lpips_weight == 0.1 and cfg.perceptual.dino_weight == 0.01
    assert cfg.repa.weight == (0.5 if "512" in name else 0.0)
    assert cfg.schedule.cooldown == 0.0  # the recipe's lr is constant after the warm-up
    assert cfg.train.global_batch_size == (1024 if "512" in name else 512) and cfg.parallel.compile


def test_the_whole_speedrun_is_one_staged_run():
    from pixelrun.config import batch_split, stage_plan

    cfg = load_config(ROOT / "configs" / "speedrun" / "speedrun.yaml")
    assert cfg.train.steps == 120_000
    (s0, e0, one), (s1, e1, two) = stage_plan(cfg)
    assert (s0, e0, s1, e1) == (0, 100_000, 100_000, 120_000)
    assert (one.data.resolution, one.repa.weight, two.data.resolution, two.repa.weight) == (512, 0.5, 1024, 0.0)
    assert batch_split(one, 32) == (1024, 32, 1) and batch_split(two, 32) == (512, 16, 1)
    assert batch_split(one, 8) == (1024, 32, 4)  # a quarter of the GPUs: 4 accumulation steps


def test_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "train.steps=7",
            "optimizer.lr=3e-4",
            "data.buckets=true",
            "model.bottleneck_size=null",
            "optimizer.betas=[0.8, 0.9]",
        ],
    )
    assert cfg.train.steps == 7 and cfg.optimizer.lr == 3e-4 and cfg.data.buckets is True
    assert cfg.model.bottleneck_size is None and cfg.optimizer.betas == [0.8, 0.9]


@pytest.mark.parametrize(
    "override, key",
    [
        (["train.stepz=3"], "train.stepz"),
        (["nosuch.key=1"], "nosuch.key"),  # the whole key as typed, not its first segment
        (["train.steps=3", "train.steps=4"], "train.steps"),  # given twice (a shell-expanded value)
        (["train.steps=abc"], "train.steps"),
        (["train.steps=1.5"], "train.steps"),
        (["data.buckets=maybe"], "data.buckets"),
        (["data.resolution=50"], "data.resolution"),  # not a multiple of the tiny preset's patch 8
        (["model.preset=huge"], "model.preset"),
        (["model.num_heads=3"], "model.num_heads"),
        (["hardware.precision=fp8"], "hardware.precision"),
        (["objective.caption_dropout=1.5"], "objective.caption_dropout"),
        (["ema.decay=1.0"], "ema.decay"),
        (["train.steps=0"], "train.steps"),
        (["sample.spacing=cosine"], "sample.spacing"),
        (["optimizer.betas=0.9"], "optimizer.betas"),
        (["data.source=folder"], "data.path"),
        (["notakeyvalue"], "notakeyvalue"),
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert e.value.key == key


def test_cli_config_error_is_one_line_exit_2(tmp_path, capsys):
    rc = main(["train", f"run.dir={tmp_path / 'run'}", "train.batch_sise=4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "train.batch_sise" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # failed before any work


def test_cli_missing_folder_and_bad_yaml(tmp_path, capsys):
    assert main(["train", "data.source=folder", f"data.path={tmp_path / 'nope'}", f"run.dir={tmp_path / 'r'}"]) == 2
    assert "data.path" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: [\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "--config" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_cli_process_exit_code_without_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pixelrun", "train", "model.depth=-1", f"run.dir={tmp_path}/r"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == "pixelrun: config error: model.depth: must be > 0; got -1"


def test_unknown_keys_name_the_nearest_valid_one():
    for typed, near in (
        ("train.stpes=3", "train.steps"),
        ("trian.steps=3", "train.steps"),
        ("model.hidden=3", "model.hidden_size"),
        ("stages=[{steps: 2, resolutoin: 3}]", "stages[0].resolution"),
    ):
        with pytest.raises(ConfigError) as e:
            load_config(None, [typed])
        assert f"did you mean {near}?" in str(e.value), typed
    with pytest.raises(ConfigError) as e:
        load_config(None, ["no.such.key=1"])
    assert e.value.key == "no.such.key" and "did you mean" not in str(e.value)


def test_a_key_given_twice_on_the_command_line_is_refused(capsys):
    # what bash makes of an unquoted data.path=shards/{00000..00001}.tar
    assert main(["train", "data.source=shards", "data.path=shards/00000.tar", "data.path=shards/00001.tar"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.path: given twice" in err and "quote" in err


def test_resume_changes_refuse_shapes_and_data_allow_the_rest():
    from pixelrun.config import resume_changes

    saved = load_config(None, [])
    refused, allowed = resume_changes(
        saved,
        load_config(
            None, ["model.depth=6", "train.steps=40", "optimizer.lr=1e-4", "data.source=emoji", "sample.guidance=2"]
        ),
    )
    assert refused == {"model.depth": (4, 6), "data.source": ("shapes", "emoji")}
    assert allowed == {"train.steps": (2000, 40), "optimizer.lr": (1e-3, 1e-4), "sample.guidance": (4.0, 2.0)}
    # the preset's own values spelled out build the same model: no change
    assert resume_changes(saved, load_config(None, ["model.depth=4", "model.hidden_size=256"])) == ({}, {})
    refused, _ = resume_changes(
        saved, load_config(None, ["text.encoder=other", "optimizer.name=muon", "repa.weight=0"])
    )
    assert set(refused) == {"text.encoder", "optimizer.name", "repa.weight"}


def test_repa_projector_width_follows_the_model_and_the_speedrun_keeps_2048():
    from pixelrun.config import repa_hidden, resume_changes

    assert repa_hidden(load_config(None, ["repa.weight=0.5"])) == 512  # twice the tiny preset's 256
    assert repa_hidden(load_config(None, ["repa.weight=0.5", "model.preset=base", "data.resolution=64"])) == 1536
    assert repa_hidden(load_config(None, ["repa.weight=0.5", "repa.hidden=64"])) == 64
    assert repa_hidden(load_config(ROOT / "configs" / "speedrun" / "speedrun.yaml")) == 2048
    # a resume compares the widths the projectors have, not how they were written
    implicit, explicit = (
        load_config(None, ["repa.weight=0.5"]),
        load_config(None, ["repa.weight=0.5", "repa.hidden=512"]),
    )
    assert "repa.hidden" not in resume_changes(implicit, explicit)[0]
    assert resume_changes(load_config(None, ["repa.weight=0.5", "repa.hidden=2048"]), implicit)[0]["repa.hidden"] == (
        2048,
        512,
    )


# ----------------------------------------------------------------------------- keys moved out of train


def test_old_train_keys_load_under_their_new_names_with_one_line(tmp_path, capsys, monkeypatch):
    import pixelrun.config.load as load

    monkeypatch.setattr(load, "_announced", set())
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  steps: 7\n  lr: 0.0003\n  optimizer: muon\n  cooldown: 0.5\n  threads: 1\n")
    cfg = load_config(old, ["train.log_every=3"])
    assert (cfg.train.steps, cfg.optimizer.lr, cfg.optimizer.name) == (7, 3e-4, "muon")
    assert (cfg.schedule.cooldown, cfg.hardware.threads, cfg.cadence.log_every) == (0.5, 1, 3)
    lines = capsys.readouterr().err.strip().splitlines()
    # one line for the file's keys, one for the override's: each names old and new
    assert len(lines) == 2, lines
    assert "train.lr -> optimizer.lr" in lines[0] and "train.optimizer -> optimizer.name" in lines[0]
    assert "train.log_every -> cadence.log_every" in lines[1]
    load_config(old)  # said once per process: the same keys again print nothing
    assert capsys.readouterr().err == ""


def test_an_old_key_in_the_file_yields_to_the_new_key_on_the_command_line(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  lr: 0.0003\n")
    assert load_config(old, ["optimizer.lr=0.002"]).optimizer.lr == 0.002


def test_an_old_and_a_new_key_in_one_place_are_refused_naming_both():
    with pytest.raises(ConfigError, match=r"^train\.lr: and optimizer\.lr are both given"):
        load_config(None, ["train.lr=0.1", "optimizer.lr=0.2"])


def test_a_saved_config_with_old_keys_builds_the_same_run():
    from pixelrun.config import config_from_dict
    from pixelrun.config.schema import MOVED_KEYS

    new = to_dict(load_config(None, ["optimizer.lr=0.002", "cadence.checkpoint_every=7", "hardware.threads=1"]))
    saved = {k: dict(v) if isinstance(v, dict) else v for k, v in new.items()}  # as a run saved it before the split
    for old, moved in MOVED_KEYS.items():
        section, name = moved.split(".")
        saved["train"][old.split(".")[1]] = saved[section].pop(name)
    for section in ("optimizer", "schedule", "cadence", "hardware"):
        assert saved.pop(section) == {}
    assert to_dict(config_from_dict(saved)) == new


def test_a_checkpoint_saved_before_text_precision_keeps_encoding_in_fp32():
    """Its model was trained on fp32 embeddings: sampling it must not switch to bf16 behind its back."""
    from pixelrun.config import with_overrides

    saved = to_dict(load_config(None, []))
    del saved["text"]["precision"]
    assert with_overrides(saved).text.precision == "fp32"
    assert with_overrides(saved, ["text.precision=bf16"]).text.precision == "bf16"  # asked for: given
    assert with_overrides(to_dict(load_config(None, []))).text.precision == "auto"  # saved with the key: kept
