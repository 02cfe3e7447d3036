"""GPT-2's vocabulary: the same ids as tiktoken's GPT-2 built from the same two files."""

from __future__ import annotations

import shutil

import pytest
from conftest import read_text, shared

from lmforge import LmforgeError
from lmforge.corpus import resolve_inputs
from lmforge.tokenizer import DisallowedSpecialError, from_gpt2_files, reference_encode

REAL_FILES = [
    "gutenberg/pg11-alice-s-adventures-in-wonderland.txt",
    "gutenberg/pg2600-war-and-peace.txt",
    "gutenberg/pg98-a-tale-of-two-cities.txt",
    "gutenberg/pg1342-pride-and-prejudice.txt",
    "korean/konlpy/kolaw/constitution.txt",
    "korean/konlpy/kobill/1809896.txt",
    "tinyshakespeare.txt",
    "llms-from-scratch/the-verdict.txt",
]


def test_shape(gpt2_tok):
    assert gpt2_tok.vocab_size == 50257
    assert gpt2_tok.eot_id == 50256
    assert len(gpt2_tok.merges) == 50000
    assert gpt2_tok.encode("Hello, world") == [15496, 11, 995]  # the well-known ids


@pytest.mark.parametrize("rel", REAL_FILES)
def test_ids_equal_tiktoken_on_real_text(gpt2_tok, tiktoken_gpt2, rel):
    text = read_text(shared(rel))
    ours = gpt2_tok.encode(text)
    assert ours == tiktoken_gpt2.encode(text, disallowed_special=())
    assert gpt2_tok.decode(ours) == text


def test_ids_equal_tiktoken_on_every_gutenberg_and_korean_file(gpt2_tok, tiktoken_gpt2):
    paths = resolve_inputs([shared("gutenberg"), shared("korean"), shared("nltk/gutenberg")])
    texts = [read_text(p) for p in paths]
    assert len(texts) >= 40
    assert gpt2_tok.encode_batch(texts) == tiktoken_gpt2.encode_ordinary_batch(texts)


@pytest.mark.parametrize("rel", ["korean/konlpy/kolaw/constitution.txt", "gutenberg/pg84-frankenstein.txt"])
def test_oracle_agrees_on_real_text(gpt2_tok, rel):
    text = read_text(shared(rel))[:40_000]
    assert reference_encode(gpt2_tok, text) == gpt2_tok.encode(text)


def test_special_handling_as_tiktoken(gpt2_tok, tiktoken_gpt2):
    text = "first document<|endoftext|>second <|endoftext|>"
    # allowed: the special id
    assert gpt2_tok.encode(text, allowed_special="all") == tiktoken_gpt2.encode(text, allowed_special="all")
    assert gpt2_tok.encode(text, allowed_special="all").count(50256) == 2
    # as plain text: what tiktoken gives with no disallowed specials
    assert gpt2_tok.encode(text) == tiktoken_gpt2.encode(text, disallowed_special=())
    assert 50256 not in gpt2_tok.encode(text)
    # disallowed: both refuse (tiktoken's default)
    with pytest.raises(ValueError):
        tiktoken_gpt2.encode(text)
    with pytest.raises(DisallowedSpecialError):
        gpt2_tok.encode(text, disallowed_special="all")


def test_mismatched_files_are_refused(tmp_path):
    bpe = shared("gpt2/vocab.bpe").read_text(encoding="utf-8").split("\n")
    bpe[10], bpe[11] = bpe[11], bpe[10]  # two merges swapped: ids no longer match encoder.json
    bad = tmp_path / "vocab.bpe"
    bad.write_text("\n".join(bpe), encoding="utf-8")
    with pytest.raises(LmforgeError, match="disagrees"):
        from_gpt2_files(shared("gpt2/encoder.json"), bad)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(LmforgeError, match="not found"):
        from_gpt2_files(tmp_path / "encoder.json", shared("gpt2/vocab.bpe"))
    shutil.copy(shared("gpt2/encoder.json"), tmp_path / "vocab.bpe")
    with pytest.raises(LmforgeError, match="#version"):
        from_gpt2_files(shared("gpt2/encoder.json"), tmp_path / "vocab.bpe")
