"""One dynamic partition per dataset folder under `datasets/`."""

from __future__ import annotations

import re

from dagster import DynamicPartitionsDefinition

datasets_partitions = DynamicPartitionsDefinition(name="datasets")

# Folder names that are safe as partition keys, run tags and output folder names alike.
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def is_valid_dataset_name(name: str) -> bool:
    return bool(_DATASET_NAME.match(name)) and ".." not in name
