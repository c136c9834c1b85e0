"""evaluation_metrics with evaluation.tagger_scores: the concept tag score per checkpoint, without training.

Fast on purpose: the dataset's images are prepared and tagged for real (tiny WD14), but the training run and
the grid's cells are written by hand, so the test controls which checkpoint's cells show the concept (the
demo character) and which show plain colours."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from dagster import AssetKey, instance_for_test
from PIL import Image

from assets.partitions import datasets_partitions
from tests.helpers import edit_settings

DATASET = "concept"
STEPS = (2, 4, 6)


@pytest.fixture
def concept_dataset(project, embedded_root):
    """Six demo images with the demo's dataset.yaml (which excludes the character tag from the captions)."""
    defs, paths = project
    folder = paths.dataset_dir(DATASET)
    folder.mkdir(parents=True)
    demo = paths.dataset_dir("demo")
    for image in sorted(demo.glob("*.png"))[:6]:
        shutil.copy(image, folder / image.name)
    shutil.copy(demo / "dataset.yaml", folder / "dataset.yaml")
    edit_settings(folder, "evaluation", clip_model="", tagger_scores=True)  # no CLIP: only the tagger runs
    return defs, paths, folder


def _run(defs, instance, *keys: str) -> None:
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, partition_key=DATASET, asset_selection=[AssetKey(key) for key in keys]
    )
    assert result.success


def _metadata(instance) -> dict:
    return instance.get_latest_materialization_event(AssetKey("evaluation_metrics")).asset_materialization.metadata


def _fake_training_run(paths, dataset: str) -> None:
    """A textual-inversion run file with checkpoints at STEPS (validation loss lowest at step 4)."""
    out = paths.output_dir(dataset, "textual_inversion")
    files = {"loss_csv": out / "loss.csv", "validation_csv": out / "validation.csv",
             "diffusers": out / "learned_embeds.safetensors"}  # fmt: skip
    for step in STEPS[:-1]:
        files[f"checkpoint_{step}_diffusers"] = out / "checkpoints" / f"pip-{step}.safetensors"
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not read by the metrics")
    losses = pd.DataFrame({"step": range(1, 7), "loss": [0.5, 0.4, 0.35, 0.3, 0.28, 0.25]})
    losses.to_csv(files["loss_csv"], index=False)
    pd.DataFrame({"step": list(STEPS), "validation_loss": [0.5, 0.3, 0.4]}).to_csv(files["validation_csv"], index=False)
    run = {"method": "textual_inversion", "name": "pip", "steps": STEPS[-1],
           "files": {key: str(path) for key, path in files.items()}}
    (out / "training_run.json").write_text(json.dumps(run))


def _fake_cells(paths, dataset: str, demo_images: list[Path], tmp_path: Path) -> None:
    """Step 2 drew plain colours, steps 4 and 6 the character; one [name]-less prompt shows the character at
    step 2 and must not count (the concept score reads the [name] cells, as the CLIP image score does)."""
    plain = []
    for index, colour in enumerate([(255, 255, 255), (70, 170, 80)]):
        plain.append(tmp_path / f"plain_{index}.png")
        Image.new("RGB", (64, 64), colour).save(plain[-1])
    rows = [("a photo of [name]", 2, plain[0]), ("[name] on a white background", 2, plain[1]),
            ("a red square", 2, demo_images[0])]  # fmt: skip
    for step in STEPS[1:]:
        rows += [("a photo of [name]", step, demo_images[1]), ("[name] on a white background", step, demo_images[2])]
    cells = pd.DataFrame([{"method": "textual_inversion", "step": step, "prompt": prompt, "image": str(image)}
                          for prompt, step, image in rows])  # fmt: skip
    out = paths.output_dir(dataset, "evaluation_grid")
    out.mkdir(parents=True, exist_ok=True)
    cells.to_parquet(out / "cells.parquet", index=False)


@pytest.mark.slow
def test_metrics_score_each_checkpoints_name_cells_with_the_datasets_tagger(concept_dataset, tmp_path: Path) -> None:
    defs, paths, folder = concept_dataset
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(datasets_partitions.name, [DATASET])
        _run(defs, instance, "prepared_images", "tag_scores", "tag_table")
        _fake_training_run(paths, DATASET)
        _fake_cells(paths, DATASET, sorted(folder.glob("*.png")), tmp_path)
        _run(defs, instance, "evaluation_metrics")

        metrics = pd.read_parquet(paths.output_dir(DATASET, "evaluation_metrics") / "metrics.parquet")
        assert metrics["step"].tolist() == list(STEPS) and metrics["best"].tolist() == [False, True, False]
        scores = metrics.set_index("step")["concept_tag_score"]
        assert scores.between(0, 1).all()
        assert scores[4] - scores[2] > 0.3 and scores[4] == pytest.approx(scores[6])  # same images at 4 and 6

        metadata = _metadata(instance)
        tags = metadata["concept_tags"].value
        assert "pip_(demo)" in tags  # excluded from the captions, still the concept
        assert not {"general", "sensitive", "questionable", "explicit"} & set(tags)  # ratings never
        first, best = metadata["concept_tag_score_first"].value, metadata["concept_tag_score_best"].value
        assert (first, best) == (pytest.approx(scores[2]), pytest.approx(scores[4]))
        assert metadata["concept_tag_score_gain"].value == pytest.approx(best - first)
        assert metadata["concept_tag_scores"].value.startswith(f"textual_inversion: {first:.4f} -> {best:.4f} (+")
        assert Path(metadata["concept_tagger"].value).name == "tiny-wd14"

        # Off (the default): no tagger runs and no column is written.
        edit_settings(folder, "evaluation", tagger_scores=False)
        _run(defs, instance, "evaluation_metrics")
        metrics = pd.read_parquet(paths.output_dir(DATASET, "evaluation_metrics") / "metrics.parquet")
        assert "concept_tag_score" not in metrics.columns
        metadata = _metadata(instance)
        assert "concept_tags" not in metadata


def test_the_demo_prints_the_column_and_the_first_to_best_figure(capsys) -> None:
    from pipelines.demo import print_metrics

    metrics = pd.DataFrame({"method": "textual_inversion", "step": list(STEPS), "training_loss": [0.5, 0.4, 0.3],
                            "validation_loss": [0.5, 0.3, 0.4], "clip_image_similarity": float("nan"),
                            "concept_tag_score": [0.125, 0.75, 0.5], "best": [False, True, False]})  # fmt: skip
    print_metrics(metrics, "demo tagger")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "checkpoints (training loss, validation loss, concept tag score):"  # no CLIP: not measured
    assert "  0.4000  0.3000  0.7500  <- best" in lines[2]
    assert lines[-1] == "concept tag score (demo tagger): first checkpoint 0.1250 -> best checkpoint 0.7500 (+0.6250)"
    print_metrics(metrics.drop(columns=["concept_tag_score"]), "demo tagger")
    plain = capsys.readouterr().out
    assert "concept" not in plain and plain.count("step") == 3
