"""The held-out validation split of the prepared images, chosen per source from its content.

Why per source and by content: every output of one source (flipped and greyscale copies, split tiles) and
its kept near duplicates go to the same split, so the validation loss never measures an image the embedding
was trained on in another form; and a source's split depends only on its own bytes (a salted hash, not its
name, position or a random draw), so renaming a file or adding images never moves other images between
splits. The one exception is the guarantee below: when the fraction picks no source at all (a tiny dataset),
the source with the lowest hash is held out, and a new image with a lower hash takes that place.
"""

from __future__ import annotations

import pandas as pd

from common.hashing import bytes_sha256

TRAIN, VALIDATION = "train", "validation"
_SALT = b"sd-personalize validation split v1:"


def split_position(source_sha256: str) -> float:
    """A number in [0, 1) fixed by the source's content hash; a source is held out when it is below the fraction.

    Salted so the split is unrelated to anything else ordered by content hash (cache folders, tagging order).
    """
    return int(bytes_sha256(_SALT + source_sha256.encode("ascii"))[:16], 16) / 2**64


def assign_splits(manifest: pd.DataFrame, fraction: float) -> pd.Series:
    """The `split` column for a prepared manifest: `train` or `validation` per kept row, "" for skipped rows.

    At least one source is held out when `fraction` > 0 and at least two are kept, and never all of them.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {fraction}")
    split = pd.Series("", index=manifest.index, dtype=object)
    kept = manifest["status"] != "skipped"
    split[kept] = TRAIN
    if fraction == 0 or not kept.any():
        return split
    groups = _groups(manifest[kept])
    positions = {sha: split_position(sha) for sha in set(groups)}
    held = {sha for sha, position in positions.items() if position < fraction}
    ranked = sorted(positions, key=lambda sha: (positions[sha], sha))
    if len(ranked) < 2:
        held = set()
    elif not held:
        held = {ranked[0]}
    elif len(held) == len(ranked):
        held.discard(ranked[-1])
    split[groups.index[groups.isin(held)]] = VALIDATION
    return split


def _groups(kept: pd.DataFrame) -> pd.Series:
    """Per kept row, the content hash that decides its split: its source's, or for a kept near duplicate the
    hash of the source it duplicates (so the two never land on opposite sides)."""
    by_source = dict(zip(kept["source"], kept["source_sha256"]))
    duplicate_of = kept["duplicate_of"] if "duplicate_of" in kept else pd.Series(None, index=kept.index)
    return pd.Series(
        [by_source.get(original, own) if isinstance(original, str) else own
         for own, original in zip(kept["source_sha256"], duplicate_of)],
        index=kept.index, dtype=object,
    )  # fmt: skip


def rows_of_split(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    """The kept rows of one split; a manifest written before splits existed is all training images."""
    if split not in (TRAIN, VALIDATION):
        raise ValueError(f"split must be {TRAIN!r} or {VALIDATION!r}, got {split!r}")
    kept = manifest[manifest["status"] != "skipped"]
    if "split" not in kept:
        return kept.reset_index(drop=True) if split == TRAIN else kept.iloc[0:0].reset_index(drop=True)
    return kept[kept["split"] == split].reset_index(drop=True)
