"""One dynamic partition per dataset folder under `datasets/`."""

from __future__ import annotations

import re

from dagster import DynamicPartitionsDefinition

datasets_partitions = DynamicPartitionsDefinition(name="datasets")

# Folder names that are safe as partition keys, run tags and output folder names alike.
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def dataset_name_problem(name: str) -> str | None:
    """Why a folder name cannot be a partition key (it also names run tags and output folders), or None."""
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        return "contains control characters"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if ".." in name:
        return "contains '..'"
    if name.startswith("."):
        return "starts with a dot (hidden folder)"
    if not _DATASET_NAME.match(name):
        return "use 1-100 letters, digits, '_', '.' or '-', starting with a letter or digit"
    return None


def is_valid_dataset_name(name: str) -> bool:
    return dataset_name_problem(name) is None
