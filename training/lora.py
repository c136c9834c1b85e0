"""LoRA: low-rank adapters on the UNet's attention projections (and optionally the text encoder's), through peft.

Why peft's layers and our own removal: peft wraps each target `nn.Linear` in a LoRA layer that keeps the
original module as its `base_layer`; putting that very object back on exit restores the shared base model
bit for bit (it is cached and reused by other assets), where merging or diffusers' unload would have to be
trusted to leave no trace. Initialisation draws from a seeded generator, never torch's global one, so a seed
gives the same adapters.

Files: the kohya format (`lora_unet_<module path, dots as underscores>.lora_down.weight`/`.lora_up.weight`/
`.alpha`, `lora_te_text_model_...` for the text encoder, `ss_*` metadata) that the webui, ComfyUI and kohya
sd-scripts load, and the diffusers format (`pytorch_lora_weights.safetensors`), written by diffusers' own
`save_lora_weights`. A module path is always the transformers-4 spelling (`text_model.encoder.layers...`),
which every loader accepts; transformers 5 dropped the `text_model` level, so it is added and removed here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from common.atomic import atomic_path
from training.base_model import BaseModel
from training.lr_schedule import parse_schedule
from training.prompt_encoding import CachedPromptEncoder, encode_input_ids
from training.training_loop import LoopResult, LoopSettings, TrainingExample, TrainingMethod, run_training

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
ADAPTER = "lora"  # the peft adapter name of our own injections
KOHYA_UNET_PREFIX = "lora_unet"
KOHYA_TEXT_ENCODER_PREFIX = "lora_te"
TEXT_MODEL = "text_model."  # the transformers-4 level every LoRA file names text-encoder modules under
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


class LoraFileError(ValueError):
    """A LoRA file that cannot be read or does not fit the model; the message names the file and why."""


@dataclass(frozen=True)
class LoraShape:
    """Rank, alpha (the update is scaled by alpha / rank, as in kohya and peft) and dropout of every adapter."""

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class LoraPair:
    """One adapted module: update = up @ down * alpha / rank."""

    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (out_features, rank)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoraWeights:
    """Adapters by module path (UNet paths as diffusers names them; text-encoder paths under `text_model.`)."""

    unet: dict[str, LoraPair] = field(default_factory=dict)
    text_encoder: dict[str, LoraPair] = field(default_factory=dict)

    def digest(self) -> str:
        """sha256 of every name and weight: the data version of a trained LoRA."""
        hasher = hashlib.sha256()
        for name, tensor in self.tensors().items():
            hasher.update(name.encode("utf-8"))
            hasher.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return hasher.hexdigest()

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every weight under a stable name: what the data version and equality checks hash."""
        out = {}
        for part, pairs in (("unet", self.unet), ("text_encoder", self.text_encoder)):
            for path, pair in sorted(pairs.items()):
                out[f"{part}.{path}.down"] = pair.down
                out[f"{part}.{path}.up"] = pair.up
                out[f"{part}.{path}.alpha"] = torch.tensor(float(pair.alpha))
        return out


def canonical_text_encoder_path(path: str) -> str:
    return path if path.startswith(TEXT_MODEL) else TEXT_MODEL + path


def _model_path(model: torch.nn.Module, canonical: str) -> str:
    """A canonical text-encoder path as this model names it (transformers 5 has no text_model level)."""
    if canonical.startswith(TEXT_MODEL) and not hasattr(model, "text_model"):
        return canonical[len(TEXT_MODEL) :]
    return canonical


# --- injection and removal ---------------------------------------------------------------------------------


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _init_down(weight: torch.Tensor, generator: torch.Generator) -> None:
    """kaiming_uniform_(a=sqrt(5)) as kohya and peft initialise lora_down, i.e. U(-1/sqrt(in), 1/sqrt(in)),
    drawn from `generator` so a seed gives the same adapters."""
    bound = 1.0 / math.sqrt(weight.shape[1])
    values = (torch.rand(weight.shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound
    weight.data.copy_(values.to(device=weight.device, dtype=weight.dtype))


def _remove(model: torch.nn.Module, requires_grad: Mapping[str, bool], had_config: bool) -> None:
    """Put every wrapped module's base layer back and undo what injection changed on the model."""
    for name in sorted(lora_layers(model), key=len, reverse=True):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, model.get_submodule(name).get_base_layer())
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(requires_grad.get(name, False))
    if not had_config and "peft_config" in model.__dict__:
        del model.peft_config


@contextlib.contextmanager
def lora_injected(
    model: torch.nn.Module,
    targets: Sequence[str],
    shapes: Mapping[str, LoraShape] | LoraShape,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[dict[str, LoraLayer]]:
    """`model` with LoRA adapters on `targets` (module-name suffixes) inside the block; afterwards exactly the
    model it was (same module objects, same tensors, same requires_grad), even on error.

    `shapes` is one shape for all, or one per full module name (a loaded file's per-module ranks). The
    adapters are float32 (`dtype`) whatever the model's precision, so their optimizer state stays exact;
    lora_up starts at zero, lora_down from `generator` (zeros without one: a loader fills them).
    """
    if lora_layers(model):
        raise ValueError(f"{type(model).__name__} already carries LoRA layers; remove them first")
    requires_grad = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    had_config = "peft_config" in model.__dict__
    if isinstance(shapes, LoraShape):
        default, ranks, alphas = shapes, {}, {}
    else:
        if not shapes:
            raise ValueError("no modules to adapt")
        default = next(iter(shapes.values()))
        ranks = {re.escape(name): shape.rank for name, shape in shapes.items()}
        alphas = {re.escape(name): shape.alpha for name, shape in shapes.items()}
    config = LoraConfig(
        r=default.rank, lora_alpha=default.alpha, lora_dropout=default.dropout, target_modules=list(targets),
        rank_pattern=ranks, alpha_pattern=alphas, init_lora_weights=True,
    )  # fmt: skip
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        layers = lora_layers(model)
        if not layers:
            raise ValueError(f"no module of {type(model).__name__} matches the LoRA targets {', '.join(targets)}")
        for layer in layers.values():
            layer.lora_A[ADAPTER].to(dtype)
            layer.lora_B[ADAPTER].to(dtype)
            torch.nn.init.zeros_(layer.lora_B[ADAPTER].weight)
            if generator is not None:
                _init_down(layer.lora_A[ADAPTER].weight, generator)
            else:
                torch.nn.init.zeros_(layer.lora_A[ADAPTER].weight)
        yield layers
    finally:
        _remove(model, requires_grad, had_config)


def set_strength(layers: Mapping[str, LoraLayer], strength: float) -> None:
    """The kohya/webui multiplier: scaling = strength * alpha / rank."""
    for layer in layers.values():
        layer.set_scale(ADAPTER, strength)


def collect_weights(
    unet_layers: Mapping[str, LoraLayer], text_encoder_layers: Mapping[str, LoraLayer] = {}
) -> LoraWeights:
    """Float32 CPU copies of the adapters, under canonical module paths."""

    def pairs(layers: Mapping[str, LoraLayer], rename) -> dict[str, LoraPair]:
        return {
            rename(name): LoraPair(
                down=layer.lora_A[ADAPTER].weight.detach().to("cpu", torch.float32).clone(),
                up=layer.lora_B[ADAPTER].weight.detach().to("cpu", torch.float32).clone(),
                alpha=float(layer.lora_alpha[ADAPTER]),
            )
            for name, layer in layers.items()
        }

    return LoraWeights(unet=pairs(unet_layers, str), text_encoder=pairs(text_encoder_layers, canonical_text_encoder_path))


@contextlib.contextmanager
def lora_weights_applied(
    unet: torch.nn.Module, text_encoder: torch.nn.Module, weights: LoraWeights, strength: float = 1.0
) -> Iterator[dict[str, LoraLayer]]:
    """Our own loader: `weights` on the models at `strength` inside the block, removed bit-exactly after."""
    with contextlib.ExitStack() as stack:
        layers: dict[str, LoraLayer] = {}
        for model, pairs, part in ((unet, weights.unet, "unet"), (text_encoder, weights.text_encoder, "text_encoder")):
            if not pairs:
                continue
            named = {_model_path(model, path): pair for path, pair in pairs.items()}
            modules = dict(model.named_modules())
            missing = sorted(set(named) - set(modules))
            if missing:
                raise LoraFileError(f"LoRA modules not in the {part}: {', '.join(missing[:5])}")
            shapes = {name: LoraShape(pair.rank, pair.alpha) for name, pair in named.items()}
            injected = stack.enter_context(lora_injected(model, list(named), shapes, dtype=model.dtype))
            for name, pair in named.items():
                layer = injected[name]
                _copy_checked(layer.lora_A[ADAPTER].weight, pair.down, f"{part} {name} lora_down")
                _copy_checked(layer.lora_B[ADAPTER].weight, pair.up, f"{part} {name} lora_up")
                layer.requires_grad_(False)
            layers.update({f"{part}.{name}": layer for name, layer in injected.items()})
        set_strength(layers, strength)
        yield layers


def _copy_checked(target: torch.Tensor, value: torch.Tensor, what: str) -> None:
    if tuple(target.shape) != tuple(value.shape):
        raise LoraFileError(f"{what}: shape {tuple(value.shape)} does not fit the model's {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(value.to(device=target.device, dtype=target.dtype))


# --- the kohya format ----------------------------------------------------------------------------------------


def kohya_name(prefix: str, path: str) -> str:
    """kohya sd-scripts' module name: prefix + "." + module path, every "." then replaced by "_"."""
    return f"{prefix}.{path}".replace(".", "_")


def kohya_state_dict(weights: LoraWeights) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for prefix, pairs in ((KOHYA_TEXT_ENCODER_PREFIX, weights.text_encoder), (KOHYA_UNET_PREFIX, weights.unet)):
        for path, pair in sorted(pairs.items()):
            name = kohya_name(prefix, path)
            state[f"{name}.lora_down.weight"] = pair.down.contiguous()
            state[f"{name}.lora_up.weight"] = pair.up.contiguous()
            state[f"{name}.alpha"] = torch.tensor(float(pair.alpha), dtype=torch.float32)
    return state


def save_kohya(path: str | os.PathLike[str], weights: LoraWeights, metadata: Mapping[str, str]) -> Path:
    """The webui/ComfyUI/kohya file, written atomically; metadata values must be strings (safetensors')."""
    bad = [key for key, value in metadata.items() if not isinstance(value, str)]
    if bad:
        raise TypeError(f"safetensors metadata must be strings: {', '.join(bad)}")
    with atomic_path(path) as tmp:
        save_file(kohya_state_dict(weights), tmp, metadata=dict(metadata))
    return Path(path)


def _module_names(model: torch.nn.Module | None, prefix: str, canonical) -> dict[str, str]:
    """kohya name -> canonical module path, for every module of `model` (so underscores inside names such
    as `down_blocks` or `to_out` are resolved against the real model, as kohya's own loader does)."""
    if model is None:
        return {}
    return {kohya_name(prefix, canonical(name)): canonical(name) for name, _ in model.named_modules() if name}


def read_kohya(
    path: str | os.PathLike[str], unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None
) -> tuple[LoraWeights, dict[str, str]]:
    """A kohya LoRA file as module paths of these models, and its metadata. A file without `.alpha` keys
    (old kohya) gets alpha = rank, as kohya and the webui assume."""
    path = Path(path)
    try:
        state = load_file(path)
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (OSError, SafetensorError, ValueError) as error:
        raise LoraFileError(f"{path}: not a readable safetensors file ({error})") from error
    names = {
        KOHYA_UNET_PREFIX: _module_names(unet, KOHYA_UNET_PREFIX, str),
        KOHYA_TEXT_ENCODER_PREFIX: _module_names(text_encoder, KOHYA_TEXT_ENCODER_PREFIX, canonical_text_encoder_path),
    }
    weights = LoraWeights()
    downs = sorted(key for key in state if key.endswith(".lora_down.weight"))
    if not downs:
        raise LoraFileError(f"{path}: no lora_down weights; not a kohya LoRA file")
    used = set()
    for key in downs:
        name = key[: -len(".lora_down.weight")]
        prefix = KOHYA_UNET_PREFIX if name.startswith(KOHYA_UNET_PREFIX + "_") else KOHYA_TEXT_ENCODER_PREFIX
        if not name.startswith(prefix + "_"):
            raise LoraFileError(f"{path}: {key}: neither {KOHYA_UNET_PREFIX}_ nor {KOHYA_TEXT_ENCODER_PREFIX}_")
        module = names[prefix].get(name)
        if module is None:
            raise LoraFileError(f"{path}: {name} names no module of this model's {'UNet' if prefix == KOHYA_UNET_PREFIX else 'text encoder'}")
        up_key, alpha_key = f"{name}.lora_up.weight", f"{name}.alpha"
        if up_key not in state:
            raise LoraFileError(f"{path}: {key} has no {up_key}")
        down, up = state[key].float(), state[up_key].float()
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraFileError(
                f"{path}: {name}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} are not a linear pair"
            )
        alpha = float(state[alpha_key]) if alpha_key in state else float(down.shape[0])
        target = weights.unet if prefix == KOHYA_UNET_PREFIX else weights.text_encoder
        target[module] = LoraPair(down, up, alpha)
        used |= {key, up_key, alpha_key}
    extra = sorted(set(state) - used)
    if extra:
        raise LoraFileError(f"{path}: unsupported keys (not plain linear LoRA): {', '.join(extra[:5])}")
    return weights, dict(metadata)


# --- the diffusers format -----------------------------------------------------------------------------------


def _peft_state(pairs: Mapping[str, LoraPair]) -> dict[str, torch.Tensor]:
    state = {}
    for path, pair in sorted(pairs.items()):
        state[f"{path}.lora_A.weight"] = pair.down.contiguous()
        state[f"{path}.lora_B.weight"] = pair.up.contiguous()
    return state


def _adapter_metadata(pairs: Mapping[str, LoraPair], targets: Sequence[str]) -> dict | None:
    """The LoraConfig diffusers stores beside the weights, so a loader knows alpha (it is not in the keys)."""
    if not pairs:
        return None
    first = next(iter(pairs.values()))
    ranks = {path: pair.rank for path, pair in pairs.items() if pair.rank != first.rank}
    alphas = {path: pair.alpha for path, pair in pairs.items() if pair.alpha != first.alpha}
    config = LoraConfig(
        r=first.rank, lora_alpha=first.alpha, target_modules=list(targets), rank_pattern=ranks, alpha_pattern=alphas
    )
    return config.to_dict()


def save_diffusers(path: str | os.PathLike[str], weights: LoraWeights) -> Path:
    """`pytorch_lora_weights.safetensors` as diffusers' LoRA training scripts write it:
    `convert_state_dict_to_diffusers` of the peft state dict, through `StableDiffusionPipeline.save_lora_weights`
    with the adapter configs (rank, alpha) as metadata. Written in a temporary folder, then renamed into place."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    unet_state = convert_state_dict_to_diffusers(_peft_state(weights.unet)) if weights.unet else None
    te_state = convert_state_dict_to_diffusers(_peft_state(weights.text_encoder)) if weights.text_encoder else None
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".lora-") as folder:
        StableDiffusionPipeline.save_lora_weights(
            folder,
            unet_lora_layers=unet_state,
            text_encoder_lora_layers=te_state,
            weight_name=path.name,
            unet_lora_adapter_metadata=_adapter_metadata(weights.unet, UNET_TARGETS),
            text_encoder_lora_adapter_metadata=_adapter_metadata(weights.text_encoder, TEXT_ENCODER_TARGETS),
        )
        os.replace(Path(folder) / path.name, path)
    return path


# --- kohya metadata -----------------------------------------------------------------------------------------


def base_model_version(unet: torch.nn.Module) -> str:
    """kohya's ss_base_model_version: SD 2.x has a 1024-wide cross attention, SD 1.x (and tiny-sd) not."""
    return "sd_v2" if int(unet.config.cross_attention_dim) == 1024 else "sd_v1"


def tag_frequency(captions: Sequence[str], folder: str) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: {image folder: {tag: images carrying it}}, tags as the captions spell them."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in dict.fromkeys(tag.strip() for tag in caption.split(",") if tag.strip()):
            counts[tag] = counts.get(tag, 0) + 1
    return {folder: dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))}


@dataclass(frozen=True)
class KohyaRunInfo:
    """What a kohya file's `ss_*` metadata tells the webui's and kohya's LoRA browsers about the run."""

    output_name: str
    shape: LoraShape
    base_model_version: str
    base_model_name: str
    base_model_hash: str
    started_at: float  # unix time
    steps: int
    max_steps: int
    learning_rate: str  # the schedule as given
    unet_lr: float
    text_encoder_lr: float
    resolution: int
    num_train_images: int
    batch_size: int
    seed: int
    clip_skip: int
    tag_frequency: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def metadata(self) -> dict[str, str]:
        values = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": self.shape.rank,
            "ss_network_alpha": _number(self.shape.alpha),
            "ss_network_dropout": _number(self.shape.dropout),
            "ss_base_model_version": self.base_model_version,
            "ss_v2": self.base_model_version == "sd_v2",
            "ss_sd_model_name": self.base_model_name,
            "ss_sd_model_hash": self.base_model_hash,
            "ss_output_name": self.output_name,
            "ss_training_started_at": self.started_at,
            "ss_steps": self.steps,
            "ss_max_train_steps": self.max_steps,
            "ss_learning_rate": self.learning_rate,
            "ss_unet_lr": _number(self.unet_lr),
            "ss_text_encoder_lr": _number(self.text_encoder_lr),
            "ss_network_train_unet_only": self.text_encoder_lr == 0,
            "ss_resolution": f"({self.resolution}, {self.resolution})",
            "ss_num_train_images": self.num_train_images,
            "ss_batch_size_per_device": self.batch_size,
            "ss_seed": self.seed,
            "ss_clip_skip": self.clip_skip,
            "ss_tag_frequency": json.dumps(self.tag_frequency, ensure_ascii=False),
        }
        return {key: str(value) for key, value in values.items()}


def _number(value: float) -> str:
    return f"{value:g}"


# --- training through the shared loop -----------------------------------------------------------------------


@dataclass(frozen=True)
class LoraTraining:
    """What a LoRA run adds to the loop's settings.

    Rates: `unet_lr` and `text_encoder_lr` are absolute rates for the schedule's first segment (kohya's
    meaning); the loop's schedule (`learning_rate`) shapes them, so "1e-4:500, 5e-5" with text_encoder_lr 5e-5
    trains the text encoder at 5e-5, then 2.5e-5. They are passed to the loop as `lr_scale` = rate / first
    scheduled rate. `unet_lr` None: the schedule's own rates. `text_encoder_lr` 0: no text-encoder adapters.
    """

    shape: LoraShape = field(default_factory=LoraShape)
    unet_lr: float | None = None
    text_encoder_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.unet_lr is not None and not (math.isfinite(self.unet_lr) and self.unet_lr > 0):
            raise ValueError(f"unet_lr must be a positive number, got {self.unet_lr}")
        if not (math.isfinite(self.text_encoder_lr) and self.text_encoder_lr >= 0):
            raise ValueError(f"text_encoder_lr must be 0 (frozen) or positive, got {self.text_encoder_lr}")

    @property
    def trains_text_encoder(self) -> bool:
        return self.text_encoder_lr > 0


class LoraMethod(TrainingMethod):
    """LoRA adapters trained through the shared loop; the base model is back to its exact self after the run."""

    label = "LoRA"

    def __init__(
        self, base: BaseModel, settings: LoopSettings, lora: LoraTraining, *, tag_frequency: Mapping | None = None,
        num_train_images: int = 0,
    ) -> None:  # fmt: skip
        self.base, self.settings, self.lora = base, settings, lora
        self.first_rate = parse_schedule(settings.learning_rate, settings.max_steps).rate_at(1)
        # A frozen text encoder gives each prompt the same conditioning all run: encoded once, then cached.
        self.cached = None if lora.trains_text_encoder else CachedPromptEncoder(
            base.tokenizer, base.text_encoder, settings.clip_skip)  # fmt: skip
        self.unet_layers: dict[str, LoraLayer] = {}
        self.text_encoder_layers: dict[str, LoraLayer] = {}
        self.tag_frequency = dict(tag_frequency or {})
        self.num_train_images = num_train_images
        self.started_at = time.time()

    @contextlib.contextmanager
    def trained_unet(self, unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Adapters on the shared UNet (and text encoder) for the run; the base model exactly as it was after.

        peft's dropout draws from torch's global generator: the run gets its own stream of it (seeded with the
        run's seed, saved with the state, and the caller's stream put back afterwards), so dropout runs are
        reproducible and resume exactly too.
        """
        generator = torch.Generator(device="cpu").manual_seed(self.settings.seed)  # the adapters' initialisation
        devices = [self.base.device.index or 0] if self.base.device.type == "cuda" else []
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices, device_type=self.base.device.type))
            torch.manual_seed(self.settings.seed)
            shape = self.lora.shape
            self.unet_layers = stack.enter_context(lora_injected(unet, UNET_TARGETS, shape, generator=generator))
            if self.lora.trains_text_encoder:
                self.text_encoder_layers = stack.enter_context(
                    lora_injected(self.base.text_encoder, TEXT_ENCODER_TARGETS, shape, generator=generator)
                )
            try:
                yield unet
            finally:
                self.unet_layers, self.text_encoder_layers = {}, {}

    def _adapters(self, layers: Mapping[str, LoraLayer]) -> list[torch.nn.Parameter]:
        return [p for layer in layers.values() for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)]

    def parameter_groups(self) -> list[dict[str, Any]]:
        unet_rate = self.lora.unet_lr if self.lora.unet_lr is not None else self.first_rate
        groups = [{"params": self._adapters(self.unet_layers), "lr_scale": unet_rate / self.first_rate}]
        if self.text_encoder_layers:
            groups.append({"params": self._adapters(self.text_encoder_layers),
                           "lr_scale": self.lora.text_encoder_lr / self.first_rate})  # fmt: skip
        return groups

    def encode(self, prompts: list[str]) -> torch.Tensor:
        if self.cached is not None:
            return self.cached(prompts)
        tokenizer = self.base.tokenizer
        input_ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids  # fmt: skip
        return encode_input_ids(self.base.text_encoder, input_ids, self.settings.clip_skip)

    def train_modules(self) -> list[torch.nn.Module]:
        return [*self.unet_layers.values(), *self.text_encoder_layers.values()]

    def weights(self) -> LoraWeights:
        return collect_weights(self.unet_layers, self.text_encoder_layers)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = self.weights().tensors()
        tensors["rng.cpu"] = torch.get_rng_state()  # dropout's stream (bytes, exact as float32)
        if self.base.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.base.device)
        return tensors

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.weights().tensors().values())

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for part, layers, rename in (("unet", self.unet_layers, str),
                                     ("text_encoder", self.text_encoder_layers, canonical_text_encoder_path)):  # fmt: skip
            for name, layer in layers.items():
                key = f"{part}.{rename(name)}"
                _copy_checked(layer.lora_A[ADAPTER].weight, tensors[f"{key}.down"], f"saved state {key}")
                _copy_checked(layer.lora_B[ADAPTER].weight, tensors[f"{key}.up"], f"saved state {key}")
        torch.set_rng_state(tensors["rng.cpu"].to(torch.uint8))
        if "rng.cuda" in tensors and self.base.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"].to(torch.uint8), self.base.device)

    def run_identity(self) -> dict[str, Any]:
        return {"lora": {"rank": self.lora.shape.rank, "alpha": self.lora.shape.alpha,
                         "dropout": self.lora.shape.dropout, "unet_lr": self.lora.unet_lr,
                         "text_encoder_lr": self.lora.text_encoder_lr, "unet_targets": list(UNET_TARGETS),
                         "text_encoder_targets": list(TEXT_ENCODER_TARGETS)}}  # fmt: skip

    def run_info(self, step: int) -> KohyaRunInfo:
        unet_rate = self.lora.unet_lr if self.lora.unet_lr is not None else self.first_rate
        return KohyaRunInfo(
            output_name=self.settings.name, shape=self.lora.shape, base_model_version=base_model_version(self.base.unet),
            base_model_name=self.base.name, base_model_hash=self.base.short_hash, started_at=self.started_at,
            steps=step, max_steps=self.settings.max_steps, learning_rate=self.settings.learning_rate,
            unet_lr=unet_rate, text_encoder_lr=self.lora.text_encoder_lr, resolution=self.base.resolution,
            num_train_images=self.num_train_images, batch_size=self.settings.batch_size, seed=self.settings.seed,
            clip_skip=self.settings.clip_skip, tag_frequency=self.tag_frequency,
        )  # fmt: skip

    def checkpoint_files(self, out_dir: Path, step: int) -> dict[str, Path]:
        return {f"checkpoint_{step}_kohya": Path(out_dir) / "checkpoints" / f"{self.settings.name}-{step}.safetensors"}

    def save_checkpoint(self, out_dir: Path, step: int, optimizer: torch.optim.Optimizer) -> dict[str, Path]:
        files = self.checkpoint_files(out_dir, step)
        for path in files.values():
            save_kohya(path, self.weights(), self.run_info(step).metadata())
        return files

    def save_final(self, out_dir: Path, step: int) -> dict[str, Path]:
        """`<name>.safetensors` (kohya) and `diffusers/pytorch_lora_weights.safetensors`."""
        weights = self.weights()
        return {
            "kohya": save_kohya(Path(out_dir) / f"{self.settings.name}.safetensors", weights, self.run_info(step).metadata()),
            "diffusers": save_diffusers(Path(out_dir) / "diffusers" / DIFFUSERS_FILE, weights),
        }


@dataclass
class LoraResult(LoopResult):
    """The loop's result (files include "kohya" and "diffusers") and the final adapters."""

    weights: LoraWeights = field(default_factory=LoraWeights)  # float32, CPU


def train_lora(
    base: BaseModel, examples: Sequence[TrainingExample], settings: LoopSettings, lora: LoraTraining,
    out_dir: Path, **loop_options: Any,
) -> LoraResult:  # fmt: skip
    """Train LoRA adapters through the shared loop (resume, NaN guard, validation, previews, loss curve) and
    write the kohya and diffusers files; `loop_options` go to `run_training` (progress, latent_cache, ...)."""
    method = LoraMethod(base, settings, lora, num_train_images=len(examples),
                        tag_frequency=tag_frequency([e.filewords for e in examples], f"1_{settings.name}"))  # fmt: skip
    final: dict[str, LoraWeights] = {}

    def save_final(step: int, optimizer: torch.optim.Optimizer) -> dict[str, Path]:
        final["weights"] = method.weights()
        return method.save_final(out_dir, step)

    result = run_training(base, examples, settings, method, out_dir, save_final=save_final, **loop_options)
    return LoraResult(**vars(result), weights=final["weights"])
