from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from tagging.captions import CAPTION_COLUMNS, DEFAULT_THRESHOLDS, CaptionOptions, build_captions, format_tag

WD14 = CaptionOptions.for_backend("wd14")


def long_scores(rows: dict[str, list[tuple[str, int, float]]]) -> pd.DataFrame:
    """The score_images layout from {image: [(tag, category, score), ...]}."""
    records = [(image, tag, category, score) for image, tags in rows.items() for tag, category, score in tags]
    frame = pd.DataFrame(records, columns=["image", "tag", "category", "score"])
    return frame.astype({"category": "int64", "score": "float32"})


SCORES = long_scores(
    {
        "a.png": [
            ("general", 9, 0.9), ("sensitive", 9, 0.2),
            ("long_hair", 0, 0.8), ("solo", 0, 0.95), ("smile", 0, 0.36), ("hat", 0, 0.34), ("blush", 0, 0.35),
            ("pip_(demo)", 4, 0.86), ("other_(demo)", 4, 0.84),
            ("^_^", 0, 0.5), ("star_[symbol]", 0, 0.4),
        ],
        "b.png": [("general", 9, 0.1), ("sensitive", 9, 0.7), ("solo", 0, 0.1), ("pip_(demo)", 4, 0.2)],
    }
)


def caption_of(image: str, options: CaptionOptions, scores: pd.DataFrame = SCORES) -> list[str]:
    table = build_captions(scores, options).set_index("image")
    return table.loc[image, "tags"]


def test_defaults_per_backend() -> None:
    assert DEFAULT_THRESHOLDS == {"wd14": {"general": 0.35, "character": 0.85}, "deepdanbooru": {"general": 0.5, "character": 0.5}}
    assert (WD14.general_threshold, WD14.character_threshold) == (0.35, 0.85)
    assert CaptionOptions.for_backend("deepdanbooru", general_threshold=0.75).general_threshold == 0.75
    with pytest.raises(ValueError, match="unknown tagger backend"):
        CaptionOptions.for_backend("blip")
    with pytest.raises(ValueError, match="between 0 and 1"):
        CaptionOptions(general_threshold=1.5, character_threshold=0.5)


def test_thresholds_per_category_and_confidence_order() -> None:
    table = build_captions(SCORES, WD14)
    assert list(table.columns) == list(CAPTION_COLUMNS)
    first = table.iloc[0]
    # 0.35 exactly is not "above" the threshold; the character threshold is stricter than the general one.
    assert first["tags"] == ["solo", "pip \\(demo\\)", "long hair", "^_^", "star \\[symbol\\]", "smile"]
    assert first["caption"] == ", ".join(first["tags"])
    assert first["scores"] == pytest.approx([0.95, 0.86, 0.8, 0.5, 0.4, 0.36])
    assert first["tag_count"] == 6


def test_image_without_tags_keeps_an_empty_caption() -> None:
    table = build_captions(SCORES, WD14)
    assert table["image"].tolist() == ["a.png", "b.png"]
    empty = table.iloc[1]
    assert (empty["caption"], empty["tags"], empty["scores"], empty["tag_count"]) == ("", [], [], 0)


def test_underscores_escaping_and_kaomoji() -> None:
    assert format_tag("long_hair", WD14) == "long hair"
    assert format_tag("^_^", WD14) == "^_^"
    assert format_tag("pip_(demo)", WD14) == "pip \\(demo\\)"
    assert format_tag("star_[symbol]", WD14) == "star \\[symbol\\]"
    raw = CaptionOptions(0.35, 0.85, replace_underscores=False, escape_brackets=False)
    assert format_tag("pip_(demo)", raw) == "pip_(demo)"
    assert "long_hair" in caption_of("a.png", raw)


def test_alphabetical_sort_and_separator() -> None:
    options = CaptionOptions(0.35, 0.85, sort_alphabetically=True, separator=" | ")
    table = build_captions(SCORES, options)
    tags = table.iloc[0]["tags"]
    assert tags == sorted(tags)
    assert table.iloc[0]["caption"] == " | ".join(tags)


def test_ties_are_ordered_by_name() -> None:
    scores = long_scores({"x": [("b_tag", 0, 0.5), ("c_tag", 0, 0.5), ("a_tag", 0, 0.5)]})
    assert caption_of("x", WD14, scores) == ["a tag", "b tag", "c tag"]


def test_blacklist_matches_raw_or_formatted_names() -> None:
    options = CaptionOptions(0.35, 0.85, exclude_tags=("long_hair", "pip \\(demo\\)", "smile ", "^_^"))
    assert caption_of("a.png", options) == ["solo", "star \\[symbol\\]"]
    spaced = CaptionOptions(0.35, 0.85, exclude_tags=["long hair"])
    assert "long hair" not in caption_of("a.png", spaced)


def test_rating_is_prepended_only_when_asked() -> None:
    assert "general" not in caption_of("a.png", WD14)
    with_rating = CaptionOptions(0.35, 0.85, include_rating=True)
    assert caption_of("a.png", with_rating)[0] == "general"
    assert caption_of("b.png", with_rating) == ["sensitive"]
    alphabetical = CaptionOptions(0.35, 0.85, include_rating=True, sort_alphabetically=True)
    assert caption_of("a.png", alphabetical)[0] == "general"


def test_thousands_of_images_take_well_under_a_second() -> None:
    rng = np.random.default_rng(0)
    images, tags = 2000, 100
    scores = pd.DataFrame(
        {
            "image": np.repeat([f"{i}.png" for i in range(images)], tags),
            "tag": np.tile([f"tag_{j}" for j in range(tags)], images),
            "category": np.tile([9] * 4 + [0] * 90 + [4] * 6, images),
            "score": rng.uniform(0, 1, images * tags).astype(np.float32),
        }
    )
    start = time.perf_counter()
    table = build_captions(scores, CaptionOptions(0.9, 0.95, include_rating=True))
    assert time.perf_counter() - start < 2.0
    assert len(table) == images
    assert table["tag_count"].sum() == int(((scores["score"] > 0.9) & (scores["category"] == 0)).sum() + ((scores["score"] > 0.95) & (scores["category"] == 4)).sum()) + images
