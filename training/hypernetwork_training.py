"""Hypernetwork training, the webui's: the k/v MLPs learn while the UNet, text encoder and VAE stay frozen.

The loop is the shared one (training/training_loop.py). What is the webui's here: the modules start from the
chosen initialisation, train at multiplier 1 with dropout active, the prompt is plain text (the webui's
hypernetwork templates have no [name]; with one, [name] is just the hypernetwork's name as words), and each
checkpoint is a webui `.pt` with its `.optim`, so the webui can load or continue any of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.hashing import bytes_sha256
from training.base_model import BaseModel
from training.hypernetwork import (
    ACTIVATIONS,
    DEFAULT_LAYER_STRUCTURE,
    WEIGHT_INITS,
    Hypernetwork,
    cross_attention_widths,
    parse_dropout_structure,
)
from training.hypernetwork_attention import apply_hypernetwork
from training.optimizers import WEBUI_OPTIMIZER_NAMES
from training.prompt_encoding import CachedPromptEncoder
from training.torch_files import torch_bytes
from training.training_loop import LoopResult, LoopSettings, TrainingExample, TrainingMethod, run_training


@dataclass(frozen=True)
class HypernetworkOptions:
    """The webui's "Create hypernetwork" options (its names and defaults)."""

    layer_structure: tuple[float, ...] = DEFAULT_LAYER_STRUCTURE
    activation_func: str = "linear"
    weight_initialization: str = "Normal"
    add_layer_norm: bool = False
    use_dropout: bool = False
    dropout_structure: tuple[float, ...] = ()  # empty: the webui's structure from use_dropout/last_layer_dropout
    activate_output: bool = False
    last_layer_dropout: bool = True
    sizes: tuple[int, ...] = ()  # context widths to create; empty: the UNet's cross-attention widths

    def __post_init__(self) -> None:
        if self.activation_func not in ACTIVATIONS:
            raise ValueError(f"activation_func must be one of {', '.join(ACTIVATIONS)}, got {self.activation_func!r}")
        if self.weight_initialization not in WEIGHT_INITS:
            raise ValueError(
                f"weight_initialization must be one of {', '.join(WEIGHT_INITS)}, got {self.weight_initialization!r}"
            )

    def build(self, name: str, sizes: tuple[int, ...], seed: int) -> Hypernetwork:
        """A fresh hypernetwork whose initial weights depend only on `seed` (the global RNG is left untouched)."""
        dropout = self.dropout_structure or parse_dropout_structure(
            self.layer_structure, self.use_dropout, self.last_layer_dropout
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return Hypernetwork(
                name, enable_sizes=sizes, layer_structure=self.layer_structure, activation_func=self.activation_func,
                weight_init=self.weight_initialization, add_layer_norm=self.add_layer_norm,
                use_dropout=self.use_dropout, activate_output=self.activate_output,
                last_layer_dropout=self.last_layer_dropout, dropout_structure=dropout,
            )  # fmt: skip


class HypernetworkMethod(TrainingMethod):
    """A webui hypernetwork trained through the frozen UNet; the prompts' conditioning is cached."""

    label = "hypernetwork"
    requires_name = False

    def __init__(self, base: BaseModel, settings: LoopSettings, options: HypernetworkOptions) -> None:
        self.base, self.settings, self.options = base, settings, options
        sizes = options.sizes or cross_attention_widths(base.unet.config)
        self.hypernetwork = options.build(settings.name, tuple(sizes), settings.seed).to(base.device).train(True)
        self.hypernetwork.sd_checkpoint, self.hypernetwork.sd_checkpoint_name = base.short_hash, base.name
        self.start = bytes_sha256(torch_bytes(self.state_tensors()))
        self.encode = CachedPromptEncoder(base.tokenizer, base.text_encoder, settings.clip_skip)

    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"params": self.hypernetwork.parameters()}]

    @contextlib.contextmanager
    def attention_hooks(self, unet: torch.nn.Module) -> Iterator[None]:
        with apply_hypernetwork(unet, self.hypernetwork, strength=1.0):
            yield

    def train_modules(self) -> list[torch.nn.Module]:
        return list(self.hypernetwork.modules())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            f"{size}.{which}.{key}": tensor.detach().to("cpu", torch.float32).clone()
            for size, pair in sorted(self.hypernetwork.layers.items())
            for which, module in zip("kv", pair)
            for key, tensor in module.state_dict().items()
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for size, pair in self.hypernetwork.layers.items():
            for which, module in zip("kv", pair):
                prefix = f"{size}.{which}."
                state = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
                module.load_state_dict(state)

    def run_identity(self) -> dict[str, Any]:
        return {"hypernetwork": asdict(self.options), "start": self.start}

    def checkpoint_files(self, out_dir: Path, step: int) -> dict[str, Path]:
        return {f"checkpoint_{step}_webui_pt": out_dir / "checkpoints" / f"{self.settings.name}-{step}.pt"}

    def save_checkpoint(self, out_dir: Path, step: int, optimizer: torch.optim.Optimizer) -> dict[str, Path]:
        files = self.checkpoint_files(out_dir, step)
        self._save(files[f"checkpoint_{step}_webui_pt"], step, optimizer)
        return files

    def save_final(self, out_dir: Path, step: int, optimizer: torch.optim.Optimizer) -> dict[str, Path]:
        path = self._save(out_dir / f"{self.settings.name}.pt", step, optimizer)
        return {"webui_pt": path, "webui_optim": Path(f"{path}.optim")}

    def _save(self, path: Path, step: int, optimizer: torch.optim.Optimizer) -> Path:
        self.hypernetwork.step = step
        return self.hypernetwork.save(path, optimizer_state=optimizer.state_dict(),
                                      optimizer_name=WEBUI_OPTIMIZER_NAMES[self.settings.optimizer])  # fmt: skip


@dataclass
class HypernetworkResult(LoopResult):
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # the final state, CPU float32

    @property
    def finite(self) -> bool:
        return all(bool(torch.isfinite(tensor).all()) for tensor in self.weights.values())


def train_hypernetwork(
    base: BaseModel,
    examples: Sequence[TrainingExample],
    settings: LoopSettings,
    options: HypernetworkOptions,
    out_dir: Path,
    progress: Callable[[int, float], None] | None = None,
    latent_cache: Path | None = None,
    log: Callable[[str], None] | None = None,
    validation_examples: Sequence[TrainingExample] = (),
) -> HypernetworkResult:
    """Train, writing `<name>.pt` + `.optim` (and `checkpoints/<name>-<step>.pt`), loss.csv and loss.png."""
    out_dir = Path(out_dir)
    method = HypernetworkMethod(base, settings, options)
    if log is not None:
        log(f"hypernetwork {settings.name!r}: widths {sorted(method.hypernetwork.layers)}, "
            f"{sum(p.numel() for p in method.hypernetwork.parameters())} parameters")  # fmt: skip
    loop = run_training(
        base, examples, settings, method, out_dir, progress=progress, latent_cache=latent_cache, log=log,
        validation_examples=validation_examples,
        save_final=lambda step, optimizer: method.save_final(out_dir, step, optimizer),
    )  # fmt: skip
    return HypernetworkResult(**vars(loop), weights=method.state_tensors())
