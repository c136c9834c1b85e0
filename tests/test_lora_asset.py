"""The lora asset's own logic: the lora: section, its overrides of training:, and its errors (no training here)."""

from __future__ import annotations

import pytest
from dagster import Failure
from pydantic import ValidationError

from assets.dataset_settings import DatasetSettings, LoraSettings, TrainingSettings
from assets.lora import lora_loop_settings, lora_training
from assets.method_training import settings_or_failure


def test_lora_section_defaults_and_overrides_reach_the_loop() -> None:
    training = TrainingSettings(learning_rate="0.005", max_steps=1000, batch_size=2, seed=7, embedding_name="sks")
    defaults = lora_loop_settings(training, LoraSettings(), "demo")
    assert (defaults.name, defaults.learning_rate, defaults.max_steps) == ("sks", "1e-4", 1000)
    assert (defaults.batch_size, defaults.seed) == (2, 7)  # everything else is training:'s
    method = lora_training(LoraSettings())
    assert (method.shape.rank, method.shape.alpha, method.shape.scale, method.shape.dropout) == (4, 4.0, 1.0, 0.0)
    assert method.unet_lr is None and not method.trains_text_encoder
    overridden = lora_loop_settings(training, LoraSettings(learning_rate=3e-4, max_steps=50), "demo")
    assert (overridden.learning_rate, overridden.max_steps) == ("0.0003", 50)
    trained = lora_training(LoraSettings(rank=8, alpha=1, dropout=0.1, unet_lr=2e-4, text_encoder_lr=5e-5))
    assert (trained.shape.rank, trained.shape.alpha, trained.unet_lr, trained.text_encoder_lr) == (8, 1.0, 2e-4, 5e-5)
    assert trained.trains_text_encoder


def test_bad_lora_settings_fail_naming_the_key() -> None:
    with pytest.raises(ValidationError, match="rank"):
        DatasetSettings.model_validate({"lora": {"rank": 0}})
    with pytest.raises(ValidationError, match="ranks"):  # a typo is an error, not a silent default
        DatasetSettings.model_validate({"lora": {"ranks": 8}})
    with pytest.raises(Failure, match="lora section: .*learning rate"):
        settings_or_failure(lambda: lora_loop_settings(TrainingSettings(), LoraSettings(learning_rate="fast"), "demo"),
                            "demo", "lora")  # fmt: skip
