"""Single-file SD 1.x checkpoints (.safetensors / .ckpt, the webui/ComfyUI/kohya format): offline load and export.

Why this module exists:
- Loading: diffusers' `from_single_file` fetches configs from the hub unless it is handed a local diffusers
  config folder, and a `.ckpt` is a pickle. So we always pass a local config folder (a sidecar next to the
  file, or the SD 1.5 configs shipped in `training/configs/`) with `local_files_only=True`, and we open every
  `.ckpt` with `weights_only=True` ourselves first, so a pickle that carries code is refused with a clear
  message before diffusers sees it. The file's tensor names and shapes are checked against the configs
  first too, since diffusers reports a missing weight only as an obscure meta-tensor error.
- Export: diffusers only converts original (LDM/CompVis) keys to diffusers keys. The tools users run
  (webui, ComfyUI, kohya) read the original layout, so the reverse mapping is written here, mirroring
  `diffusers.loaders.single_file_utils.convert_ldm_{unet,vae,clip}_checkpoint` rule by rule.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import SingleFileComponentError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from common.atomic import atomic_path
from training.base_model import BaseModelError

SD15_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "stable-diffusion-v1-5"
TOKENIZER_BUILD_COMMAND = "python training/configs/build_clip_tokenizer.py"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer.text_model."
# Keys every SD 1.x-layout checkpoint has whatever its depth (UNet conv_in and output conv, VAE, CLIP text).
SD1_REQUIRED_KEYS = (
    UNET_PREFIX + "input_blocks.0.0.weight",
    UNET_PREFIX + "out.2.weight",
    VAE_PREFIX + "decoder.conv_out.weight",
    TEXT_ENCODER_PREFIX + "embeddings.token_embedding.weight",
)

# Training-run metadata that SD 1.x .ckpt files carry beside the weights (the PyTorch Lightning callback
# class used as a dict key, numpy scalars/arrays for scores). torch's weights-only unpickler refuses these
# names; we let it resolve them to `_IgnoredMetadata`, which runs no code, instead of the real objects.
TOLERATED_CKPT_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.dtype",
    "numpy.ndarray",
    "numpy.core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar",
    "numpy._core.multiarray._reconstruct",
)


class SingleFileError(BaseModelError):
    """A single-file checkpoint that cannot be loaded or written; the message names the file and the reason."""


class _IgnoredMetadata:
    """Stands in for a tolerated non-weight object in a .ckpt: accepts any arguments and state, keeps nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


@contextlib.contextmanager
def tolerated_ckpt_globals() -> Iterator[None]:
    """Let `torch.load(weights_only=True)` (ours and diffusers') accept `TOLERATED_CKPT_GLOBALS` as inert stubs."""
    with torch.serialization.safe_globals([(_IgnoredMetadata, name) for name in TOLERATED_CKPT_GLOBALS]):
        yield


# --------------------------------------------------------------------------------------------- loading


def load_single_file_pipeline(path: Path, *, dtype: torch.dtype, config_dir: Path | None = None) -> StableDiffusionPipeline:
    """Load an SD 1.x single-file checkpoint without touching the network.

    `config_dir` is a diffusers-layout folder giving the architecture, scheduler and tokenizer (weights in it,
    if any, are ignored); by default it is found with `resolve_config_dir`.
    """
    path = Path(path)
    if not path.is_file():
        raise SingleFileError(f"{path}: checkpoint file not found")
    config_dir = resolve_config_dir(path) if config_dir is None else Path(config_dir)
    _check_config_dir(config_dir, path)
    shapes = checkpoint_shapes(path)
    _check_sd1_layout(shapes, path)
    _check_against_config(shapes, expected_checkpoint_shapes(config_dir), path, config_dir)
    try:
        with tolerated_ckpt_globals():
            pipeline = StableDiffusionPipeline.from_single_file(
                str(path),
                config=str(config_dir),
                local_files_only=True,
                dtype=dtype,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
    except (SingleFileComponentError, ValueError, RuntimeError, OSError, KeyError) as error:
        raise SingleFileError(f"{path}: does not fit the model configs in {config_dir}: {error}") from error
    return pipeline


def resolve_config_dir(path: Path) -> Path:
    """The config folder for a checkpoint: `<name>/` or `<name>.<ext>.config/` beside it, else the shipped SD 1.5.

    Why a sidecar wins: fine-tunes with another architecture (or the embedded tiny model) carry their own
    configs, and the user drops them next to the file rather than setting an option.
    """
    path = Path(path)
    for candidate in (path.with_suffix(""), path.with_name(path.name + ".config")):
        if (candidate / "model_index.json").is_file():
            return candidate
    return SD15_CONFIG_DIR


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read safely and cheaply: the safetensors header, or a weights-only mmap unpickle."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except (SafetensorError, OSError) as error:
            raise SingleFileError(f"{path}: not a readable safetensors file ({error})") from error
    if path.suffix == ".ckpt":
        state = read_ckpt_state_dict(path)
        return {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}
    raise SingleFileError(f"{path}: expected a .safetensors or .ckpt file (lower-case suffix)")


def read_ckpt_state_dict(path: Path) -> dict[str, Any]:
    """A `.ckpt`'s entries, unwrapped from its `state_dict` entry, unpickled with `weights_only=True`.

    Why mmap: SD checkpoints are GBs, and checking the file needs only the pickle's small index.
    """
    path = Path(path)
    try:
        with tolerated_ckpt_globals():
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        raise SingleFileError(
            f"{path}: refused: this .ckpt holds something other than tensors ({_unpickler_reason(error)}); "
            "loading it fully could run code, so it was opened with weights_only=True. "
            "Convert it to .safetensors with a tool you trust, or use a .safetensors version."
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise SingleFileError(f"{path}: not a readable torch checkpoint (damaged or another format?): {error}") from error
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not any(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        raise SingleFileError(f"{path}: no tensors found (expected a dict of tensors, optionally under 'state_dict')")
    return checkpoint


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """torch's message ends with advice to disable weights_only; keep only the reason the file was refused."""
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n|$)", str(error), flags=re.DOTALL)
    return match.group(1).strip() if match else str(error).splitlines()[0]


def _check_config_dir(config_dir: Path, path: Path) -> None:
    if not (config_dir / "model_index.json").is_file():
        raise SingleFileError(f"{path}: config folder {config_dir} has no model_index.json")
    tokenizer_dir = config_dir / "tokenizer"
    missing = [name for name in ("vocab.json", "merges.txt") if not (tokenizer_dir / name).is_file()]
    if not missing:
        return
    is_shipped = config_dir == SD15_CONFIG_DIR
    build_hint = f"run `{TOKENIZER_BUILD_COMMAND}` (derives it from open_clip_torch), or " if is_shipped else ""
    raise SingleFileError(
        f"{path}: no CLIP tokenizer in {tokenizer_dir} (missing {', '.join(missing)}); {build_hint}put a diffusers "
        f"config folder with a tokenizer/ subfolder (vocab.json, merges.txt) next to the checkpoint as "
        f"{path.with_suffix('')}/"
    )


def _check_sd1_layout(keys: Iterable[str], path: Path) -> None:
    keys = set(keys)
    missing = [key for key in SD1_REQUIRED_KEYS if key not in keys]
    if not missing:
        return
    if any(key.startswith(("conditioner.", "cond_stage_model.model.")) for key in keys):
        kind = "it looks like SD 2.x or SDXL (OpenCLIP text encoder)"
    elif not any(key.startswith(UNET_PREFIX) for key in keys):
        kind = "it has no UNet (a LoRA, VAE or embedding file?)"
    else:
        kind = "a component is missing"
    raise SingleFileError(f"{path}: not a full SD 1.x checkpoint: {kind}; missing e.g. {missing[0]}")


def expected_checkpoint_shapes(config_dir: Path) -> dict[str, tuple[int, ...]]:
    """Original-layout name -> shape of every weight the configs in `config_dir` call for.

    Why: diffusers loads whatever matches and fails later with a meta-tensor error on a missing weight, so
    the file is checked first. The models are built on the meta device (no memory) and named by the same
    mapping the export uses, so both directions agree by construction.
    """
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder", local_files_only=True))
    expected = {key: tuple(value.shape) for key, value in ldm_state_dict(unet, vae, text_encoder).items()}
    del expected[TEXT_ENCODER_PREFIX + "embeddings.position_ids"]  # a buffer, not a weight: many files lack it
    return expected


def _check_against_config(
    shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], path: Path, config_dir: Path
) -> None:
    hint = f"for another SD 1.x-style architecture, put its diffusers config folder next to the file as {path.with_suffix('')}/"
    missing = [key for key in expected if key not in shapes]
    if missing:
        raise SingleFileError(
            f"{path}: {len(missing)} weight(s) that the configs in {config_dir} call for are not in the file, "
            f"e.g. {missing[0]}; {hint}"
        )
    # Trailing unit dims are ignored: the VAE's attention weights are stored as 1x1 convs or as linear layers.
    mismatched = [key for key in expected if _squeezed(shapes[key]) != _squeezed(expected[key])]
    if mismatched:
        key = mismatched[0]
        raise SingleFileError(
            f"{path}: {len(mismatched)} weight(s) differ in shape from the configs in {config_dir}, e.g. {key}: "
            f"{shapes[key]} in the file, {expected[key]} expected; {hint}"
        )


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 1 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


# ---------------------------------------------------------------------------------------------- export


def export_single_file(base_model_dir: Path, out_path: Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write a diffusers SD 1.x folder's UNet, VAE and text encoder as one original-layout `.safetensors` file.

    `dtype=torch.float16` halves the file, as most shared SD 1.x checkpoints are.
    """
    base_model_dir, out_path = Path(base_model_dir), Path(out_path)
    if out_path.suffix != ".safetensors":
        raise SingleFileError(f"{out_path}: export writes .safetensors only (never pickles)")
    if not (base_model_dir / "model_index.json").is_file():
        raise SingleFileError(f"{base_model_dir}: not a diffusers model folder (no model_index.json)")
    try:
        common = dict(local_files_only=True, torch_dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(base_model_dir, subfolder="unet", **common)
        vae = AutoencoderKL.from_pretrained(base_model_dir, subfolder="vae", **common)
        text_encoder = CLIPTextModel.from_pretrained(base_model_dir / "text_encoder", local_files_only=True, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as error:
        raise SingleFileError(f"{base_model_dir}: cannot load its UNet, VAE or text encoder: {error}") from error
    try:
        return save_single_file(unet, vae, text_encoder, out_path)
    except ValueError as error:
        raise SingleFileError(f"{base_model_dir}: {error}") from error


def save_single_file(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    out_path: Path,
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Loaded SD 1.x components as one original-layout `.safetensors` file, written atomically (tensors are
    copied to the CPU, in `dtype` when given); raises ValueError for a component that is not SD 1.x."""
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise SingleFileError(f"{out_path}: export writes .safetensors only (never pickles)")
    state_dict = ldm_state_dict(unet, vae, text_encoder)
    tensors = {
        key: tensor.detach().to("cpu", dtype if dtype is not None and tensor.is_floating_point() else None).contiguous()
        for key, tensor in state_dict.items()
    }
    with atomic_path(out_path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
    return out_path


def ldm_state_dict(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """All weights under their original SD 1.x names in one flat dict (tensors are shared, not copied)."""
    unet_state = ldm_unet_state_dict(unet.state_dict(), layers_per_block=unet.config.layers_per_block)
    vae_state = ldm_vae_state_dict(vae.state_dict(), levels=len(vae.config.up_block_types))
    max_positions = text_encoder.config.max_position_embeddings
    clip_state = ldm_clip_state_dict(text_encoder.state_dict(), max_positions=max_positions)
    out = {UNET_PREFIX + key: value for key, value in unet_state.items()}
    out.update({VAE_PREFIX + key: value for key, value in vae_state.items()})
    out.update({TEXT_ENCODER_PREFIX + key: value for key, value in clip_state.items()})
    return out


_UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_TOP_LEVEL = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
# The mid-block attention: diffusers' Attention module vs the original AttnBlock's 1x1 convolutions.
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _alternatives(names: Iterable[str]) -> str:
    return "|".join(re.escape(name) for name in names)


_PARAM = r"(?P<param>weight|bias)"
_UNET_TOP_RE = re.compile(rf"(?P<layer>{_alternatives(_UNET_TOP_LEVEL)})\.{_PARAM}")
_UNET_RESNET_RE = re.compile(
    rf"(?P<side>down|up)_blocks\.(?P<level>\d+)\.resnets\.(?P<index>\d+)\.(?P<layer>{_alternatives(_UNET_RESNET)})\.{_PARAM}"
)
_UNET_ATTENTION_RE = re.compile(r"(?P<side>down|up)_blocks\.(?P<level>\d+)\.attentions\.(?P<index>\d+)\.(?P<rest>.+)")
_UNET_DOWNSAMPLER_RE = re.compile(rf"down_blocks\.(?P<level>\d+)\.downsamplers\.0\.conv\.{_PARAM}")
_UNET_UPSAMPLER_RE = re.compile(rf"up_blocks\.(?P<level>\d+)\.upsamplers\.0\.conv\.{_PARAM}")
_UNET_MID_RESNET_RE = re.compile(
    rf"mid_block\.resnets\.(?P<index>[01])\.(?P<layer>{_alternatives(_UNET_RESNET)})\.{_PARAM}"
)
_UNET_MID_ATTENTION_RE = re.compile(r"mid_block\.attentions\.0\.(?P<rest>.+)")

_VAE_TOP_RE = re.compile(rf"(?P<layer>{_alternatives(_VAE_TOP_LEVEL)})\.{_PARAM}")
_VAE_RESNET_RE = re.compile(
    rf"(?:encoder\.down|decoder\.up)_blocks\.(?P<level>\d+)\.resnets\.(?P<index>\d+)\.(?P<layer>{_alternatives(_VAE_RESNET)})\.{_PARAM}"
)
_VAE_SAMPLER_RE = re.compile(
    rf"(?:encoder\.down_blocks\.(?P<down>\d+)\.downsamplers|decoder\.up_blocks\.(?P<up>\d+)\.upsamplers)\.0\.conv\.{_PARAM}"
)
_VAE_MID_RESNET_RE = re.compile(
    rf"(?P<coder>encoder|decoder)\.mid_block\.resnets\.(?P<index>[01])\.(?P<layer>{_alternatives(_VAE_RESNET)})\.{_PARAM}"
)
_VAE_MID_ATTENTION_RE = re.compile(
    rf"(?P<coder>encoder|decoder)\.mid_block\.attentions\.0\.(?P<layer>{_alternatives(_VAE_ATTENTION)})\.{_PARAM}"
)
_LDM_VAE_PROJECTION_RE = re.compile(r"(?:encoder|decoder)\.mid\.attn_1\.(?:q|k|v|proj_out)\.weight")


def _not_sd1(component: str, key: str) -> ValueError:
    return ValueError(f"{component} weight {key!r} has no place in the SD 1.x layout (not an SD 1.x architecture?)")


def ldm_unet_state_dict(state: Mapping[str, torch.Tensor], *, layers_per_block: Any) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict under LDM names (without `model.diffusion_model.`).

    The LDM UNet numbers its blocks flat. Input block 0 is conv_in; each level then has `layers_per_block`
    (resnet, attention) blocks and one block holding the downsampler. The output side has
    `layers_per_block + 1` blocks per level, and the level's upsampler sits in its last block, after the
    attention when the level has one (index 2) and right after the resnet otherwise (index 1).
    """
    if not isinstance(layers_per_block, int):
        raise ValueError(f"UNet layers_per_block={layers_per_block!r}: the SD 1.x layout needs one number for all levels")
    per_level = layers_per_block + 1
    up_levels_with_attention = {m["level"] for m in map(_UNET_ATTENTION_RE.fullmatch, state) if m and m["side"] == "up"}

    def block(side: str, level: str, index: str) -> str:
        if side == "down":
            return f"input_blocks.{1 + int(level) * per_level + int(index)}"
        return f"output_blocks.{int(level) * per_level + int(index)}"

    def rename(key: str) -> str:
        if m := _UNET_TOP_RE.fullmatch(key):
            return f"{_UNET_TOP_LEVEL[m['layer']]}.{m['param']}"
        if m := _UNET_RESNET_RE.fullmatch(key):
            return f"{block(m['side'], m['level'], m['index'])}.0.{_UNET_RESNET[m['layer']]}.{m['param']}"
        if m := _UNET_ATTENTION_RE.fullmatch(key):
            return f"{block(m['side'], m['level'], m['index'])}.1.{m['rest']}"
        if m := _UNET_DOWNSAMPLER_RE.fullmatch(key):
            return f"input_blocks.{(int(m['level']) + 1) * per_level}.0.op.{m['param']}"
        if m := _UNET_UPSAMPLER_RE.fullmatch(key):
            slot = 2 if m["level"] in up_levels_with_attention else 1
            return f"{block('up', m['level'], str(layers_per_block))}.{slot}.conv.{m['param']}"
        if m := _UNET_MID_RESNET_RE.fullmatch(key):
            return f"middle_block.{2 * int(m['index'])}.{_UNET_RESNET[m['layer']]}.{m['param']}"
        if m := _UNET_MID_ATTENTION_RE.fullmatch(key):
            return f"middle_block.1.{m['rest']}"
        raise _not_sd1("UNet", key)

    return {rename(key): value for key, value in state.items()}


def ldm_vae_state_dict(state: Mapping[str, torch.Tensor], *, levels: int) -> dict[str, torch.Tensor]:
    """A diffusers VAE state dict (with `levels` resolution levels) under LDM names (without `first_stage_model.`).

    Two quirks of the original: decoder levels are numbered from the lowest resolution up (the reverse of
    diffusers), and the mid-block attention projections are 1x1 convolutions, so linear weights gain two
    unit dimensions.
    """
    def level_name(key: str, level: str) -> str:
        return f"encoder.down.{level}" if key.startswith("encoder.") else f"decoder.up.{levels - 1 - int(level)}"

    def rename(key: str) -> str:
        if m := _VAE_TOP_RE.fullmatch(key):
            return f"{_VAE_TOP_LEVEL[m['layer']]}.{m['param']}"
        if m := _VAE_RESNET_RE.fullmatch(key):
            return f"{level_name(key, m['level'])}.block.{m['index']}.{_VAE_RESNET[m['layer']]}.{m['param']}"
        if m := _VAE_SAMPLER_RE.fullmatch(key):
            sampler = "downsample" if m["down"] is not None else "upsample"
            return f"{level_name(key, m['down'] or m['up'])}.{sampler}.conv.{m['param']}"
        if m := _VAE_MID_RESNET_RE.fullmatch(key):
            return f"{m['coder']}.mid.block_{int(m['index']) + 1}.{_VAE_RESNET[m['layer']]}.{m['param']}"
        if m := _VAE_MID_ATTENTION_RE.fullmatch(key):
            return f"{m['coder']}.mid.attn_1.{_VAE_ATTENTION[m['layer']]}.{m['param']}"
        raise _not_sd1("VAE", key)

    out = {}
    for key, value in state.items():
        name = rename(key)
        if _LDM_VAE_PROJECTION_RE.fullmatch(name) and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[name] = value
    return out


def ldm_clip_state_dict(state: Mapping[str, torch.Tensor], *, max_positions: int) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict under LDM names (without `cond_stage_model.transformer.text_model.`).

    `position_ids` is no longer a saved weight in transformers, but SD 1.x files carry it and older loaders
    expect it, so it is written as the originals have it: int64 `[[0, 1, ..., max_positions - 1]]`.
    """
    out = {key.removeprefix("text_model."): value for key, value in state.items()}
    out["embeddings.position_ids"] = torch.arange(max_positions, dtype=torch.int64)[None]
    return out
