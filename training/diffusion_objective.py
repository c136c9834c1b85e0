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


def predicted_clean_latents(
    scheduler: DDPMScheduler, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The clean latents x0 a UNet output implies at these timesteps (the inverse of TARGETS), differentiable.

    epsilon: x0 = (x_t - sqrt(1 - a) * eps) / sqrt(a); v: x0 = sqrt(a) * x_t - sqrt(1 - a) * v; sample: itself,
    with a the cumulative alpha of each sample's timestep.
    """
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return prediction
    alphas = scheduler.alphas_cumprod.to(device=noisy.device, dtype=torch.float32)[timesteps.to(noisy.device)]
    alphas = alphas.view(-1, *([1] * (noisy.ndim - 1)))
    signal, noise = alphas.sqrt(), (1 - alphas).sqrt()
    if kind == "epsilon":
        return (noisy.float() - noise * prediction.float()) / signal
    if kind == "v_prediction":
        return signal * noisy.float() - noise * prediction.float()
    raise ValueError(f"unsupported prediction_type {kind!r} (expected one of {', '.join(TARGETS)})")
