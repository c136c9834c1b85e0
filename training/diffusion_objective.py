"""What a diffusion UNet is trained to predict, shared by every trainer and by the validation loss.

Why its own module: training (textual inversion today; hypernetworks and LoRA next) and the validation loss
must use the same noise schedule and the same target rule, or the two losses would not be comparable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDPMScheduler

from training.base_model import BaseModel

# By the scheduler's prediction_type: (scheduler, latents, noise, timesteps) -> target.
TARGETS: dict[str, Callable[[DDPMScheduler, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "epsilon": lambda scheduler, latents, noise, timesteps: noise,
    "v_prediction": lambda scheduler, latents, noise, timesteps: scheduler.get_velocity(latents, noise, timesteps),
    "sample": lambda scheduler, latents, noise, timesteps: latents,
}


def noise_scheduler(base: BaseModel) -> DDPMScheduler:
    """The training noise schedule of the base model (SD's own config, read as DDPM)."""
    scheduler = DDPMScheduler.from_config(base.scheduler_config)
    if scheduler.config.prediction_type not in TARGETS:
        raise ValueError(
            f"{base.source}: unsupported prediction_type {scheduler.config.prediction_type!r} "
            f"(expected one of {', '.join(TARGETS)})"
        )
    return scheduler


def prediction_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The tensor the UNet's output is compared with: the noise (epsilon), the velocity or the clean latents."""
    return TARGETS[scheduler.config.prediction_type](scheduler, latents, noise, timesteps)
