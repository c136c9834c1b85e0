"""Pickled torch files the webui reads: bytes made in memory, safe loading, and the `.optim` companion.

Why one module: textual-inversion embeddings and hypernetworks are both webui `.pt` files with a
`<file>.pt.optim` beside them ({hash, optimizer_name, optimizer_state_dict}); only what the hash is taken
of differs (the embedding's vectors, the hypernetwork file's bytes). Loading is always `weights_only`,
so a file with arbitrary Python objects in it is refused instead of executed.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import torch

from common.atomic import write_bytes

OPTIM_SUFFIX = ".optim"


def torch_bytes(data: object) -> bytes:
    """Serialised in memory first, so the bytes do not depend on the temporary file's name."""
    buffer = io.BytesIO()
    torch.save(data, buffer)
    return buffer.getvalue()


def load_torch_file(path: str | os.PathLike[str], error: type[Exception]) -> object:
    """`torch.load(weights_only=True)` on CPU; every way it can fail becomes `error` naming the file."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as cause:
        raise error(
            f"{path}: corrupt, or holds Python objects besides tensors and plain values, which are never unpickled"
        ) from cause
    except Exception as cause:  # noqa: BLE001 - the unpickler fails on garbage in many ways (EOF, IndexError ...)
        raise error(f"{path}: not a readable torch file ({cause})") from cause


def optim_path(pt_path: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(pt_path)}{OPTIM_SUFFIX}")


def save_optim_companion(
    pt_path: str | os.PathLike[str], owner_hash: str, optimizer_name: str, optimizer_state: dict
) -> Path:
    """`<file>.pt.optim` as the webui writes it; `owner_hash` ties the state to the weights it was built on."""
    data = {"hash": owner_hash, "optimizer_name": optimizer_name, "optimizer_state_dict": optimizer_state}
    return write_bytes(optim_path(pt_path), torch_bytes(data))


def load_optim_companion(
    pt_path: str | os.PathLike[str], owner_hash: str, error: type[Exception]
) -> tuple[str, dict] | None:
    """(optimizer name, state) from `<file>.pt.optim` when it exists and carries `owner_hash`, else None.

    As the webui does: a state saved for other weights is ignored, since AdamW's moments only make sense
    for the values they were accumulated on. A file that is there but unreadable is an error.
    """
    path = optim_path(pt_path)
    if not path.is_file():
        return None
    data = load_torch_file(path, error)
    if not isinstance(data, dict) or data.get("hash") != owner_hash:
        return None
    state = data.get("optimizer_state_dict")
    if not isinstance(state, dict):
        return None
    return str(data.get("optimizer_name") or "AdamW"), state
