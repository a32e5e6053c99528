"""Conditional latent diffusion: schedules (``schedulers``) and the inferer (``inferer``)."""
from __future__ import annotations

from .inferer import ConditionalLatentInferer, LossWeights
from .schedulers import DDIMSampler, ScheduleConfig, SchedulerOutput, make_train_scheduler, predicted_x0_eps

__all__ = [
    "ConditionalLatentInferer", "LossWeights", "DDIMSampler", "ScheduleConfig", "SchedulerOutput",
    "make_train_scheduler", "predicted_x0_eps",
]
