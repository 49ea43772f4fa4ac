"""The spine end to end on a tiny model: learning, exact resume, clean stops, atomic checkpoints, the CLI."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from conftest import tiny_overrides
from PIL import Image

from pixelrun.cli import main
from pixelrun.config import load_config
from pixelrun.data.shapes import ShapesBatchSource
from pixelrun.diffusion.draws import step_draws
from pixelrun.infra import checkpoint as ckpt
from pixelrun.infra.checkpoint_save import save_checkpoint
from pixelrun.infra.records import CheckpointMeta
from pixelrun.model.denoiser import model_from_config
from pixelrun.model.text import TextEncoder
from pixelrun.run.train import train
from pixelrun.training.optim import make_optimizer
from pixelrun.training.step import compute_losses


def _metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _weights(run, which: str) -> dict:
    """The raw or EMA weights of a run's newest checkpoint, through the loading code users get."""
    cfg = load_config(Path(run) / "config.yaml")
    model = model_from_config(cfg, ckpt.load_meta(ckpt.latest_checkpoint(run)).text_dim)
    ckpt.load_weights(ckpt.latest_checkpoint(run), model, which)
    return model.state_dict()


def test_tiny_model_overfits_one_batch(tmp_path, tiny_encoder_dir):
    cfg = load_config(
        None,
        tiny_overrides(  # 150 steps past train.steps: no cooldown, or the lr would be 0 from step 6
            tmp_path,
            tiny_encoder_dir,
            **{
                "model.hidden_size": 64,
                "optimizer.lr": 3e-3,
                "objective.caption_dropout": 0.0,
                "schedule.cooldown": 0.0,
            },
        ),
    )
    enc = TextEncoder(tiny_encoder_dir, 16)
    model = model_from_config(cfg, enc.dim)
    opt, sched = make_optimizer(model, cfg)
    batch = next(ShapesBatchSource(0, "train", 4, [(32, 32)]))
    text, mask = enc.encode(batch.captions)
    null = enc.encode([""])
    losses = []
    noise = step_draws(cfg, 0, list(range(4)), (3, 32, 32), 8, "cpu")
    for _ in range(150):
        # the same noise and times every step: a fixed regression problem the model must fit
        res = compute_losses(model, batch, text, mask, *null, noise, cfg, torch.device("cpu"))
        opt.zero_grad()
        res.loss.backward()
        opt.step()
        sched.step()
        losses.append(res.loss.item())
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])


def test_interrupted_run_resumes_exactly(tmp_path, tiny_encoder_dir):
    extra = {"train.steps": 8, "cadence.checkpoint_every": 4, "eval.prompts": 0, "ema.every": 2}
    full = tmp_path / "full"
    train(load_config(None, tiny_overrides(full, tiny_encoder_dir, **extra)))
    part = tmp_path / "part"
    cfg = load_config(None, tiny_overrides(part, tiny_encoder_dir, **extra))
    out = train(cfg, stop_at_step=3)  # stops like SIGTERM: saves step 3 and returns
    assert out["step"] == 3 and ckpt.latest_checkpoint(part).name == "step_00000003"
    train(cfg)  # the same command again
    a, b = _metrics(full), _metrics(part)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for k in ("loss", "flow", "grad_norm", "lr"):
            assert ra[k] == rb[k], (ra["step"], k)
    for which in ("raw", "ema"):
        wa, wb = _weights(full, which), _weights(part, which)
        for name, tensor in wa.items():
            assert torch.equal(tensor, wb[name]), (which, name)
    ma, mb = ckpt.load_meta(ckpt.latest_checkpoint(full)), ckpt.load_meta(ckpt.latest_checkpoint(part))
    assert ma.data == mb.data and ma.scheduler == mb.scheduler


def test_validation_bins_at_every_evaluation_and_identical_after_resume(tmp_path, tiny_encoder_dir):
    """The validation loss by noise level (pixelrun/evaluation/validation.py) of the raw and EMA weights, at
    every evaluation and at the end, the same numbers in a run that was stopped and resumed."""
    extra = {"train.steps": 6, "cadence.checkpoint_every": 2, "eval.prompts": 0, "eval.every": 2, "eval.val_images": 4}
    full, part = tmp_path / "full", tmp_path / "part"
    train(load_config(None, tiny_overrides(full, tiny_encoder_dir, **extra)))
    cfg = load_config(None, tiny_overrides(part, tiny_encoder_dir, **extra))
    train(cfg, stop_at_step=3)
    train(cfg)
    keys = [f"{w}/flow/{b}" for w in ("val", "val_ema") for b in ("low", "mid", "high")]
    rows = {name: [r for r in _metrics(run) if "val/flow/low" in r] for name, run in (("full", full), ("part", part))}
    assert [r["step"] for r in rows["full"]] == [2, 4, 6] == [r["step"] for r in rows["part"]]
    for a, b in zip(rows["full"], rows["part"]):
        assert [a[k] for k in keys] == [b[k] for k in keys], a["step"]
    assert all(r[k] > 0 for r in rows["full"] for k in keys)


def _meta(step: int) -> CheckpointMeta:
    return CheckpointMeta(
        step=step, scheduler={}, torch_rng=torch.get_rng_state(), data=[], world_size=1, config={}, text_dim=0
    )


def test_half_written_checkpoints_are_ignored(tmp_path):
    root = ckpt.checkpoint_root(tmp_path)
    save_checkpoint(tmp_path, 2, {"w": torch.zeros(3)}, _meta(2), "seed: 0\n")
    (root / ".tmp-step_00000004").mkdir()  # a crash mid-write
    (root / ".tmp-step_00000004" / "meta.pt").write_bytes(b"garbage")
    (root / "step_00000006").mkdir()  # a directory without its files
    (root / "step_00000006" / "meta.pt").write_bytes(b"garbage")  # meta but no tensor metadata
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000002"
    save_checkpoint(tmp_path, 8, {"w": torch.arange(3.0)}, _meta(8), "seed: 0\n", keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000008"]
    assert not list(root.glob(".tmp-*"))
    latest = ckpt.resolve_checkpoint(tmp_path)
    assert ckpt.load_meta(latest).step == 8
    tree = {"w": torch.zeros(3)}
    ckpt.load_tensors(latest, tree)
    assert tree["w"].tolist() == [0.0, 1.0, 2.0]


def test_sigterm_saves_and_the_same_command_resumes(tmp_path, tiny_encoder_dir):
    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "pixelrun",
        "train",
        *tiny_overrides(run, tiny_encoder_dir, **{"train.steps": 100000, "eval.prompts": 0}),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert time.monotonic() < deadline and proc.poll() is None, "no three rows of metrics.jsonl"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in out and "Traceback" not in err
    latest = ckpt.latest_checkpoint(run)
    step = ckpt.load_meta(latest).step
    assert step >= 3
    assert main(["train", *tiny_overrides(run, tiny_encoder_dir, **{"train.steps": step + 2, "eval.prompts": 0})]) == 0
    assert [r["step"] for r in _metrics(run) if "loss" in r] == list(range(1, step + 3))


def test_default_run_outputs_sample_and_eval(tmp_path, tiny_encoder_dir, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *tiny_overrides(run, tiny_encoder_dir, **{"cadence.sample_every": 3, "cadence.checkpoint_every": 3}),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "done: 6 steps" in out and "shapes score" in out and "step_00000006" in out
    assert "(placed; kind " in out  # never the placed score alone (issue 31)
    assert "(dim 32, float32); device cpu; autocast off (fp32)" in out  # the tower's dtype as loaded
    assert (run / "config.yaml").exists() and (run / "samples" / "step_00000003.png").exists()
    assert (run / "samples" / "final.png").exists() and list((run / "tensorboard").iterdir())
    with Image.open(run / "samples" / "denoise.png") as strip:  # each held-out image, then predictions from it
        assert json.loads(strip.info["captions"])[1] == "predicted from t = 0.2"
    result = json.loads((run / "eval.json").read_text())
    assert result["real_images"]["placed"] == 1.0 and result["settings"]["prompts"] == 4
    # where a blob's kind is lost: the scores from held-out images noised to three levels, printed too
    assert list(result["denoise"]) == ["0.05", "0.2", "0.5"] and result["denoise"]["0.2"]["n"] == 4
    assert "denoise: drawn from held-out images noised to t = 0.05 / 0.2 / 0.5: kind " in out
    assert load_config(run / "config.yaml").run.dir == str(run)

    outdir = tmp_path / "out"
    prompt = "a large red circle in the top left on a white background"
    assert main(["sample", "--checkpoint", str(run), "--prompt", prompt, "--out", str(outdir), "sample.seed=5"]) == 0
    first = np.asarray(Image.open(outdir / "000.png"))
    assert first.shape == (32, 32, 3)
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(run),
                "--prompt",
                prompt,
                "--out",
                str(tmp_path / "again"),
                "sample.seed=5",
                "--size",
                "48x32",
            ]
        )
        == 0
    )  # WxH: 48 wide, 32 high
    assert np.asarray(Image.open(tmp_path / "again" / "000.png")).shape == (32, 48, 3)
    assert (
        main(["sample", "--checkpoint", str(run), "--prompt", prompt, "--out", str(tmp_path / "same"), "sample.seed=5"])
        == 0
    )
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "same" / "000.png")))

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "eval.prompts=3", "sample.steps=2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["settings"]["prompts"] == 3 and report["settings"]["steps"] == 2 and 0 <= report["score"]["placed"] <= 1
    )


def test_sample_rejects_bad_size_and_missing_checkpoint(tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tmp_path / "none"), "--prompt", "x", "--out", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_trains_on_an_image_folder_with_a_broken_image(tmp_path, tiny_encoder_dir, capsys):
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        size = (48, 32) if i % 2 else (32, 48)  # wide and tall: two aspect buckets
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"random picture number {i}")
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (data / "broken.txt").write_text("a broken file")
    run = tmp_path / "run"
    over = tiny_overrides(
        run,
        tiny_encoder_dir,
        **{
            "data.source": "folder",
            "data.path": str(data),
            "data.buckets": "true",
            "train.batch_size": 3,
            "train.steps": 4,
            "sample.grid_prompts": 2,
            "eval.metrics": "[shapes]",  # an explicit list: the shapes score, skipped on a folder
        },
    )
    summary = train(load_config(None, over))
    out = capsys.readouterr().out
    assert summary["skipped_images"] == 1 and "skipped 1 unusable samples" in out and "broken.png" in out
    assert "score" not in summary  # the shapes score is for the shapes dataset only
    assert (run / "samples" / "final.png").exists()
    assert len([r for r in _metrics(run) if "loss" in r]) == 4


def test_time_budget_ends_the_run_like_a_finished_one(tmp_path, tiny_encoder_dir, capsys):
    run = tmp_path / "run"
    summary = train(
        load_config(None, tiny_overrides(run, tiny_encoder_dir, **{"train.steps": 1000, "train.max_minutes": 1e-6}))
    )
    assert summary["step"] == 1 and "score" in summary  # stopped after the first step, then evaluated
    assert "train.max_minutes=1e-06 reached at step 1" in capsys.readouterr().out


def test_compiled_blocks_may_keep_a_graph_for_every_shape_the_run_meets(tmp_path, tiny_encoder_dir):
    """Aspect buckets at 32px, patch 8: 24x40, 32x32, 40x24 -> 15 and 16 tokens; TREAD 0.5 keeps 8
    of either; micro-batch 4 with grad: (4, 15), (4, 16), (4, 8). The validation loss without grad:
    6 square images (16 tokens) in chunks of 4: (4, 16) and (2, 16). 5 variants + a margin of 4.
    torch's default limit of 8 graphs would be short, so building a compiled run raises it."""
    import torch._dynamo.config as dynamo

    from pixelrun.config import stage_plan
    from pixelrun.training.build import block_graphs

    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path,
            tiny_encoder_dir,
            **{"data.buckets": "true", "routing.ratio": 0.5, "model.depth": 4, "eval.val_images": 6},
        ),
    )
    assert block_graphs([c for *_, c in stage_plan(cfg)]) == 9
    stages = "stages=[{steps: 1, resolution: 32}, {steps: 1, resolution: 48, batch_size: 2}]"
    staged = load_config(
        None,
        [
            o
            for o in tiny_overrides(tmp_path, tiny_encoder_dir, **{"data.buckets": "true"})
            if not o.startswith("train.steps=")
        ]
        + [stages],
    )
    assert block_graphs([c for *_, c in stage_plan(staged)]) > block_graphs([stage_plan(staged)[0][2]])
    before = dynamo.recompile_limit
    try:
        from pixelrun.infra.distributed import DistContext
        from pixelrun.training.build import build_state

        many = load_config(
            None,
            tiny_overrides(
                tmp_path,
                tiny_encoder_dir,
                **{
                    "data.buckets": "true",
                    "routing.ratio": 0.5,
                    "model.depth": 4,
                    "parallel.compile": "true",
                    "eval.val_images": 6,
                    "data.resolution": 64,
                },
            ),
        )
        build_state(many, [many], DistContext(0, 1, 0, torch.device("cpu")), 32)
        assert dynamo.recompile_limit == max(before, block_graphs([many])) > 8
    finally:
        dynamo.recompile_limit = before


def test_parallel_options_reach_the_trained_model(tmp_path, tiny_encoder_dir):
    """parallel.compile compiles each block of the trained model (not the EMA copy, which only
    samples); parallel.activation_checkpointing switches recomputation on."""
    from pixelrun.config import stage_plan
    from pixelrun.infra.distributed import DistContext
    from pixelrun.training.build import build_state

    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path, tiny_encoder_dir, **{"parallel.compile": "true", "parallel.activation_checkpointing": "true"}
        ),
    )
    st = build_state(cfg, [c for *_, c in stage_plan(cfg)], DistContext(0, 1, 0, torch.device("cpu")), 32)
    assert st.model.activation_checkpointing
    assert all(b._compiled_call_impl is not None for b in st.model.blocks)
    assert all(b._compiled_call_impl is None for b in st.ema.model.blocks)
    plain = build_state(
        load_config(None, tiny_overrides(tmp_path, tiny_encoder_dir)),
        [c for *_, c in stage_plan(cfg)],
        DistContext(0, 1, 0, torch.device("cpu")),
        32,
    )
    assert not plain.model.activation_checkpointing
    assert all(b._compiled_call_impl is None for b in plain.model.blocks)
