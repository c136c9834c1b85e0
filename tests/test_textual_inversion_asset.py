"""The textual_inversion asset's own logic: settings mapping and the seeds' loss checks (no training here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dagster import AssetCheckSeverity, Failure

from assets.dataset_settings import TrainingSettings
from assets.method_training import MAX_PREVIEWS, evaluation_metadata, loss_check_results, preview_metadata
from assets.textual_inversion import trainer_settings
from training.textual_inversion import Evaluation, TrainingResult


def test_every_training_option_reaches_the_trainer() -> None:
    section = TrainingSettings(
        keep_tokens=2, clip_grad_mode="norm", clip_grad_value="0.5:10, 0.1", latent_sampling_method="random",
        resume=False, tag_drop_out=0.1, shuffle_tags=True, save_embedding_every=5, learning_rate=0.01,
    )  # fmt: skip
    settings = trainer_settings(section, "mycat")
    assert (settings.name, settings.keep_tokens, settings.clip_grad_mode) == ("mycat", 2, "norm")
    assert (settings.clip_grad_value, settings.latent_sampling_method, settings.resume) == ("0.5:10, 0.1", "random", False)
    assert (settings.tag_dropout, settings.shuffle_tags, settings.save_every, settings.learning_rate) == (0.1, True, 5, "0.01")


def test_preview_optimizer_initialization_and_acceleration_options_reach_the_trainer(tmp_path) -> None:
    section = TrainingSettings(
        create_image_every=50, preview_prompt="a photo of [name]", preview_negative_prompt="blurry", preview_seed=9,
        preview_steps=12, preview_cfg_scale=5.5, preview_sampler="ddim", save_image_with_stored_embedding=False,
        optimizer="adamw8bit", weight_decay=0.01, initialization_embedding="init/other.pt",
        overwrite_old_embedding=False, gradient_checkpointing=True, attention="classic", compile=True,
        mixed_precision="bf16",
    )  # fmt: skip
    settings = trainer_settings(section, "mycat", tmp_path)
    preview = settings.previews
    assert (preview.every, preview.prompt, preview.negative_prompt, preview.seed) == (50, "a photo of [name]", "blurry", 9)
    assert (preview.steps, preview.cfg_scale, preview.sampler) == (12, 5.5, "ddim")
    assert (settings.save_image_with_stored_embedding, settings.optimizer, settings.weight_decay) == (False, "adamw8bit", 0.01)
    assert settings.initialization_embedding == str(tmp_path / "init" / "other.pt")  # relative to the dataset folder
    assert settings.overwrite_old_embedding is False
    assert (settings.gradient_checkpointing, settings.attention, settings.compile, settings.mixed_precision) == (
        True, "classic", True, "bf16",
    )  # fmt: skip
    absolute = TrainingSettings(initialization_embedding="/models/other.pt")
    assert trainer_settings(absolute, "mycat", tmp_path).initialization_embedding == "/models/other.pt"
    defaults = trainer_settings(TrainingSettings(), "mycat", tmp_path)
    assert (defaults.previews.every, defaults.optimizer, defaults.weight_decay, defaults.mixed_precision) == (0, "adamw", 0.0, "no")


def test_the_latest_previews_are_shown_per_step(tmp_path) -> None:
    from PIL import Image

    files = {}
    for step in range(10, 10 * (MAX_PREVIEWS + 3), 10):
        files[f"preview_{step}"] = tmp_path / f"mycat-{step}.png"
        files[f"preview_{step}_embedding"] = tmp_path / "image_embeddings" / f"mycat-{step}.png"
        Image.new("RGB", (8, 8), (step % 255, 0, 0)).save(files[f"preview_{step}"])
    metadata = preview_metadata(files)
    assert list(metadata) == [f"preview_step_{step}" for step in range(30, 10 * (MAX_PREVIEWS + 3), 10)]
    assert metadata["preview_step_30"].value.startswith("![preview at step 30](data:image/png;base64,")
    assert preview_metadata({"webui_pt": tmp_path / "mycat.pt"}) == {}


def test_a_bad_option_names_the_file_and_the_fragment() -> None:
    with pytest.raises(Failure, match=r"datasets/mycat/dataset.yaml, training section: clip_grad_value: '0.1:x'"):
        trainer_settings(TrainingSettings(clip_grad_mode="value", clip_grad_value="0.1:x"), "mycat")


def _result(losses: list[float]) -> TrainingResult:
    return TrainingResult(vectors=torch.zeros(1, 4), steps=len(losses), losses=losses)


def _checks(losses: list[float], **training) -> dict:
    section = TrainingSettings(max_steps=len(losses), **training)
    result = _result(losses)
    save_every = trainer_settings(section, "mycat").save_every
    results = loss_check_results(result, section, save_every, "embedding_is_finite", bool(result.vectors.isfinite().all()))
    return {result.check_name: result for result in results}


def test_the_seeds_loss_rules_warn() -> None:
    falling = list(np.linspace(0.5, 0.1, 200))
    checks = _checks(falling)
    assert checks["embedding_is_finite"].passed and checks["final_loss_is_low"].passed and checks["loss_still_falling"].passed

    high = _checks([0.4] * 100)
    assert not high["final_loss_is_low"].passed and high["final_loss_is_low"].severity == AssetCheckSeverity.WARN
    assert _checks([0.4] * 100, loss_warning_threshold=0.5)["final_loss_is_low"].passed

    stalled = _checks(falling[:20] + [0.2] * 180, save_embedding_every=10, loss_patience_rounds=10)
    assert not stalled["loss_still_falling"].passed
    assert stalled["loss_still_falling"].metadata["rounds_without_improvement"].value == 17


def test_early_stopping_reaches_the_trainer_and_needs_checkpoints() -> None:
    assert trainer_settings(TrainingSettings(early_stopping_patience=3, save_embedding_every=10), "mycat"
                            ).early_stopping_patience == 3
    with pytest.raises(Failure, match=r"training section: early_stopping_patience needs save_embedding_every"):
        trainer_settings(TrainingSettings(early_stopping_patience=3), "mycat")


def test_evaluation_metadata_names_the_last_validation_loss_and_the_early_stop(tmp_path) -> None:
    rows = [Evaluation(10, 0.31, 0.2), Evaluation(20, 0.29, 0.18)]
    result = TrainingResult(vectors=torch.zeros(1, 4), steps=20, losses=[0.2] * 20, validations=rows,
                            files={"validation_csv": tmp_path / "validation.csv"}, stopped_early_at=20)
    metadata = evaluation_metadata(result, validation_images=3)
    assert (metadata["validation_images"], metadata["validation_loss"], metadata["stopped_early_at"]) == (3, 0.29, 20)
    assert metadata["validation_csv"].value == str(tmp_path / "validation.csv")
    assert "0.29" in metadata["validation"].value and metadata["last_training_loss_round"] == 0.18
    unsplit = TrainingResult(vectors=torch.zeros(1, 4), steps=20, losses=[0.2] * 20,
                             validations=[Evaluation(20, float("nan"), 0.2)])
    assert "validation_loss" not in evaluation_metadata(unsplit, validation_images=0)
    assert evaluation_metadata(unsplit, validation_images=0)["stopped_early_at"] is None
