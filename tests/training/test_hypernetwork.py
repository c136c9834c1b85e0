"""The webui hypernetwork module and its `.pt`/`.optim` files: layout, initialisations, round trips, webui files, bad files."""

from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from common.hashing import file_sha256
from training.embedding_formats import save_webui_pt
from training.hypernetwork import (
    ACTIVATIONS,
    WEIGHT_INITS,
    Hypernetwork,
    HypernetworkFileError,
    HypernetworkModule,
    cross_attention_widths,
    load_hypernetwork_optim,
    parse_dropout_structure,
)

SETTING_KEYS = {
    "step", "name", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization", "sd_checkpoint",
    "sd_checkpoint_name", "activate_output", "use_dropout", "dropout_structure", "last_layer_dropout", "optional_info",
}


def _kinds(module: HypernetworkModule) -> list[type]:
    return [type(layer) for layer in module.linear]


def test_layers_and_state_dict_keys_follow_the_webui_sequence():
    module = HypernetworkModule(8, (1, 2, 1), "relu", add_layer_norm=True, dropout_structure=[0, 0.3, 0])
    assert _kinds(module) == [nn.Linear, nn.ReLU, nn.LayerNorm, nn.Dropout, nn.Linear, nn.LayerNorm]
    assert [(layer.in_features, layer.out_features) for layer in module.linear if isinstance(layer, nn.Linear)] == [
        (8, 16), (16, 8)]
    assert module.linear[3].p == 0.3
    assert list(module.state_dict()) == [f"linear.{index}.{part}" for index in (0, 2, 4, 5) for part in ("weight", "bias")]

    with_output = HypernetworkModule(8, (1, 1.5, 2, 1), "tanh", activate_output=True)
    assert _kinds(with_output) == [nn.Linear, nn.Tanh] * 3
    assert [layer.out_features for layer in with_output.linear if isinstance(layer, nn.Linear)] == [12, 16, 8]
    assert _kinds(HypernetworkModule(8, (1, 2, 1), "linear")) == [nn.Linear, nn.Linear]
    assert list(HypernetworkModule(8).state_dict()) == ["linear.0.weight", "linear.0.bias", "linear.1.weight", "linear.1.bias"]


def test_forward_is_the_residual_mlp_scaled_by_the_multiplier_in_eval_mode_only():
    torch.manual_seed(0)
    module = HypernetworkModule(6, (1, 2, 1), "relu", weight_init="XavierNormal").eval()
    x = torch.randn(2, 5, 6)
    mlp = module.linear(x)
    assert mlp.abs().max() > 0.1
    module.multiplier = 0.25
    torch.testing.assert_close(module(x), x + 0.25 * mlp, rtol=0, atol=0)
    module.multiplier = 0.0
    assert torch.equal(module(x), x)
    module.train()
    torch.testing.assert_close(module(x), x + mlp, rtol=0, atol=0)  # the webui trains at strength 1


def test_every_activation_builds_and_keeps_the_width():
    assert {"linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "gelu", "mish", "silu"} <= set(ACTIVATIONS)
    assert ACTIVATIONS["swish"] is nn.Hardswish
    x = torch.randn(2, 3, 4)
    for name in ACTIVATIONS:
        module = HypernetworkModule(4, (1, 2, 1), name, activate_output=True).eval()
        expected = 2 if name == "linear" else 4
        assert len(module.linear) == expected, name
        assert module(x).shape == x.shape, name
    with pytest.raises(ValueError, match="unsupported hypernetwork activation function 'nope'"):
        HypernetworkModule(4, (1, 2, 1), "nope")


@pytest.mark.parametrize("weight_init", WEIGHT_INITS)
@pytest.mark.parametrize("activation", ["relu", "leakyrelu"])
def test_weight_initialisations_use_the_webui_constants(weight_init: str, activation: str):
    torch.manual_seed(1)
    dim = 64
    module = HypernetworkModule(dim, (1, 2, 1), activation, weight_init, add_layer_norm=True)
    linears = [layer for layer in module.linear if isinstance(layer, nn.Linear)]
    gain = math.sqrt(2.0)  # "leaky_relu" with torch's default slope a=0, as the webui calls it, is relu's gain
    for layer in linears:
        fan_out, fan_in = layer.weight.shape
        expected_std = {
            "Normal": 0.01,
            "XavierUniform": math.sqrt(2.0 / (fan_in + fan_out)),
            "XavierNormal": math.sqrt(2.0 / (fan_in + fan_out)),
            "KaimingUniform": gain / math.sqrt(fan_in),
            "KaimingNormal": gain / math.sqrt(fan_in),
        }[weight_init]
        assert layer.weight.std().item() == pytest.approx(expected_std, rel=0.05)
        assert torch.count_nonzero(layer.bias) == 0
        if weight_init.endswith("Uniform"):
            assert layer.weight.abs().max().item() <= expected_std * math.sqrt(3) + 1e-6
    for norm in (layer for layer in module.linear if isinstance(layer, nn.LayerNorm)):
        # The webui gives LayerNorms the Normal initialisation whatever the choice, weight included.
        assert norm.weight.std().item() == pytest.approx(0.01, rel=0.2) and torch.count_nonzero(norm.bias) == 0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="weight_init must be one of"):
        HypernetworkModule(4, (1, 2, 1), "relu", "Zeros")
    with pytest.raises(ValueError, match="start and end with 1"):
        HypernetworkModule(4, (2, 1))
    with pytest.raises(ValueError, match="one entry per layer_structure entry"):
        HypernetworkModule(4, (1, 2, 1), dropout_structure=[0, 0.3])
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\)"):
        HypernetworkModule(4, (1, 2, 1), dropout_structure=[0, 1.0, 0])


def test_dropout_structure_from_the_old_switches():
    assert parse_dropout_structure([1, 2, 1], False, True) == [0, 0, 0]
    assert parse_dropout_structure([1, 2, 1], True, False) == [0, 0, 0]
    assert parse_dropout_structure([1, 2, 1], True, True) == [0, 0.3, 0]
    assert parse_dropout_structure([1, 2, 2, 1], True, False) == [0, 0.3, 0, 0]
    assert parse_dropout_structure([1, 2, 2, 1], True, True) == [0, 0.3, 0.3, 0]
    assert parse_dropout_structure(None, True, True) == [0, 0.3, 0]


def test_sizes_come_from_the_unet_cross_attention_widths():
    assert cross_attention_widths({"cross_attention_dim": 768}) == (768,)
    assert cross_attention_widths({"cross_attention_dim": [1024, 1024, 768]}) == (768, 1024)


def _trained_looking(hypernetwork: Hypernetwork, seed: int = 0) -> Hypernetwork:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in hypernetwork.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return hypernetwork


def test_save_and_load_round_trip_every_key_and_tensor_exactly(tmp_path: Path):
    hypernetwork = _trained_looking(
        Hypernetwork("mynet", (16, 24), (1, 2, 2, 1), "leakyrelu", "KaimingNormal", add_layer_norm=True,
                     use_dropout=True, activate_output=True, last_layer_dropout=True)
    )
    hypernetwork.step, hypernetwork.sd_checkpoint, hypernetwork.sd_checkpoint_name = 42, "0123456789", "tiny-sd"
    path = hypernetwork.save(tmp_path / "mynet.pt")

    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {16, 24} | SETTING_KEYS
    assert isinstance(raw[16], tuple) and all(isinstance(state, OrderedDict) for state in raw[16])
    assert raw["layer_structure"] == [1.0, 2.0, 2.0, 1.0] and raw["dropout_structure"] == [0, 0.3, 0.3, 0]
    assert raw["last_layer_dropout"] is True and raw["is_layer_norm"] is True and raw["use_dropout"] is True
    assert (raw["activation_func"], raw["weight_initialization"], raw["step"]) == ("leakyrelu", "KaimingNormal", 42)
    assert not (tmp_path / "mynet.pt.optim").exists()  # no optimizer state given

    loaded = Hypernetwork.load(path)
    original, again = hypernetwork.file_dict(), loaded.file_dict()
    assert {k: v for k, v in again.items() if isinstance(k, str)} == {k: v for k, v in original.items() if isinstance(k, str)}
    for size in (16, 24):
        for mine, theirs in zip(original[size], again[size]):
            assert list(mine) == list(theirs)
            assert all(torch.equal(mine[key], theirs[key]) for key in mine)
    assert all(not module.training and not any(p.requires_grad for p in module.parameters()) for module in loaded.modules())
    x = torch.randn(3, 16)
    assert torch.equal(loaded.layers[16][1](x), hypernetwork.layers[16][1](x))


def test_optim_companion_belongs_to_exactly_the_file_it_was_saved_with(tmp_path: Path):
    hypernetwork = _trained_looking(Hypernetwork("net", (8,)))
    optimizer = torch.optim.AdamW(hypernetwork.train().parameters(), lr=1e-5)
    sum(p.sum() for p in hypernetwork.parameters()).backward()
    optimizer.step()
    path = hypernetwork.save(tmp_path / "net.pt", optimizer_state=optimizer.state_dict(), optimizer_name="AdamW")

    raw = torch.load(tmp_path / "net.pt.optim", map_location="cpu", weights_only=True)
    assert set(raw) == {"hash", "optimizer_name", "optimizer_state_dict"}
    assert raw["hash"] == file_sha256(path)[:10]  # the webui's shorthash of the .pt
    name, state = load_hypernetwork_optim(path)
    assert name == "AdamW" and state["state"][0]["step"] == 1
    fresh = torch.optim.AdamW(Hypernetwork.load(path).train().parameters(), lr=1e-5)
    fresh.load_state_dict(state)

    hypernetwork.step = 7
    hypernetwork.save(path)  # a new .pt beside the old .optim: the state no longer belongs to it
    assert load_hypernetwork_optim(path) is None


def _webui_module_state(dim: int, layers: list[nn.Module]) -> tuple[nn.Module, OrderedDict]:
    holder = nn.Module()
    holder.linear = nn.Sequential(*layers)
    with torch.no_grad():
        for parameter in holder.parameters():
            parameter.normal_()
    return holder, holder.state_dict()


def test_reads_a_file_written_as_the_webui_writes_it(tmp_path: Path):
    torch.manual_seed(3)
    k_holder, k_state = _webui_module_state(32, [nn.Linear(32, 64), nn.ReLU(), nn.LayerNorm(64), nn.Linear(64, 32), nn.LayerNorm(32)])
    v_holder, v_state = _webui_module_state(32, [nn.Linear(32, 64), nn.ReLU(), nn.LayerNorm(64), nn.Linear(64, 32), nn.LayerNorm(32)])
    webui = {
        32: (k_state, v_state),
        "step": 1500,
        "name": "webuinet",
        "layer_structure": [1.0, 2.0, 1.0],
        "activation_func": "relu",
        "is_layer_norm": True,
        "weight_initialization": "Normal",
        "sd_checkpoint": "e1441589a6",
        "sd_checkpoint_name": "v1-5-pruned",
        "activate_output": False,
        "use_dropout": False,
        "dropout_structure": [0.0, 0.0, 0.0],
        "last_layer_dropout": False,
        "optional_info": None,
    }
    path = tmp_path / "webuinet.pt"
    torch.save(webui, path)

    loaded = Hypernetwork.load(path)
    assert (loaded.name, loaded.step, loaded.sd_checkpoint, loaded.sd_checkpoint_name) == (
        "webuinet", 1500, "e1441589a6", "v1-5-pruned")
    assert list(loaded.layers) == [32] and loaded.activation_func == "relu" and loaded.add_layer_norm
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.layers[32][0](x), x + k_holder.linear(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded.layers[32][1](x), x + v_holder.linear(x), rtol=0, atol=0)


def test_reads_an_early_file_with_two_fixed_layers_and_no_settings(tmp_path: Path):
    """The first webui/NovelAI files: {width: [state, state]} with linear1/linear2 keys and nothing else."""
    torch.manual_seed(4)
    first, second = nn.Linear(16, 32), nn.Linear(32, 16)
    state = {"linear1.weight": first.weight.data, "linear1.bias": first.bias.data,
             "linear2.weight": second.weight.data, "linear2.bias": second.bias.data}
    path = tmp_path / "anime.pt"
    torch.save({16: [state, dict(state)]}, path)

    loaded = Hypernetwork.load(path)
    assert loaded.name == "anime" and loaded.step == 0 and loaded.sd_checkpoint is None
    assert loaded.layer_structure == [1.0, 2.0, 1.0] and loaded.activation_func is None
    assert loaded.weight_init == "Normal" and loaded.activate_output is True  # the webui's defaults on load
    assert loaded.dropout_structure == [0, 0, 0] and not loaded.use_dropout
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.layers[16][0](x), x + second(first(x)), rtol=0, atol=0)


class _NotATensor:
    pass


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = _trained_looking(Hypernetwork("good", (8,))).file_dict()
    cases: dict[str, tuple[object, str]] = {
        "missing.pt": (None, "hypernetwork file not found"),
        "garbage.pt": (b"not a torch file at all", "corrupt, or holds Python objects|not a readable torch file"),
        "list.pt": ([1, 2, 3], "expected a dict"),
        "no_layers.pt": ({"name": "x", "step": 3}, r"no hypernetwork layers \(integer width keys\)"),
        "one_module.pt": ({**good, 8: (good[8][0],)}, r"width 8 should hold a \(k, v\) pair"),
        "wrong_shape.pt": ({**good, 8: (good[8][0], {k: v[:, :1] if v.ndim == 2 else v for k, v in good[8][1].items()})},
                           "width 8 does not match its settings"),
        "int_weights.pt": ({**good, 8: (good[8][0], {k: v.long() for k, v in good[8][1].items()})}, "is not a float tensor"),
        "nan.pt": ({**good, 8: (good[8][0], {k: v * float("nan") for k, v in good[8][1].items()})}, "contains NaN or inf"),
        "structure.pt": ({**good, "layer_structure": [2, 1]}, "start and end with 1"),
        "activation.pt": ({**good, "activation_func": "nope"}, "unsupported hypernetwork activation function"),
        "typed.pt": ({**good, "layer_structure": "1,2,1"}, "'layer_structure' should be a list or tuple, found str '1,2,1'"),
    }
    written = {}
    for name, (content, reason) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            torch.save(content, path)
        written[name] = (path, reason)
    pickled = tmp_path / "pickled.pt"
    pickled.write_bytes(pickle.dumps({"object": _NotATensor()}))
    written["pickled.pt"] = (pickled, "corrupt, or holds Python objects")
    embedding = save_webui_pt(tmp_path / "embedding.pt", "emb", torch.ones(2, 8), 10, None, None)
    written["embedding.pt"] = (embedding, "a textual-inversion embedding, not a hypernetwork")
    return written


def test_bad_files_give_an_error_naming_the_file_and_the_reason(tmp_path: Path):
    for name, (path, reason) in _bad_files(tmp_path).items():
        with pytest.raises(HypernetworkFileError, match=f"{name}: .*({reason})|{name}: ({reason})"):
            Hypernetwork.load(path)


def test_an_unreadable_optim_companion_is_an_error_naming_it(tmp_path: Path):
    path = Hypernetwork("net", (8,)).save(tmp_path / "net.pt")
    (tmp_path / "net.pt.optim").write_bytes(b"broken")
    with pytest.raises(HypernetworkFileError, match="net.pt.optim: "):
        load_hypernetwork_optim(path)
