"""Conditional latent diffusion p(Z_B | Z_A [, Z_G]): training losses and few-step sampling.

Kept apart from the networks (MONAI-style inferer): it owns the latent scaling, the noise
schedule and how the denoiser output is turned into a loss or a sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .schedulers import DDIMSampler, ScheduleConfig, make_train_scheduler, predicted_x0_eps

#: Draws one fresh noise tensor for a stochastic sampling step (per-slice generators at inference).
StepNoise = Callable[[], torch.Tensor]


@dataclass
class LossWeights:
    """Diffusion loss + reference terms on the denoised estimate (decoder term keeps images faithful)."""

    diffusion: float = 1.0
    latent: float = 0.1
    image: float = 20.0


class ConditionalLatentInferer:
    """Wraps a frozen autoencoder, a denoiser and the schedule.

    ``latent_shift``/``latent_scale`` (per channel) map raw latents to unit variance, so the
    noise schedule sees the scale it was designed for. Parameterizations:

    * ``"latent"``: diffuse Z_B, condition Z_A.
    * ``"residual"``: diffuse ``(Z_B - Z_A - r_shift) / r_scale``, condition Z_A. Z_A and Z_B
      are close, so the denoiser need not learn to copy the condition.
    * ``"first_guess"``: diffuse ``(Z_B - Z_G - r_shift) / r_scale`` with ``Z_G = E(G(A))``,
      G the fitted linear kernel filter; condition ``[Z_A, Z_G]``. G already predicts the part
      of Bl64 that Br40 determines linearly, so the diffusion only models what G misses and a
      zero residual decodes to a faithful image instead of to Br40.

    Decodings (``schedule.decoding``): ``"full"`` decodes the sampled latent, ``D(Z_B_hat)``;
    ``"delta"`` returns ``G(A) + D(Z_B_hat) - D(Z_G)``, so a zero residual gives G(A) exactly
    and the autoencoder's round-trip error only touches the correction (see :meth:`to_image`).
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        denoiser: nn.Module,
        schedule: ScheduleConfig,
        latent_shift: torch.Tensor,
        latent_scale: torch.Tensor,
        residual_shift: torch.Tensor | None = None,
        residual_scale: torch.Tensor | None = None,
    ) -> None:
        self.autoencoder = autoencoder
        self.denoiser = denoiser
        self.schedule = schedule
        self.train_scheduler = make_train_scheduler(schedule)
        self.sampler = DDIMSampler(schedule)
        self.shift = latent_shift.reshape(1, -1, 1, 1)
        self.scale = latent_scale.reshape(1, -1, 1, 1)
        self.parameterization = schedule.parameterization
        self.first_guess = self.parameterization == "first_guess"
        self.residual = self.parameterization in ("residual", "first_guess")
        if self.residual and (residual_shift is None or residual_scale is None):
            raise ValueError(f"{self.parameterization} parameterization needs residual_shift and residual_scale")
        self.r_shift = (residual_shift if residual_shift is not None else torch.zeros_like(latent_scale)).reshape(1, -1, 1, 1)
        self.r_scale = (residual_scale if residual_scale is not None else torch.ones_like(latent_scale)).reshape(1, -1, 1, 1)

    def to(self, device: torch.device | str) -> "ConditionalLatentInferer":
        self.shift, self.scale = self.shift.to(device), self.scale.to(device)
        self.r_shift, self.r_scale = self.r_shift.to(device), self.r_scale.to(device)
        return self

    def to_target(self, z_b: torch.Tensor, z_ref: torch.Tensor) -> torch.Tensor:
        """Scaled latent of B -> the variable the diffusion runs on (``z_ref``: Z_A, or Z_G for first_guess)."""
        return (z_b - z_ref - self.r_shift) / self.r_scale if self.residual else z_b

    def from_target(self, x: torch.Tensor, z_ref: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_target`."""
        return z_ref + x * self.r_scale + self.r_shift if self.residual else x

    @property
    def noise_dim(self) -> int:
        """Series-level noise descriptors the denoiser takes (``ltdiff_core.noise_condition``); 0: none."""
        return int(getattr(getattr(self.denoiser, "config", None), "noise_dim", 0) or 0)

    def _reference_and_condition(
        self, z_a: torch.Tensor, z_g: torch.Tensor | None, noise_cond: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent the residual is taken from, and the denoiser's condition (the noise
        descriptors, when the denoiser takes them, as constant channels at the end)."""
        if not self.first_guess:
            ref, cond = z_a, z_a
        elif z_g is None:
            raise ValueError("first_guess parameterization needs the encoded first guess z_g")
        else:
            ref, cond = z_g, torch.cat([z_a, z_g], dim=1)
        if self.noise_dim:
            if noise_cond is None or noise_cond.shape != (z_a.shape[0], self.noise_dim):
                raise ValueError(f"this denoiser needs noise descriptors of shape ({z_a.shape[0]}, {self.noise_dim})")
            planes = noise_cond.to(cond.device, cond.dtype)[:, :, None, None].expand(-1, -1, *cond.shape[-2:])
            cond = torch.cat([cond, planes], dim=1)
        return ref, cond

    # --- latent space --------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (self.autoencoder.encode(x) - self.shift) / self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z * self.scale + self.shift)

    @property
    def delta_decoding(self) -> bool:
        return self.schedule.decoding == "delta"

    def to_image(self, z_b: torch.Tensor, z_g: torch.Tensor | None = None,
                 guide: torch.Tensor | None = None, d_g: torch.Tensor | None = None) -> torch.Tensor:
        """Image of a (scaled) Z_B estimate; ``"delta"`` needs ``z_g`` and ``guide`` = G(A).

        ``d_g`` = D(Z_G) may be passed when already computed (training decodes it once, without grad).
        """
        if not self.delta_decoding:
            return self.decode(z_b)
        if z_g is None or guide is None:
            raise ValueError("delta decoding needs the encoded first guess z_g and the first guess image")
        if d_g is None:
            d_g = self.decode(z_g)
        return guide + self.decode(z_b) - d_g

    # --- training ------------------------------------------------------------------------
    def training_losses(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        weights: LossWeights,
        generator: torch.Generator | None = None,
        guide: torch.Tensor | None = None,
        noise_cond: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses for one paired batch (images in normalised space, shape (B,1,H,W)).

        ``guide`` is the first guess G(A) (same space and shape), needed for ``first_guess``;
        ``noise_cond`` the standardised noise descriptors, for a denoiser that takes them.
        """
        with torch.no_grad():
            z_a, z_b = self.encode(a), self.encode(b)
            z_g = self.encode(guide) if (self.first_guess and guide is not None) else None
        return self.latent_losses(z_a, z_b, weights, generator, z_g=z_g, b=b, guide=guide, noise_cond=noise_cond)

    def latent_losses(
        self,
        z_a: torch.Tensor,
        z_b: torch.Tensor,
        weights: LossWeights,
        generator: torch.Generator | None = None,
        z_g: torch.Tensor | None = None,
        b: torch.Tensor | None = None,
        guide: torch.Tensor | None = None,
        noise_cond: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses from already encoded, scaled latents (a latent cache skips the encoder per step).

        The image term needs the target image ``b`` (and ``guide`` for delta decoding); with
        ``weights.image == 0`` it is skipped, so a step never runs the decoder: the diffusion
        then learns p(Z_B | condition) in latent space alone, as latent diffusion usually does.
        """
        z_ref, cond = self._reference_and_condition(z_a, z_g, noise_cond)
        n, T = z_b.shape[0], self.schedule.num_train_timesteps
        t_max = max(1, int(self.schedule.t_max_fraction * T))
        t = torch.randint(0, t_max, (n,), generator=generator).to(z_b.device)
        noise = torch.randn(z_b.shape, generator=generator).to(z_b.device)
        x0 = self.to_target(z_b, z_ref)
        z_t = self.train_scheduler.add_noise(x0, noise, t)
        out = self.denoiser(z_t, t, cond)
        if self.schedule.prediction_type == "v_prediction":
            target = self.train_scheduler.get_velocity(x0, noise, t)
        else:
            target = noise
        ac = self.train_scheduler.alphas_cumprod.to(z_b.device)[t].reshape(-1, 1, 1, 1)
        x0_hat, _ = predicted_x0_eps(self.schedule.prediction_type, out.float(), z_t, ac)
        z0_hat = self.from_target(x0_hat, z_ref)
        losses = {
            "diffusion": F.mse_loss(out.float(), target),
            "latent": F.mse_loss(z0_hat, z_b),
        }
        total = weights.diffusion * losses["diffusion"] + weights.latent * losses["latent"]
        if weights.image > 0:
            if b is None:
                raise ValueError("the image term needs the target image b (or set the image weight to 0)")
            with torch.no_grad():
                d_g = self.decode(z_g) if (self.delta_decoding and z_g is not None) else None
            losses["image"] = F.mse_loss(self.to_image(z0_hat, z_g, guide, d_g).float(), b)
            total = total + weights.image * losses["image"]
        losses["total"] = total
        return losses

    @torch.no_grad()
    def sampled_image_mse(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        steps: int,
        strength: float,
        generator: torch.Generator | None = None,
        guide: torch.Tensor | None = None,
        eta: float = 0.0,
        noise_cond: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Fidelity and texture of what inference returns (sampled, not teacher-forced).

        ``image``: image MSE against B. The training loss sees ``z_t`` built from the true Z_B,
        which at low noise leaks the answer; this is the number that tracks fidelity.
        ``residual_power``: power of the sampled correction over the power of the true one,
        ``mean((Y - G)^2) / mean((B - G)^2)`` with G the first guess (or A): 1 when the model
        draws the texture the first guess misses at the right level, 0 when it adds nothing.
        """
        shape = (a.shape[0], self.shift.shape[1], *self.latent_hw(a))
        noise = torch.randn(shape, generator=generator)
        step_noise = (lambda: torch.randn(shape, generator=generator)) if eta > 0 else None  # noqa: E731
        y = self.standardize(a, noise.to(a.device), steps, strength, guide, eta=eta, step_noise=step_noise,
                             noise_cond=noise_cond).float()
        ref = guide if guide is not None else a
        return {"image": F.mse_loss(y, b),
                "residual_power": ((y - ref) ** 2).mean() / ((b - ref) ** 2).mean().clamp_min(1e-12)}

    # --- sampling ------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        z_a: torch.Tensor,
        noise: torch.Tensor,
        steps: int,
        strength: float,
        on_step: Callable[[int, int], None] | None = None,
        z_g: torch.Tensor | None = None,
        eta: float = 0.0,
        step_noise: StepNoise | None = None,
        gain: float = 1.0,
        noise_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Z_B estimate: start from the reference (Z_A, or Z_G) noised to ``strength`` (SDEdit), run DDIM.

        ``eta > 0`` makes every step but the last draw fresh noise from ``step_noise()`` (same
        shape as ``noise``); without it the draws come from the global torch generator.
        ``gain`` scales the sampled (scaled) residual before it is added to the reference: a
        sampler with few steps returns samples of too little variance even with a perfect
        denoiser (tests/test_diffusion.py), and the checkpoint's ``sampling.residual_gain``,
        measured on training slices, restores the residual's power.
        """
        z_ref, cond = self._reference_and_condition(z_a, z_g, noise_cond)
        self.sampler.set_timesteps(steps, strength)
        ts = self.sampler.timesteps
        if strength >= 1.0:
            z = noise
        else:
            start = self.to_target(z_ref, z_ref)
            z = self.train_scheduler.add_noise(start, noise, ts[:1].repeat(z_a.shape[0]).to(z_a.device))
        for k, t in enumerate(ts.tolist()):
            tt = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
            out = self.denoiser(z, tt, cond).to(z.dtype)
            fresh = step_noise().to(z.device, z.dtype) if (eta > 0 and step_noise is not None and k < len(ts) - 1) else None
            z = self.sampler.step(out, t, z, eta=eta, variance_noise=fresh).prev_sample
            if on_step is not None:
                on_step(k + 1, len(ts))
        return self.from_target(gain * z if gain != 1.0 else z, z_ref)

    def latent_hw(self, x: torch.Tensor) -> tuple[int, int]:
        """Latent grid of an image batch (the autoencoder downsamples by ``config.factor``)."""
        f = self.autoencoder.config.factor
        return x.shape[-2] // f, x.shape[-1] // f

    @torch.no_grad()
    def standardize(
        self,
        a: torch.Tensor,
        noise: torch.Tensor,
        steps: int,
        strength: float,
        guide: torch.Tensor | None = None,
        eta: float = 0.0,
        step_noise: StepNoise | None = None,
        gain: float = 1.0,
        noise_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image in, image out: encode A (and G(A)), sample Z_B from ``noise``, return the image."""
        z_a = self.encode(a).float()
        z_g = self.encode(guide).float() if (self.first_guess and guide is not None) else None
        z_b = self.sample(z_a, noise, steps, strength, z_g=z_g, eta=eta, step_noise=step_noise, gain=gain,
                          noise_cond=noise_cond)
        return self.to_image(z_b, z_g, guide)
