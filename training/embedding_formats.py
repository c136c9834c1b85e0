"""Textual-inversion embedding files in the formats other tools read: webui `.pt` (+ `.optim`), diffusers,
kohya, and the webui's PNG-embedded form.

Why several: the webui reads its `.pt` (it carries the step and the base checkpoint it was trained on)
and resumes its optimizer from the `.pt.optim` beside it, diffusers' `load_textual_inversion` reads a
one-key `{token: vectors}` file, kohya's scripts and ComfyUI read `emb_params` safetensors, and embeddings
are shared as PNG cards. We write and read all of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from common.atomic import write_bytes
from training.png_embedding import read_png_embedding
from training.torch_files import load_optim_companion, load_torch_file, save_optim_companion, torch_bytes

# The webui writes this fixed map in every embedding; readers only use the '*' key, never the id.
WEBUI_STRING_TO_TOKEN = {"*": 265}
KOHYA_KEY = "emb_params"
TORCH_SUFFIXES = (".pt", ".bin")


class EmbeddingFileError(ValueError):
    """An embedding file that cannot be read; the message names the file and the reason."""


@dataclass(frozen=True)
class EmbeddingFile:
    name: str
    vectors: torch.Tensor  # (n_vectors, hidden) float32 on CPU
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None


def portable_vectors(vectors: torch.Tensor, name: str) -> torch.Tensor:
    """A float32 CPU copy that owns its storage (torch.save would otherwise store a whole parent tensor)."""
    if vectors.ndim != 2 or vectors.shape[0] < 1:
        raise ValueError(f"embedding {name!r}: vectors must have shape (n_vectors, hidden), got {tuple(vectors.shape)}")
    if not torch.isfinite(vectors).all():
        raise ValueError(f"embedding {name!r}: refusing to save vectors containing NaN or inf")
    return vectors.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()


def webui_embedding_dict(
    name: str, vectors: torch.Tensor, step: int, sd_checkpoint: str | None, sd_checkpoint_name: str | None
) -> dict:
    """The dict the webui pickles into `.pt` files and JSON-encodes into PNG embeddings."""
    return {
        "string_to_token": dict(WEBUI_STRING_TO_TOKEN),
        "string_to_param": {"*": portable_vectors(vectors, name)},
        "name": name,
        "step": int(step),
        "sd_checkpoint": sd_checkpoint,
        "sd_checkpoint_name": sd_checkpoint_name,
    }


def save_webui_pt(
    path: str | os.PathLike[str],
    name: str,
    vectors: torch.Tensor,
    step: int,
    sd_checkpoint: str | None,
    sd_checkpoint_name: str | None,
) -> Path:
    """The webui's embedding layout."""
    return write_bytes(path, torch_bytes(webui_embedding_dict(name, vectors, step, sd_checkpoint, sd_checkpoint_name)))


def webui_checksum(vectors: torch.Tensor) -> str:
    """The webui's 4-hex-digit embedding checksum, which its `.optim` files must carry to be loaded."""
    value = 0
    for number in (vectors.detach().to("cpu", torch.float32).reshape(-1) * 100).tolist():
        value = ((value * 281) ^ (int(number) * 997)) & 0xFFFFFFFF
    return f"{value & 0xFFFF:04x}"


def save_webui_optim(
    pt_path: str | os.PathLike[str], vectors: torch.Tensor, optimizer_state: dict, optimizer_name: str = "AdamW"
) -> Path:
    """`<embedding>.pt.optim`: the optimizer state the webui resumes from when it continues training this file."""
    return save_optim_companion(pt_path, webui_checksum(vectors), optimizer_name, optimizer_state)


def load_webui_optim(pt_path: str | os.PathLike[str], vectors: torch.Tensor, optimizer_name: str) -> dict | None:
    """The optimizer state in `<embedding>.pt.optim`, when it belongs to these vectors and this optimizer.

    As the webui does: a state saved for other vectors (checksum) or another optimizer is ignored, since
    AdamW's moments only make sense for the values they were accumulated on.
    """
    found = load_optim_companion(pt_path, webui_checksum(vectors), EmbeddingFileError)
    if found is None or found[0] != optimizer_name:
        return None
    return found[1]


def save_kohya_embedding(path: str | os.PathLike[str], name: str, vectors: torch.Tensor) -> Path:
    """kohya's / ComfyUI's layout: one `emb_params` tensor; the file name is the embedding's name."""
    return write_bytes(path, safetensors.torch.save({KOHYA_KEY: portable_vectors(vectors, name)}))


def save_diffusers_embedding(
    path: str | os.PathLike[str], name: str, vectors: torch.Tensor, *, step: int | None = None
) -> Path:
    """`{name: vectors}` as diffusers writes `learned_embeds.safetensors`; the step rides in the metadata.

    One metadata key at most: safetensors writes metadata in hash-map order, so two keys would make
    the bytes differ from run to run.
    """
    metadata = None if step is None else {"step": str(int(step))}
    data = safetensors.torch.save({name: portable_vectors(vectors, name)}, metadata=metadata)
    return write_bytes(path, data)


def _checked_vectors(path: Path, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise EmbeddingFileError(f"{path}: the embedding vectors are not a floating-point tensor")
    vectors = value.detach().to(device="cpu", dtype=torch.float32)
    if vectors.ndim == 1:
        vectors = vectors[None]  # diffusers' single-vector files store (hidden,)
    if vectors.ndim != 2 or vectors.shape[0] < 1:
        raise EmbeddingFileError(f"{path}: expected vectors of shape (n_vectors, hidden), got {tuple(value.shape)}")
    if not torch.isfinite(vectors).all():
        raise EmbeddingFileError(f"{path}: the embedding vectors contain NaN or inf")
    return vectors.contiguous()


def _read_safetensors(path: Path) -> EmbeddingFile:
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in keys}
    except (safetensors.SafetensorError, OSError) as error:
        raise EmbeddingFileError(f"{path}: not a readable safetensors file ({error})") from error
    step = int(metadata["step"]) if metadata.get("step", "").isdigit() else None
    if keys == [KOHYA_KEY]:
        return EmbeddingFile(name=path.stem, vectors=_checked_vectors(path, tensors[KOHYA_KEY]), step=step)
    if len(keys) == 1:
        return EmbeddingFile(name=keys[0], vectors=_checked_vectors(path, tensors[keys[0]]), step=step)
    if {"clip_l", "clip_g"} <= set(keys):
        raise EmbeddingFileError(f"{path}: an SDXL embedding (clip_l/clip_g); only SD 1.x embeddings are supported")
    raise EmbeddingFileError(f"{path}: expected one tensor (diffusers) or '{KOHYA_KEY}' (kohya), found keys {keys}")


def _read_webui(path: Path, data: dict) -> EmbeddingFile:
    params = data["string_to_param"]
    if not isinstance(params, dict) or len(params) != 1:
        raise EmbeddingFileError(f"{path}: webui embedding with a malformed 'string_to_param' (expected one entry)")
    step = data.get("step")
    return EmbeddingFile(
        name=str(data.get("name") or path.stem),
        vectors=_checked_vectors(path, next(iter(params.values()))),
        step=int(step) if isinstance(step, int) else None,
        sd_checkpoint=data.get("sd_checkpoint"),
        sd_checkpoint_name=data.get("sd_checkpoint_name"),
    )


def _read_torch(path: Path) -> EmbeddingFile:
    data = load_torch_file(path, EmbeddingFileError)
    if not isinstance(data, dict):
        raise EmbeddingFileError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    if "string_to_param" in data:
        return _read_webui(path, data)
    if list(data) == [KOHYA_KEY]:
        return EmbeddingFile(name=path.stem, vectors=_checked_vectors(path, data[KOHYA_KEY]))
    if len(data) == 1:
        name, vectors = next(iter(data.items()))
        return EmbeddingFile(name=str(name), vectors=_checked_vectors(path, vectors))
    raise EmbeddingFileError(f"{path}: neither a webui embedding ('string_to_param') nor a one-tensor diffusers file")


def _read_png(path: Path) -> EmbeddingFile:
    try:
        data = read_png_embedding(path)
    except ValueError as error:
        raise EmbeddingFileError(str(error)) from error
    if "string_to_param" not in data:
        raise EmbeddingFileError(f"{path}: the embedded data has no 'string_to_param'")
    return _read_webui(path, data)


def read_embedding(path: str | os.PathLike[str]) -> EmbeddingFile:
    """Everything the file says: vectors, name, and the step and base checkpoint when the format keeps them."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingFileError(f"{path}: embedding file not found")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    if suffix == ".png":
        return _read_png(path)
    raise EmbeddingFileError(f"{path}: unsupported embedding file type (expected .safetensors, .pt, .bin or .png)")


def load_embedding(path: str | os.PathLike[str]) -> tuple[str, torch.Tensor]:
    embedding = read_embedding(path)
    return embedding.name, embedding.vectors
