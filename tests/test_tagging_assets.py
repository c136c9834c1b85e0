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


def test_blip_captions_reach_the_caption_table_and_filewords(few, embedded_root) -> None:
    from assets.training_examples import training_examples, validation_examples

    defs, paths, _ = few
    folder = paths.dataset_dir(DATASET)
    edit_settings(folder, "tagging", blip_model=str(embedded_root / "models" / "tiny-blip"), blip_prompt="a picture of",
                  min_length=3, max_length=8)
    edit_settings(folder, "captions", filewords_source="blip_and_tags")
    tables = paths.data_root() / DATASET / "tables"
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(datasets_partitions.name, [DATASET])
        run(defs, instance, "prepared_images", "tag_scores", "tag_table")
        scores = metadata(instance, "tag_scores")
        assert (scores["blip_processed"], scores["blip_reused"], scores["blip_skipped"]) == (6, 0, 0)
        blip = pd.read_parquet(tables / "blip_captions.parquet").set_index("image")["blip_caption"]
        assert len(blip) == 6 and all(text.startswith("a picture of") for text in blip)
        captions = pd.read_parquet(tables / "captions.parquet").set_index("image")
        assert captions["blip_caption"].to_dict() == blip.to_dict()
        assert all(row.caption == ", ".join([row.blip_caption, *row.tags]) for row in captions.itertuples())
        examples = [*training_examples(paths, DATASET), *validation_examples(paths, DATASET)]
        filewords = {example.image_path.name: example.filewords for example in examples}
        assert filewords == captions["caption"].to_dict()

        run(defs, instance, "tag_scores")
        again = metadata(instance, "tag_scores")
        assert (again["blip_processed"], again["blip_reused"]) == (0, 6)

        edit_settings(folder, "captions", filewords_source="blip")
        run(defs, instance, "tag_table")
        captions = pd.read_parquet(tables / "captions.parquet")
        assert list(captions["caption"]) == list(captions["blip_caption"])

        edit_settings(folder, "tagging", blip_model=None)
        run(defs, instance, "tag_scores", "tag_table")
        assert metadata(instance, "tag_scores")["blip"] == "off"
        captions = pd.read_parquet(tables / "captions.parquet")
        assert (captions["blip_caption"] == "").all()
        assert list(captions["caption"]) == [", ".join(tags) for tags in captions["tags"]]


def test_a_bad_blip_folder_fails_before_any_image(few, tmp_path) -> None:
    defs, paths, _ = few
    edit_settings(paths.dataset_dir(DATASET), "tagging", blip_model=str(tmp_path / "no-blip"))
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(datasets_partitions.name, [DATASET])
        run(defs, instance, "prepared_images")
        result = run(defs, instance, "tag_scores", succeed=False)
    message = result.failure_data_for_node("tag_scores").user_failure_data.description
    assert str(tmp_path / "no-blip") in message and "does not exist" in message
    assert not (paths.data_root() / DATASET / "tables" / "tag_scores.parquet").exists()
