"""The dreamartist asset: settings from both sections, the pair trained for a dataset that lists it, a not-trained
record for one that does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dagster import AssetKey, Definitions, Failure, instance_for_test

from assets.dataset_settings import DatasetSettings
from assets.dreamartist import STAGE, dreamartist, dreamartist_settings
from assets.partitions import datasets_partitions
from tests.helpers import edit_settings
from tests.test_graph import DATASET, run_job
from training.embedding_formats import read_embedding


def test_both_sections_reach_the_trainer(tmp_path: Path) -> None:
    settings = DatasetSettings.model_validate({
        "training": {"max_steps": 77, "seed": 3, "batch_size": 2, "initialization_text": "girl",
                     "initialization_embedding": "init.pt", "overwrite_old_embedding": False, "template": "style"},
        "dreamartist": {"positive_vectors": 4, "negative_vectors": 7, "learning_rate": 0.0025, "cfg_scale": "2.5-5:cos",
                        "ema": 0.95, "ema_replace_every": 10, "reconstruction_weight": 0.5, "negative_lr_scale": 2,
                        "positive_only_filewords": True, "negative_initialization_text": "bad"},
    })  # fmt: skip
    trainer = dreamartist_settings(settings, "mycat", tmp_path)
    assert (trainer.name, trainer.max_steps, trainer.seed, trainer.batch_size, trainer.template) == ("mycat", 77, 3, 2, "style")
    assert (trainer.vectors_per_token, trainer.negative_vectors, trainer.learning_rate) == (4, 7, "0.0025")
    assert (trainer.cfg_scale, trainer.ema, trainer.ema_replace_every) == ("2.5-5:cos", 0.95, 10)
    assert (trainer.reconstruction_weight, trainer.negative_lr_scale, trainer.positive_only_filewords) == (0.5, 2.0, True)
    assert (trainer.initialization_text, trainer.negative_initialization_text) == ("girl", "bad")
    assert trainer.initialization_embedding == str(tmp_path / "init.pt")
    assert trainer.overwrite_old_embedding is True  # the pair always starts from its initialization
    defaults = dreamartist_settings(DatasetSettings(), "mycat")
    assert (defaults.vectors_per_token, defaults.negative_vectors, defaults.cfg_scale, defaults.ema) == (3, 6, "3", 0.97)
    assert (defaults.learning_rate, defaults.reconstruction_weight, defaults.max_steps) == ("0.003", 0.0, 1000)


def test_bad_dreamartist_settings_are_named() -> None:
    with pytest.raises(ValueError, match="CFG scale '2-x'"):
        DatasetSettings.model_validate({"dreamartist": {"cfg_scale": "2-x"}})
    with pytest.raises(ValueError, match="ema"):
        DatasetSettings.model_validate({"dreamartist": {"ema": 1.2}})
    settings = DatasetSettings.model_validate({"dreamartist": {"positive_vectors": 75}, "training": {"embedding_name": "a b"}})
    with pytest.raises(Failure, match="dataset.yaml, training section: embedding name 'a b'"):
        dreamartist_settings(settings, "mycat")


def _with_dreamartist(defs: Definitions) -> Definitions:
    """The project's definitions with the dreamartist asset (until the lead lists it in assets/trained_methods.py)."""
    if AssetKey(STAGE) in defs.resolve_asset_graph().get_all_asset_keys():
        return defs
    return Definitions.merge(defs, Definitions(assets=[dreamartist]))


def _materialize(defs: Definitions, instance) -> None:
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.execute_in_process(instance=instance, partition_key=DATASET, asset_selection=[AssetKey(STAGE)]).success


@pytest.mark.slow
def test_the_pair_is_trained_for_a_listing_dataset_and_skipped_otherwise(project) -> None:
    defs, paths = project
    defs = _with_dreamartist(defs)
    dataset_dir = paths.dataset_dir(DATASET)
    edit_settings(dataset_dir, "training", methods=["textual_inversion"], max_steps=3, save_embedding_every=2)
    edit_settings(dataset_dir, "dreamartist", positive_vectors=2, negative_vectors=3, cfg_scale="2-4:cos", ema=0.9)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(datasets_partitions.name, [DATASET])
        run_job(defs, instance, "observe_datasets", partition=None)
        run_job(defs, instance, "prepare")
        _materialize(defs, instance)
        skipped = instance.get_latest_materialization_event(AssetKey(STAGE)).asset_materialization
        assert skipped.metadata["trained"].value is False
        assert not (paths.output_dir(DATASET, STAGE) / "training_run.json").exists()

        edit_settings(dataset_dir, "training", methods=["dreamartist"])
        _materialize(defs, instance)
        trained = instance.get_latest_materialization_event(AssetKey(STAGE)).asset_materialization
        assert trained.metadata["steps"].value == 3
        run = json.loads((paths.output_dir(DATASET, STAGE) / "training_run.json").read_text())
        name = run["name"]  # the demo's training.embedding_name
        assert trained.metadata["negative_embedding_name"].value == run["negative_name"] == f"{name}-neg"
        positive, negative = read_embedding(run["files"]["webui_pt"]), read_embedding(run["files"]["negative_webui_pt"])
        assert positive.vectors.shape[0] == 2 and negative.vectors.shape[0] == 3
        assert (positive.name, negative.name) == (name, f"{name}-neg")
        assert Path(run["files"]["checkpoint_2_negative_diffusers"]).is_file()
        checks = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [key for key in defs.resolve_asset_graph().asset_check_keys if key.asset_key == AssetKey(STAGE)]
        )
        assert {key.name for key in checks} == {"embedding_is_finite", "final_loss_is_low", "loss_still_falling"}
