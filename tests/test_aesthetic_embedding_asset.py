"""The aesthetic_embedding asset on prepared images: the extension's .pt, skipped without a CLIP model,
a bad CLIP folder named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dagster import AssetKey

from assets.aesthetic_embedding import STAGE, aesthetic_embedding_path, aesthetic_options
from assets.dataset_settings import AestheticSettings
from tests.helpers import edit_settings
from tests.prepared_fixtures import dataset, prepare, setup_fixture  # noqa: F401 (fixture)
from training.aesthetic import EMBEDDINGS_DIR, AestheticOptions, create_aesthetic_embedding
from training.clip_scores import ClipScorer

NAME = "moods"


def _materialize(defs, instance, *, raise_on_error: bool = True):
    job = defs.resolve_implicit_global_asset_job_def()
    return job.execute_in_process(instance=instance, partition_key=NAME, raise_on_error=raise_on_error,
                                  asset_selection=[AssetKey(STAGE)])


def _prepared(setup, count: int = 5):
    defs, paths, instance = setup
    folder = dataset(paths, NAME, count)
    prepare(defs, instance, NAME)
    return defs, paths, instance, folder


def test_the_mean_clip_embedding_of_the_prepared_images(setup, embedded_root: Path) -> None:
    defs, paths, instance, folder = _prepared(setup)
    clip_dir = embedded_root / "models" / "tiny-clip"
    edit_settings(folder, "aesthetic", clip_model=str(clip_dir), batch_size=2)
    assert _materialize(defs, instance).success

    out = paths.data_root() / NAME / STAGE / EMBEDDINGS_DIR / f"{NAME}.pt"
    assert aesthetic_embedding_path(paths, NAME) == out
    stored = torch.load(out, weights_only=True)
    prepared = sorted((paths.data_root() / NAME / "prepared_images").glob("*.png"))
    assert len(prepared) == 5
    expected = create_aesthetic_embedding(ClipScorer.load(clip_dir), prepared)
    assert stored.shape == (1, 32) and torch.allclose(stored, expected, atol=1e-5)

    metadata = instance.get_latest_materialization_event(AssetKey(STAGE)).asset_materialization.metadata
    assert metadata["images"].value == 5
    assert metadata["embedding_norm"].value == pytest.approx(float(stored.norm()), rel=1e-5)
    assert metadata["path"].value == str(out)


def test_a_dataset_without_a_clip_model_is_skipped_not_failed(setup) -> None:
    defs, paths, instance, _ = _prepared(setup, count=2)
    result = _materialize(defs, instance)
    assert result.success
    assert instance.get_latest_materialization_event(AssetKey(STAGE)) is None
    assert not (paths.data_root() / NAME / STAGE).exists()


def test_a_missing_clip_folder_is_named_and_not_retried(setup, tmp_path: Path) -> None:
    defs, _, instance, folder = _prepared(setup, count=2)
    edit_settings(folder, "aesthetic", clip_model=str(tmp_path / "no-clip"))
    result = _materialize(defs, instance, raise_on_error=False)
    assert not result.success
    failure = next(event for event in result.all_events if event.is_step_failure)
    message = failure.step_failure_data.error.message
    assert "aesthetic.clip_model" in message and str(tmp_path / "no-clip") in message


def test_every_generation_option_reaches_the_library() -> None:
    section = AestheticSettings(clip_model="models/tiny-clip", aesthetic_weight=0.4, aesthetic_steps=7, aesthetic_lr=0.002,
                                aesthetic_slerp=True, aesthetic_imgs_text="warm light", aesthetic_slerp_angle=0.3,
                                aesthetic_text_negative=True)
    options = aesthetic_options(section)
    assert (options.aesthetic_weight, options.aesthetic_steps, options.aesthetic_lr) == (0.4, 7, 0.002)
    assert (options.aesthetic_slerp, options.aesthetic_imgs_text) == (True, "warm light")
    assert (options.aesthetic_slerp_angle, options.aesthetic_text_negative) == (0.3, True)
    assert aesthetic_options(AestheticSettings()) == AestheticOptions()  # the same defaults as the extension
