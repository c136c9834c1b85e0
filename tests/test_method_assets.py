"""training.methods through the graph: an unlisted method records that it did not train, a listed one trains,
and the evaluation grid and metrics cover exactly the methods that trained."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from dagster import AssetKey, instance_for_test

from tests.helpers import edit_settings
from tests.test_graph import DATASET, materialize_all
from training.hypernetwork import Hypernetwork

pytestmark = pytest.mark.slow


def _materialization(instance, key: str):
    return instance.get_latest_materialization_event(AssetKey(key)).asset_materialization


def test_an_unlisted_method_is_skipped_and_the_listed_one_is_trained_and_evaluated(project) -> None:
    defs, paths = project
    dataset_dir = paths.dataset_dir(DATASET)
    edit_settings(dataset_dir, "training", methods=["hypernetwork"], max_steps=4, save_embedding_every=2,
                  batch_size=2)  # fmt: skip
    edit_settings(dataset_dir, "hypernetwork", learning_rate="0.001", layer_structure="1, 1.5, 1")
    edit_settings(dataset_dir, "evaluation", prompts=["a red circle"], seeds=[1], steps=2, z_axis="none")
    with instance_for_test() as instance:
        materialize_all(defs, instance)

        skipped = _materialization(instance, "textual_inversion")
        assert skipped.metadata["trained"].value is False
        assert "does not list 'textual_inversion' in training.methods" in skipped.metadata["skipped"].value
        assert not (paths.output_dir(DATASET, "textual_inversion") / "training_run.json").exists()
        checks = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [key for key in defs.resolve_asset_graph().asset_check_keys if key.asset_key == AssetKey("textual_inversion")]
        )
        assert checks and all(execution.status.value == "SUCCEEDED" for execution in checks.values())

        trained = _materialization(instance, "hypernetwork")
        hyper_file = Path(trained.metadata["webui_pt"].value)
        loaded = Hypernetwork.load(hyper_file)
        assert loaded.step == 4 and loaded.layer_structure == [1.0, 1.5, 1.0]

        cells = pd.read_parquet(paths.output_dir(DATASET, "evaluation_grid") / "cells.parquet")
        assert set(cells["method"]) == {"hypernetwork"} and sorted(set(cells["step"])) == [2, 4]
        assert _materialization(instance, "evaluation_grid").metadata["methods"].value == "hypernetwork"
        metrics = pd.read_parquet(paths.output_dir(DATASET, "evaluation_metrics") / "metrics.parquet")
        assert metrics["method"].tolist() == ["hypernetwork", "hypernetwork"] and metrics["best"].sum() == 1
        best = paths.output_dir(DATASET, "hypernetwork") / "best"
        assert (best / hyper_file.name).is_file() and (best / "best.json").is_file()
        assert Hypernetwork.load(best / hyper_file.name).step == int(metrics.loc[metrics["best"], "step"].iloc[0])
