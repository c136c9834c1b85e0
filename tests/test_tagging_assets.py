"""`tag_scores` and `tag_table` as assets: metadata the UI shows, caption settings that re-run only the
caption step, sidecar captions from the dataset, and a bad model folder failing before any image."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from dagster import AssetKey, instance_for_test

from assets.partitions import datasets_partitions
from tests.helpers import edit_settings

DATASET = "few"


@pytest.fixture
def few(project, embedded_root):
    """Six demo images (one with a caption of its own) in a dataset of their own."""
    defs, paths = project
    folder = paths.dataset_dir(DATASET)
    folder.mkdir(parents=True)
    for image in sorted((embedded_root / "datasets" / "demo").glob("*.png"))[:6]:
        shutil.copy(image, folder / image.name)
    first = min(folder.glob("*.png"))
    first.with_suffix(".txt").write_text("a drawing of pip")
    return defs, paths, first


def run(defs, instance, *keys: str, succeed: bool = True):
    job = defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(instance=instance, partition_key=DATASET, raise_on_error=False,
                                    asset_selection=[AssetKey(key) for key in keys])
    assert result.success is succeed
    return result


def metadata(instance, key: str) -> dict:
    event = instance.get_latest_materialization_event(AssetKey(key))
    return {name: getattr(value, "value", value) for name, value in event.asset_materialization.metadata.items()}


def test_scores_then_captions_then_a_caption_change(few) -> None:
    defs, paths, captioned = few
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(datasets_partitions.name, [DATASET])
        run(defs, instance, "prepared_images", "tag_scores", "tag_table")
        scores = metadata(instance, "tag_scores")
        assert (scores["processed"], scores["reused"], scores["skipped"]) == (6, 0, 0)
        assert scores["provider"] == "CPUExecutionProvider" and scores["images_per_second"] > 0
        table = metadata(instance, "tag_table")
        assert "data:image/png;base64" in table["tag_frequency_chart"]
        assert "| tag" in table["tag_frequency"]

        edit_settings(paths.dataset_dir(DATASET), "captions", existing_caption="prepend", drop_frequent_above=0.9,
                      max_tags=3)
        run(defs, instance, "tag_table")
        tables = paths.data_root() / DATASET / "tables"
        captions = pd.read_parquet(tables / "captions.parquet").set_index("image")
        frequency = pd.read_parquet(tables / "tag_frequency.parquet")
        assert frequency.loc[frequency["fraction"] > 0.9, "dropped"].all() and frequency["dropped"].any()
        dropped = set(frequency.loc[frequency["dropped"], "tag"])
        assert all(not dropped & set(tags) and len(tags) <= 3 for tags in captions["tags"])
        own = captions.loc[f"{captioned.stem}.png", "caption"]
        assert own.startswith("a drawing of pip")
        sidecar = paths.data_root() / DATASET / "prepared_images" / f"{captioned.stem}.txt"
        assert sidecar.read_text() == own
        assert captioned.with_suffix(".txt").read_text() == "a drawing of pip"  # the raw caption is untouched

        run(defs, instance, "tag_scores")
        assert metadata(instance, "tag_scores")["reused"] == 6


def test_a_bad_model_folder_fails_before_any_image(few, tmp_path) -> None:
    defs, paths, _ = few
    broken = tmp_path / "broken_tagger"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not a model")
    edit_settings(paths.dataset_dir(DATASET), "tagging", model=str(broken))
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(datasets_partitions.name, [DATASET])
        run(defs, instance, "prepared_images")
        result = run(defs, instance, "tag_scores", succeed=False)
    failure = result.failure_data_for_node("tag_scores")
    message = failure.user_failure_data.description
    assert str(broken) in message and "selected_tags.csv" in message
    # The GPU RetryPolicy does not retry a broken model folder: the same folder would fail the same way.
    assert not [event for event in result.all_events if event.event_type_value == "STEP_UP_FOR_RETRY"]
    assert not (paths.data_root() / DATASET / "tables" / "tag_scores.parquet").exists()
    assert not (paths.data_root() / "cache" / "tag_scores").exists() or not any(
        (paths.data_root() / "cache" / "tag_scores").iterdir())
