"""The lora asset's own logic: the lora: section, its overrides of training:, and its errors (no training here)."""

from __future__ import annotations

import json
from pathlib import Path

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


@pytest.mark.slow
def test_the_asset_trains_a_listed_dataset_and_records_an_unlisted_one(project) -> None:
    """The asset invoked directly on the prepared demo dataset (the lead wires it into the jobs)."""
    from dagster import build_asset_context, instance_for_test
    from safetensors import safe_open

    from assets.lora import lora
    from assets.partitions import datasets_partitions
    from resources import BaseModelResource, TorchDevice
    from tests.helpers import edit_settings
    from tests.test_graph import DATASET, run_job

    defs, paths = project
    resources = {"paths": paths, "base_model": defs.resources["base_model"], "device": TorchDevice(device="cpu",
                 precision="fp32")}  # fmt: skip
    assert isinstance(resources["base_model"], BaseModelResource)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(datasets_partitions.name, [DATASET])
        run_job(defs, instance, "observe_datasets", partition=None)
        run_job(defs, instance, "prepare")
        unlisted = lora(build_asset_context(partition_key=DATASET, instance=instance), **resources)
        assert unlisted.metadata["trained"] is False and "does not list 'lora'" in unlisted.metadata["skipped"]
        assert not (paths.output_dir(DATASET, "lora") / "training_run.json").exists()

        edit_settings(paths.dataset_dir(DATASET), "training", methods=["lora"], max_steps=4, save_embedding_every=2,
                      batch_size=2)  # fmt: skip
        edit_settings(paths.dataset_dir(DATASET), "lora", learning_rate="1e-3", rank=2, alpha=1)
        result = lora(build_asset_context(partition_key=DATASET, instance=instance), **resources)
    out = paths.output_dir(DATASET, "lora")
    run = json.loads((out / "training_run.json").read_text())
    assert run["method"] == "lora" and run["steps"] == 4
    assert {"kohya", "diffusers", "checkpoint_2_kohya", "checkpoint_4_kohya", "loss_csv"} <= set(run["files"])
    assert Path(run["files"]["kohya"]) == out / f"{run['name']}.safetensors"
    assert (out / "checkpoints" / f"{run['name']}-2.safetensors").is_file()
    assert (out / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    with safe_open(run["files"]["kohya"], framework="pt") as handle:
        assert handle.metadata()["ss_network_dim"] == "2" and handle.metadata()["ss_network_alpha"] == "1"
    assert result.metadata["rank"] == 2 and result.metadata["steps"] == 4
    assert result.data_version is not None and all(check.passed for check in result.check_results[:1])
