"""Aesthetic embeddings (Gallego's "aesthetic gradients", as the webui's aesthetic-gradients extension does them).

Two halves:
- creation: the mean of CLIP's projected image features over a set of images, saved as the extension saves
  it: a bare float tensor of shape (1, projection_dim) (1x768 for ViT-L/14), not normalised, in
  `aesthetic_embeddings/<name>.pt` (the extension's folder; drop the file there to use it in the webui);
- application at generation time: a copy of the text encoder is optimised for a few Adam steps so the
  prompt's CLIP text features point at the (normalised) aesthetic embedding, optionally first rotated
  towards or away from a text by slerp; the copy's hidden states are then blended into the base
  conditioning by `aesthetic_weight` (linear, or the extension's slerp).

Why the base text encoder is the one copied: the extension optimises the text tower of CLIP ViT-L/14, which
*is* SD 1.x's text encoder, weight for weight; copying the encoder the pipeline actually uses gives the same
result and also sees embeddings (textual inversion tokens) loaded into it. Only CLIP's text projection,
which maps the encoder's pooled output into the joint image-text space, comes from the CLIP model. The copy
is discarded afterwards: the shared base encoder is never modified.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from common.atomic import write_bytes
from training.clip_scores import ClipScorer, ImageInput, normalized
from training.embedding_formats import portable_vectors
from training.torch_files import torch_bytes
from training.prompt_encoding import check_clip_skip, encode_input_ids

EMBEDDINGS_DIR = "aesthetic_embeddings"  # the extension's folder name (extensions/aesthetic-gradients/...)


@dataclass(frozen=True)
class AestheticOptions:
    """The extension's generation options, with its names and UI defaults."""

    aesthetic_weight: float = 0.9  # blend of the optimised conditioning into the base one (0: off)
    aesthetic_steps: int = 5  # Adam steps on the text encoder copy (0: off)
    aesthetic_lr: float = 0.0001  # their learning rate (0: off)
    aesthetic_slerp: bool = False  # blend by the extension's slerp instead of linearly
    aesthetic_imgs_text: str = ""  # a text that rotates the image embedding's direction
    aesthetic_slerp_angle: float = 0.1  # how far towards that text (0..1)
    aesthetic_text_negative: bool = False  # rotate away from the text instead

    def __post_init__(self) -> None:
        if not 0 <= self.aesthetic_weight <= 1:
            raise ValueError(f"aesthetic_weight must be between 0 and 1, got {self.aesthetic_weight}")
        if self.aesthetic_steps < 0:
            raise ValueError(f"aesthetic_steps must be 0 or more, got {self.aesthetic_steps}")
        if self.aesthetic_lr < 0:
            raise ValueError(f"aesthetic_lr must be 0 or more, got {self.aesthetic_lr}")
        if not 0 <= self.aesthetic_slerp_angle <= 1:
            raise ValueError(f"aesthetic_slerp_angle must be between 0 and 1, got {self.aesthetic_slerp_angle}")

    @property
    def active(self) -> bool:
        """The extension applies nothing when steps, learning rate or weight is zero."""
        return self.aesthetic_steps != 0 and self.aesthetic_lr != 0 and self.aesthetic_weight != 0


def create_aesthetic_embedding(scorer: ClipScorer, images: Sequence[ImageInput]) -> torch.Tensor:
    """(1, projection_dim) float32 CPU: the mean of the images' raw CLIP image features (the extension's recipe)."""
    return scorer.raw_image_features(images).mean(dim=0, keepdim=True)


def save_aesthetic_embedding(path: str | os.PathLike[str], embedding: torch.Tensor) -> Path:
    """Write the bare (1, d) tensor atomically; the file loads with `torch.load(weights_only=True)`."""
    if embedding.ndim != 2 or embedding.shape[0] != 1:
        raise ValueError(f"{path}: an aesthetic embedding has shape (1, projection_dim), got {tuple(embedding.shape)}")
    return write_bytes(path, torch_bytes(portable_vectors(embedding, Path(path).stem)))


def load_aesthetic_embedding(path: str | os.PathLike[str]) -> torch.Tensor:
    """The (1, d) embedding from an extension `.pt`, normalised to unit length as the extension does on load."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic embedding {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a corrupt or non-tensor pickle
        raise ValueError(f"{path}: not a readable aesthetic embedding ({error})") from error
    if not isinstance(data, torch.Tensor) or data.ndim != 2 or data.shape[0] != 1 or not data.is_floating_point():
        found = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"{path}: an aesthetic embedding is a float tensor of shape (1, projection_dim), got {found}")
    if not torch.isfinite(data).all() or float(data.norm()) == 0:
        raise ValueError(f"{path}: the aesthetic embedding is zero or contains NaN/inf")
    return normalized(data.float())


def slerp(low: torch.Tensor, high: torch.Tensor, val: float) -> torch.Tensor:
    """The extension's spherical interpolation, along dim 1 as it does it.

    For (1, d) embeddings that is the feature axis. For (batch, 77, width) conditioning it is the token
    axis: each hidden channel's column of 77 values is interpolated on its own (the extension's behaviour,
    kept so results match). Where the two are parallel (angle ~0) the formula is 0/0; there we fall back
    to linear interpolation, which is its limit, instead of the extension's NaN.
    """
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    omega = torch.acos((low_norm * high_norm).sum(1).clamp(-1.0, 1.0))
    so = torch.sin(omega)
    parallel = so.abs() < 1e-6
    safe = torch.where(parallel, torch.ones_like(so), so)
    low_weight = torch.where(parallel, torch.full_like(so, 1.0 - val), torch.sin((1.0 - val) * omega) / safe)
    high_weight = torch.where(parallel, torch.full_like(so, val), torch.sin(val * omega) / safe)
    return low_weight.unsqueeze(1) * low + high_weight.unsqueeze(1) * high


def _text_features(text_encoder: CLIPTextModel, projection: torch.nn.Linear, input_ids: torch.Tensor) -> torch.Tensor:
    pooled = text_encoder(input_ids=input_ids).pooler_output
    return projection(pooled)


def check_fits(text_encoder: CLIPTextModel, projection: torch.nn.Linear, embedding: torch.Tensor) -> None:
    """The CLIP model's text projection must read this text encoder's width and write the embedding's."""
    width = text_encoder.config.hidden_size
    if projection.in_features != width:
        raise ValueError(
            f"the CLIP model's text projection reads width {projection.in_features} but the base model's text encoder "
            f"is {width} wide: use the CLIP whose text tower is the base model's encoder (SD 1.x: ViT-L/14)"
        )
    if projection.out_features != embedding.shape[-1]:
        raise ValueError(f"the aesthetic embedding has {embedding.shape[-1]} values but the CLIP model projects to "
                         f"{projection.out_features}: it was made with another CLIP model")


def aesthetic_target(
    encoder: CLIPTextModel, tokenizer: CLIPTokenizer, projection: torch.nn.Linear, embedding: torch.Tensor,
    options: AestheticOptions,
) -> torch.Tensor:
    """The direction the prompt is pulled towards: the unit image embedding, or its slerp towards (or, with
    aesthetic_text_negative, away from) the features of aesthetic_imgs_text, as the extension computes it."""
    target = embedding.to(device=encoder.device, dtype=torch.float32)
    if not options.aesthetic_imgs_text:
        return target
    with torch.no_grad():
        text_ids = tokenizer([options.aesthetic_imgs_text], padding=True, truncation=True, return_tensors="pt")
        text = _text_features(encoder, projection, text_ids.input_ids.to(encoder.device)).float()
        if options.aesthetic_text_negative:
            text = normalized(target - text)
        return slerp(target, text, options.aesthetic_slerp_angle)


def optimised_text_encoder(
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    projection: torch.nn.Linear,
    embedding: torch.Tensor,
    input_ids: torch.Tensor,
    options: AestheticOptions,
) -> CLIPTextModel:
    """A float32 copy of `text_encoder` after `aesthetic_steps` Adam steps that raise the cosine between the
    prompts' projected text features and the aesthetic target; the original and `projection` stay untouched."""
    check_fits(text_encoder, projection, embedding)
    encoder = copy.deepcopy(text_encoder).float().requires_grad_(True)
    head = copy.deepcopy(projection).float().requires_grad_(False)
    target = aesthetic_target(encoder, tokenizer, head, embedding, options)
    tokens = input_ids.to(encoder.device)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=options.aesthetic_lr)
    with torch.enable_grad():
        for _ in range(options.aesthetic_steps):
            features = normalized(_text_features(encoder, head, tokens))
            loss = -(features @ target.T).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return encoder.requires_grad_(False)


def aesthetic_conditioning(
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    projection: torch.nn.Linear,
    embedding: torch.Tensor,
    input_ids: torch.Tensor,
    conditioning: torch.Tensor,
    options: AestheticOptions,
    *,
    clip_skip: int = 1,
) -> torch.Tensor:
    """`conditioning` (batch, 77, width) moved towards the aesthetic `embedding` (unit (1, d)) as the extension does.

    `input_ids` (batch, 77) are the tokens that produced `conditioning` (BOS, prompt, EOS, padding). Returns
    a new tensor of the conditioning's dtype and device (the conditioning itself when the options are
    inactive); the text encoder, the projection and the inputs are left untouched.
    """
    if not options.active:
        return conditioning
    check_clip_skip(text_encoder, clip_skip)
    if input_ids.shape != conditioning.shape[:2]:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} do not match the conditioning {tuple(conditioning.shape)}")
    encoder = optimised_text_encoder(text_encoder, tokenizer, projection, embedding, input_ids, options)
    with torch.no_grad():
        moved = encode_input_ids(encoder, input_ids, clip_skip).to(conditioning.device, conditioning.dtype)
    del encoder
    if options.aesthetic_slerp:
        return slerp(conditioning, moved, options.aesthetic_weight)
    return conditioning * (1 - options.aesthetic_weight) + moved * options.aesthetic_weight


@dataclass(frozen=True)
class AestheticGradients:
    """An aesthetic embedding ready to apply: the CLIP text projection, the unit embedding and the options."""

    projection: torch.nn.Linear
    embedding: torch.Tensor
    options: AestheticOptions

    @classmethod
    def load(cls, scorer: ClipScorer, path: str | os.PathLike[str], options: AestheticOptions) -> AestheticGradients:
        return cls(projection=scorer.model.text_projection, embedding=load_aesthetic_embedding(path), options=options)

    def prompt_embeds(self, pipeline: object, prompt: str, clip_skip: int = 1) -> torch.Tensor:
        """(1, 77, width) `prompt_embeds` for a diffusers SD pipeline, tokenized as our evaluation tokenizes
        (the pipeline's textual-inversion tokens expanded), with the aesthetic gradient applied."""
        tokenizer = pipeline.tokenizer
        text = pipeline.maybe_convert_prompt(prompt, tokenizer)
        input_ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                              return_tensors="pt").input_ids
        with torch.no_grad():
            base = encode_input_ids(pipeline.text_encoder, input_ids, clip_skip)
        return aesthetic_conditioning(pipeline.text_encoder, tokenizer, self.projection, self.embedding, input_ids,
                                      base, self.options, clip_skip=clip_skip)
