import pytest
import torch

from pixelrun.diffusion.sampling import initial_noise, sample, time_grid
from pixelrun.model.denoiser import ModelOutput


def test_linear_grid_matches_recipe():
    expected = [1, 0.955, 0.900, 0.833, 0.750, 0.643, 0.500, 0.300, 0]
    assert time_grid(8, 3.0, "linear").tolist() == pytest.approx(expected, abs=6e-4)


def test_diffusers_grid_matches_recipe():
    expected = [1, 0.948, 0.883, 0.801, 0.694, 0.548, 0.338, 0.009, 0]
    assert time_grid(8, 3.0, "diffusers").tolist() == pytest.approx(expected, abs=6e-4)


@pytest.mark.parametrize("steps", [1, 8, 28, 50])
def test_diffusers_grid_equals_diffusers_scheduler(steps):
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(steps)
    assert torch.allclose(time_grid(steps, 3.0, "diffusers"), sch.sigmas.float(), atol=1e-6)


class Oracle(torch.nn.Module):
    """Predicts a fixed image; for the empty prompt (all-False mask) a different one."""

    def __init__(self, cond, uncond):
        super().__init__()
        self.cond, self.uncond = cond, uncond

    def forward(self, x, t, text, mask=None, routing=None, return_features=()):
        is_uncond = ~mask.any(dim=1)
        pred = torch.where(is_uncond[:, None, None, None], self.uncond.expand_as(x), self.cond.expand_as(x))
        return ModelOutput(pred, {})


def _prompt(b=2):
    text = torch.zeros(b, 4, 8)
    mask = torch.zeros(b, 4, dtype=torch.bool)
    mask[:, :2] = True
    return text, mask, torch.zeros(1, 4, 8), torch.zeros(1, 4, dtype=torch.bool)


def test_euler_with_exact_prediction_lands_on_it():
    # x_t lies on the straight line between the target and the noise, and each Euler step with the
    # exact x-prediction stays on it: the last step (t = 0.3 -> 0) lands on the target exactly.
    target = torch.full((1, 3, 8, 8), 0.25)
    text, mask, nt, nm = _prompt()
    out = sample(
        Oracle(target, -target),
        text,
        mask,
        null_text=nt,
        null_mask=nm,
        height=8,
        width=8,
        steps=8,
        guidance_mode="none",
        spacing="linear",
    )
    assert torch.allclose(out, target.expand(2, -1, -1, -1), atol=1e-5)


def test_cfg_combines_on_the_prediction():
    cond, uncond = torch.full((1, 3, 8, 8), 0.2), torch.full((1, 3, 8, 8), -0.1)
    text, mask, nt, nm = _prompt()
    out = sample(
        Oracle(cond, uncond),
        text,
        mask,
        null_text=nt,
        null_mask=nm,
        height=8,
        width=8,
        steps=8,
        guidance=2.0,
        spacing="linear",
    )
    assert torch.allclose(out, torch.full_like(out, -0.1 + 2.0 * (0.2 + 0.1)), atol=1e-5)
    one = sample(
        Oracle(cond, uncond),
        text,
        mask,
        null_text=nt,
        null_mask=nm,
        height=8,
        width=8,
        steps=8,
        guidance=1.0,
        spacing="linear",
    )
    assert torch.allclose(one, torch.full_like(one, 0.2), atol=1e-5)


def test_noise_is_drawn_like_diffusers_and_seeded():
    n = initial_noise(2, 8, 8, seed=3, noise_scale=2.0)
    assert torch.equal(n, torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(3)) * 2.0)
    text, mask, nt, nm = _prompt()
    m = Oracle(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    kw = dict(null_text=nt, null_mask=nm, height=8, width=8, steps=4, spacing="diffusers")
    a, b, c = (
        sample(m, text, mask, seed=1, **kw),
        sample(m, text, mask, seed=1, **kw),
        sample(m, text, mask, seed=2, **kw),
    )
    assert torch.equal(a, b) and not torch.equal(a, c)
