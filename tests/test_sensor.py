"""The dataset sensor: new folders become partitions; edits become observations of exactly what changed."""

from __future__ import annotations

import shutil

from dagster import build_sensor_context, instance_for_test

from assets.dataset_settings import SECTIONS
from assets.partitions import datasets_partitions
from pipelines.sensors import dataset_sensor
from tests.helpers import copy_with_settings, edit_settings


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
        assert observed == {"raw_images", *(f"{section}_settings" for section in SECTIONS)}
        assert {"training_settings", "lora_settings", "dreambooth_settings"} <= observed  # every section, methods too
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
    copy_with_settings(paths, "demo", "other", "training: [this is not a mapping\n")
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


def test_unchanged_dataset_is_not_rehashed(project, monkeypatch):
    """The stat signature in the cursor: an unchanged dataset costs no content hashing on the next tick."""
    import common.hashing

    _, paths = project
    hashed: list[str] = []
    real = common.hashing.file_sha256
    monkeypatch.setattr(common.hashing, "file_sha256", lambda path: hashed.append(str(path)) or real(path))
    dataset_dir = paths.dataset_dir("demo")
    for index in range(40):  # sub-folders are walked too
        (dataset_dir / "more").mkdir(exist_ok=True)
        (dataset_dir / "more" / f"note{index}.txt").write_text(f"caption {index}", encoding="utf-8")
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(datasets_partitions.name, ["demo"])
        common.hashing._sha256_at.cache_clear()
        first = _tick(instance, paths, None)
        assert hashed and first.asset_events

        hashed.clear()
        common.hashing._sha256_at.cache_clear()  # as in a fresh daemon process: only the cursor remembers
        quiet = _tick(instance, paths, first.cursor)
        assert hashed == [] and not quiet.asset_events

        image = sorted(dataset_dir.glob("*.png"))[0]
        image.write_bytes(image.read_bytes() + b"\0")  # same name, new content
        changed = _tick(instance, paths, quiet.cursor)
        assert hashed and [event.asset_key.to_user_string() for event in changed.asset_events] == ["raw_images"]

        hashed.clear()
        common.hashing._sha256_at.cache_clear()
        (dataset_dir / "more" / "note3.txt").unlink()  # sidecar-less notes are not images: signature moves,
        removed = _tick(instance, paths, changed.cursor)  # hashes are recomputed, the data version does not
        assert hashed and not removed.asset_events


def test_unsafe_names_and_removed_folders_are_reported(project, capfd):
    _, paths = project
    root = paths.datasets_root()
    for name in ("..evil", ".hidden", "tab\there", "new\nline", "semi;colon"):
        (root / name).mkdir()
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(datasets_partitions.name, ["demo", "gone"])
        result = _tick(instance, paths, None)
        assert not result.dynamic_partitions_requests
        text = capfd.readouterr().err
        assert "'..evil'" in text and "contains '..'" in text
        assert "'.hidden'" in text and "starts with a dot" in text
        assert "'tab\\there'" in text and "control characters" in text
        assert "'semi;colon'" in text
        assert f"{root / 'gone'} was removed" in text

        again = _tick(instance, paths, result.cursor)
        text = capfd.readouterr().err
        assert "was removed" not in text and "is not used" not in text  # reported once, not on every tick
        assert not again.dynamic_partitions_requests
