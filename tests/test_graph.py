"""The whole asset graph on the embedded default, on a temporary Dagster instance."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
import torch
from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterInstance,
    evaluate_automation_conditions,
    instance_for_test,
)

from assets.partitions import datasets_partitions
from assets.trained_methods import TRAINED_METHODS
from tests.conftest import make_project
from tests.helpers import edit_settings

DATASET = "demo"
FAST_TRAINING = dict(max_steps=40, save_embedding_every=20)
FAST_EVALUATION = dict(seeds=[1, 2], steps=4)


def run_job(defs, instance: DagsterInstance, job: str, partition: str | None = DATASET):
    result = defs.resolve_job_def(job).execute_in_process(instance=instance, partition_key=partition)
    assert result.success
    return result


def materialize_all(defs, instance: DagsterInstance) -> None:
    instance.add_dynamic_partitions(datasets_partitions.name, [DATASET])
    run_job(defs, instance, "observe_datasets", partition=None)
    run_job(defs, instance, "prepare")
    run_job(defs, instance, "train")


def data_version(instance: DagsterInstance, key: str) -> str:
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(key), asset_partitions=[DATASET]), limit=1
    ).records
    return records[0].asset_materialization.tags["dagster/data_version"]


def materialize_only(defs, instance: DagsterInstance, *keys: str) -> None:
    """What the automation daemon would launch for a request: just those assets, for the dataset."""
    job = defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        instance=instance, partition_key=DATASET, asset_selection=[AssetKey(key) for key in keys]
    )
    assert result.success


def requested(result) -> dict[str, set[str]]:
    keys = ["prepared_images", "tag_scores", "tag_table", "class_images", *TRAINED_METHODS, "evaluation_grid", "evaluation_metrics",
            "evaluation_report"]
    found = {key: result.get_requested_partitions(AssetKey(key)) for key in keys}
    return {key: partitions for key, partitions in found.items() if partitions}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, embedded_root):
    """The demo partition materialised once, with the demo dataset's own settings, for the read-only tests."""
    defs, paths = make_project(tmp_path_factory.mktemp("demo_run"), embedded_root)
    with instance_for_test() as instance:
        materialize_all(defs, instance)
        yield defs, paths, instance


@pytest.fixture
def materialized(project):
    """A fresh, faster-trained materialisation for tests that edit settings."""
    defs, paths = project
    edit_settings(paths.dataset_dir(DATASET), "training", **FAST_TRAINING)
    edit_settings(paths.dataset_dir(DATASET), "evaluation", **FAST_EVALUATION)
    with instance_for_test() as instance:
        materialize_all(defs, instance)
        yield defs, paths, instance


@pytest.mark.slow
def test_full_graph_outputs_are_valid_and_loadable(demo_run):
    from diffusers import StableDiffusionPipeline

    defs, paths, instance = demo_run
    data = paths.data_root() / DATASET
    manifest = pd.read_parquet(data / "tables" / "prepared_manifest.parquet")
    assert (manifest["status"] == "processed").sum() >= 30
    captions = pd.read_parquet(data / "tables" / "captions.parquet")
    assert set(captions["image"]) == set(manifest.loc[manifest["status"] != "skipped", "output"])
    assert (captions["tag_count"] > 0).all()
    for image in captions["image"]:
        assert (data / "prepared_images" / f"{Path(image).stem}.txt").is_file()

    ti_dir = data / "textual_inversion"
    webui = next(ti_dir.glob("*.pt"))
    state = torch.load(webui, weights_only=True)
    vectors = state["string_to_param"]["*"]
    assert vectors.ndim == 2 and torch.isfinite(vectors).all()
    assert state["step"] == 100 and state["name"] == webui.stem == "pip"
    assert sorted(p.name for p in (ti_dir / "checkpoints").glob("*.pt")) == ["pip-100.pt", "pip-50.pt"]
    assert (ti_dir / "loss.csv").is_file() and (ti_dir / "loss.png").is_file()
    # A held-out split (default validation_fraction 0.1): never trained on, scored at each checkpoint.
    held_out = manifest[manifest["split"] == "validation"]
    assert 1 <= held_out["source"].nunique() < manifest["source"].nunique()
    validation = pd.read_csv(ti_dir / "validation.csv")
    assert validation["step"].tolist() == [50, 100] and (validation["validation_loss"] > 0).all()
    run_file = json.loads((ti_dir / "training_run.json").read_text())
    assert run_file["files"]["validation_csv"] == str(ti_dir / "validation.csv")
    assert run_file["stopped_early_at"] is None
    grid = next((data / "evaluation_grid").glob("*grid*.png"))
    assert grid.stat().st_size > 0
    report = (data / "evaluation_report" / "report.html").read_text(encoding="utf-8")
    assert f'href="../evaluation_grid/{grid.name}"' in report and 'href="../textual_inversion/loss.png"' in report

    # Both files load into a diffusers pipeline built from the same tiny model, and the token matters.
    base_dir = defs.resources["base_model"].resolved()
    pipe = StableDiffusionPipeline.from_pretrained(base_dir, local_files_only=True, safety_checker=None)
    name = state["name"]

    def encode(prompt: str) -> torch.Tensor:
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids).last_hidden_state

    plain = encode(f"a photo of {name}")
    for path in (webui, ti_dir / "learned_embeds.safetensors"):
        pipe.load_textual_inversion(path, token=name)
        assert not torch.allclose(encode(f"a photo of {name}"), plain)
        pipe.unload_textual_inversion()

    # Metadata the UI shows: item counts, row counts and inline images.
    for key, expected in {
        "prepared_images": ["processed", "reused", "skipped", "dagster/row_count", "contact_sheet"],
        "tag_scores": ["processed", "reused", "skipped", "dagster/row_count"],
        "tag_table": ["processed", "dagster/row_count", "preview"],
        "textual_inversion": ["loss_curve", "steps", "validation_images", "validation_loss", "stopped_early_at"],
        "evaluation_grid": ["grid"],
        "evaluation_report": ["report_path", "report_url", "sections"],
    }.items():
        event = instance.get_latest_materialization_event(AssetKey(key))
        assert set(expected) <= set(event.asset_materialization.metadata), key


@pytest.mark.slow
def test_rerun_reuses_and_keeps_versions(demo_run):
    defs, paths, instance = demo_run
    stages = ("prepared_images", "tag_scores", "tag_table")
    before = {key: data_version(instance, key) for key in stages}
    run_job(defs, instance, "prepare")
    for key in ("prepared_images", "tag_scores"):
        metadata = instance.get_latest_materialization_event(AssetKey(key)).asset_materialization.metadata
        assert metadata["processed"].value == 0 and metadata["reused"].value > 0, key
    assert {key: data_version(instance, key) for key in stages} == before


def _next_2am(now: datetime) -> datetime:
    tomorrow = (now + timedelta(days=1)).replace(hour=2, minute=0, second=30, microsecond=0)
    return tomorrow if tomorrow - now < timedelta(days=1) else tomorrow - timedelta(days=1)


@pytest.mark.slow
def test_settings_edits_request_only_the_stages_that_read_them(materialized):
    defs, paths, instance = materialized
    dataset_dir = paths.dataset_dir(DATASET)
    clock = iter(datetime.now(timezone.utc) + timedelta(minutes=minute) for minute in range(100))
    cursor = None

    def tick(at: datetime | None = None) -> dict[str, set[str]]:
        nonlocal cursor
        result = evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=cursor, evaluation_time=at or next(clock)
        )
        cursor = result.cursor
        return requested(result)

    assert tick() == {}

    edit_settings(dataset_dir, "captions", general_threshold=0.9)
    run_job(defs, instance, "observe_datasets", partition=None)
    assert tick() == {"tag_table": {DATASET}}
    materialize_only(defs, instance, "tag_table")
    assert tick() == {}

    edit_settings(dataset_dir, "tagging", batch_size=3)
    run_job(defs, instance, "observe_datasets", partition=None)
    assert tick() == {"tag_scores": {DATASET}, "tag_table": {DATASET}}
    materialize_only(defs, instance, "tag_scores", "tag_table")
    assert tick() == {}

    # The new captions made training unsynced; it waits for the night, then runs with its evaluation.
    night = _next_2am(next(clock))
    assert tick(night) == {
        **{method: {DATASET} for method in TRAINED_METHODS}, "evaluation_grid": {DATASET},
        "evaluation_metrics": {DATASET}, "evaluation_report": {DATASET},
    }
    run_job(defs, instance, "train")
    assert tick(night + timedelta(hours=1)) == {}
    assert tick(night + timedelta(days=1)) == {}


@pytest.mark.slow
def test_training_loss_falls_on_demo_because_it_learns(demo_run):
    """The loss falls from the first ten steps to the last ten, and by more than sampling alone explains.

    Per-step losses vary with the random timesteps, so a fall could be luck; a control run with the same
    seed (same timesteps, noise and prompts) and a learning rate of ~0 shows what luck alone gives.
    """
    from dataclasses import replace

    from assets.textual_inversion import trainer_settings
    from assets.training_examples import training_examples
    from training.textual_inversion import train_textual_inversion

    defs, paths, _ = demo_run
    losses = pd.read_csv(paths.data_root() / DATASET / "textual_inversion" / "loss.csv")["loss"]
    assert losses.head(10).mean() > losses.tail(10).mean()

    settings = trainer_settings(_demo_training(paths), DATASET)
    control = replace(settings, learning_rate="1e-12", save_every=0)
    base = defs.resources["base_model"].load(defs.resources["device"])
    frozen = train_textual_inversion(base, training_examples(paths, DATASET), control, paths.data_root() / "control")
    assert losses.tail(10).mean() < pd.Series(frozen.losses).tail(10).mean()


def _demo_training(paths):
    from assets.dataset_settings import load_dataset_settings

    return load_dataset_settings(paths.dataset_dir(DATASET)).training
