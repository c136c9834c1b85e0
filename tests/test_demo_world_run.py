"""`make demo`'s run, end to end: the demo world's dataset through every asset on the shipped demo base model and
the demo tagger, as pipelines/demo.py runs it. The embedding must bring the concept: the demo tagger's concept
tags on the grid's cells rise from the first checkpoint to the best (issue 9's figure)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from dagster import instance_for_test

from assets.concept_scores import first_and_best
from assets.evaluation_metrics import METRICS_TABLE
from assets.partitions import datasets_partitions
from embedded import DEMO_BASE, DEMO_TAGGER
from embedded.world_dataset import build_world_dataset
from pipelines.demo import WORLD

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_demo_embedding_brings_the_new_character(tmp_path: Path) -> None:
    from pipelines.definitions import build_definitions
    from resources import BaseModelResource, ProjectPaths, TaggerResource, TorchDevice

    build_world_dataset(tmp_path / "datasets" / WORLD)
    paths = ProjectPaths(datasets_dir=str(tmp_path / "datasets"), data_dir=str(tmp_path / "data"))
    defs = build_definitions({
        "paths": paths,
        "tagger": TaggerResource(wd14_model=str(ROOT / DEMO_TAGGER)),
        "base_model": BaseModelResource(path=str(ROOT / DEMO_BASE)),
        "device": TorchDevice(device="cpu", precision="fp32"),
    })
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(datasets_partitions.name, [WORLD])
        assert defs.resolve_job_def("observe_datasets").execute_in_process(instance=instance).success
        for job in ("prepare", "train"):
            assert defs.resolve_job_def(job).execute_in_process(instance=instance, partition_key=WORLD).success
    metrics = pd.read_parquet(paths.output_dir(WORLD, "evaluation_metrics") / METRICS_TABLE)
    assert metrics["step"].tolist() == [25, 50, 75, 100, 125, 150]
    first, best = first_and_best(metrics, "textual_inversion")
    assert first < 0.05 and best > first + 0.1, (first, best)
    assert metrics["validation_loss"].iloc[-1] < metrics["validation_loss"].iloc[0]
