"""A dataset folder with broken files still prepares: the bad files are skipped with a reason."""

from __future__ import annotations

import shutil

import pandas as pd
from dagster import instance_for_test

from assets.partitions import datasets_partitions


def test_corrupt_zero_byte_and_mislabelled_files_are_skipped(project, embedded_root):
    defs, paths = project
    dataset_dir = paths.dataset_dir("messy")
    dataset_dir.mkdir(parents=True)
    good = sorted((embedded_root / "datasets" / "demo").glob("*.png"))[:3]
    for image in good:
        shutil.copy(image, dataset_dir / image.name)
    (dataset_dir / "zero.png").write_bytes(b"")
    (dataset_dir / "notes.png").write_text("this is a text file, not a picture")
    (dataset_dir / "corrupt.png").write_bytes(good[0].read_bytes()[:200])
    raw_before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in dataset_dir.iterdir()}

    with instance_for_test() as instance:
        instance.add_dynamic_partitions(datasets_partitions.name, ["messy"])
        result = defs.resolve_job_def("prepare").execute_in_process(instance=instance, partition_key="messy")
        assert result.success

    manifest = pd.read_parquet(paths.data_root() / "messy" / "tables" / "prepared_manifest.parquet")
    skipped = manifest[manifest["status"] == "skipped"].set_index("source")["reason"]
    assert set(skipped.index) == {"zero.png", "notes.png", "corrupt.png"}
    assert all(reason for reason in skipped)
    assert (manifest["status"] == "processed").sum() == len(good)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in dataset_dir.iterdir()} == raw_before


def test_bad_settings_fail_with_the_file_and_field(project):
    defs, paths = project
    (paths.dataset_dir("demo") / "dataset.yaml").write_text("captions:\n  general_treshold: 0.5\n")
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(datasets_partitions.name, ["demo"])
        result = defs.resolve_job_def("prepare").execute_in_process(
            instance=instance, partition_key="demo", raise_on_error=False
        )
    assert not result.success
    failure = result.failure_data_for_node("prepared_images")
    assert "dataset.yaml" in str(failure.user_failure_data.description if failure.user_failure_data else failure.error)
