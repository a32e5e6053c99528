"""Noise schedules: MONAI ``DDPMScheduler`` for training, a few-step DDIM sampler for inference.

The sampler follows the diffusers ``step()`` contract (``step(model_output, timestep, sample)``
returns an object with ``prev_sample`` and ``pred_original_sample``) but looks the previous
timestep up in its own schedule. MONAI's ``DDIMScheduler.step`` assumes a spacing of
``T // n`` that differs from its own ``linspace`` timesteps, which matters at 4-8 steps, and it
cannot start part-way (SDEdit). Latents are never clipped: they are not in [-1, 1].
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from monai.networks.schedulers import DDPMScheduler, Scheduler

PREDICTION_TYPES = ("epsilon", "v_prediction")
PARAMETERIZATIONS = ("latent", "residual", "first_guess")
DECODINGS = ("full", "delta")


@dataclass
class ScheduleConfig:
    """Diffusion process shared by training and sampling (stored in checkpoints)."""

    num_train_timesteps: int = 1000
    schedule: str = "scaled_linear_beta"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "v_prediction"
    t_max_fraction: float = 1.0  # training samples t in [0, fraction * T)
    # "latent": diffuse Z_B; "residual": Z_B - Z_A; "first_guess": Z_B - E(G(A)) with G the linear filter
    parameterization: str = "latent"
    # How the sampled latent becomes the image. "full": D(Z_B_hat). "delta" (first_guess only):
    # G(A) + D(Z_B_hat) - D(Z_G); the autoencoder's round-trip error on G(A) cancels, so only the
    # correction the diffusion makes passes through the decoder.
    decoding: str = "full"

    def __post_init__(self) -> None:
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}")
        if self.decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {DECODINGS}")
        if self.decoding == "delta" and self.parameterization != "first_guess":
            raise ValueError("decoding 'delta' needs parameterization 'first_guess' (it adds to G(A))")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}")
        if not 0.0 < self.t_max_fraction <= 1.0:
            raise ValueError("t_max_fraction must be in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_train_scheduler(cfg: ScheduleConfig) -> DDPMScheduler:
    """MONAI DDPM scheduler with ``clip_sample=False`` (latents are unbounded)."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        schedule=cfg.schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        clip_sample=False,
        prediction_type=cfg.prediction_type,
    )


@dataclass
class SchedulerOutput:
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class DDIMSampler(Scheduler):
    """DDIM over an explicit timestep list, optionally SDEdit-style, deterministic or stochastic.

    ``set_timesteps(n, strength)`` places ``n`` model evaluations evenly on ``[t_start, 0]``
    with ``t_start = strength * (T - 1)``; the last step jumps to the clean sample.

    ``eta`` (Song et al. 2021) sets how much fresh noise each step injects: 0 is deterministic
    DDIM, which with few steps returns close to the conditional *mean* and so averages away any
    texture the condition does not determine; 1 is the DDPM posterior variance (ancestral
    sampling), which *draws* that texture with the statistics the denoiser learned.
    """

    def __init__(self, cfg: ScheduleConfig) -> None:
        super().__init__(cfg.num_train_timesteps, cfg.schedule, beta_start=cfg.beta_start, beta_end=cfg.beta_end)
        self.prediction_type = cfg.prediction_type
        self.timesteps = torch.empty(0, dtype=torch.long)
        self._prev: dict[int, int] = {}

    def set_timesteps(self, num_inference_steps: int, strength: float = 1.0) -> None:
        if num_inference_steps < 1:
            raise ValueError("num_inference_steps must be >= 1")
        if not 0.0 < strength <= 1.0:
            raise ValueError("strength must be in (0, 1]")
        t_start = int(round(strength * (self.num_train_timesteps - 1)))
        if num_inference_steps > t_start + 1:
            raise ValueError(f"{num_inference_steps} steps do not fit below t_start={t_start}")
        grid = torch.linspace(t_start, 0, num_inference_steps + 1)[:-1].round().long()
        self.timesteps = grid
        prevs = grid.tolist()[1:] + [-1]
        self._prev = dict(zip(grid.tolist(), prevs))

    def _alpha(self, t: int) -> torch.Tensor:
        return self.alphas_cumprod[t] if t >= 0 else torch.tensor(1.0)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
    ) -> SchedulerOutput:
        """One DDIM update x_t -> x_prev (diffusers' ``step`` signature).

        With ``eta > 0`` the update adds ``sigma_t * variance_noise`` (drawn from ``generator`` when
        not given; pass ``variance_noise`` to keep draws per slice independent of batching). The
        last step (to t = -1) is always the clean estimate, so it draws nothing.
        """
        t = int(timestep)
        if t not in self._prev:
            raise ValueError(f"timestep {t} is not in the schedule; call set_timesteps first")
        if eta < 0:
            raise ValueError("eta must be >= 0")
        a_t = self._alpha(t).to(sample.device, sample.dtype)
        a_prev = self._alpha(self._prev[t]).to(sample.device, sample.dtype)
        x0, eps = predicted_x0_eps(self.prediction_type, model_output, sample, a_t)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp_min(0).sqrt()
        prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp_min(0).sqrt() * eps
        if eta > 0 and self._prev[t] >= 0:
            if variance_noise is None:
                variance_noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype).to(sample.device)
            prev = prev + sigma * variance_noise
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)


def predicted_x0_eps(
    prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor, alpha_cumprod: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean-sample and noise estimates from a model output (``alpha_cumprod`` broadcastable)."""
    a, s = alpha_cumprod.sqrt(), (1 - alpha_cumprod).sqrt()
    if prediction_type == "v_prediction":
        return a * sample - s * model_output, a * model_output + s * sample
    x0 = (sample - s * model_output) / a
    return x0, model_output
