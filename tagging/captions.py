"""Thresholds and caption formatting: the options users know from the webui and the WD14 tagger extension,
applied to the long score table in one vectorised pass (thousands of images in milliseconds).

DEFAULT_THRESHOLDS holds the default score thresholds per tagger backend:

- "wd14": general 0.35, character 0.85, the defaults of the WD14 tagger extension and of kohya's tagger script.
- "deepdanbooru": 0.5 for both, the webui default of `interrogate_deepbooru_score_threshold`. The seed guide
  recommends raising it to 0.75 for embedding training (fewer, surer tags).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tagging.categories import CHARACTER_CATEGORY, RATING_CATEGORY

DEFAULT_THRESHOLDS: dict[str, dict[str, float]] = {
    "wd14": {"general": 0.35, "character": 0.85},
    "deepdanbooru": {"general": 0.5, "character": 0.5},
}
# Kaomoji whose underscores are part of the face (SmilingWolf's list, used by the WD14 extension).
KAOMOJI = (
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
    "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
)
_ESCAPED = re.compile(r"([\\()\[\]])")
_UNESCAPE = re.compile(r"\\(.)")
CAPTION_COLUMNS = ("image", "caption", "tags", "scores", "tag_count")


@dataclass(frozen=True)
class CaptionOptions:
    """How scores become a caption. Field names follow the webui settings a user already knows."""

    general_threshold: float
    character_threshold: float
    include_rating: bool = False  # prepend the single best rating tag
    replace_underscores: bool = True  # webui "use spaces for tags in deepbooru"
    escape_brackets: bool = True  # webui "escape (\) brackets in deepbooru": \ ( ) [ ] become literal
    sort_alphabetically: bool = False  # webui "sort alphabetically"; otherwise by confidence, highest first
    exclude_tags: tuple[str, ...] = ()  # blacklist: raw name, formatted tag, or the spaces-for-underscores spelling
    keep_underscore_tags: tuple[str, ...] = KAOMOJI
    separator: str = ", "

    def __post_init__(self) -> None:
        for name in ("general_threshold", "character_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        # YAML gives lists; a frozen (hashable) options object needs tuples.
        object.__setattr__(self, "exclude_tags", tuple(self.exclude_tags))
        object.__setattr__(self, "keep_underscore_tags", tuple(self.keep_underscore_tags))

    @classmethod
    def for_backend(cls, backend: str, **overrides: object) -> CaptionOptions:
        """Options with the backend's default thresholds (see DEFAULT_THRESHOLDS), overridable field by field."""
        if backend not in DEFAULT_THRESHOLDS:
            raise ValueError(f"unknown tagger backend {backend!r}; known: {sorted(DEFAULT_THRESHOLDS)}")
        defaults = DEFAULT_THRESHOLDS[backend]
        fields = {"general_threshold": defaults["general"], "character_threshold": defaults["character"]}
        return cls(**{**fields, **overrides})


def format_tag(name: str, options: CaptionOptions) -> str:
    """A raw tag as it should appear in a prompt: spaces for underscores (kaomoji excepted), and brackets
    escaped so the webui reads them as literal characters rather than attention weights."""
    if options.replace_underscores and name not in options.keep_underscore_tags:
        name = name.replace("_", " ")
    if options.escape_brackets:
        name = _ESCAPED.sub(r"\\\1", name)
    return name


def _plain(tag: str) -> str:
    return _UNESCAPE.sub(r"\1", tag).replace("_", " ").strip()


def build_captions(scores: pd.DataFrame, options: CaptionOptions) -> pd.DataFrame:
    """One caption per image from the long `score_images` table.

    A score must be strictly above its category's threshold (character tags use the character threshold,
    ratings are never thresholded, every other category uses the general one). Images with no tag left keep
    an empty caption so the image list stays complete. Equal scores are ordered by tag name, so the same
    scores always give the same caption.
    """
    missing = [column for column in ("image", "tag", "category", "score") if column not in scores.columns]
    if missing:
        raise ValueError(f"score table lacks the columns {missing}; expected image, tag, category, score")
    images = pd.unique(scores["image"])
    category = scores["category"].to_numpy()
    score = scores["score"].to_numpy()
    threshold = np.where(category == CHARACTER_CATEGORY, options.character_threshold, options.general_threshold)
    picked = scores.loc[(category != RATING_CATEGORY) & (score > threshold), ["image", "tag", "score"]].assign(group=1)
    if options.include_rating:
        ratings = scores.loc[category == RATING_CATEGORY, ["image", "tag", "score"]]
        best = ratings.sort_values(["image", "score", "tag"], ascending=[True, False, True]).drop_duplicates("image")
        picked = pd.concat([best.assign(group=0), picked], ignore_index=True)
    picked = _format_and_filter(picked, options)
    order = ["image", "group", "formatted"] if options.sort_alphabetically else ["image", "group", "score", "tag"]
    ascending = [True, True, True] if options.sort_alphabetically else [True, True, False, True]
    picked = picked.sort_values(order, ascending=ascending, kind="stable")
    grouped = picked.groupby("image", sort=False).agg(tags=("formatted", list), scores=("score", list))
    grouped = grouped.reindex(images)
    tags = [value if isinstance(value, list) else [] for value in grouped["tags"]]
    tag_scores = [[float(s) for s in value] if isinstance(value, list) else [] for value in grouped["scores"]]
    return pd.DataFrame(
        {
            "image": list(images),
            "caption": [options.separator.join(value) for value in tags],
            "tags": tags,
            "scores": tag_scores,
            "tag_count": np.array([len(value) for value in tags], dtype=np.int64),
        },
        columns=list(CAPTION_COLUMNS),
    )


def _format_and_filter(picked: pd.DataFrame, options: CaptionOptions) -> pd.DataFrame:
    """Format each distinct tag once (a few thousand at most) and drop the blacklisted ones."""
    names = pd.unique(picked["tag"])
    formatted = {name: format_tag(name, options) for name in names}
    blocked = {entry.strip() for entry in options.exclude_tags} | {_plain(entry) for entry in options.exclude_tags}
    allowed = {name for name in names if not {name, formatted[name], _plain(name)} & blocked}
    kept = picked[picked["tag"].isin(allowed)]
    return kept.assign(formatted=kept["tag"].map(formatted))
