"""AdamW with weight decay touches only the learned vectors; 8-bit AdamW is wired to bitsandbytes or fails clearly."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from training.base_model import BaseModel
from training.optimizers import OptimizerUnavailableError, make_optimizer
from training.textual_inversion import TextualInversionSettings, train_textual_inversion


def run_settings(**overrides) -> TextualInversionSettings:
    values = dict(name="mycat", vectors_per_token=2, learning_rate="0.02", max_steps=3, batch_size=2)
    return TextualInversionSettings(**{**values, **overrides})


def _frozen_weights(base: BaseModel) -> dict[str, torch.Tensor]:
    modules = {"text_encoder": base.text_encoder, "unet": base.unet, "vae": base.vae}
    return {f"{name}.{key}": value.clone() for name, module in modules.items() for key, value in module.state_dict().items()}


def test_weight_decay_changes_the_vectors_and_nothing_else(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    before = _frozen_weights(tiny_base)
    plain = train_textual_inversion(tiny_base, subject_examples[:4], run_settings(), tmp_path / "plain")
    decayed = train_textual_inversion(tiny_base, subject_examples[:4], run_settings(weight_decay=0.5), tmp_path / "decay")
    assert not torch.equal(plain.vectors, decayed.vectors)
    # AdamW's decay multiplies by (1 - lr * wd) each step: the decayed vectors are pulled towards zero.
    assert decayed.vectors.norm() < plain.vectors.norm()
    after = _frozen_weights(tiny_base)
    assert before.keys() == after.keys()
    drifted = [key for key in before if not torch.equal(before[key], after[key])]
    assert drifted == []  # the token table (and every other frozen weight) never moved


class _RecordingAdamW8bit(torch.optim.AdamW):
    """Stands in for bitsandbytes.optim.AdamW8bit: the update is AdamW's, the construction is recorded."""

    created: list[dict] = []

    def __init__(self, params, lr: float, weight_decay: float = 0.0) -> None:
        params = list(params)
        tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]  # tensors or groups
        type(self).created.append({"shapes": [tuple(t.shape) for t in tensors], "lr": lr, "weight_decay": weight_decay})
        super().__init__(params, lr=lr, weight_decay=weight_decay)


def _fake_bitsandbytes(optimizer_class: type) -> types.ModuleType:
    module = types.ModuleType("bitsandbytes")
    module.optim = types.SimpleNamespace(AdamW8bit=optimizer_class)
    return module


def test_adamw8bit_uses_bitsandbytes(tiny_base: BaseModel, subject_examples, tmp_path: Path, monkeypatch) -> None:
    _RecordingAdamW8bit.created = []
    monkeypatch.setitem(sys.modules, "bitsandbytes", _fake_bitsandbytes(_RecordingAdamW8bit))
    eight = train_textual_inversion(
        tiny_base, subject_examples[:4], run_settings(optimizer="adamw8bit", weight_decay=0.1), tmp_path / "eight"
    )
    probe, real = _RecordingAdamW8bit.created
    assert probe["shapes"] == [(8,)]  # the usability probe, before training
    assert real == {"shapes": [(2, 32)], "lr": 0.02, "weight_decay": 0.1}
    optim = torch.load(eight.files["webui_optim"], weights_only=True)
    assert optim["optimizer_name"] == "AdamW8bit" and optim["optimizer_state_dict"]["state"][0]["step"] == 3
    reference = train_textual_inversion(tiny_base, subject_examples[:4], run_settings(weight_decay=0.1), tmp_path / "ref")
    assert torch.equal(eight.vectors, reference.vectors)  # same update rule as the stand-in: the wiring is all that differs


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(monkeypatch) -> None:
    vectors = [torch.nn.Parameter(torch.zeros(1, 4))]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(OptimizerUnavailableError, match=r"adamw8bit needs the bitsandbytes package.*optimizer: adamw"):
        make_optimizer("adamw8bit", vectors, 0.01, 0.0)

    class Broken(torch.optim.AdamW):
        def step(self, closure=None):
            raise RuntimeError("CUDA Setup failed")

    monkeypatch.setitem(sys.modules, "bitsandbytes", _fake_bitsandbytes(Broken))
    with pytest.raises(OptimizerUnavailableError, match=r"cannot update a tensor on cpu \(RuntimeError: CUDA Setup failed\)"):
        make_optimizer("adamw8bit", vectors, 0.01, 0.0)
    with pytest.raises(ValueError, match="optimizer must be one of adamw, adamw8bit"):
        run_settings(optimizer="sgd")
    with pytest.raises(ValueError, match="weight_decay must be at least 0"):
        run_settings(weight_decay=-0.1)
