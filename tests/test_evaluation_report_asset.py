"""`evaluation_report` as an asset on a small copy of the demo dataset: trained for two steps, one grid cell."""

from __future__ import annotations

import re
import shutil

import pandas as pd
import pytest
from dagster import AssetKey, instance_for_test

from assets.evaluation_report import metrics_path, report_path
from assets.partitions import datasets_partitions
from tests.helpers import edit_settings

DATASET = "few"
SMALL = {
    "preprocess": {"flip": False, "min_images": 1},
    "training": {"max_steps": 2, "batch_size": 2, "save_embedding_every": 0},
    "evaluation": {"prompts": ["a photo of [name]"], "seeds": [1], "steps": 2},
}


def run(defs, instance, *keys: str):
    job = defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(instance=instance, partition_key=DATASET,
                                    asset_selection=[AssetKey(key) for key in keys])
    assert result.success
    return instance.get_latest_materialization_event(AssetKey("evaluation_report")).asset_materialization


@pytest.mark.slow
def test_report_of_a_trained_dataset_then_with_metrics(project, embedded_root) -> None:
    defs, paths = project
    folder = paths.dataset_dir(DATASET)
    folder.mkdir(parents=True)
    for image in sorted((embedded_root / "datasets" / "demo").glob("*.png"))[:4]:
        shutil.copy(image, folder / image.name)
    (folder / "broken <one>.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    shutil.copy(embedded_root / "datasets" / "demo" / "dataset.yaml", folder / "dataset.yaml")
    for section, values in SMALL.items():
        edit_settings(folder, section, **values)

    with instance_for_test() as instance:
        instance.add_dynamic_partitions(datasets_partitions.name, [DATASET])
        # Before training: the report renders what exists and says what does not.
        early = run(defs, instance, "prepared_images", "tag_scores", "tag_table", "evaluation_report")
        assert early.metadata["sections"].value == {
            "grid": False, "loss": False, "metrics": False, "settings": True, "tags": True, "skipped": True}
        page = report_path(paths, DATASET).read_text(encoding="utf-8")
        assert "not available: no evaluation grid image was found (materialize evaluation_grid)" in page
        assert "broken &lt;one&gt;.png" in page

        event = run(defs, instance, "textual_inversion", "evaluation_grid", "evaluation_report")
        out = report_path(paths, DATASET)
        assert event.metadata["report_path"].value == str(out)
        assert event.metadata["report_url"].value == out.resolve().as_uri()
        assert event.metadata["size_bytes"].value == out.stat().st_size
        sections = event.metadata["sections"].value
        assert sections == {"grid": True, "loss": True, "metrics": False, "settings": True, "tags": True,
                            "skipped": True}
        page = out.read_text(encoding="utf-8")
        assert len(re.findall(r'<img src="data:image/', page)) == 2  # the grid and the loss curve
        assert re.search(r'href="\.\./evaluation_grid/[^"]+_grid\.png"', page)
        assert "not available: ../evaluation_metrics/metrics.parquet does not exist" in page
        assert "- a photo of [name]" in page  # the settings section shows the dataset's prompts
        version = event.tags["dagster/data_version"]

        # Unchanged inputs: the same bytes, so the same data version.
        assert run(defs, instance, "evaluation_report").tags["dagster/data_version"] == version

        # The metrics table the evaluation_metrics stage writes: shown, with its best checkpoint marked.
        pd.DataFrame({"method": ["textual_inversion"] * 2, "step": [1, 2], "checkpoint": ["a.pt", "b.pt"],
                      "validation_loss": [0.4, 0.3], "best": [False, True]}).to_parquet(
            metrics_path(paths, DATASET), index=False)  # metrics_path creates its folder
        event = run(defs, instance, "evaluation_report")
        assert event.metadata["sections"].value["metrics"] is True
        assert event.metadata["best_checkpoint"].value == "textual_inversion step 2 (b.pt)"
        assert event.tags["dagster/data_version"] != version
        assert re.search(r'<tr class="best" data-best="true">\s*<td>textual_inversion</td>\s*<td>2</td>',
                         report_path(paths, DATASET).read_text(encoding="utf-8"))
