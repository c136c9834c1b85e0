"""The whole asset graph on the embedded default, on a temporary Dagster instance."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
import torch
from dagster import AssetKey, DagsterInstance, evaluate_automation_conditions, instance_for_test

from assets.partitions import datasets_partitions
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


def requested(result) -> dict[str, set[str]]:
    keys = ["prepared_images", "tag_scores", "tag_table", "textual_inversion", "evaluation_grid"]
    found = {key: result.get_requested_partitions(AssetKey(key)) for key in keys}
    return {key: partitions for key, partitions in found.items() if partitions}


@pytest.fixture
def materialized(project):
    defs, paths = project
    edit_settings(paths.dataset_dir(DATASET), "training", **FAST_TRAINING)
    edit_settings(paths.dataset_dir(DATASET), "evaluation", **FAST_EVALUATION)
    with instance_for_test() as instance:
        materialize_all(defs, instance)
        yield defs, paths, instance


@pytest.mark.slow
def test_full_graph_outputs_are_valid_and_loadable(materialized):
    from diffusers import StableDiffusionPipeline

    defs, paths, instance = materialized
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
    assert state["step"] == FAST_TRAINING["max_steps"] and state["name"] == webui.stem
    assert (ti_dir / "loss.csv").is_file() and (ti_dir / "loss.png").is_file()
    grid = next((data / "evaluation_grid").glob("*grid*.png"))
    assert grid.stat().st_size > 0

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
        pipe.unload_textual_inversion(name)

    # Metadata the UI shows: item counts, row counts and inline images.
    for key, expected in {
        "prepared_images": ["processed", "reused", "skipped", "dagster/row_count", "contact_sheet"],
        "tag_scores": ["processed", "reused", "skipped", "dagster/row_count"],
        "tag_table": ["processed", "dagster/row_count", "preview"],
        "textual_inversion": ["loss_curve", "steps"],
        "evaluation_grid": ["grid"],
    }.items():
        event = instance.get_latest_materialization_event(AssetKey(key))
        assert set(expected) <= set(event.asset_materialization.metadata), key


@pytest.mark.slow
def test_rerun_reuses_and_keeps_versions(materialized):
    defs, paths, instance = materialized
    before = {k: instance.get_latest_data_version_record(AssetKey(k), partition_key=DATASET).data_version
              for k in ("prepared_images", "tag_scores", "tag_table")}
    run_job(defs, instance, "prepare")
    for key in ("prepared_images", "tag_scores"):
        metadata = instance.get_latest_materialization_event(AssetKey(key)).asset_materialization.metadata
        assert metadata["processed"].value == 0 and metadata["reused"].value > 0, key
    after = {k: instance.get_latest_data_version_record(AssetKey(k), partition_key=DATASET).data_version
             for k in before}
    assert after == before


def _next_2am(now: datetime) -> datetime:
    tomorrow = (now + timedelta(days=1)).replace(hour=2, minute=0, second=30, microsecond=0)
    return tomorrow if tomorrow - now < timedelta(days=1) else tomorrow - timedelta(days=1)


@pytest.mark.slow
def test_settings_edits_request_only_the_stages_that_read_them(materialized):
    defs, paths, instance = materialized
    dataset_dir = paths.dataset_dir(DATASET)
    now = datetime.now(timezone.utc)
    baseline = evaluate_automation_conditions(defs=defs, instance=instance, evaluation_time=now)
    assert requested(baseline) == {}

    edit_settings(dataset_dir, "captions", general_threshold=0.9)
    run_job(defs, instance, "observe_datasets", partition=None)
    after_threshold = evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=baseline.cursor, evaluation_time=now + timedelta(minutes=1)
    )
    assert requested(after_threshold) == {"tag_table": {DATASET}}

    edit_settings(dataset_dir, "tagging", batch_size=3)
    run_job(defs, instance, "observe_datasets", partition=None)
    after_tagger = evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=after_threshold.cursor, evaluation_time=now + timedelta(minutes=2)
    )
    assert requested(after_tagger) == {"tag_scores": {DATASET}, "tag_table": {DATASET}}

    # The new captions make training unsynced; it waits for the night, then runs with its evaluation.
    run_job(defs, instance, "retag")
    evening = evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=after_tagger.cursor, evaluation_time=now + timedelta(minutes=3)
    )
    assert requested(evening) == {}
    night = _next_2am(now + timedelta(minutes=3))
    nightly = evaluate_automation_conditions(defs=defs, instance=instance, cursor=evening.cursor, evaluation_time=night)
    assert requested(nightly) == {"textual_inversion": {DATASET}, "evaluation_grid": {DATASET}}
    run_job(defs, instance, "train")
    next_night = evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=nightly.cursor, evaluation_time=night + timedelta(days=1)
    )
    assert requested(next_night) == {}


@pytest.mark.slow
def test_training_loss_falls_on_demo(materialized):
    _, paths, _ = materialized
    losses = pd.read_csv(paths.data_root() / DATASET / "textual_inversion" / "loss.csv")["loss"]
    assert losses.head(10).mean() > losses.tail(10).mean()
