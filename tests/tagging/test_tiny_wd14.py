from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from embedded.demo_dataset import DEMO_CHARACTER, build_demo_dataset
from embedded.tiny_wd14 import INPUT_NAME, build_tiny_wd14, selected_tags_csv
from tagging.images import list_images
from tagging.wd14 import WD14Tagger, score_images


def scores_by_image(tagger: WD14Tagger, paths: list[Path]) -> dict[str, dict[str, float]]:
    long = score_images(tagger, paths)
    return {image: dict(zip(rows["tag"], rows["score"])) for image, rows in long.groupby("image")}


def test_same_seed_gives_identical_files(tiny_tagger_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_wd14(tmp_path / "again", seed=0, side=64)
    for name in ("model.onnx", "selected_tags.csv"):
        assert (again / name).read_bytes() == (tiny_tagger_dir / name).read_bytes()
    other_seed = build_tiny_wd14(tmp_path / "other", seed=1, side=64)
    assert (other_seed / "model.onnx").read_bytes() != (again / "model.onnx").read_bytes()


def test_csv_layout_matches_selected_tags() -> None:
    rows = list(csv.DictReader(io.StringIO(selected_tags_csv())))
    assert list(rows[0]) == ["tag_id", "name", "category", "count"]
    categories = [int(row["category"]) for row in rows]
    assert [row["name"] for row in rows[:4]] == ["general", "sensitive", "questionable", "explicit"]
    assert categories == sorted(categories, key=[9, 0, 4].index)
    assert {"red_theme", "blue_background", "white_background", "dark", "bright", "simple_background", "solo"} <= {row["name"] for row in rows}
    assert any(row["name"] == DEMO_CHARACTER and row["category"] == "4" for row in rows)


def test_onnx_io_matches_smilingwolf_models(tiny_tagger_dir: Path) -> None:
    session = ort.InferenceSession(str(tiny_tagger_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (model_input,), (model_output,) = session.get_inputs(), session.get_outputs()
    assert model_input.name == INPUT_NAME and model_input.type == "tensor(float)"
    assert isinstance(model_input.shape[0], str) and model_input.shape[1:] == [64, 64, 3]
    assert model_output.shape[1] == len(selected_tags_csv().splitlines()) - 1


def test_tags_describe_red_and_blue_images(tiny_tagger: WD14Tagger, tmp_path: Path, solid_image) -> None:
    paths = [
        solid_image(tmp_path / "red.png", (220, 30, 30)),
        solid_image(tmp_path / "blue.png", (30, 60, 220)),
        solid_image(tmp_path / "white.png", (255, 255, 255)),
        solid_image(tmp_path / "black.png", (10, 10, 10)),
    ]
    scores = scores_by_image(tiny_tagger, paths)
    red, blue, white, black = (scores[f"{name}.png"] for name in ("red", "blue", "white", "black"))
    assert red["red_theme"] > 0.9 and blue["red_theme"] < 0.1
    assert blue["blue_background"] > 0.9 and red["blue_background"] < 0.1
    assert white["white_background"] > 0.9 and white["bright"] > 0.9 and red["white_background"] < 0.1
    assert black["dark"] > 0.9 and white["dark"] < 0.1
    assert all(image["simple_background"] > 0.5 and image["general"] > 0.9 for image in scores.values())
    assert all(image[DEMO_CHARACTER] < 0.05 and image["solo"] < 0.1 for image in scores.values())


def test_demo_character_is_recognised(tiny_tagger: WD14Tagger, tmp_path: Path) -> None:
    dataset = build_demo_dataset(tmp_path / "demo", count=8, side=96, seed=3)
    scores = scores_by_image(tiny_tagger, list_images(dataset))
    assert len(scores) == 8
    assert all(image[DEMO_CHARACTER] > 0.85 and image["solo"] > 0.35 for image in scores.values())


def test_rebuild_replaces_a_previous_build_but_not_foreign_files(tmp_path: Path) -> None:
    target = build_tiny_wd14(tmp_path / "wd14", seed=0, side=16, fixed_batch=True)
    assert WD14Tagger(target, threads=1).fixed_batch == 1
    build_tiny_wd14(target, seed=0, side=16)
    assert WD14Tagger(target, threads=1).fixed_batch is None
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        build_tiny_wd14(target, side=16)
    assert (target / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wd14"]  # no staging folders left behind


def test_scores_do_not_depend_on_batch_composition(tiny_tagger: WD14Tagger) -> None:
    pixels = np.random.default_rng(1).uniform(0, 255, size=(4, 64, 64, 3)).astype(np.float32)
    together = tiny_tagger.predict(pixels)
    alone = np.concatenate([tiny_tagger.predict(pixels[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-6)
