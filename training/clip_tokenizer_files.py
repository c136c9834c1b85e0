"""CLIP BPE tokenizer files (vocab.json, merges.txt, configs) in the layout `CLIPTokenizer` loads.

Shared by the tiny model builder (a small vocabulary) and the SD 1.5 tokenizer builder (CLIP's own), so
both write exactly the same file format.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.atomic import write_text

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": BOS,
    "do_lower_case": True,
    "eos_token": EOS,
    "errors": "replace",
    "model_max_length": 77,
    "pad_token": EOS,
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": EOS,
}
SPECIAL_TOKENS_MAP = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table: every byte gets a visible base token."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def base_tokens() -> list[str]:
    """The 512 tokens every CLIP vocabulary starts with: each byte, then each byte ending a word."""
    base = list(bytes_to_unicode().values())
    return base + [token + "</w>" for token in base]


def write_tokenizer_files(out_dir: Path, vocab: dict[str, int], merges: list[str]) -> Path:
    write_text(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    write_text(out_dir / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    write_text(out_dir / "special_tokens_map.json", json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n")
    # Written last: a folder with tokenizer_config.json is complete, so an interrupted build is redone.
    write_text(out_dir / "tokenizer_config.json", json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    return out_dir


def write_tokenizer_of(tokenizer: object, out_dir: Path) -> Path:
    """A loaded CLIPTokenizer's vocabulary and merges as vocab.json/merges.txt.

    Why: transformers 5 saves only tokenizer.json, and the single-file loader (training/single_file.py) and
    older tools read the BPE files, so a saved model folder gets both.
    """
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]  # type: ignore[attr-defined]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    return write_tokenizer_files(Path(out_dir), dict(model["vocab"]), merges)
