"""Thresholds and caption formatting: the options users know from the webui, kohya's tagger script and the
WD14 tagger extensions, applied to the long score table in one vectorised pass.

Why vectorised: this is the step users iterate on (a threshold, a blacklist, an ordering), so it must cost
milliseconds on thousands of images. Every per-tag decision (spelling, blacklist, replacement, always-first)
is made once per distinct tag, every per-row decision with numpy over the whole table, and Python only loops
once per image to join the final strings.

DEFAULT_THRESHOLDS holds the default score thresholds per tagger backend:

- "wd14": general 0.35, character 0.85, the defaults of the WD14 tagger extension and of kohya's tagger script.
- "deepdanbooru": 0.5 for both, the webui default of `interrogate_deepbooru_score_threshold`. The seed guide
  recommends raising it to 0.75 for embedding training (fewer, surer tags).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
# SmilingWolf's reference app never lets MCut push the character threshold below this.
CHARACTER_MCUT_FLOOR = 0.15
EXISTING_CAPTION_MODES = ("ignore", "prepend", "append", "replace")
FILEWORDS_SOURCES = ("tags", "blip", "blip_and_tags")
_ESCAPED = re.compile(r"([\\()\[\]])")
_UNESCAPE = re.compile(r"\\(.)")
CAPTION_COLUMNS = ("image", "caption", "tags", "scores", "tag_count", "keep_tokens", "blip_caption")
FREQUENCY_COLUMNS = ("tag", "images", "fraction", "dropped")
# Row groups, in caption order.
_FIRST, _RATING_FIRST, _CHARACTER, _REST, _RATING_LAST = range(5)


@dataclass(frozen=True)
class CaptionOptions:
    """How scores become a caption. Field names follow the webui / kohya settings a user already knows."""

    general_threshold: float
    character_threshold: float
    rating_threshold: float = 0.0  # the best rating is used only when it scores above this
    general_mcut: bool = False  # automatic per-image threshold at the largest score gap (MCut)
    character_mcut: bool = False
    max_tags: int = 0  # keep only the N most confident general/character tags (0: no limit)
    include_rating: bool = False
    rating_position: str = "first"  # "first" or "last"
    character_first: bool = False  # kohya --character_tags_first
    replace_underscores: bool = True  # webui "use spaces for tags in deepbooru"
    escape_brackets: bool = True  # webui "escape (\) brackets in deepbooru": \ ( ) [ ] become literal
    sort_alphabetically: bool = False  # webui "sort alphabetically"; otherwise by confidence, highest first
    exclude_tags: tuple[str, ...] = ()  # kohya --undesired_tags: raw, formatted or spaced spelling
    exclude_regex: tuple[str, ...] = ()  # full-match patterns on the spaced, unescaped spelling
    replace_tags: Mapping[str, str] = field(default_factory=dict)  # kohya --tag_replacement; "" removes
    always_first: tuple[str, ...] = ()  # kohya --always_first_tags, in this order, when present
    keep_tokens: int = 0  # kohya keep_tokens: leading tags a trainer's shuffle keeps in place
    keep_underscore_tags: tuple[str, ...] = KAOMOJI
    separator: str = ", "
    existing_caption: str = "ignore"  # a sidecar caption from the dataset: ignore / prepend / append / replace
    drop_frequent_above: float | None = None  # subject features: drop tags in more than this fraction of images
    subject_tags: tuple[str, ...] = ()  # subject features listed by hand (dropped like exclude_tags)
    filewords_source: str = "tags"  # the caption is the tags, the BLIP caption, or the BLIP caption then the tags

    def __post_init__(self) -> None:
        for name in ("general_threshold", "character_threshold", "rating_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if self.drop_frequent_above is not None and not 0.0 <= self.drop_frequent_above <= 1.0:
            raise ValueError(f"drop_frequent_above must be between 0 and 1, got {self.drop_frequent_above}")
        if self.max_tags < 0 or self.keep_tokens < 0:
            raise ValueError("max_tags and keep_tokens must not be negative")
        if self.rating_position not in ("first", "last"):
            raise ValueError(f"rating_position must be 'first' or 'last', got {self.rating_position!r}")
        if self.existing_caption not in EXISTING_CAPTION_MODES:
            raise ValueError(f"existing_caption must be one of {EXISTING_CAPTION_MODES}, got {self.existing_caption!r}")
        if self.filewords_source not in FILEWORDS_SOURCES:
            raise ValueError(f"filewords_source must be one of {FILEWORDS_SOURCES}, got {self.filewords_source!r}")
        for pattern in self.exclude_regex:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"exclude_regex {pattern!r} is not a valid regular expression: {exc}") from exc
        # YAML gives lists and dicts; a frozen (hashable) options object needs tuples.
        for name in ("exclude_tags", "exclude_regex", "always_first", "keep_underscore_tags", "subject_tags"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "replace_tags", dict(self.replace_tags))

    @classmethod
    def for_backend(cls, backend: str, **overrides: object) -> CaptionOptions:
        """Options with the backend's default thresholds (see DEFAULT_THRESHOLDS), overridable field by field."""
        if backend not in DEFAULT_THRESHOLDS:
            raise ValueError(f"unknown tagger backend {backend!r}; known: {sorted(DEFAULT_THRESHOLDS)}")
        defaults = DEFAULT_THRESHOLDS[backend]
        fields = {"general_threshold": defaults["general"], "character_threshold": defaults["character"]}
        return cls(**{**fields, **overrides})


@dataclass(frozen=True)
class CaptionResult:
    captions: pd.DataFrame  # CAPTION_COLUMNS, one row per image
    frequency: pd.DataFrame  # FREQUENCY_COLUMNS, one row per tag that passed the thresholds, most frequent first


def format_tag(name: str, options: CaptionOptions) -> str:
    """A raw tag as it should appear in a prompt: spaces for underscores (kaomoji excepted), and brackets
    escaped so the webui reads them as literal characters rather than attention weights."""
    if options.replace_underscores and name not in options.keep_underscore_tags:
        name = name.replace("_", " ")
    if options.escape_brackets:
        name = _ESCAPED.sub(r"\\\1", name)
    return name


def _plain(tag: str) -> str:
    """The spelling user lists are matched on, so `long_hair`, `long hair` and `pip \\(demo\\)` all match."""
    return _UNESCAPE.sub(r"\1", tag).replace("_", " ").strip()


def build_captions(
    scores: pd.DataFrame,
    options: CaptionOptions,
    *,
    images: Sequence[str] | None = None,
    existing: Mapping[str, str] | None = None,
    blip: Mapping[str, str] | None = None,
) -> CaptionResult:
    """One caption per image from the long score table (image, tag, category, score).

    A score must be strictly above its category's threshold (MCut's, when enabled). Images with no tag left
    keep an empty caption so the image list stays complete; `images` adds images that have no score row at
    all. Equal scores are ordered by tag name, so the same scores always give the same caption. `existing`
    holds sidecar captions that came with the dataset, combined as `options.existing_caption` says. `blip` holds
    BLIP captions by image (the `blip_caption` column); `options.filewords_source` says whether the caption is
    made of the tags, the BLIP caption, or the BLIP caption followed by the tags (the BLIP sentence then counts
    as one leading token that keep_tokens keeps in place). An image without a BLIP caption keeps its tags.
    """
    missing = [column for column in ("image", "tag", "category", "score") if column not in scores.columns]
    if missing:
        raise ValueError(f"score table lacks the columns {missing}; expected image, tag, category, score")
    image_codes, image_names = _codes(scores["image"])
    seen = set(image_names)
    names = list(image_names) + [name for name in (images or ()) if name not in seen]
    tag_codes, vocabulary = _codes(scores["tag"])
    category = scores["category"].to_numpy()
    score = scores["score"].to_numpy(dtype=np.float32)

    keep = _above_thresholds(image_codes, category, score, options)
    vocab = _Vocabulary.build(vocabulary, np.unique(tag_codes[keep]), options)
    keep &= ~vocab.blocked[tag_codes] | (category == RATING_CATEGORY)
    rows = np.flatnonzero(keep)
    rows = _one_row_per_output(rows, image_codes, vocab.output_code[tag_codes], score)
    out = vocab.output_code[tag_codes[rows]]
    frequency = np.bincount(out[category[rows] != RATING_CATEGORY], minlength=len(vocab.outputs))
    drop = _subject_features(frequency, len(names), vocab, options)
    rows = rows[~drop[out] | (category[rows] == RATING_CATEGORY)]
    rows = _limit_tags(rows, image_codes, category, score, vocab.first_rank[tag_codes], options)

    group = _groups(category[rows], vocab.first_rank[tag_codes[rows]], options)
    out = vocab.output_code[tag_codes[rows]]
    within = vocab.alpha_rank[out] if options.sort_alphabetically else -score[rows]
    order = np.lexsort((vocab.alpha_rank[out], within, vocab.first_rank[tag_codes[rows]], group, image_codes[rows]))
    rows, out, group = rows[order], out[order], group[order]
    captions = _assemble(names, image_codes[rows], vocab.outputs[out], score[rows], group, existing or {}, blip or {},
                         options)
    table = _frequency_table(vocab.outputs, frequency, drop, len(names))
    return CaptionResult(captions=captions, frequency=table)


@dataclass(frozen=True)
class _Vocabulary:
    """Every per-tag decision, made once per distinct tag (a few thousand) instead of once per row."""

    output_code: np.ndarray  # tag code -> index into outputs (after formatting and replacement)
    outputs: np.ndarray  # distinct output spellings (object array)
    blocked: np.ndarray  # tag code -> excluded by list or regex (or replaced by nothing)
    first_rank: np.ndarray  # tag code -> position in always_first, or len(always_first) when not listed
    alpha_rank: np.ndarray  # output code -> rank in alphabetical order
    plain_outputs: tuple[str, ...]

    @classmethod
    def build(cls, vocabulary: list[str], used: np.ndarray, options: CaptionOptions) -> _Vocabulary:
        """Decisions for the `used` tag codes only (those above a threshold somewhere): a 10,000-tag model
        rarely has more than a few thousand of them in a dataset."""
        excluded = {_plain(entry) for entry in options.exclude_tags}
        patterns = [re.compile(pattern) for pattern in options.exclude_regex]
        replacements = {_plain(source): target for source, target in options.replace_tags.items()}
        first = {_plain(entry): rank for rank, entry in reversed(list(enumerate(options.always_first)))}
        needs_plain = bool(excluded or patterns or replacements or first)
        blocked = np.zeros(len(vocabulary), dtype=bool)
        first_rank = np.full(len(vocabulary), len(first), dtype=np.int64)
        spelled: list[str] = []
        for code in used.tolist():
            tag = vocabulary[code]
            key = _plain(tag) if needs_plain else tag
            target = replacements.get(key)
            if target is not None and not target.strip():
                blocked[code] = True
            text = format_tag(_UNESCAPE.sub(r"\1", target.strip()) if target else tag, options)
            spelled.append(text)
            if key in excluded or any(pattern.fullmatch(key) for pattern in patterns):
                blocked[code] = True
            if first:
                first_rank[code] = first.get(_plain(text), first.get(key, len(first)))
        local_code, outputs = pd.factorize(pd.Series(spelled, dtype=object), sort=False)
        output_code = np.zeros(len(vocabulary), dtype=np.int64)
        output_code[used] = local_code
        outputs = np.asarray(outputs, dtype=object)
        alpha_rank = np.empty(len(outputs), dtype=np.int64)
        alpha_rank[np.argsort(outputs.astype(str), kind="stable")] = np.arange(len(outputs))
        plain_outputs = tuple(_plain(str(text)) for text in outputs) if options.subject_tags else ()
        return cls(output_code=output_code, outputs=outputs, blocked=blocked, first_rank=first_rank,
                   alpha_rank=alpha_rank, plain_outputs=plain_outputs)


def _codes(column: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Integer codes and their names; free for the categorical columns tag_scores writes."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        return column.cat.codes.to_numpy().astype(np.int64), column.cat.categories.to_numpy(dtype=object).tolist()
    codes, uniques = pd.factorize(column, sort=False)
    return codes.astype(np.int64), pd.Index(uniques).to_numpy(dtype=object).tolist()


def _above_thresholds(image: np.ndarray, category: np.ndarray, score: np.ndarray, options: CaptionOptions) -> np.ndarray:
    """Rows kept by the per-category thresholds; ratings keep only each image's best one, when asked."""
    is_character = category == CHARACTER_CATEGORY
    is_rating = category == RATING_CATEGORY
    is_general = ~is_character & ~is_rating
    threshold = np.where(is_character, np.float32(options.character_threshold), np.float32(options.general_threshold))
    if options.general_mcut:
        threshold = np.where(is_general, mcut_thresholds(image, score, is_general)[image], threshold)
    if options.character_mcut:
        cut = np.maximum(mcut_thresholds(image, score, is_character), CHARACTER_MCUT_FLOOR)
        threshold = np.where(is_character, cut[image], threshold)
    keep = ~is_rating & (score > threshold)
    if options.include_rating:
        keep |= _best_per_image(image, score, is_rating & (score > options.rating_threshold))
    return keep


def mcut_thresholds(image: np.ndarray, score: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per image code, the MCut threshold (Largeron et al., 2012) of the masked scores: the midpoint of the
    largest gap between consecutive sorted scores. Images with fewer than two scores get 1.0 (nothing kept),
    as SmilingWolf's reference code would find no gap to cut at."""
    count = int(image.max()) + 1 if len(image) else 0
    thresholds = np.ones(count, dtype=np.float32)
    rows = np.flatnonzero(mask)
    if len(rows) < 2:
        return thresholds
    rows = rows[np.lexsort((-score[rows], image[rows]))]
    owner, values = image[rows], score[rows]
    gaps = np.where(owner[:-1] == owner[1:], values[:-1] - values[1:], -1.0)
    best = np.full(count, -1.0)
    np.maximum.at(best, owner[:-1], gaps)
    at_best = np.flatnonzero((gaps >= 0) & (gaps == best[owner[:-1]]))
    first_owner, first_index = np.unique(owner[at_best], return_index=True)
    position = at_best[first_index]
    thresholds[first_owner] = (values[position] + values[position + 1]) / 2
    return thresholds


def _best_per_image(image: np.ndarray, score: np.ndarray, mask: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(mask)
    rows = rows[np.lexsort((-score[rows], image[rows]))]
    _, first = np.unique(image[rows], return_index=True)
    best = np.zeros(len(image), dtype=bool)
    best[rows[first]] = True
    return best


def _one_row_per_output(rows: np.ndarray, image: np.ndarray, output: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Two tags replaced by the same word would repeat it: keep the more confident row of each pair."""
    rows = rows[np.lexsort((-score[rows], output[rows], image[rows]))]
    key = image[rows].astype(np.int64) * (int(output.max(initial=0)) + 1) + output[rows]
    first = np.r_[True, key[1:] != key[:-1]] if len(rows) else np.zeros(0, dtype=bool)
    return np.sort(rows[first])


def _subject_features(frequency: np.ndarray, images: int, vocab: _Vocabulary, options: CaptionOptions) -> np.ndarray:
    """Output codes to drop because they describe the subject itself (the seeds' rule for [filewords])."""
    listed = {_plain(entry) for entry in options.subject_tags}
    drop = np.array([text in listed for text in vocab.plain_outputs] or [False] * len(vocab.outputs), dtype=bool)
    if options.drop_frequent_above is not None and images:
        always = np.zeros(len(vocab.outputs), dtype=bool)
        always[vocab.output_code[vocab.first_rank < len(options.always_first)]] = True
        drop |= (frequency / images > options.drop_frequent_above) & ~always
    return drop


def _limit_tags(rows: np.ndarray, image: np.ndarray, category: np.ndarray, score: np.ndarray,
                first_rank: np.ndarray, options: CaptionOptions) -> np.ndarray:
    """At most `max_tags` general/character tags per image, the most confident ones; ratings and always-first
    tags do not count against the limit."""
    if not options.max_tags or not len(rows):
        return rows
    limited = (category[rows] != RATING_CATEGORY) & (first_rank[rows] >= len(options.always_first))
    candidates = rows[limited]
    candidates = candidates[np.lexsort((-score[candidates], image[candidates]))]
    owner = image[candidates]
    starts = np.r_[0, np.flatnonzero(owner[1:] != owner[:-1]) + 1]
    rank = np.arange(len(candidates)) - np.repeat(starts, np.diff(np.r_[starts, len(candidates)]))
    return np.sort(np.concatenate([rows[~limited], candidates[rank < options.max_tags]]))


def _groups(category: np.ndarray, first_rank: np.ndarray, options: CaptionOptions) -> np.ndarray:
    group = np.full(len(category), _REST, dtype=np.int64)
    if options.character_first:
        group[category == CHARACTER_CATEGORY] = _CHARACTER
    group[category == RATING_CATEGORY] = _RATING_FIRST if options.rating_position == "first" else _RATING_LAST
    group[(first_rank < len(options.always_first)) & (category != RATING_CATEGORY)] = _FIRST
    return group


def _assemble(names: list[str], owner: np.ndarray, texts: np.ndarray, scores: np.ndarray, group: np.ndarray,
              existing: Mapping[str, str], blip: Mapping[str, str], options: CaptionOptions) -> pd.DataFrame:
    """Join the sorted rows into one caption per image (the only per-image Python loop)."""
    bounds = np.searchsorted(owner, np.arange(len(names) + 1)).tolist()
    fixed = [0, *np.cumsum(np.isin(group, (_FIRST, _RATING_FIRST))).tolist()]
    texts, scores = texts.tolist(), scores.tolist()  # slicing lists beats slicing arrays 10,000 times
    captions, tag_lists, score_lists, counts, keeps, sentences = [], [], [], [], [], []
    for index, name in enumerate(names):
        start, stop = bounds[index], bounds[index + 1]
        tags, values = texts[start:stop], scores[start:stop]
        kept = fixed[stop] - fixed[start]
        sentence = (blip.get(name) or "").strip()
        parts = tags
        if sentence and options.filewords_source == "blip":
            parts, kept = [sentence], 0
        elif sentence and options.filewords_source == "blip_and_tags":
            parts, kept = [sentence, *tags], kept + 1
        text, tokens = options.separator.join(parts), len(parts)
        sidecar = (existing.get(name) or "").strip()
        if sidecar and options.existing_caption == "replace":
            text, tokens, kept = sidecar, 1, 0
        elif sidecar and options.existing_caption == "prepend":
            text, tokens, kept = options.separator.join([sidecar, *parts]), tokens + 1, kept + 1
        elif sidecar and options.existing_caption == "append":
            text, tokens = options.separator.join([*parts, sidecar]), tokens + 1
        keep = min(kept + options.keep_tokens, tokens)
        captions.append(text)
        tag_lists.append(tags)
        score_lists.append(values)
        counts.append(len(tags))
        keeps.append(keep)
        sentences.append(sentence)
    return pd.DataFrame(
        {
            "image": pd.Series(names, dtype=object),
            "caption": pd.Series(captions, dtype=object),
            "tags": pd.Series(tag_lists, dtype=object),
            "scores": pd.Series(score_lists, dtype=object),
            "tag_count": np.array(counts, dtype=np.int64),
            "keep_tokens": np.array(keeps, dtype=np.int64),
            "blip_caption": pd.Series(sentences, dtype=object),
        },
        columns=list(CAPTION_COLUMNS),
    )


def _frequency_table(outputs: np.ndarray, frequency: np.ndarray, drop: np.ndarray, images: int) -> pd.DataFrame:
    present = np.flatnonzero(frequency)
    table = pd.DataFrame(
        {
            "tag": outputs[present].astype(str),
            "images": frequency[present].astype(np.int64),
            "fraction": (frequency[present] / max(images, 1)).astype(np.float64),
            "dropped": drop[present],
        },
        columns=list(FREQUENCY_COLUMNS),
    )
    return table.sort_values(["images", "tag"], ascending=[False, True], kind="stable").reset_index(drop=True)
