"""`[filewords]` from a file name, by the webui's rule, and the caption sidecar a user put beside an image."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

# webui textual_inversion/dataset.py: leading numbers and dashes (and the space after them) are dropped.
_LEADING_NUMBERS = re.compile(r"^[-\d]+\s*")


def filename_words(name: str, *, word_regex: str = "", join: str = " ") -> str:
    """`12-a red cat.png` -> `a red cat`; with `word_regex` only its matches are kept, joined by `join`."""
    text = _LEADING_NUMBERS.sub("", PurePosixPath(name).stem)
    if word_regex:
        text = join.join(re.findall(word_regex, text))
    return text


def sidecar_caption(image: Path) -> str | None:
    """The text of `<name>.txt` beside the image (stripped), or None when there is none or it is unreadable
    as UTF-8, since a caption that cannot be read is no caption."""
    path = image.with_suffix(".txt")
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
