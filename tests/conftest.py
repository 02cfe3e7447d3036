"""Shared fixtures: the real public data beside the checkout, and tokenizers built from it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from lmforge.corpus import ReadStats, iter_documents, resolve_inputs
from lmforge.tokenizer import Tokenizer, from_gpt2_files, train_bpe

# The machine is shared and noisy: no example may fail for taking long.
settings.register_profile("lmforge", deadline=None)
settings.load_profile("lmforge")
# The test models are tiny: threads only add overhead there (and contention on a busy machine).
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GPT2_DIR = SHARED / "gpt2"


def shared(rel: str) -> Path:
    """A file from ../shared/data; a missing one is an error, never a skip."""
    p = SHARED / rel
    if not p.exists():
        raise FileNotFoundError(f"test data {p} is missing: the shared/ folder must sit beside the checkout")
    return p


def read_text(path: Path) -> str:
    """Read a real text file the way lmforge does (UTF-8, undecodable bytes as U+FFFD)."""
    return "".join(c for doc in iter_documents([path], ReadStats()) for c in doc)


@pytest.fixture(scope="session")
def gpt2_tok() -> Tokenizer:
    return from_gpt2_files(shared("gpt2/encoder.json"), shared("gpt2/vocab.bpe"))


@pytest.fixture(scope="session")
def tiktoken_gpt2():
    """tiktoken's GPT-2 encoding built from the same two files (no download, no cache)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read the local files directly
    ranks = data_gym_to_mergeable_bpe_ranks(str(shared("gpt2/vocab.bpe")), str(shared("gpt2/encoder.json")))
    return tiktoken.Encoding("gpt2-local", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})


def _train_small(pattern: str, vocab_size: int) -> Tokenizer:
    paths = [shared("tinyshakespeare.txt"), *resolve_inputs([shared("korean/konlpy/kobill")])]
    chunks = (c for doc in iter_documents(paths, ReadStats()) for c in doc)
    return train_bpe(chunks, vocab_size, special_tokens=["<|endoftext|>", "<|user|>"], pattern=pattern, progress=False)


@pytest.fixture(scope="session")
def small_tok() -> Tokenizer:
    """A 1,000-id BPE trained here on Shakespeare and Korean bills (GPT-2 pattern)."""
    return _train_small("gpt2", 1000)


@pytest.fixture(scope="session")
def small_tok_gpt4() -> Tokenizer:
    from lmforge.tokenizer import GPT4_PATTERN

    return _train_small(GPT4_PATTERN, 600)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The README walk first. Its sections build on each other, so one worker runs them all
    (5-10 minutes here); started first, the other workers take every other file
    meanwhile instead of waiting on it at the end (`scripts/test` runs one worker per core)."""
    items.sort(key=lambda item: item.path.name != "test_readme.py")
