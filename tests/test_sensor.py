"""The dataset sensor: new folders become partitions; edits become observations of exactly what changed."""

from __future__ import annotations

import shutil

from dagster import build_sensor_context, instance_for_test

from assets.partitions import datasets_partitions
from pipelines.sensors import dataset_sensor
from tests.helpers import edit_settings


def _tick(instance, paths, cursor):
    context = build_sensor_context(instance=instance, resources={"paths": paths}, cursor=cursor)
    return dataset_sensor(context)


def test_new_folder_then_edits(project):
    _, paths = project
    with instance_for_test() as instance:
        first = _tick(instance, paths, None)
        assert [request.partition_keys for request in first.dynamic_partitions_requests] == [["demo"]]
        assert not first.asset_events
        instance.add_dynamic_partitions(datasets_partitions.name, ["demo"])

        second = _tick(instance, paths, first.cursor)
        observed = {event.asset_key.to_user_string() for event in second.asset_events}
        assert observed == {"raw_images", "preprocess_settings", "tagging_settings", "captions_settings",
                            "training_settings", "evaluation_settings"}
        assert all(event.partition == "demo" and event.tags["dagster/data_version"] for event in second.asset_events)

        quiet = _tick(instance, paths, second.cursor)
        assert not quiet.asset_events and not quiet.dynamic_partitions_requests

        edit_settings(paths.dataset_dir("demo"), "captions", general_threshold=0.5)
        image = sorted(paths.dataset_dir("demo").glob("*.png"))[0]
        shutil.copy(image, image.with_name("copy of first.png"))
        edited = _tick(instance, paths, quiet.cursor)
        assert {event.asset_key.to_user_string() for event in edited.asset_events} == {"captions_settings", "raw_images"}

        image.with_suffix(".txt").write_text("a drawing of pip", encoding="utf-8")
        captioned = _tick(instance, paths, edited.cursor)
        assert [event.asset_key.to_user_string() for event in captioned.asset_events] == ["raw_images"]
        image.with_suffix(".txt").write_text("a painting of pip", encoding="utf-8")
        recaptioned = _tick(instance, paths, captioned.cursor)
        assert [event.asset_key.to_user_string() for event in recaptioned.asset_events] == ["raw_images"]


def test_broken_settings_skip_that_dataset_only(project):
    _, paths = project
    other = paths.dataset_dir("other")
    shutil.copytree(paths.dataset_dir("demo"), other)
    (other / "dataset.yaml").write_text("training: [this is not a mapping\n")
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(datasets_partitions.name, ["demo", "other"])
        result = _tick(instance, paths, None)
    assert {event.partition for event in result.asset_events} == {"demo"}


def test_invalid_folder_names_are_not_partitions(project):
    _, paths = project
    (paths.datasets_root() / "bad name, with comma").mkdir()
    (paths.datasets_root() / ".hidden").mkdir()
    with instance_for_test() as instance:
        result = _tick(instance, paths, None)
    assert [request.partition_keys for request in result.dynamic_partitions_requests] == [["demo"]]
