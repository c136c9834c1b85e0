"""evaluation_grid and evaluation_metrics on the embedded default, with a short run so every checkpoint counts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from dagster import AssetKey, instance_for_test

from tests.helpers import edit_settings
from training.checkpoint_selection import BEST_TOLERANCE, best_row
from tests.test_graph import DATASET, materialize_all, materialize_only

pytestmark = pytest.mark.slow

TRAINING = dict(max_steps=6, save_embedding_every=2, batch_size=2, gradient_accumulation_steps=1)
EVALUATION = dict(prompts=["a photo of [name]", "a red square"], seeds=[1], steps=2, z_axis="none")


def _materialization(instance, key: str):
    return instance.get_latest_materialization_event(AssetKey(key)).asset_materialization


def _grid_failure(defs, instance) -> str:
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, partition_key=DATASET, asset_selection=[AssetKey("evaluation_grid")], raise_on_error=False
    )
    assert not result.success
    return str(next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").event_specific_data.error)


def test_grid_and_metrics_cover_every_checkpoint_rerender_only_what_changed_and_name_missing_ones(project) -> None:
    defs, paths = project
    dataset_dir = paths.dataset_dir(DATASET)
    edit_settings(dataset_dir, "preprocess", validation_fraction=0.2)
    edit_settings(dataset_dir, "training", **TRAINING)
    edit_settings(dataset_dir, "evaluation", **EVALUATION)
    with instance_for_test() as instance:
        materialize_all(defs, instance)
        grid_dir, metrics_dir = (paths.output_dir(DATASET, stage) for stage in ("evaluation_grid", "evaluation_metrics"))
        cells = pd.read_parquet(grid_dir / "cells.parquet")
        assert sorted(set(cells["step"])) == [2, 4, 6] and len(cells) == 3 * 2
        assert cells["rendered"].all() and all(Path(path).is_file() for path in cells["image"])
        grid = _materialization(instance, "evaluation_grid")
        assert grid.metadata["prompts_without_name"].value == 1  # "a red square": a warning, not a failure
        assert Path(grid.metadata["grid_path"].value).is_file()

        metrics = pd.read_parquet(metrics_dir / "metrics.parquet")
        assert metrics["step"].tolist() == [2, 4, 6]
        assert metrics["training_loss"].notna().all() and metrics["validation_loss"].notna().all()
        assert metrics["best"].sum() == 1
        best_step = int(metrics.loc[metrics["best"], "step"].iloc[0])
        assert metrics["clip_image_similarity"].between(-1, 1).all()  # the demo sets evaluation.clip_model
        assert metrics["clip_text_similarity"].between(-1, 1).all()
        lowest = metrics["validation_loss"].min()
        assert metrics.loc[metrics["best"], "validation_loss"].iloc[0] <= lowest * (1 + BEST_TOLERANCE)
        assert best_step == int(metrics.loc[best_row(metrics), "step"])
        kept = paths.output_dir(DATASET, "textual_inversion") / "best"
        assert (kept / "pip.pt").is_file() and (kept / "learned_embeds.safetensors").is_file()
        assert _materialization(instance, "evaluation_metrics").metadata["best_step"].value == best_step

        # A second CFG value renders only its own cells; the first value's cells come from the cache.
        edit_settings(dataset_dir, "evaluation", cfg_scale=[7.0, 3.0], z_axis="cfg_scale")
        materialize_only(defs, instance, "evaluation_grid")
        again = pd.read_parquet(grid_dir / "cells.parquet")
        assert len(again) == 12
        assert again.groupby("cfg_scale")["rendered"].sum().to_dict() == {3.0: 6, 7.0: 0}
        assert _materialization(instance, "evaluation_grid").metadata["processed"].value == 6

        # A step that was never saved, and a checkpoint file deleted since: clear failures naming them.
        edit_settings(dataset_dir, "evaluation", checkpoints=[5])
        assert "evaluation checkpoint step 5 of textual_inversion does not exist (saved: 2, 4, 6)" in _grid_failure(defs, instance)
        edit_settings(dataset_dir, "evaluation", checkpoints="all")
        (paths.output_dir(DATASET, "textual_inversion") / "checkpoints" / "pip-4.safetensors").unlink()
        assert "pip-4.safetensors: the textual_inversion checkpoint at step 4 no longer exists" in _grid_failure(defs, instance)
