"""Runs carry dataset, stage and method tags, whether launched from a job or by the automation."""

from __future__ import annotations

from dagster import AssetKey, DagsterEventType, build_run_status_sensor_context, instance_for_test

from assets.partitions import datasets_partitions
from assets.trained_methods import TRAINED_METHODS
from pipelines.run_tags import run_tags_for, run_tags_sensor


def test_tags_follow_the_assets_of_the_run() -> None:
    assert run_tags_for(["tag_table"], "cats") == {"stage": "captions", "dataset": "cats"}
    assert run_tags_for(["evaluation_grid", "textual_inversion"]) == {"stage": "train", "method": "textual_inversion"}
    assert run_tags_for(["tag_scores", "prepared_images", "tag_table"], "demo")["stage"] == "prepare"


def test_jobs_carry_stage_and_method(project) -> None:
    defs, _ = project
    assert defs.resolve_job_def("prepare").tags == {"stage": "prepare"}
    # The train job holds every method asset (the unlisted ones record that they did not train).
    assert defs.resolve_job_def("train").tags == {"stage": "train", "method": ",".join(sorted(TRAINED_METHODS))}


def test_the_sensor_tags_an_automation_style_run(project) -> None:
    """A run of `tag_table` alone for one partition, as the automation launches it, gets all three tags."""
    defs, paths = project
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(datasets_partitions.name, ["demo"])
        job = defs.resolve_implicit_global_asset_job_def()
        for keys in (["prepared_images", "tag_scores", "tag_table"], ["tag_table"]):
            result = job.execute_in_process(
                instance=instance, partition_key="demo", asset_selection=[AssetKey(key) for key in keys],
                tags={"trigger": "automation"},
            )
        run = instance.get_run_by_id(result.run_id)
        assert "dataset" not in run.tags
        event = next(e for e in result.all_events if e.event_type == DagsterEventType.PIPELINE_START)
        context = build_run_status_sensor_context(
            sensor_name=run_tags_sensor.name, dagster_instance=instance, dagster_run=run, dagster_event=event
        )
        run_tags_sensor(context)
        tags = instance.get_run_by_id(result.run_id).tags
    assert (tags["dataset"], tags["stage"], tags["trigger"]) == ("demo", "captions", "automation")
    assert "method" not in tags
