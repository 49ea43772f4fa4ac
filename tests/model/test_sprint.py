"""SPRINT (`routing.kind: sprint`, pixelrun/model/sprint.py) and its path-drop guidance.

A tiny randomly initialised model (normal std 0.05 everywhere, so the zero-initialised modulation
and output layers do not make every output trivially 0), as tests/model/test_routing.py does.
"""

from __future__ import annotations

import pytest
import torch
from conftest import one_line_error, tiny_overrides
from test_routing import N_TOKENS, SIZE, _inputs  # 32x32 px at patch 8: 16 tokens

from pixelrun.cli import main
from pixelrun.config import ConfigError, load_config, resume_changes
from pixelrun.diffusion.objective import x_to_velocity
from pixelrun.diffusion.sampling import initial_noise, model_evaluations, sample
from pixelrun.experiments.plan import flops_per_image, steps_for_budget
from pixelrun.experiments.spec import BudgetSpec
from pixelrun.infra import checkpoint as ckpt
from pixelrun.model.denoiser import build_model, model_from_config
from pixelrun.model.flops import training_flops_per_image
from pixelrun.model.routing import path_drop_routing, random_routing
from pixelrun.model.sprint import SprintFusion
from pixelrun.run.train import train
from pixelrun.tools.export_diffusers import check_config

SPAN = (1, 2)
WIDTH = 32


def _randomised(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model.eval()


def _pass_deep_through(fusion: SprintFusion) -> None:
    """Fusion weight [0 | I], bias 0: the fused stream is the deep stream."""
    with torch.no_grad():
        fusion.fuse.weight.zero_()
        fusion.fuse.weight[:, WIDTH:].copy_(torch.eye(WIDTH))
        fusion.fuse.bias.zero_()


@pytest.fixture(scope="module")
def pair():
    """A dense model and a SPRINT model with the same weights, the fusion passing the deep stream."""
    dense = _randomised(build_model("tiny", 24, hidden_size=WIDTH, num_heads=2, depth=4))
    sprint = build_model("tiny", 24, hidden_size=WIDTH, num_heads=2, depth=4, sprint_span=SPAN).eval()
    missing, unexpected = sprint.load_state_dict(dense.state_dict(), strict=False)
    assert sorted(missing) == ["sprint.fuse.bias", "sprint.fuse.weight", "sprint.mask_token"] and not unexpected
    with torch.no_grad():
        sprint.sprint.mask_token.normal_(0.0, 1.0)  # a mask token that would show wherever it appears
    _pass_deep_through(sprint.sprint)
    return dense, sprint


# --- the model ------------------------------------------------------------------------------------


def test_ratio_zero_with_a_pass_through_fusion_is_the_dense_model_exactly(pair):
    dense, sprint = pair
    x, t, text, mask = _inputs()
    assert random_routing(2, N_TOKENS, 0.0, SPAN, torch.Generator()) is None  # ratio 0: no routing at all
    with torch.no_grad():
        a = dense(x, t, text, mask, return_features=(2,))
        b = sprint(x, t, text, mask, return_features=(2,))
    assert torch.equal(a.prediction, b.prediction) and torch.equal(a.features[2], b.features[2])
    assert a.prediction.abs().max() > 1e-3  # not trivially zero


def test_the_dense_stream_is_the_one_entering_the_span(pair):
    """Fusion weight [I | 0] (bias 0) passes the dense stream: the SPRINT model is then the dense
    model with blocks 1..2 skipped, which the dense model gives for a routing keeping no token."""
    dense, sprint = pair
    x, t, text, mask = _inputs()
    with torch.no_grad():
        sprint.sprint.fuse.weight.zero_()
        sprint.sprint.fuse.weight[:, :WIDTH].copy_(torch.eye(WIDTH))
        passes_dense = sprint(x, t, text, mask).prediction
        _pass_deep_through(sprint.sprint)
        skipped = dense(x, t, text, mask, routing=path_drop_routing(2, SPAN)).prediction
        full = dense(x, t, text, mask).prediction
    assert torch.equal(passes_dense, skipped) and not torch.allclose(skipped, full)


def test_mask_token_sits_exactly_at_the_dropped_positions():
    fusion = SprintFusion(2, (0, 0))
    with torch.no_grad():
        fusion.mask_token.copy_(torch.tensor([[[7.0, -7.0]]]))
    keep = torch.tensor([[0, 2], [1, 3]])  # sample 0 drops 1 and 3, sample 1 drops 0 and 2
    deep = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [8.0, 9.0]]])
    m = [7.0, -7.0]
    expected = torch.tensor([[[1.0, 2.0], m, [3.0, 4.0], m], [m, [5.0, 6.0], m, [8.0, 9.0]]])
    assert torch.equal(fusion.deep_stream(deep, keep, 4), expected)
    assert fusion.deep_stream(deep, None, 2) is deep  # every token kept: no mask token anywhere
    dense = torch.randn(2, 4, 2)
    fused = fusion(dense, deep, keep)  # Linear([dense ‖ deep]) by hand
    by_hand = torch.cat([dense, expected], -1) @ fusion.fuse.weight.T + fusion.fuse.bias
    assert torch.allclose(fused, by_hand, atol=1e-6)


def test_the_mask_token_learns_only_where_tokens_were_dropped(pair):
    _, sprint = pair
    x, t, text, mask = _inputs()
    routing = random_routing(2, N_TOKENS, 0.5, SPAN, torch.Generator().manual_seed(1))
    for r, learns in ((None, False), (routing, True)):
        sprint.zero_grad(set_to_none=True)
        sprint(x, t, text, mask, routing=r).prediction.square().mean().backward()
        grad = sprint.sprint.mask_token.grad
        assert (grad is not None and grad.abs().sum() > 0) == learns
        assert sprint.sprint.fuse.weight.grad.abs().sum() > 0
    sprint.zero_grad(set_to_none=True)


def test_routed_features_are_the_kept_tokens_and_a_wrong_span_is_refused(pair):
    _, sprint = pair
    x, t, text, mask = _inputs()
    routing = random_routing(2, N_TOKENS, 0.5, SPAN, torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = sprint(x, t, text, mask, routing=routing, return_features=(1, 3))
    assert out.features[1].shape == (2, 8, WIDTH) and out.features[3].shape == (2, N_TOKENS, WIDTH)
    other = random_routing(2, N_TOKENS, 0.5, (1, 1), torch.Generator())
    with pytest.raises(ValueError, match="not this SPRINT model's 1..2"):
        sprint(x, t, text, mask, routing=other)


# --- path-drop guidance ---------------------------------------------------------------------------


def _sample(model, mode, guidance, steps=2):
    _, _, text, mask = _inputs()
    null, null_mask = torch.zeros(1, 5, 24), torch.ones(1, 5, dtype=torch.bool)
    return sample(
        model,
        text,
        mask,
        null_text=null,
        null_mask=null_mask,
        height=SIZE,
        width=SIZE,
        steps=steps,
        guidance=guidance,
        guidance_mode=mode,
        seed=3,
    )


def test_path_drop_guidance_at_scale_one_is_the_conditional_prediction(pair):
    _, sprint = pair
    assert torch.equal(_sample(sprint, "pathdrop", 1.0), _sample(sprint, "none", 1.0))
    assert not torch.equal(_sample(sprint, "pathdrop", 3.0), _sample(sprint, "none", 1.0))


def test_path_drop_guidance_pushes_away_from_the_empty_prompt_with_the_path_dropped(pair):
    """One Euler step from t = 1 to 0, by hand: x_hat = weak + w (cond - weak), weak the empty
    prompt's pass keeping no token in the span."""
    _, sprint = pair
    _, _, text, mask = _inputs()
    w = 3.0
    x = initial_noise(2, SIZE, SIZE, 3)
    t = torch.ones(2)
    with torch.no_grad():
        cond = sprint(x, t, text, mask).prediction
        null, null_mask = torch.zeros(2, 5, 24), torch.ones(2, 5, dtype=torch.bool)
        weak = sprint(x, t, null, null_mask, routing=path_drop_routing(2, SPAN)).prediction
        full_null = sprint(x, t, null, null_mask).prediction
    assert not torch.allclose(weak, full_null)  # the path is really dropped: not classic CFG
    expected = (x - x_to_velocity(x, weak + w * (cond - weak), t, 0.05)).clamp(-1, 1)
    assert torch.allclose(_sample(sprint, "pathdrop", w, steps=1), expected, atol=1e-5)
    assert model_evaluations(4, guidance_mode="pathdrop", guidance=w) == 8


def test_path_drop_guidance_needs_a_sprint_model(pair):
    dense, _ = pair
    with pytest.raises(ValueError, match="needs a SPRINT model"):
        _sample(dense, "pathdrop", 1.0)


# --- config, export, FLOPs ------------------------------------------------------------------------


def test_an_unknown_kind_and_pathdrop_without_sprint_are_one_line_naming_the_key(capsys):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["routing.kind=moe"])
    assert e.value.key == "routing.kind" and "\n" not in str(e.value) and "tread, sprint" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["sample.guidance_mode=pathdrop", "routing.ratio=0.5"])
    assert e.value.key == "sample.guidance_mode" and "routing.kind=sprint" in str(e.value)
    assert load_config(None, ["routing.kind=sprint", "sample.guidance_mode=pathdrop"]).routing.kind == "sprint"
    assert main(["train", "routing.kind=moe"]) == 2
    assert one_line_error(capsys, "routing.kind", "moe").startswith("pixelrun: config error: routing.kind:")


def test_a_resume_refuses_another_routing_kind():
    saved = load_config(None, ["routing.ratio=0.5"])
    refused, _ = resume_changes(saved, load_config(None, ["routing.ratio=0.5", "routing.kind=sprint"]))
    assert refused == {"routing.kind": ("tread", "sprint")}
    assert resume_changes(saved, load_config(None, ["routing.ratio=0.25"]))[0] == {}  # the ratio may change


def test_the_diffusers_export_refuses_a_sprint_model_in_one_line():
    check_config(load_config(None, ["routing.ratio=0.5"]))  # TREAD exports
    with pytest.raises(ConfigError) as e:
        check_config(load_config(None, ["routing.kind=sprint", "routing.ratio=0.5"]))
    assert e.value.key == "routing.kind" and "\n" not in str(e.value) and "PRXTransformer2DModel" in str(e.value)


def test_equal_flops_budget_gives_sprint_more_steps_than_dense_and_fewer_than_tread():
    """By hand on the tiny preset at 48 px (36 tokens, width 256, span 1..2 of 4): SPRINT adds its
    fusion, a Linear(512 -> 256) on all 36 tokens: 2 * 36 * 512 * 256 FLOPs forward, 3x that in
    training; at ratio 0.5 it saves what TREAD saves (half the tokens in blocks 1..2), far more."""
    base = ["repa.weight=0"]  # the analytic count alone: no teacher to measure

    def fpi(*over):
        return flops_per_image(load_config(None, base + list(over)), 384)

    dense, tread = fpi(), fpi("routing.ratio=0.5")
    sprint0, sprint = fpi("routing.kind=sprint"), fpi("routing.kind=sprint", "routing.ratio=0.5")
    fusion = 3 * 2 * 36 * 512 * 256
    assert sprint0 - dense == fusion and sprint - tread == fusion
    budget = BudgetSpec(kind="flops", value=1e14)
    steps = {
        k: steps_for_budget(budget, 16, v, None) for k, v in (("dense", dense), ("sprint", sprint), ("tread", tread))
    }
    assert steps["dense"] < steps["sprint"] < steps["tread"], steps
    assert steps_for_budget(budget, 16, sprint0, None) < steps["dense"]
    model = model_from_config(load_config(None, ["routing.kind=sprint"]), 384)
    assert model.sprint is not None and (model.sprint.start, model.sprint.end) == (1, 2)


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_the_analytic_count_equals_torch_flop_counter_on_a_sprint_model(ratio):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_model("tiny", 24, hidden_size=WIDTH, num_heads=2, depth=4, sprint_span=SPAN)
    x, t, text, mask = _inputs()
    routing = random_routing(2, N_TOKENS, ratio, SPAN, torch.Generator().manual_seed(4))
    expected = training_flops_per_image(model.cfg, SIZE, SIZE, 5, routing_ratio=ratio, span=SPAN)
    assert expected["training"]["sprint_fusion"] == 3 * 2 * N_TOKENS * 2 * WIDTH * WIDTH
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            model(x, t, text, mask, routing=routing)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as training:
        model(x, t, text, mask, routing=routing).prediction.sum().backward()
    assert forward.get_total_flops() == 2 * expected["forward_total"]  # a batch of 2
    assert training.get_total_flops() == 2 * expected["training_total"]


# --- training -------------------------------------------------------------------------------------


def test_sprint_trains_resumes_exactly_and_refuses_the_diffusers_export(tmp_path, tiny_encoder_dir, capsys):
    extra = {
        "model.depth": 3,  # span 1..1: a dense block before it and one after
        "routing.kind": "sprint",
        "routing.ratio": 0.5,
        "train.steps": 6,
        "cadence.checkpoint_every": 3,
        "eval.prompts": 0,
        "sample.guidance_mode": "pathdrop",  # the grids at the end of each run
    }
    full, part = tmp_path / "full", tmp_path / "part"
    train(load_config(None, tiny_overrides(full, tiny_encoder_dir, **extra)))
    cfg = load_config(None, tiny_overrides(part, tiny_encoder_dir, **extra))
    assert train(cfg, stop_at_step=2)["step"] == 2
    train(cfg)
    cfg = load_config(full / "config.yaml")
    weights = []
    for run in (full, part):
        model = model_from_config(cfg, ckpt.load_meta(ckpt.latest_checkpoint(run)).text_dim)
        ckpt.load_weights(ckpt.latest_checkpoint(run), model, "raw")
        weights.append(model.state_dict())
    assert weights[0]["sprint.mask_token"].abs().sum() > 0  # trained: it starts at zero
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
    capsys.readouterr()
    # a TREAD checkpoint starts a SPRINT run (run.init_from): the fusion starts fresh, and says so
    tread = {
        **extra,
        "routing.kind": "tread",
        "sample.guidance_mode": "cfg",
        "train.steps": 1,
        "cadence.checkpoint_every": 1,
        "sample.grid_prompts": 0,
    }
    train(load_config(None, tiny_overrides(tmp_path / "tread", tiny_encoder_dir, **tread)))
    init = {**extra, "train.steps": 1, "run.init_from": str(tmp_path / "tread"), "sample.grid_prompts": 0}
    train(load_config(None, tiny_overrides(tmp_path / "init", tiny_encoder_dir, **init)))
    assert "SPRINT fusion and mask token: not in the checkpoint" in capsys.readouterr().out
    out = tmp_path / "pipe"
    assert main(["export", "--checkpoint", str(full), "--format", "diffusers", "--out", str(out)]) == 2
    assert one_line_error(capsys, "routing.kind").startswith("pixelrun: config error: routing.kind:")
    assert not out.exists()


# --- path-drop learning (routing.path_drop) -------------------------------------------------------


def test_a_dropped_sample_is_the_path_drop_pass_and_the_others_are_untouched(pair):
    """Per sample: `dropped` True gives what path-drop guidance's weak pass gives (no token through
    the span, the mask token everywhere), False what the routing alone gives."""
    from pixelrun.model.denoiser import Routing

    _, sprint = pair
    x, t, text, mask = _inputs()
    routing = random_routing(2, N_TOKENS, 0.5, SPAN, torch.Generator().manual_seed(3))
    assert routing is not None
    dropped = Routing(routing.keep, *SPAN, dropped=torch.tensor([True, False]))
    with torch.no_grad():
        mixed = sprint(x, t, text, mask, routing=dropped).prediction
        routed = sprint(x, t, text, mask, routing=routing).prediction
        weak = sprint(x, t, text, mask, routing=path_drop_routing(2, SPAN)).prediction
    assert torch.equal(mixed[1], routed[1]) and not torch.allclose(mixed[0], routed[0])
    assert torch.allclose(mixed[0], weak[0], atol=1e-6)


def test_path_drop_draws_about_its_fraction_per_sample_and_nothing_when_off():
    from pixelrun.diffusion.draws import step_draws

    cfg = load_config(None, ["routing.kind=sprint", "routing.ratio=0.5", "routing.path_drop=0.1"])
    off = load_config(None, ["routing.kind=sprint", "routing.ratio=0.5"])
    shape = (3, 16, 16)
    drops = torch.cat([step_draws(cfg, step, list(range(64)), shape, 8, "cpu").routing.dropped for step in range(50)])
    # 3,200 Bernoulli(0.1) draws: mean 320, sd 17; 5 sd either side
    assert 235 < int(drops.sum()) < 405, int(drops.sum())
    a, b = step_draws(cfg, 7, [0, 1, 2], shape, 8, "cpu"), step_draws(off, 7, [0, 1, 2], shape, 8, "cpu")
    assert b.routing.dropped is None
    # the other draws of a sample do not move when the path drop is switched on (drawn after them)
    assert torch.equal(a.routing.keep, b.routing.keep) and torch.equal(a.t, b.t) and torch.equal(a.eps, b.eps)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["routing.ratio=0.5", "routing.path_drop=0.1"], "needs routing.kind=sprint"),
        (["routing.kind=sprint", "routing.path_drop=0.1"], "needs routing.ratio > 0"),
        (["routing.kind=sprint", "routing.ratio=0.5", "routing.path_drop=1"], "must be in [0, 1)"),
    ],
)
def test_path_drop_is_refused_where_it_cannot_apply(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert e.value.key == "routing.path_drop" and message in str(e.value)
