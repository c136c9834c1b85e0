"""Acceleration options on CPU: each is really switched on during the run, restored after, and trains the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils.checkpoint
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from training.base_model import BaseModel
from training.textual_inversion import TextualInversionSettings, train_textual_inversion


def run_settings(**overrides) -> TextualInversionSettings:
    values = dict(name="mycat", vectors_per_token=2, learning_rate="0.02", max_steps=3, batch_size=2)
    return TextualInversionSettings(**{**values, **overrides})


def _processor_types(base: BaseModel) -> set[type]:
    return {type(processor) for processor in base.unet.attn_processors.values()}


@pytest.fixture(scope="module")
def reference(tiny_base: BaseModel, subject_examples, tmp_path_factory: pytest.TempPathFactory):
    return train_textual_inversion(tiny_base, subject_examples[:4], run_settings(), tmp_path_factory.mktemp("reference"))


def test_classic_attention_is_used_and_agrees_with_sdpa(tiny_base: BaseModel, subject_examples, tmp_path: Path, reference) -> None:
    before = _processor_types(tiny_base)
    seen: list[set[type]] = []
    result = train_textual_inversion(
        tiny_base, subject_examples[:4], run_settings(attention="classic"), tmp_path,
        progress=lambda step, loss: seen.append(_processor_types(tiny_base)),
    )  # fmt: skip
    assert seen == [{AttnProcessor}] * 3
    assert _processor_types(tiny_base) == before
    np.testing.assert_allclose(result.losses, reference.losses, rtol=1e-4)
    torch.testing.assert_close(result.vectors, reference.vectors, rtol=1e-4, atol=1e-5)
    seen.clear()
    train_textual_inversion(
        tiny_base, subject_examples[:4], run_settings(max_steps=1), tmp_path / "sdpa",
        progress=lambda step, loss: seen.append(_processor_types(tiny_base)),
    )  # fmt: skip
    assert seen == [{AttnProcessor2_0}]


def test_gradient_checkpointing_recomputes_and_trains_the_same(
    tiny_base: BaseModel, subject_examples, tmp_path: Path, reference, monkeypatch
) -> None:
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    during: list[bool] = []
    result = train_textual_inversion(
        tiny_base, subject_examples[:4], run_settings(gradient_checkpointing=True), tmp_path,
        progress=lambda step, loss: during.append(tiny_base.unet.is_gradient_checkpointing),
    )  # fmt: skip
    assert during == [True] * 3 and not tiny_base.unet.is_gradient_checkpointing
    assert calls  # the UNet's blocks went through torch.utils.checkpoint
    np.testing.assert_allclose(result.losses, reference.losses, rtol=1e-5)
    torch.testing.assert_close(result.vectors, reference.vectors, rtol=1e-5, atol=1e-6)


def test_compile_wraps_the_unet_the_training_calls(
    tiny_base: BaseModel, subject_examples, tmp_path: Path, reference, monkeypatch
) -> None:
    compiled: list[torch.nn.Module] = []
    forwards: list[int] = []

    class FakeCompiled(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            forwards.append(1)
            return self.module(*args, **kwargs)

    def fake_compile(module: torch.nn.Module, **options) -> torch.nn.Module:
        compiled.append(module)
        return FakeCompiled(module)

    monkeypatch.setattr(torch, "compile", fake_compile)
    result = train_textual_inversion(tiny_base, subject_examples[:4], run_settings(compile=True), tmp_path)
    assert compiled == [tiny_base.unet] and len(forwards) == 3
    assert torch.equal(result.vectors, reference.vectors)


def test_bf16_mixed_precision_runs_on_cpu(tiny_base: BaseModel, subject_examples, tmp_path: Path, reference) -> None:
    autocast_states: list[tuple[bool, torch.dtype]] = []

    def record(module, args, kwargs) -> None:
        autocast_states.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

    handle = tiny_base.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = train_textual_inversion(tiny_base, subject_examples[:4], run_settings(mixed_precision="bf16"), tmp_path)
    finally:
        handle.remove()
    assert autocast_states == [(True, torch.bfloat16)] * 3
    assert all(np.isfinite(result.losses)) and result.vectors.dtype == torch.float32
    assert not torch.equal(result.vectors, reference.vectors)  # computed in bf16, so not the float32 bytes ...
    np.testing.assert_allclose(result.losses, reference.losses, rtol=0.1)  # ... but the same training


def test_fp16_needs_cuda_and_bad_choices_are_named(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mixed_precision fp16 needs a CUDA device"):
        train_textual_inversion(tiny_base, subject_examples[:2], run_settings(mixed_precision="fp16", batch_size=1), tmp_path)
    with pytest.raises(ValueError, match="attention must be one of sdpa, classic"):
        run_settings(attention="flash")
    with pytest.raises(ValueError, match="mixed_precision must be one of no, fp16, bf16"):
        run_settings(mixed_precision="fp8")
