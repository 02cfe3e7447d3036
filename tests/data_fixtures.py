"""Helpers shared by the data-stage tests (tests/test_data_*.py, tests/test_cli_data.py).

Plain cached functions rather than fixtures: a fixture imported into several test
modules is set up once per module. The GPT-2 tokenizer is conftest.py's `gpt2_tok`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lmforge.tokenizer import ENDOFTEXT, Tokenizer, train_bpe

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@functools.cache
def small_tokenizer() -> Tokenizer:
    """A 300-id byte-level BPE (with <|endoftext|>) trained on The Verdict."""
    text = (SHARED / "llms-from-scratch" / "the-verdict.txt").read_text(encoding="utf-8")
    return train_bpe([text], vocab_size=300, workers=1, progress=False)


def write_texts(folder: Path, texts: Sequence[str], suffix: str = ".txt") -> list[Path]:
    """One file per text, named so that input order (sorted names) is list order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(texts):
        path = folder / f"doc{i:03d}{suffix}"
        path.write_bytes(text.encode("utf-8"))
        paths.append(path)
    return paths


def write_jsonl(path: Path, texts: Sequence[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def expected_tokens(tok: Tokenizer, docs: Sequence[str]) -> list[int]:
    """What prepare must write for `docs`: each encoded on its own, each followed by the eot id."""
    out: list[int] = []
    for doc in docs:
        out += tok.encode(doc) + [tok.eot_id]
    return out


def joined(docs: Sequence[str]) -> str:
    return "".join(doc + ENDOFTEXT for doc in docs)


def ids(array: np.ndarray) -> list[int]:
    return np.asarray(array).tolist()
