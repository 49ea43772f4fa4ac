"""`pixelrun ablate plan` with one variant per switch of the catalogue (issue 28): each variant's
steps at an equal FLOPs budget, and a Heun variant sampled at Euler's model evaluations."""

from __future__ import annotations

import pytest
from test_ablate import write_spec

from pixelrun.cli import main
from pixelrun.config import load_config
from pixelrun.diffusion.sampling import model_evaluations
from pixelrun.experiments.plan import equal_nfe_steps

CATALOGUE = {
    "dense": [],
    "tread": ["routing.ratio=0.5"],
    "sprint": ["routing.kind=sprint", "routing.ratio=0.5"],
    "contrastive": ["objective.contrastive_weight=0.05"],
    "token": ["model.resolution_embeds=token"],
    "heun": ["sample.sampler=heun"],
}


def test_the_plan_gives_each_switch_its_steps_at_equal_flops(tmp_path, capsys, monkeypatch):
    from pixelrun.experiments import plan as plan_module

    monkeypatch.setattr(plan_module, "calibrate_step_seconds", lambda *a: 0.5)  # not timed here
    spec = write_spec(
        tmp_path,
        variants=CATALOGUE,
        budget={"kind": "flops", "value": 2e11},
        evaluation={"points": [1.0], "prompts": 4, "sample_steps": 25, "guidance": [4.0]},
    )
    assert main(["ablate", "plan", str(spec)]) == 0
    lines = {line.split(":")[0].strip(): line for line in capsys.readouterr().err.splitlines() if line.startswith("  ")}
    steps = {v: int(lines[v].split(": ")[1].split(" steps")[0]) for v in CATALOGUE}
    # routing saves FLOPs, SPRINT's fusion spends some of it back; the resolution tokens cost a little;
    # the contrastive term and the sampler cost nothing in training
    assert steps["tread"] > steps["sprint"] > steps["dense"] > steps["token"]
    assert steps["contrastive"] == steps["heun"] == steps["dense"]
    assert lines["heun"].endswith("sampled by heun in 13 steps (Euler's NFE)")
    assert "sampled by" not in lines["dense"]
    # 13 Heun steps evaluate the model 2 x 12 + 1 = 25 times, as 25 Euler steps do (x2 for CFG)
    assert model_evaluations(13, sampler="heun") == model_evaluations(25) == 50


@pytest.mark.parametrize(
    "overrides, euler_steps, expected",
    [
        ([], 25, 25),  # Euler is its own match
        (["sample.sampler=heun"], 25, 13),  # 2 x 12 + 1 = 25 evaluations
        (["sample.sampler=heun"], 10, 5),  # 2 x 4 + 1 = 9 <= 10 < 2 x 5 + 1 = 11
        (["sample.sampler=heun"], 1, 1),  # one step is Euler's
        (["sample.sampler=heun", "sample.guidance_mode=none"], 25, 13),  # unguided: the same ratio
    ],
)
def test_equal_nfe_steps_by_hand(overrides, euler_steps, expected):
    cfg = load_config(None, overrides)
    got = equal_nfe_steps(cfg, euler_steps)
    assert got == expected
    s = cfg.sample
    nfe = {
        sampler: model_evaluations(n, sampler=sampler, guidance=s.guidance, guidance_mode=s.guidance_mode)
        for sampler, n in (("euler", euler_steps), (s.sampler, got))
    }
    assert nfe[s.sampler] <= nfe["euler"]


def test_with_a_guidance_interval_the_match_counts_the_unguided_steps():
    """Guidance only for t in (0.5, 1]: on the 25-step grid (shift 3) the guided Euler evaluations
    cost 2, the rest 1; the Heun match is the most steps whose evaluations stay within Euler's."""
    cfg = load_config(None, ["sample.sampler=heun", "sample.guidance_interval=[0.5,1.0]"])
    got = equal_nfe_steps(cfg, 25)

    def nfe(n: int, sampler: str) -> int:
        return model_evaluations(n, sampler=sampler, guidance_interval=(0.5, 1.0))

    assert nfe(got, "heun") <= nfe(25, "euler") < nfe(got + 1, "heun")
