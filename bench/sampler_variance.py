"""Variance a sampler keeps, with the *exact* denoiser of a unit-variance Gaussian residual.

    python -m bench.sampler_variance

The first-guess diffusion draws a residual scaled to unit variance. For x0 ~ N(0, 1) the exact
denoiser is known in closed form (E[x0 | x_t] = sqrt(alpha_bar) x_t), so any variance a sampler
loses here is the sampler's own discretisation, not the network's. Prints the ratio
var(sample) / var(x0) for deterministic DDIM and ancestral (eta = 1) sampling at several step counts,
from pure noise (strength 1), on the schedule the shipped checkpoints use.
"""
from __future__ import annotations

import torch

from ltdiff_core.diffusion import DDIMSampler, ScheduleConfig


def kept_variance(eta: float, steps: int, n: int = 200_000, seed: int = 0) -> float:
    s = DDIMSampler(ScheduleConfig(prediction_type="epsilon"))
    gen = torch.Generator().manual_seed(seed)
    s.set_timesteps(steps, 1.0)
    x = torch.randn(n, generator=gen)
    for t in s.timesteps.tolist():
        a = s.alphas_cumprod[t]
        eps = (1 - a).sqrt() * x
        x = s.step(eps, t, x, eta=eta, variance_noise=torch.randn(n, generator=gen)).prev_sample
    return float(x.var())


def main() -> None:
    print("steps  DDIM(eta=0)  ancestral(eta=1)")
    for steps in (1, 2, 4, 10, 20, 50, 100):
        print(f"{steps:5d}  {kept_variance(0.0, steps):11.3f}  {kept_variance(1.0, steps):16.3f}")


if __name__ == "__main__":
    main()
