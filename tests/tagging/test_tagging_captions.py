from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tagging.captions import (
    CAPTION_COLUMNS,
    DEFAULT_THRESHOLDS,
    FREQUENCY_COLUMNS,
    CaptionOptions,
    build_captions,
    format_tag,
    mcut_thresholds,
)

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
    table = build_captions(scores, options).captions.set_index("image")
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
    table = build_captions(SCORES, WD14).captions
    assert list(table.columns) == list(CAPTION_COLUMNS)
    first = table.iloc[0]
    # 0.35 exactly is not "above" the threshold; the character threshold is stricter than the general one.
    assert first["tags"] == ["solo", "pip \\(demo\\)", "long hair", "^_^", "star \\[symbol\\]", "smile"]
    assert first["caption"] == ", ".join(first["tags"])
    assert first["scores"] == pytest.approx([0.95, 0.86, 0.8, 0.5, 0.4, 0.36])
    assert first["tag_count"] == 6


def test_image_without_tags_keeps_an_empty_caption() -> None:
    table = build_captions(SCORES, WD14).captions
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
    table = build_captions(SCORES, options).captions
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


def test_thousands_of_images_count_every_tag_once() -> None:
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
    table = build_captions(scores, CaptionOptions(0.9, 0.95, include_rating=True)).captions
    assert len(table) == images
    assert table["tag_count"].sum() == int(((scores["score"] > 0.9) & (scores["category"] == 0)).sum() + ((scores["score"] > 0.95) & (scores["category"] == 4)).sum()) + images


def test_mcut_cuts_at_the_largest_gap() -> None:
    scores = long_scores({"x": [("a", 0, 0.9), ("b", 0, 0.85), ("c", 0, 0.3), ("d", 0, 0.25)],
                          "y": [("a", 0, 0.6), ("b", 0, 0.5), ("c", 0, 0.45)], "z": [("a", 0, 0.7)]})
    codes = pd.factorize(scores["image"])[0]
    cuts = mcut_thresholds(codes, scores["score"].to_numpy(), np.ones(len(scores), bool))
    np.testing.assert_allclose(cuts, [0.575, 0.55, 1.0], rtol=1e-6)
    options = CaptionOptions(0.0, 0.85, general_mcut=True)
    assert caption_of("x", options, scores) == ["a", "b"] and caption_of("y", options, scores) == ["a"]
    assert caption_of("z", options, scores) == []


def test_character_mcut_never_goes_below_its_floor() -> None:
    scores = long_scores({"x": [("pip", 4, 0.14), ("tom", 4, 0.01), ("solo", 0, 0.9)]})
    assert caption_of("x", CaptionOptions(0.35, 0.85, character_mcut=True), scores) == ["solo"]
    scores = long_scores({"x": [("pip", 4, 0.5), ("tom", 4, 0.01)]})
    assert caption_of("x", CaptionOptions(0.35, 0.85, character_mcut=True), scores) == ["pip"]


def test_max_tags_keeps_the_most_confident_and_ignores_rating_and_always_first() -> None:
    options = CaptionOptions(0.35, 0.85, max_tags=2, include_rating=True, always_first=["smile"])
    assert caption_of("a.png", options) == ["smile", "general", "solo", "pip \\(demo\\)"]


def test_rating_threshold_and_position() -> None:
    last = CaptionOptions(0.35, 0.85, include_rating=True, rating_position="last")
    assert caption_of("a.png", last)[-1] == "general"
    strict = CaptionOptions(0.35, 0.85, include_rating=True, rating_threshold=0.8)
    assert caption_of("b.png", strict) == [] and caption_of("a.png", strict)[0] == "general"
    with pytest.raises(ValueError, match="rating_position"):
        CaptionOptions(0.35, 0.85, rating_position="middle")


def test_character_first_and_always_first() -> None:
    character = CaptionOptions(0.35, 0.85, character_first=True, always_first=["long hair", "missing", "^_^"])
    assert caption_of("a.png", character) == ["long hair", "^_^", "pip \\(demo\\)", "solo", "star \\[symbol\\]", "smile"]
    table = build_captions(SCORES, character).captions.set_index("image")
    assert table.loc["a.png", "keep_tokens"] == 2
    keep = CaptionOptions(0.35, 0.85, keep_tokens=3)
    assert build_captions(SCORES, keep).captions.set_index("image")["keep_tokens"].tolist() == [3, 0]


def test_regex_exclusion_and_replacements() -> None:
    options = CaptionOptions(0.35, 0.85, exclude_regex=[r".*\(demo\)", "s.*"],
                             replace_tags={"long_hair": "very long hair", "^_^": ""})
    assert caption_of("a.png", options) == ["very long hair"]
    merged = CaptionOptions(0.35, 0.85, replace_tags={"smile": "solo"})
    assert caption_of("a.png", merged).count("solo") == 1
    with pytest.raises(ValueError, match="not a valid regular expression"):
        CaptionOptions(0.35, 0.85, exclude_regex=["("])


def test_existing_sidecar_captions() -> None:
    existing = {"a.png": "a photo of pip", "b.png": ""}
    def caption(mode: str) -> list[str]:
        options = CaptionOptions(0.9, 0.9, existing_caption=mode)
        return build_captions(SCORES, options, existing=existing).captions["caption"].tolist()
    assert caption("ignore") == ["solo", ""]
    assert caption("prepend") == ["a photo of pip, solo", ""]
    assert caption("append") == ["solo, a photo of pip", ""]
    assert caption("replace") == ["a photo of pip", ""]
    table = build_captions(SCORES, CaptionOptions(0.9, 0.85), images=["a.png", "c.png"]).captions
    assert table["image"].tolist() == ["a.png", "b.png", "c.png"] and table["caption"].iloc[2] == ""


def test_subject_features_by_frequency_and_list() -> None:
    scores = long_scores({f"{i}.png": [("general", 9, 0.9), ("blue_eyes", 0, 0.9), ("solo", 0, 0.9 if i < 3 else 0.1),
                                      ("hat", 0, 0.9 if i == 0 else 0.1)] for i in range(4)})
    result = build_captions(scores, CaptionOptions(0.35, 0.85, drop_frequent_above=0.7, include_rating=True))
    assert list(result.frequency.columns) == list(FREQUENCY_COLUMNS)
    assert result.frequency[["tag", "images", "dropped"]].values.tolist() == [
        ["blue eyes", 4, True], ["solo", 3, True], ["hat", 1, False]]
    assert result.captions["caption"].tolist() == ["general, hat", "general", "general", "general"]
    listed = build_captions(scores, CaptionOptions(0.35, 0.85, subject_tags=["blue_eyes"], always_first=["solo"],
                                                   drop_frequent_above=0.5))
    assert listed.captions["caption"].tolist() == ["solo, hat", "solo", "solo", ""]


def test_an_empty_score_table_still_lists_every_image() -> None:
    empty = long_scores({})
    options = CaptionOptions(0.35, 0.85, general_mcut=True, include_rating=True, max_tags=2, drop_frequent_above=0.5)
    result = build_captions(empty, options, images=["a.png"])
    assert result.captions["image"].tolist() == ["a.png"] and result.captions["caption"].tolist() == [""]
    assert result.frequency.empty


def test_filewords_source_picks_tags_blip_or_both() -> None:
    blip = {"a.png": "a drawing of a girl in a hat"}
    tags = build_captions(SCORES, WD14, blip=blip).captions.set_index("image")
    assert tags.loc["a.png", "caption"] == ", ".join(tags.loc["a.png", "tags"])
    assert tags.loc["a.png", "blip_caption"] == "a drawing of a girl in a hat" and tags.loc["b.png", "blip_caption"] == ""

    only = CaptionOptions.for_backend("wd14", filewords_source="blip", keep_tokens=2)
    table = build_captions(SCORES, only, blip=blip).captions.set_index("image")
    assert table.loc["a.png", "caption"] == "a drawing of a girl in a hat" and table.loc["a.png", "keep_tokens"] == 1
    assert table.loc["a.png", "tags"] == tags.loc["a.png", "tags"]  # the tags stay in their own column
    assert table.loc["b.png", "caption"] == tags.loc["b.png", "caption"]  # no BLIP caption: the tags

    both = CaptionOptions.for_backend("wd14", filewords_source="blip_and_tags", always_first=("solo",), keep_tokens=1,
                                      existing_caption="append")
    table = build_captions(SCORES, both, blip=blip, existing={"a.png": "by hand"}).captions.set_index("image")
    assert table.loc["a.png", "caption"].split(", ")[:2] == ["a drawing of a girl in a hat", "solo"]
    assert table.loc["a.png", "caption"].endswith(", by hand")
    assert table.loc["a.png", "keep_tokens"] == 3  # the sentence, the always-first tag, then keep_tokens=1
    with pytest.raises(ValueError, match="filewords_source"):
        CaptionOptions.for_backend("wd14", filewords_source="clip")
