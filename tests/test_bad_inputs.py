"""A dataset folder with broken files still prepares: the bad files are skipped with a reason."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from dagster import instance_for_test

from assets.partitions import datasets_partitions
from tests.helpers import copy_with_settings


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


def test_settings_errors_name_file_line_and_key(tmp_path):
    from assets.dataset_settings import SettingsError, load_dataset_settings

    path = tmp_path / "dataset.yaml"
    cases = {
        "captions:\n  max_tags: 3\n  general_treshold: 0.5\n": ("line 3", "captions.general_treshold",
                                                               "did you mean 'general_threshold'?"),
        "training:\n  max_steps: 10\n\n  batch_size: -1\n": ("line 4", "training.batch_size", "greater than"),
        "evaluation:\n  seeds: [1, 2, x]\n": ("line 2", "evaluation.seeds.2", "integer"),
        "captoins:\n  max_tags: 3\n": ("line 1", "key captoins", "did you mean 'captions'?"),
        "training:\n  max_steps: [1, 2\n": ("line 3", "not valid YAML", ""),
        "training:\n\tmax_steps: 2\n": ("line 2", "not valid YAML", ""),
    }
    for text, expected in cases.items():
        path.write_text(text, encoding="utf-8")
        with pytest.raises(SettingsError) as caught:
            load_dataset_settings(tmp_path)
        message = str(caught.value)
        assert str(path) in message
        for part in expected:
            assert part in message, (text, message)


def test_one_broken_dataset_does_not_stop_the_others(project):
    defs, paths = project
    broken = copy_with_settings(paths, "demo", "broken", "preprocess:\n  size: 64\n  crop: centr\n")
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(datasets_partitions.name, ["demo", "broken"])
        job = defs.resolve_job_def("prepare")
        bad = job.execute_in_process(instance=instance, partition_key="broken", raise_on_error=False)
        good = job.execute_in_process(instance=instance, partition_key="demo")
    assert good.success and not bad.success
    failure = bad.failure_data_for_node("prepared_images")
    description = failure.user_failure_data.description
    assert f"{broken / 'dataset.yaml'}, line 3, key preprocess.crop" in description
