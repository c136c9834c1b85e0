"""DreamArtist / Advanced Prompt Tuning (APT): a positive and a negative embedding trained together.

What the DreamArtist webui extension does, and so what we do: the UNet runs once on the batch doubled,
conditioned on the prompt with `<name>-neg` (first half) and on the prompt with `<name>` (second half); the
two predictions are combined as generation combines them, `neg + cfg * (pos - neg)`, and that combination is
what the loss sees. The negative embedding thereby learns what the images are *not*, which is why it belongs
in the negative prompt when the pair is used. Options, all from the extension:

- the training CFG scale is a number (`3`) or a dynamic range `lo-hi` with a shape (`2.5-5:cos`); the
  extension moves along the range with each sample's *diffusion timestep* (t / (T - 1)), not with the
  training step, and so do we;
- an exponential moving average of each embedding (the seeds: 0.95-0.97), which the extension copies back
  into the trained vectors every N steps;
- a reconstruction loss: the predicted clean latents decoded by the VAE with gradients, L1 to the image;
- positive-only filewords: the negative prompt is the template line without the caption.

Nothing here evaluates user text: the schedule is parsed by one strict regular expression.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler

from training.diffusion_objective import predicted_clean_latents

NEGATIVE_SUFFIX = "-neg"
CFG_SHAPES = ("linear", "cos", "cos2")
_SHAPE_ALIASES = {"ln": "linear"}  # the extension's own name for the linear shape
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_CFG_PATTERN = re.compile(
    rf"\s*(?P<low>{_NUMBER})(?:\s*-\s*(?P<high>{_NUMBER}))?\s*(?::\s*(?P<shape>[a-z0-9]+))?\s*"
)
_CFG_SYNTAX = 'expected a number ("3") or a range "low-high" with an optional shape ("2.5-5", "2.5-5:cos", "1-3:linear")'


def negative_name(name: str) -> str:
    """The negative embedding's name, as the extension names it: `<name>-neg`."""
    return f"{name}{NEGATIVE_SUFFIX}"


def negative_embedding_path(positive: Path) -> Path:
    """Where the negative embedding of a positive embedding file is: the same name with `-neg` before the suffix
    (`mycat.pt` -> `mycat-neg.pt`, `mycat-500.safetensors` -> `mycat-500-neg.safetensors`), as the extension
    saves them, so the webui, which names an embedding after its file, calls it `<name>-neg`."""
    positive = Path(positive)
    return positive.with_name(f"{positive.stem}{NEGATIVE_SUFFIX}{positive.suffix}")


@dataclass(frozen=True)
class CfgSchedule:
    """The training CFG scale: `low` at timestep 0 rising to `high` at the last timestep along `shape`."""

    low: float
    high: float
    shape: str = "linear"

    def __post_init__(self) -> None:
        if self.shape not in CFG_SHAPES:
            raise ValueError(f"CFG shape {self.shape!r}: expected one of {', '.join(CFG_SHAPES)}")
        for value in (self.low, self.high):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"CFG scale {value!r}: must be a finite number of at least 0")

    @property
    def dynamic(self) -> bool:
        return self.low != self.high

    def value(self, k: torch.Tensor | float, n: float) -> torch.Tensor:
        """The scale at position k of n (k = 0 gives `low`, k = n gives `high`); k may be a tensor of them."""
        if n <= 0:
            raise ValueError(f"the CFG range needs n > 0, got {n}")
        rate = torch.as_tensor(k, dtype=torch.float32) / float(n)
        if self.shape == "cos":  # the extension's cos((rate - 1) * pi / 2): fast at first, flat at the end
            rate = torch.cos((rate - 1) * (math.pi / 2))
        elif self.shape == "cos2":  # its 1 - cos(rate * pi / 2): flat at first, fast at the end
            rate = 1 - torch.cos(rate * (math.pi / 2))
        return self.low + (self.high - self.low) * rate

    def for_timesteps(self, timesteps: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
        """One scale per sample from its diffusion timestep, as the extension does (float32, timesteps' device)."""
        if not self.dynamic:
            return torch.full(timesteps.shape, self.low, dtype=torch.float32, device=timesteps.device)
        return self.value(timesteps.float(), num_train_timesteps - 1).to(timesteps.device)


def parse_cfg_schedule(text: str) -> CfgSchedule:
    """`"3"`, `"2.5-5"`, `"2.5-5:cos"`, `"1-3:linear"`; anything else is an error quoting the text."""
    match = _CFG_PATTERN.fullmatch(str(text))
    if match is None:
        raise ValueError(f"CFG scale {text!r}: {_CFG_SYNTAX}")
    low = float(match["low"])
    high = float(match["high"]) if match["high"] is not None else low
    shape = _SHAPE_ALIASES.get(match["shape"] or "linear", match["shape"] or "linear")
    if shape not in CFG_SHAPES:
        raise ValueError(f"CFG scale {text!r}: unknown shape {match['shape']!r}; expected one of {', '.join(CFG_SHAPES)}")
    return CfgSchedule(low, high, shape)


class ExponentialMovingAverage:
    """Shadow copies of named tensors: shadow = decay * shadow + (1 - decay) * current after each update.

    decay 1 keeps the starting values forever, which the extension treats as "EMA off" (and so do callers
    here); decay 0 follows the current values exactly. The shadows are float32 copies that never share
    storage with the tensors they follow, and are part of the saved training state so a resumed run
    continues the same average.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        self.decay = float(decay)
        self.shadows = {name: tensor.detach().to(torch.float32).clone() for name, tensor in tensors.items()}

    @torch.no_grad()
    def update(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if set(tensors) != set(self.shadows):
            raise ValueError(f"EMA tensors {sorted(tensors)} differ from the averaged ones {sorted(self.shadows)}")
        for name, tensor in tensors.items():
            shadow = self.shadows[name]
            shadow.mul_(self.decay).add_(tensor.detach().to(device=shadow.device, dtype=torch.float32), alpha=1 - self.decay)

    def state_tensors(self, prefix: str = "ema.") -> dict[str, torch.Tensor]:
        return {f"{prefix}{name}": shadow.detach().to("cpu").clone() for name, shadow in self.shadows.items()}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], prefix: str = "ema.") -> None:
        missing = [name for name in self.shadows if f"{prefix}{name}" not in tensors]
        if missing:
            raise ValueError(f"the saved state has no EMA of {', '.join(missing)}")
        for name, shadow in self.shadows.items():
            saved = tensors[f"{prefix}{name}"]
            if saved.shape != shadow.shape:
                raise ValueError(f"the saved EMA of {name} has shape {tuple(saved.shape)}, expected {tuple(shadow.shape)}")
            shadow.copy_(saved.to(device=shadow.device, dtype=torch.float32))


def combined_prediction(
    unet: torch.nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    cfg: torch.Tensor | float,
) -> torch.Tensor:
    """`neg + cfg * (pos - neg)` from one UNet call on the doubled batch (negative half first, as the extension).

    cfg is a number or one scale per sample. One call instead of two: the same work for the UNet, half the
    kernel launches, and the two halves see exactly the same noisy latents and timesteps.
    """
    batch = noisy.shape[0]
    output = unet(
        torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]), encoder_hidden_states=torch.cat([negative, positive])
    ).sample
    from_negative, from_positive = output[:batch], output[batch:]
    scale = torch.as_tensor(cfg, dtype=output.dtype, device=output.device)
    if scale.ndim == 1:
        scale = scale.view(-1, *([1] * (output.ndim - 1)))
    return from_negative + scale * (from_positive - from_negative)


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents to images in [-1, 1] (unclamped) through the VAE decoder, differentiable."""
    parameter = next(vae.parameters())
    return vae.decode(latents.to(dtype=parameter.dtype) / vae.config.scaling_factor).sample


def reconstruction_loss(
    vae: AutoencoderKL,
    scheduler: DDPMScheduler,
    noisy: torch.Tensor,
    prediction: torch.Tensor,
    timesteps: torch.Tensor,
    images: torch.Tensor,
) -> torch.Tensor:
    """L1 between the image and the VAE decoding of the clean latents the prediction implies.

    The gradient flows through the decoder into the prediction (and so into the embeddings), as in the
    extension, which decodes its x0 with gradients enabled. `images` are the training images in [-1, 1].
    """
    clean = predicted_clean_latents(scheduler, noisy, prediction, timesteps)
    decoded = decode_latents(vae, clean)
    return F.l1_loss(decoded.float(), images.to(device=decoded.device, dtype=torch.float32))
