"""Turn a YAML or validation error in `dataset.yaml` into a message with the file, the line and the key.

Why a separate pass over the YAML node tree: pydantic reports where a value sits in the data (`captions ->
general_treshold`), not where it sits in the file; composing the same text with PyYAML keeps the marks, so
each error can point at the line the user has to edit.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError


def yaml_error_message(path: Path, error: yaml.YAMLError | UnicodeDecodeError) -> str:
    """`<file>, line N: <problem>` from PyYAML's problem mark (1-based lines)."""
    if isinstance(error, UnicodeDecodeError):
        return f"{path}: not UTF-8 text ({error.reason} at byte {error.start})"
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    detail = f"{context}, {problem}" if context else problem
    return f"{path}{where}: not valid YAML: {detail}"


def key_line(text: str, loc: Sequence[str | int]) -> int | None:
    """1-based line of the deepest key (or list item) of `loc` that exists in the YAML text."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((key, value) for key, value in node.value if key.value == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _fields_at(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """Field names of the (nested) settings model that holds the last key of `loc`."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def did_you_mean(model: type[BaseModel], loc: Sequence[str | int]) -> str:
    """` (did you mean 'general_threshold'?)` for a misspelt key, else the list of known keys."""
    known = _fields_at(model, loc)
    if not known:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known keys: {', '.join(known)})"


def validation_error_message(path: Path, text: str, model: type[BaseModel], error: ValidationError) -> str:
    """One line per problem: `<file>, line N, key a.b: <reason>`; unknown keys get a did-you-mean."""
    problems = []
    for item in error.errors():
        loc = [part for part in item["loc"] if isinstance(part, (str, int))]
        key = ".".join(str(part) for part in loc) or "(top level)"
        line = key_line(text, loc) if loc else None
        where = f", line {line}" if line else ""
        if item["type"] == "extra_forbidden":
            reason = f"unknown key{did_you_mean(model, loc)}"
        else:
            reason = item["msg"]
        problems.append(f"{path}{where}, key {key}: {reason}")
    return "\n".join(problems)
