"""`prepared_images` as Dagster runs it: work follows content, not runs (issue 3, "incremental by content")."""

from __future__ import annotations

import os
from pathlib import Path

from dagster import instance_for_test

from assets.prepared_images import cache_dir, manifest_path
from tests.conftest import make_project
from tests.helpers import edit_settings
from tests.prepared_fixtures import (  # noqa: F401 (the fixtures are used by name)
    counted_fixture,
    dataset,
    manifest,
    noise_images,
    prepare,
    setup_fixture,
    statuses,
)


def test_adding_one_image_processes_one(setup, counted) -> None:
    defs, paths, instance = setup
    folder = dataset(paths, "cats", 8)
    prepare(defs, instance, "cats")
    assert len(counted) == 8 and statuses(paths, "cats") == {"processed": 8}
    noise_images(folder, ["new one.png"], seed=99)
    counted.clear()
    prepare(defs, instance, "cats")
    assert counted == ["new one.png"]
    assert statuses(paths, "cats") == {"reused": 8, "processed": 1}


def test_rename_reuses_and_delete_removes_outputs_and_cache(setup, counted) -> None:
    defs, paths, instance = setup
    folder = dataset(paths, "cats", 4)
    prepare(defs, instance, "cats")
    out = paths.output_dir("cats", "prepared_images")
    (folder / "01 img.png").rename(folder / "renamed.png")
    (folder / "02 img.png").unlink()
    counted.clear()
    prepare(defs, instance, "cats")
    assert counted == []
    rows = manifest(paths, "cats").set_index("source")
    assert rows.loc["renamed.png", "status"] == "reused" and "02 img.png" not in rows.index
    assert sorted(p.name for p in out.glob("*.png")) == ["00 img.png", "03 img.png", "renamed.png"]
    entries = [p.name for p in cache_dir(paths, "cats").glob("*/*/*")]
    assert sorted(entries) == sorted(rows["source_sha256"])


def test_crop_mode_change_reprocesses_that_dataset_only(setup, counted) -> None:
    defs, paths, instance = setup
    cats = dataset(paths, "cats", 3)
    dataset(paths, "dogs", 2)
    prepare(defs, instance, "cats")
    prepare(defs, instance, "dogs")
    edit_settings(cats, "preprocess", crop="focal")
    counted.clear()
    prepare(defs, instance, "cats")
    prepare(defs, instance, "dogs")
    assert sorted(counted) == ["00 img.png", "01 img.png", "02 img.png"]
    assert statuses(paths, "cats") == {"processed": 3} and statuses(paths, "dogs") == {"reused": 2}
    # Switching back costs nothing: the entries of the first setting are still in the cache.
    edit_settings(cats, "preprocess", crop="centre")
    counted.clear()
    prepare(defs, instance, "cats")
    assert counted == [] and statuses(paths, "cats") == {"reused": 3}


def test_killed_run_resumes_to_the_uninterrupted_manifest(tmp_path: Path, embedded_root: Path, monkeypatch) -> None:
    import tagging.prepare as prepare_module

    real, calls = prepare_module.build_entry, []

    def dies_on_the_fourth(path: str, *args, **kwargs):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")  # what a SIGINT looks like half way through
        return real(path, *args, **kwargs)

    manifests = []
    for name, kill in (("clean", False), ("killed", True)):
        defs, paths = make_project(tmp_path / name, embedded_root)
        folder = dataset(paths, "cats", 6, flip=True)
        for index, path in enumerate(sorted(folder.glob("*.png"))):  # same mtimes in both projects
            os.utime(path, ns=(10**18 + index, 10**18 + index))
        with instance_for_test() as instance:
            if kill:
                monkeypatch.setattr(prepare_module, "build_entry", dies_on_the_fourth)
                assert not prepare(defs, instance, "cats", raise_on_error=False).success
                assert not manifest_path(paths, "cats").exists()
                monkeypatch.setattr(prepare_module, "build_entry", real)
            prepare(defs, instance, "cats")
        manifests.append(manifest(paths, "cats"))
        outputs = paths.output_dir("cats", "prepared_images")
        assert sorted(p.name for p in outputs.iterdir()) == sorted(manifests[-1]["output"])
    clean, resumed = manifests
    assert resumed["status"].value_counts().to_dict() == {"reused": 6, "processed": 6}  # 3 sources x 2 reused
    assert resumed.drop(columns="status").equals(clean.drop(columns="status"))


def test_parallel_workers_log_progress_and_match_single_process(setup) -> None:
    defs, paths, instance = setup
    dataset(paths, "cats", 6, workers=2)
    dataset(paths, "dogs", 6, workers=1)  # the same pictures: both names have four letters
    result = prepare(defs, instance, "cats")
    prepare(defs, instance, "dogs")
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any("decoded and resized 6/6" in message for message in messages)
    assert statuses(paths, "cats") == {"processed": 6}
    columns = ["source", "source_sha256", "output", "sha256", "options"]
    assert manifest(paths, "cats")[columns].equals(manifest(paths, "dogs")[columns])


def test_validation_fraction_change_moves_the_split_without_reprocessing(setup, counted) -> None:
    defs, paths, instance = setup
    folder = dataset(paths, "cats", 10, validation_fraction=0.0)
    first = prepare(defs, instance, "cats")
    assert set(manifest(paths, "cats")["split"]) == {"train"}
    edit_settings(folder, "preprocess", validation_fraction=0.4)
    counted.clear()
    second = prepare(defs, instance, "cats")
    assert counted == [] and statuses(paths, "cats") == {"reused": 10}
    rows = manifest(paths, "cats")
    held = int((rows["split"] == "validation").sum())
    assert 0 < held < 10 and set(rows["split"]) == {"train", "validation"}
    metadata = second.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["validation_images"].value == held
    # The prepared images are the same files, but the training set changed: downstream must see a new version.
    versions = [run.get_asset_materialization_events()[0].materialization.tags["dagster/data_version"]
                for run in (first, second)]
    assert versions[0] != versions[1]
