"""Derive CLIP ViT-L/14's tokenizer folder (what SD 1.x uses) from the BPE file that open_clip_torch ships.

Why: a real SD 1.x checkpoint is useless without CLIP's exact tokenizer, the hub is out of reach, and the
files are too large to keep in the repo comfortably. The `open_clip_torch` wheel carries OpenAI's original
`bpe_simple_vocab_16e6.txt.gz`; CLIP's own `simple_tokenizer.py` derives its vocabulary from that file in a
fixed way (byte tokens, their word-final forms, the first 48,894 merges, then the two special tokens), and
the Hugging Face `vocab.json`/`merges.txt` pair is that same derivation written out. So this script
reproduces the files byte-for-token without downloading anything.

Install the package without its dependencies (it would pull torchvision otherwise), then run the script:

    pip install --no-deps open_clip_torch==3.3.0
    python training/configs/build_clip_tokenizer.py

Only the package's data file is read; `open_clip` itself is never imported.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `common` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training.clip_tokenizer_files import BOS, EOS, base_tokens, write_tokenizer_files  # noqa: E402

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "stable-diffusion-v1-5" / "tokenizer"
BPE_DISTRIBUTION = "open_clip_torch"
BPE_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# CLIP's vocabulary is 49,408 tokens: 512 byte tokens + merges + 2 special tokens.
VOCAB_SIZE = 49408
MERGE_COUNT = VOCAB_SIZE - 2 * 256 - 2


class TokenizerBuildError(RuntimeError):
    """The BPE source file is missing or not the one CLIP was trained with."""


def clip_vocab_and_merges(bpe_text: str) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merge list, exactly as `clip/simple_tokenizer.py` builds them from the BPE file."""
    lines = bpe_text.split("\n")
    merges = lines[1 : MERGE_COUNT + 1]  # line 0 is a version header
    if len(merges) != MERGE_COUNT or any(len(merge.split()) != 2 for merge in merges):
        raise TokenizerBuildError(f"expected {MERGE_COUNT} merge lines of two symbols each after the header")
    tokens = base_tokens() + ["".join(merge.split()) for merge in merges] + [BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise TokenizerBuildError(f"derived {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def find_bpe_file() -> Path:
    """Locate the BPE file inside the installed wheel through package metadata, without importing open_clip."""
    try:
        distribution = importlib.metadata.distribution(BPE_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as error:
        raise TokenizerBuildError(
            f"{BPE_DISTRIBUTION} is not installed; run `pip install --no-deps {BPE_DISTRIBUTION}` "
            "or pass --bpe with a copy of bpe_simple_vocab_16e6.txt.gz"
        ) from error
    path = Path(distribution.locate_file(BPE_FILE))
    if not path.is_file():
        raise TokenizerBuildError(f"{path}: {BPE_DISTRIBUTION} is installed but does not ship {BPE_FILE}")
    return path


def is_built(out_dir: Path) -> bool:
    return all((out_dir / name).is_file() for name in ("vocab.json", "merges.txt", "tokenizer_config.json"))


def build_clip_tokenizer(out_dir: Path = DEFAULT_OUT_DIR, *, bpe_path: Path | None = None, force: bool = False) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs into `out_dir` unless they are already there."""
    out_dir = Path(out_dir)
    if is_built(out_dir) and not force:
        return out_dir
    bpe_path = Path(bpe_path) if bpe_path is not None else find_bpe_file()
    try:
        bpe_text = gzip.decompress(bpe_path.read_bytes()).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise TokenizerBuildError(f"{bpe_path}: not a readable gzip'd BPE merges file ({error})") from error
    try:
        vocab, merges = clip_vocab_and_merges(bpe_text)
    except TokenizerBuildError as error:
        raise TokenizerBuildError(f"{bpe_path}: {error}") from error
    return write_tokenizer_files(out_dir, vocab, merges)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="tokenizer folder to write")
    parser.add_argument("--bpe", type=Path, default=None, help="bpe_simple_vocab_16e6.txt.gz (default: from open_clip_torch)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    args = parser.parse_args(argv)
    try:
        out_dir = build_clip_tokenizer(args.out, bpe_path=args.bpe, force=args.force)
    except TokenizerBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"CLIP tokenizer ready in {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
