"""[filewords] for each prepared image: tag-table caption, else the source's sidecar caption, else filename words."""

from __future__ import annotations

import pandas as pd

from assets.prepared_images import manifest_path
from assets.tag_table import captions_path
from assets.training_examples import training_examples, validation_examples
from resources import ProjectPaths


def test_filewords_fall_back_from_tags_to_sidecar_to_filename(tmp_path) -> None:
    paths = ProjectPaths(datasets_dir=str(tmp_path / "datasets"), data_dir=str(tmp_path / "data"))
    manifest = pd.DataFrame({
        "output": ["a.png", "b.png", "c.png", "d.png", "e.png"],
        "status": ["processed", "reused", "processed", "processed", "skipped"],
        "source_caption": ["sidecar a", "sidecar b", None, None, "sidecar e"],
        "filename_words": ["words a", "words b", "words c", "", "words e"],
    })
    manifest_path(paths, "ds").parent.mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(manifest_path(paths, "ds"))
    captions = pd.DataFrame({"image": ["a.png", "b.png", "c.png", "d.png"], "caption": ["1girl, smile", "", "", ""]})
    captions.to_parquet(captions_path(paths, "ds"))

    examples = training_examples(paths, "ds")

    assert [(example.image_path.name, example.filewords) for example in examples] == [
        ("a.png", "1girl, smile"), ("b.png", "sidecar b"), ("c.png", "words c"), ("d.png", "")]


def test_training_gets_the_train_split_and_validation_the_held_out_rest(tmp_path) -> None:
    paths = ProjectPaths(datasets_dir=str(tmp_path / "datasets"), data_dir=str(tmp_path / "data"))
    manifest = pd.DataFrame({
        "output": ["a.png", "a__flip.png", "b.png", "c.png", None],
        "status": ["processed", "processed", "reused", "processed", "skipped"],
        "split": ["validation", "validation", "train", "train", ""],
        "source_caption": [None] * 5, "filename_words": ["words a", "words a", "words b", "words c", ""],
    })  # fmt: skip
    manifest_path(paths, "ds").parent.mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(manifest_path(paths, "ds"))
    captions = pd.DataFrame({"image": ["a.png", "a__flip.png", "b.png", "c.png"], "caption": ["tag a", "", "", ""]})
    captions.to_parquet(captions_path(paths, "ds"))

    assert [example.image_path.name for example in training_examples(paths, "ds")] == ["b.png", "c.png"]
    assert [(example.image_path.name, example.filewords) for example in validation_examples(paths, "ds")] == [
        ("a.png", "tag a"), ("a__flip.png", "words a")]
