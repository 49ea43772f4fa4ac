"""The time convention and every conversion, against values computed by hand."""

import math

import pytest
import torch

from pixelrun.diffusion.objective import add_noise, sample_times, shift_time, velocity_loss, x_to_velocity


def test_shift_by_hand():
    # s*u / (1 + (s-1)*u) with s = 3
    assert shift_time(0.5, 3.0) == pytest.approx(0.75)
    assert shift_time(0.25, 3.0) == pytest.approx(0.5)
    assert shift_time(0.0, 3.0) == 0.0 and shift_time(1.0, 3.0) == 1.0
    assert shift_time(0.3, 1.0) == pytest.approx(0.3)


def test_noising_by_hand_t1_is_noise_t0_is_image():
    x, eps = torch.tensor([1.0]), torch.tensor([2.0])
    assert add_noise(x, eps, torch.tensor([0.25])).item() == pytest.approx(0.75 * 1 + 0.25 * 2)
    assert add_noise(x, eps, torch.tensor([0.25]), noise_scale=2.0).item() == pytest.approx(0.75 + 0.25 * 4)
    assert add_noise(x, eps, torch.tensor([0.0])).item() == 1.0  # t = 0: the clean image
    assert add_noise(x, eps, torch.tensor([1.0]), noise_scale=2.0).item() == 4.0  # t = 1: pure (scaled) noise


def test_velocity_is_the_time_derivative():
    # independent formula: d/dt [(1 - t) x + t s eps] = s eps - x
    torch.manual_seed(0)
    x, eps = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    t = torch.tensor([0.2, 0.5, 0.9])
    x_t = add_noise(x, eps, t, 2.0)
    assert torch.allclose(x_to_velocity(x_t, x, t), 2.0 * eps - x, atol=1e-5)


def test_velocity_clamp_by_hand():
    x_t, x_hat = torch.tensor([[1.0]]), torch.tensor([[0.5]])
    assert x_to_velocity(x_t, x_hat, torch.tensor([0.01])).item() == pytest.approx(0.5 / 0.05)
    assert x_to_velocity(x_t, x_hat, torch.tensor([0.5])).item() == pytest.approx(1.0)


def test_velocity_loss_by_hand():
    x = torch.zeros(2, 3, 2, 2)
    x_t = torch.ones(2, 3, 2, 2)
    t = torch.tensor([0.5, 0.02])
    assert velocity_loss(x, x, x_t, t).item() == 0.0
    # x_hat = x + 0.1: v_hat - v = -0.1 / max(t, 0.05) -> squared: 0.04 and 4.0, mean 2.02
    assert velocity_loss(x + 0.1, x, x_t, t).item() == pytest.approx((0.04 + 4.0) / 2, rel=1e-5)


def test_time_sampling_distribution():
    g = torch.Generator().manual_seed(0)
    t = sample_times(200_000, g, shift=3.0, uniform_fraction=0.0)
    assert t.min() >= 1e-3 and t.max() < 1.0
    # median of sigmoid(N(0,1)) is 0.5, shifted with s = 3: 0.75
    assert t.median().item() == pytest.approx(0.75, abs=0.01)
    u = sample_times(200_000, g, shift=3.0, uniform_fraction=1.0)
    assert u.mean().item() == pytest.approx((1e-3 + 1) / 2, abs=0.01)
    mixed = sample_times(200_000, g, shift=3.0, uniform_fraction=0.1)
    # P(t < 0.2): logit-normal part: u < 1/13 (shift inverse of 0.2), i.e. N < logit(1/13)
    p_ln = 0.5 * (1 + math.erf(math.log((1 / 13) / (12 / 13)) / math.sqrt(2)))
    expected = 0.9 * p_ln + 0.1 * (0.2 - 1e-3) / (1 - 1e-3)
    assert (mixed < 0.2).float().mean().item() == pytest.approx(expected, abs=0.005)


def test_time_sampling_reproducible_from_seed():
    a = sample_times(16, torch.Generator().manual_seed(7))
    b = sample_times(16, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
