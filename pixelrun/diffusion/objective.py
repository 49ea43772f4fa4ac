"""Flow matching with x-prediction and a loss in velocity space (JiT, "Back to Basics").

The time convention, written once for the whole project:

    t = 1 is pure noise, t = 0 is the clean image (PRX, SD3, diffusers' FlowMatchEuler).
    x_t = (1 - t) * x + t * s * eps,        s = noise_scale, eps ~ N(0, I), x in [-1, 1]
    v   = d x_t / d t = s * eps - x = (x_t - x) / t

The network predicts the clean image x_hat. Prediction and target are both turned into velocities
with the same clamped denominator, v_hat = (x_t - x_hat) / max(t, t_clamp), and the loss is the mean
squared difference. Sampling integrates from t = 1 down to t = 0 (see sampling.py).
JiT and PixelGen write time the other way round (t = 1 clean): translate, never mix.
"""

from __future__ import annotations

import torch


def shift_time(u, shift: float):  # u: a tensor, an array or a float
    """Resolution shift of SD3 / PRX: pushes times towards the noise end for s > 1 (t=0, t=1 fixed)."""
    return shift * u / (1 + (shift - 1) * u)


def sample_times(
    n: int,
    generator: torch.Generator,
    *,
    shift: float = 3.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    uniform_fraction: float = 0.1,
    t_min: float = 1e-3,
    device=None,
) -> torch.Tensor:
    """Training times: shifted logit-normal in [t_min, 1), a `uniform_fraction` of them uniform instead."""
    device = device or generator.device
    u = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, device=device))
    t_max = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()  # largest float32 below 1
    t = shift_time(u, shift).clamp(t_min, t_max)
    uniform = t_min + (1 - t_min) * torch.rand(n, generator=generator, device=device)
    use_uniform = torch.rand(n, generator=generator, device=device) < uniform_fraction
    return torch.where(use_uniform, uniform, t)


def add_noise(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, noise_scale: float = 1.0) -> torch.Tensor:
    t = t.view(-1, *([1] * (x.dim() - 1)))
    return (1 - t) * x + t * noise_scale * eps


def x_to_velocity(x_t: torch.Tensor, x_hat: torch.Tensor, t: torch.Tensor, t_clamp: float = 0.05) -> torch.Tensor:
    """v = (x_t - x_hat) / max(t, t_clamp): the velocity that an x-prediction implies at time t."""
    t = t.view(-1, *([1] * (x_t.dim() - 1))).clamp(min=t_clamp)
    return (x_t - x_hat) / t


def velocity_loss(x_hat, x, x_t, t, t_clamp: float = 0.05) -> torch.Tensor:
    """Mean squared error between the predicted and the true velocity (both clamped alike)."""
    v_hat = x_to_velocity(x_t, x_hat.float(), t, t_clamp)
    v = x_to_velocity(x_t, x, t, t_clamp)
    return (v_hat - v).pow(2).mean()
