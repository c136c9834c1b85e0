"""The webui's hypernetworks: small MLPs that rewrite the attention context before the k and v projections.

What a hypernetwork is (AUTOMATIC1111's `modules/hypernetworks/hypernetwork.py`, re-implemented here):
for each context width it has a pair of `HypernetworkModule`s (one for k, one for v), each computing
`x + MLP(x) * strength`. In every attention layer of the UNet whose k/v input has a width the hypernetwork
covers, `k = to_k(hyper_k(context))` and `v = to_v(hyper_v(context))`; the context is the text encoding in
cross-attention and the image tokens in self-attention (the webui's `default(context, x)`), so a file with
320/640/1280 modules (NovelAI's) also changes self-attention, exactly as in the webui. Our own hypernetworks
are created for the cross-attention widths only (`cross_attention_widths`, 768 on SD 1.x).

Files are the webui's `.pt` layout, so the webui, and anything that reads webui files, loads ours and we
load theirs (including files from before `dropout_structure` and `activate_output` existed).
"""

from __future__ import annotations

import inspect
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.init import kaiming_normal_, kaiming_uniform_, normal_, xavier_normal_, xavier_uniform_, zeros_

from common.atomic import write_bytes
from common.hashing import bytes_sha256, file_sha256
from training.torch_files import load_optim_companion, load_torch_file, save_optim_companion, torch_bytes

DEFAULT_LAYER_STRUCTURE = (1.0, 2.0, 1.0)
# The webui's default `enable_sizes`: every context width of SD 1.x (768), SD 2.x (1024) and the UNet's
# own channel widths (320, 640, 1280), which self-attention layers see.
WEBUI_ENABLE_SIZES = (320, 640, 768, 1024, 1280)
WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
# The webui's dropout probability for hidden layers when `use_dropout` is on without an explicit structure.
WEBUI_DROPOUT = 0.3


def _activation_classes() -> dict[str, type[nn.Module]]:
    """The webui's names: its seven, then every torch activation by its lower-cased class name.

    Only classes that build without arguments and keep the width are listed (the webui also lists
    Threshold, GLU and MultiheadAttention, with which a hypernetwork cannot be built at all).
    """
    names: dict[str, type[nn.Module]] = {
        "linear": nn.Identity,
        "relu": nn.ReLU,
        "leakyrelu": nn.LeakyReLU,
        "elu": nn.ELU,
        "swish": nn.Hardswish,  # sic: the webui's "swish" is Hardswish
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
    }
    unusable = {nn.Threshold, nn.GLU, nn.MultiheadAttention}
    for class_name, cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass):
        if cls.__module__ == "torch.nn.modules.activation" and cls not in unusable:
            names.setdefault(class_name.lower(), cls)
    return names


ACTIVATIONS: dict[str, type[nn.Module]] = _activation_classes()
# Keys the webui renamed when it went from two fixed layers to a layer structure.
_OLD_KEYS = {
    "linear1.weight": "linear.0.weight",
    "linear1.bias": "linear.0.bias",
    "linear2.weight": "linear.1.weight",
    "linear2.bias": "linear.1.bias",
}


class HypernetworkFileError(ValueError):
    """A hypernetwork file that cannot be read; the message names the file and the reason."""


def _check_layer_structure(layer_structure: Sequence[float]) -> list[float]:
    values = [float(value) for value in layer_structure]
    if len(values) < 2 or values[0] != 1 or values[-1] != 1:
        raise ValueError(f"layer_structure must start and end with 1 and have at least two entries, got {values}")
    if any(not math.isfinite(value) or value <= 0 for value in values):
        raise ValueError(f"layer_structure multipliers must be positive numbers, got {values}")
    return values


def _check_dropout_structure(dropout_structure: Sequence[float], layer_structure: Sequence[float]) -> list[float]:
    values = [float(value) for value in dropout_structure]
    if len(values) != len(layer_structure):
        raise ValueError(
            f"dropout_structure needs one entry per layer_structure entry ({len(layer_structure)}), got {values}"
        )
    if any(not 0 <= value < 1 for value in values):
        raise ValueError(f"dropout_structure entries must be probabilities in [0, 1), got {values}")
    return values


def parse_dropout_structure(
    layer_structure: Sequence[float] | None, use_dropout: bool, last_layer_dropout: bool
) -> list[float]:
    """The webui's dropout structure for files that only say `use_dropout`/`last_layer_dropout`.

    0.3 after every hidden layer but the last one, which gets it only with `last_layer_dropout`;
    never after the output. E.g. (1, 2, 2, 1) -> [0, 0.3, 0, 0], or [0, 0.3, 0.3, 0] with last_layer_dropout.
    """
    structure = list(layer_structure) if layer_structure is not None else list(DEFAULT_LAYER_STRUCTURE)
    if not use_dropout:
        return [0.0] * len(structure)
    hidden = [WEBUI_DROPOUT] * (len(structure) - 3)
    return [0.0, *hidden, WEBUI_DROPOUT if last_layer_dropout else 0.0, 0.0]


def _initialise(layer: nn.Linear | nn.LayerNorm, weight_init: str, activation_func: str | None) -> None:
    """The webui's initialisations. LayerNorms always get the Normal one (weight ~ N(0, 0.01), as the webui does)."""
    weight, bias = layer.weight.data, layer.bias.data
    nonlinearity = "leaky_relu" if activation_func == "leakyrelu" else "relu"
    if weight_init == "Normal" or isinstance(layer, nn.LayerNorm):
        normal_(weight, mean=0.0, std=0.01)
        zeros_(bias)
    elif weight_init == "XavierUniform":
        xavier_uniform_(weight)
        zeros_(bias)
    elif weight_init == "XavierNormal":
        xavier_normal_(weight)
        zeros_(bias)
    elif weight_init == "KaimingUniform":
        kaiming_uniform_(weight, nonlinearity=nonlinearity)
        zeros_(bias)
    elif weight_init == "KaimingNormal":
        kaiming_normal_(weight, nonlinearity=nonlinearity)
        zeros_(bias)
    else:
        raise ValueError(f"weight_init must be one of {', '.join(WEIGHT_INITS)}, got {weight_init!r}")


class HypernetworkModule(nn.Module):
    """One MLP of a hypernetwork: `x + MLP(x) * multiplier`, laid out as the webui lays it out.

    `self.linear` is one Sequential holding, per step of `layer_structure`, a Linear, then the activation
    (not after the last Linear unless `activate_output`), a LayerNorm when `add_layer_norm`, and a Dropout
    where `dropout_structure` says so; its indices are the webui's, so state_dict keys match
    (`linear.0.weight`, ...). The multiplier (the strength) applies in eval mode; training always uses 1,
    as in the webui.
    """

    def __init__(
        self,
        dim: int,
        layer_structure: Sequence[float] = DEFAULT_LAYER_STRUCTURE,
        activation_func: str | None = "linear",
        weight_init: str = "Normal",
        add_layer_norm: bool = False,
        activate_output: bool = False,
        dropout_structure: Sequence[float] | None = None,
        *,
        state_dict: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        structure = _check_layer_structure(layer_structure)
        dropouts = _check_dropout_structure(dropout_structure, structure) if dropout_structure is not None else None
        activation = None if activation_func in (None, "linear") else ACTIVATIONS.get(activation_func)
        if activation_func not in (None, "linear") and activation is None:
            raise ValueError(f"unsupported hypernetwork activation function {activation_func!r}")
        self.dim = int(dim)
        self.multiplier = 1.0
        layers: list[nn.Module] = []
        last = len(structure) - 2
        for index in range(len(structure) - 1):
            width_out = int(self.dim * structure[index + 1])
            layers.append(nn.Linear(int(self.dim * structure[index]), width_out))
            if activation is not None and (index < last or activate_output):
                layers.append(activation())
            if add_layer_norm:
                layers.append(nn.LayerNorm(width_out))
            if dropouts is not None and dropouts[index + 1] > 0:
                layers.append(nn.Dropout(p=dropouts[index + 1]))
        self.linear = nn.Sequential(*layers)
        if state_dict is not None:
            renamed = {_OLD_KEYS.get(key, key): value for key, value in state_dict.items()}
            self.load_state_dict(renamed, strict=True)
        else:
            for layer in self.linear:
                if isinstance(layer, (nn.Linear, nn.LayerNorm)):
                    _initialise(layer, weight_init, activation_func)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x) * (1.0 if self.training else self.multiplier)


def _portable_state_dict(module: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The module's state_dict (with its version metadata, as the webui pickles it) as CPU copies."""
    state = module.state_dict()
    for key, value in state.items():
        state[key] = value.detach().to("cpu").clone()
    return state


class Hypernetwork:
    """A webui hypernetwork: a (k, v) pair of `HypernetworkModule`s per context width, plus what its file says."""

    def __init__(
        self,
        name: str,
        enable_sizes: Iterable[int] = WEBUI_ENABLE_SIZES,
        layer_structure: Sequence[float] = DEFAULT_LAYER_STRUCTURE,
        activation_func: str | None = "linear",
        weight_init: str = "Normal",
        add_layer_norm: bool = False,
        use_dropout: bool = False,
        activate_output: bool = False,
        last_layer_dropout: bool = True,
        dropout_structure: Sequence[float] | None = None,
    ) -> None:
        self.name = name
        self.layer_structure = _check_layer_structure(layer_structure)
        self.activation_func = activation_func
        self.weight_init = weight_init
        self.add_layer_norm = bool(add_layer_norm)
        self.use_dropout = bool(use_dropout)
        self.activate_output = bool(activate_output)
        self.last_layer_dropout = bool(last_layer_dropout)
        if dropout_structure is None:
            dropout_structure = parse_dropout_structure(self.layer_structure, self.use_dropout, self.last_layer_dropout)
        self.dropout_structure = _check_dropout_structure(dropout_structure, self.layer_structure)
        self.step = 0
        self.sd_checkpoint: str | None = None
        self.sd_checkpoint_name: str | None = None
        self.optional_info: str | None = None
        self.layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]] = {
            int(size): (self._module(int(size)), self._module(int(size))) for size in enable_sizes
        }
        self.frozen()

    def _module(self, size: int, state_dict: Mapping[str, torch.Tensor] | None = None) -> HypernetworkModule:
        return HypernetworkModule(
            size,
            self.layer_structure,
            self.activation_func,
            self.weight_init,
            self.add_layer_norm,
            self.activate_output,
            self.dropout_structure,
            state_dict=state_dict,
        )

    def modules(self) -> list[HypernetworkModule]:
        return [module for size in sorted(self.layers) for module in self.layers[size]]

    def parameters(self) -> list[nn.Parameter]:
        """What an optimizer trains: every parameter of every module (Linear, LayerNorm, PReLU ...)."""
        return [parameter for module in self.modules() for parameter in module.parameters()]

    def train(self, mode: bool = True) -> Hypernetwork:
        """Training mode (dropout on, multiplier 1) with gradients, or eval mode without, as the webui switches."""
        for module in self.modules():
            module.train(mode)
            module.requires_grad_(mode)
        return self

    def frozen(self) -> Hypernetwork:
        """Eval mode (multiplier applies, dropout off) without gradients: how it is applied at generation time."""
        return self.train(False)

    def to(self, device: torch.device | str) -> Hypernetwork:
        for module in self.modules():
            module.to(device)
        return self

    def set_multiplier(self, multiplier: float) -> Hypernetwork:
        for module in self.modules():
            module.multiplier = float(multiplier)
        return self

    def file_dict(self) -> dict[Any, Any]:
        """The dict the webui pickles: {width: (k state_dict, v state_dict)} and the settings beside them."""
        data: dict[Any, Any] = {
            size: (_portable_state_dict(self.layers[size][0]), _portable_state_dict(self.layers[size][1]))
            for size in sorted(self.layers)
        }
        data.update(
            step=int(self.step),
            name=self.name,
            layer_structure=list(self.layer_structure),
            activation_func=self.activation_func,
            is_layer_norm=self.add_layer_norm,
            weight_initialization=self.weight_init,
            sd_checkpoint=self.sd_checkpoint,
            sd_checkpoint_name=self.sd_checkpoint_name,
            activate_output=self.activate_output,
            use_dropout=self.use_dropout,
            dropout_structure=list(self.dropout_structure),
            last_layer_dropout=self.dropout_structure[-2] != 0,
            optional_info=self.optional_info,
        )
        return data

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        optimizer_state: dict | None = None,
        optimizer_name: str = "AdamW",
    ) -> Path:
        """Write `path` (and `path.optim` when an optimizer state is given), each atomically.

        The `.optim` carries the webui's hash of the `.pt` (the first 10 hex digits of its sha256), so it is
        only resumed from next to the exact file it was saved with.
        """
        data = torch_bytes(self.file_dict())
        written = write_bytes(path, data)
        if optimizer_state:
            save_optim_companion(path, bytes_sha256(data)[:10], optimizer_name, optimizer_state)
        return written

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Hypernetwork:
        """Read a webui hypernetwork `.pt`; settings missing from older files get the webui's defaults."""
        path = Path(path)
        if not path.is_file():
            raise HypernetworkFileError(f"{path}: hypernetwork file not found")
        data = load_torch_file(path, HypernetworkFileError)
        return _from_file_dict(path, data)


def _setting(path: Path, data: Mapping, key: str, default: Any, kinds: type | tuple[type, ...]) -> Any:
    value = data.get(key, default)
    if value is not None and not isinstance(value, kinds):
        expected = " or ".join(kind.__name__ for kind in (kinds if isinstance(kinds, tuple) else (kinds,)))
        raise HypernetworkFileError(f"{path}: '{key}' should be a {expected}, found {type(value).__name__} {value!r}")
    return value


def _checked_state_dict(path: Path, size: int, which: str, value: object) -> Mapping[str, torch.Tensor]:
    if not isinstance(value, Mapping) or not value:
        raise HypernetworkFileError(f"{path}: the {which} weights for width {size} are not a state dict")
    for key, tensor in value.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise HypernetworkFileError(f"{path}: {which} weight {key!r} for width {size} is not a float tensor")
        if not torch.isfinite(tensor).all():
            raise HypernetworkFileError(f"{path}: {which} weight {key!r} for width {size} contains NaN or inf")
    return value


def _from_file_dict(path: Path, data: object) -> Hypernetwork:
    if not isinstance(data, dict):
        raise HypernetworkFileError(f"{path}: expected a dict (webui hypernetwork), found {type(data).__name__}")
    if "string_to_param" in data:
        raise HypernetworkFileError(f"{path}: a textual-inversion embedding, not a hypernetwork")
    sizes = sorted(key for key in data if isinstance(key, int) and not isinstance(key, bool))
    if not sizes:
        raise HypernetworkFileError(f"{path}: no hypernetwork layers (integer width keys) in the file")
    layer_structure = _setting(path, data, "layer_structure", None, (list, tuple)) or list(DEFAULT_LAYER_STRUCTURE)
    dropout_structure = _setting(path, data, "dropout_structure", None, (list, tuple))
    # A file that lists dropouts uses them, whatever `use_dropout` says (the webui's rule).
    use_dropout = bool(dropout_structure and any(dropout_structure)) or bool(
        _setting(path, data, "use_dropout", False, (bool, int))
    )
    settings = dict(
        layer_structure=layer_structure,
        activation_func=_setting(path, data, "activation_func", None, str),
        weight_init=_setting(path, data, "weight_initialization", "Normal", str) or "Normal",
        add_layer_norm=bool(_setting(path, data, "is_layer_norm", False, (bool, int))),
        use_dropout=use_dropout,
        activate_output=bool(_setting(path, data, "activate_output", True, (bool, int))),  # the webui's default on load
        last_layer_dropout=bool(_setting(path, data, "last_layer_dropout", False, (bool, int))),
        dropout_structure=dropout_structure,
    )
    try:
        hypernetwork = Hypernetwork(str(data.get("name") or path.stem), enable_sizes=(), **settings)
    except ValueError as error:
        raise HypernetworkFileError(f"{path}: {error}") from error
    layers = {}
    for size in sizes:
        pair = data[size]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise HypernetworkFileError(f"{path}: width {size} should hold a (k, v) pair of state dicts")
        try:
            layers[size] = tuple(
                hypernetwork._module(size, dict(_checked_state_dict(path, size, which, state)))
                for which, state in zip(("k", "v"), pair)
            )
        except (RuntimeError, ValueError) as error:
            if isinstance(error, HypernetworkFileError):
                raise
            raise HypernetworkFileError(f"{path}: width {size} does not match its settings ({error})") from error
    hypernetwork.layers = layers
    hypernetwork.frozen()
    step = data.get("step", 0)
    hypernetwork.step = int(step) if isinstance(step, int) else 0
    hypernetwork.sd_checkpoint = _setting(path, data, "sd_checkpoint", None, str)
    hypernetwork.sd_checkpoint_name = _setting(path, data, "sd_checkpoint_name", None, str)
    hypernetwork.optional_info = _setting(path, data, "optional_info", None, str)
    return hypernetwork


def load_hypernetwork_optim(pt_path: str | os.PathLike[str]) -> tuple[str, dict] | None:
    """(optimizer name, state) saved beside `pt_path`, when it was saved with exactly this file (the webui's rule)."""
    return load_optim_companion(pt_path, file_sha256(pt_path)[:10], HypernetworkFileError)


def cross_attention_widths(unet_config: Mapping[str, Any]) -> tuple[int, ...]:
    """The context widths a UNet's cross-attention sees (768 for SD 1.x, 1024 for SD 2.x): the sizes to create."""
    value = unet_config["cross_attention_dim"]
    widths = value if isinstance(value, (list, tuple)) else [value]
    return tuple(sorted({int(width) for width in widths}))
