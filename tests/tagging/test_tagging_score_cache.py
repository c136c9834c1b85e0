from __future__ import annotations

from pathlib import Path

import pandas as pd

from common.hashing import file_sha256
from tagging.score_cache import SCORE_COLUMNS, ImageToScore, score_with_cache
from tagging.wd14 import WD14Tagger


def to_score(path: Path, name: str | None = None) -> ImageToScore:
    return ImageToScore(name=name or path.name, path=path, sha256=file_sha256(path))


def test_reuses_scores_by_content_hash(tiny_tagger: WD14Tagger, tmp_path: Path, solid_image) -> None:
    red = to_score(solid_image(tmp_path / "red.png", (220, 30, 30)))
    blue = to_score(solid_image(tmp_path / "blue.png", (30, 60, 220)))
    first, status = score_with_cache(tiny_tagger, [red, blue], None)
    assert list(first.columns) == SCORE_COLUMNS
    assert status == {"red.png": "processed", "blue.png": "processed"}
    assert len(first) == 2 * len(tiny_tagger.tags)

    renamed = ImageToScore(name="crimson.png", path=red.path, sha256=red.sha256)
    green = to_score(solid_image(tmp_path / "green.png", (40, 180, 60)))
    second, status = score_with_cache(tiny_tagger, [renamed, blue, green], first)
    assert status == {"crimson.png": "reused", "blue.png": "reused", "green.png": "processed"}
    by_image = {image: rows.set_index("tag")["score"] for image, rows in second.groupby("image")}
    old = {image: rows.set_index("tag")["score"] for image, rows in first.groupby("image")}
    pd.testing.assert_series_equal(by_image["crimson.png"], old["red.png"], check_names=False)
    assert by_image["green.png"]["green_background"] > 0.9


def test_identical_files_do_not_duplicate_rows(tiny_tagger: WD14Tagger, tmp_path: Path, solid_image) -> None:
    one = to_score(solid_image(tmp_path / "one.png", (0, 0, 0)))
    two = to_score(solid_image(tmp_path / "two.png", (0, 0, 0)))
    first, _ = score_with_cache(tiny_tagger, [one, two], None)
    again, status = score_with_cache(tiny_tagger, [one, two], first)
    assert set(status.values()) == {"reused"}
    assert len(again) == 2 * len(tiny_tagger.tags)


def test_other_model_means_new_scores(tiny_tagger: WD14Tagger, tmp_path: Path, solid_image) -> None:
    image = to_score(solid_image(tmp_path / "a.png"))
    first, _ = score_with_cache(tiny_tagger, [image], None)
    stale = first.assign(model="another-model")
    _, status = score_with_cache(tiny_tagger, [image], stale)
    assert status == {"a.png": "processed"}
