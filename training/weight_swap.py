"""Fine-tuned weights from a single-file SD 1.x checkpoint swapped into loaded modules for a while.

Why swap rather than load a second pipeline: an evaluation grid renders several checkpoints of one run over
the same shared base model, and a full second model per checkpoint would double the memory. The file is read
tensor by tensor (safetensors), blended into the UNet and text encoder in place, and the originals are put
back on exit, so the shared base model is bit-identical afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextModel

from training.single_file import TEXT_ENCODER_PREFIX, UNET_PREFIX, ldm_unet_state_dict


def ldm_names(unet: UNet2DConditionModel, text_encoder: CLIPTextModel) -> dict[str, tuple[torch.nn.Module, str]]:
    """Original-layout name -> (module, its diffusers/transformers name) for every UNet and text-encoder weight,
    by the same renaming the single-file export uses (so both directions agree)."""
    keys = {key: key for key in unet.state_dict()}
    unet_names = ldm_unet_state_dict(keys, layers_per_block=unet.config.layers_per_block)  # type: ignore[arg-type]
    names: dict[str, tuple[torch.nn.Module, str]] = {UNET_PREFIX + ldm: (unet, key) for ldm, key in unet_names.items()}
    for key in text_encoder.state_dict():
        names[TEXT_ENCODER_PREFIX + key.removeprefix("text_model.")] = (text_encoder, key)
    return names


@contextmanager
def swapped_weights(
    unet: UNet2DConditionModel, text_encoder: CLIPTextModel, path: Path, strength: float = 1.0
) -> Iterator[None]:
    """Inside the block the modules hold base + strength * (file - base), a linear blend of the weights
    (1: the file's weights, 0: the base model's); every weight is restored on exit, even on error."""
    path = Path(path)
    names = ldm_names(unet, text_encoder)
    states = {id(module): module.state_dict() for module, _ in names.values()}
    originals: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with safe_open(str(path), framework="pt") as handle, torch.no_grad():
            present = set(handle.keys())
            missing = [name for name, (module, _) in names.items() if module is unet and name not in present]
            if missing:
                raise ValueError(f"{path}: not a full SD 1.x checkpoint of this model: no {missing[0]}")
            for name, (module, key) in names.items():
                if name not in present:
                    continue  # e.g. the text encoder's position_ids buffer
                current = states[id(module)][key]
                trained = handle.get_tensor(name)
                if trained.shape != current.shape:
                    raise ValueError(f"{path}: {name} has shape {tuple(trained.shape)}, the model {tuple(current.shape)}")
                trained = trained.to(device=current.device, dtype=current.dtype)
                if torch.equal(trained, current):
                    continue
                originals.append((current, current.clone()))
                current.copy_(current + strength * (trained - current) if strength != 1.0 else trained)
        yield
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
    finally:
        with torch.no_grad():
            for current, original in originals:
                current.copy_(original)
