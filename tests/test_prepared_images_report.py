"""What the UI shows for `prepared_images`: counts by outcome and reason, the two sheets, and the checks."""

from __future__ import annotations

import shutil

from dagster import AssetKey, AssetRecordsFilter

from tests.helpers import edit_settings
from tests.prepared_fixtures import noise_images, prepare, setup_fixture  # noqa: F401 (used by name)


def test_metadata_and_checks_of_a_messy_folder(setup) -> None:
    defs, paths, instance = setup
    folder = paths.dataset_dir("messy")
    noise_images(folder, ["a.png", "b.png", "c.png"])
    shutil.copy(folder / "a.png", folder / "a again.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (folder / "empty.png").write_bytes(b"")
    edit_settings(folder, "preprocess", size=16, workers=1, max_skipped_fraction=0.3)

    result = prepare(defs, instance, "messy")
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["has_training_images"].passed
    assert not checks["enough_images"].passed and checks["enough_images"].severity.value == "WARN"
    assert not checks["few_skipped"].passed  # 2 bad of 5 distinct sources > 0.3
    assert checks["few_skipped"].metadata["skipped_fraction"].value == 0.4

    record = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("prepared_images"), asset_partitions=["messy"]), limit=1
    ).records[0]
    metadata = record.asset_materialization.metadata
    assert metadata["processed"].value == 3 and metadata["skipped"].value == 3
    assert metadata["exact_duplicates"].value == 1
    assert metadata["skipped_by_reason"].value == {"exact duplicate": 1, "truncated or corrupt image": 1,
                                                   "zero-byte file": 1}
    assert "data:image/png;base64" in metadata["contact_sheet"].value
    assert "data:image/png;base64" in metadata["crop_boxes"].value
    assert "broken.jpg" in metadata["skipped_files"].value

    edit_settings(folder, "preprocess", max_skipped_fraction=0.5, min_images=3)
    again = {e.check_name: e.passed for e in prepare(defs, instance, "messy").get_asset_check_evaluations()}
    assert again == {"has_training_images": True, "enough_images": True, "few_skipped": True}
