"""`python -m embedded [ROOT]`: build the embedded default models and demo dataset where missing, and the
models trained on the demo world where missing or out of date."""

from __future__ import annotations

import sys
from pathlib import Path

from embedded import build_missing


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parents[1]
    built = build_missing(root, trained=True)
    for relative, path in built.items():
        print(f"built {relative} -> {path}")
    if not built:
        print("embedded default models and demo dataset are present")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
