"""The project loads the way the UI and the daemon load it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dagster_definitions_validate_passes_on_workspace(tmp_path):
    # The project's instance settings, in a scratch DAGSTER_HOME so the real one gets no databases.
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", tmp_path / "dagster.yaml")
    dagster = Path(sys.executable).with_name("dagster")
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [str(dagster), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_graph_shape():
    from assets.trained_methods import TRAINED_METHODS
    from pipelines.definitions import defs

    graph = defs.resolve_asset_graph()
    parents = {key.to_user_string(): sorted(p.to_user_string() for p in graph.get(key).parent_keys)
               for key in graph.get_all_asset_keys()}
    assert parents["prepared_images"] == ["preprocess_settings", "raw_images"]
    assert parents["tag_scores"] == ["prepared_images", "tagging_settings"]
    assert parents["tag_table"] == ["captions_settings", "tag_scores"]
    assert parents["textual_inversion"] == ["prepared_images", "tag_table", "training_settings"]
    assert parents["hypernetwork"] == ["hypernetwork_settings", "prepared_images", "tag_table", "training_settings"]
    methods = sorted(TRAINED_METHODS)
    assert parents["evaluation_grid"] == sorted(["evaluation_settings", *methods])
    assert parents["evaluation_metrics"] == sorted(["evaluation_grid", "evaluation_settings", *methods])
    assert parents["evaluation_report"] == ["evaluation_grid", "evaluation_metrics", "prepared_images", "tag_table"]
    assert parents["aesthetic_embedding"] == ["aesthetic_settings", "prepared_images"]
    pools = {key.to_user_string(): graph.get(key).pools for key in graph.get_all_asset_keys()}
    for name in ("tag_scores", *TRAINED_METHODS, "evaluation_grid", "evaluation_metrics", "aesthetic_embedding"):
        assert pools[name] == {"gpu"}
    assert not pools["evaluation_report"]  # it loads no model
    assert {job.name for job in defs.jobs} >= {"prepare", "retag", "train"}
