"""How a DreamArtist pair is named: `<name>` and `<name>-neg`, in files side by side.

Its own small module because both the trainer (training/dreamartist.py) and the evaluation grid
(training/evaluation.py) need the rule, and the evaluation is imported by the training loop's previews.
"""

from __future__ import annotations

from pathlib import Path

NEGATIVE_SUFFIX = "-neg"


def negative_name(name: str) -> str:
    """The negative embedding's name, as the extension names it: `<name>-neg`."""
    return f"{name}{NEGATIVE_SUFFIX}"


def negative_embedding_path(positive: Path) -> Path:
    """Where the negative embedding of a positive embedding file is: the same name with `-neg` before the suffix
    (`mycat.pt` -> `mycat-neg.pt`, `mycat-500.safetensors` -> `mycat-500-neg.safetensors`), as the extension
    saves them, so the webui, which names an embedding after its file, calls it `<name>-neg`."""
    positive = Path(positive)
    return positive.with_name(f"{positive.stem}{NEGATIVE_SUFFIX}{positive.suffix}")
