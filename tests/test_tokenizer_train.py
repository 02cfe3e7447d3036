"""The incremental BPE trainer against a naive full-recount trainer, ties, specials, save/load."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import regex
from conftest import shared
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge import LmforgeError
from lmforge.corpus import ReadStats, read_chunks, safe_cut
from lmforge.tokenizer import GPT2_PATTERN, GPT4_PATTERN, Tokenizer, train_bpe
from lmforge.tokenizer.train import count_words, learn_merges


def naive_merges(word_counts: Counter, n_merges: int) -> list[tuple[int, int]]:
    """Textbook BPE: recount every pair after every merge. Same tie rule, same duplicate rule."""
    vocab = [bytes([b]) for b in range(256)]
    token_of = {t: i for i, t in enumerate(vocab)}
    words = {tuple(w.encode("utf-8", "surrogatepass")): f for w, f in word_counts.items()}
    merges = []
    while len(merges) < n_merges:
        pairs = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += f
        if not pairs:
            break
        a, b = min(pairs, key=lambda p: (-pairs[p], vocab[p[0]], vocab[p[1]]))
        merged = vocab[a] + vocab[b]
        if merged in token_of:
            t = token_of[merged]
        else:
            t = len(vocab)
            vocab.append(merged)
            token_of[merged] = t
            merges.append((a, b))
        new_words = Counter()
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(t)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += f
        words = new_words
    return merges


words_strategy = st.dictionaries(
    st.text(st.sampled_from("abcab ba한국"), min_size=1, max_size=8), st.integers(1, 6), min_size=1, max_size=25
)


@settings(deadline=None, max_examples=150)
@given(word_counts=words_strategy, n_merges=st.integers(1, 40))
def test_incremental_equals_naive(word_counts, n_merges):
    counts = Counter(word_counts)
    assert learn_merges(counts, n_merges, progress=False) == naive_merges(counts, n_merges)


def test_incremental_equals_naive_on_real_words():
    text = shared("llms-from-scratch/the-verdict.txt").read_text(encoding="utf-8")
    counts = Counter(regex.findall(GPT2_PATTERN, text))
    assert learn_merges(counts, 300, progress=False) == naive_merges(counts, 300)


def test_tie_rule_is_bytes_order():
    # "cd" and "ab" are equally frequent: (a, b) wins because b"a" < b"c", whatever the order seen.
    for order in (["cd", "ab"], ["ab", "cd"]):
        counts = Counter({w: 3 for w in order})
        assert learn_merges(counts, 2, progress=False) == [(ord("a"), ord("b")), (ord("c"), ord("d"))]


def test_training_is_deterministic_across_order_and_workers():
    text = shared("tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000]
    lines = text.splitlines(keepends=True)
    shuffled = lines[:]
    random.Random(0).shuffle(shuffled)
    a = train_bpe(["".join(lines)], 700, workers=1, progress=False)
    b = train_bpe(["".join(lines)], 700, workers=2, progress=False)
    c = train_bpe(["".join(shuffled)], 700, workers=1, progress=False)
    assert a.to_dict() == b.to_dict()
    # shuffling lines changes a few pieces at line joins, but not the winning merges early on
    assert a.merges[:50] == c.merges[:50]


def test_vocab_size_and_special_ids():
    text = shared("llms-from-scratch/the-verdict.txt").read_text(encoding="utf-8")
    tok = train_bpe([text], 270, special_tokens=["<|endoftext|>", "<|pad|>"], progress=False)
    assert tok.vocab_size == 270
    assert tok.special_tokens == {"<|endoftext|>": 268, "<|pad|>": 269}


def test_special_strings_in_training_text_are_never_merged():
    text = "<|endoftext|>".join(["hello there"] * 200)
    tok = train_bpe([text], 400, progress=False)
    assert all(b"<|" not in tok.token_bytes(i) and b"|>" not in tok.token_bytes(i) for i in range(256, 256 + len(tok.merges)))


def test_small_corpus_gives_smaller_vocab_and_errors():
    tok = train_bpe(["ab"], 1000, progress=False)
    assert tok.vocab_size == 258  # 256 bytes + (a, b) + <|endoftext|>
    with pytest.raises(LmforgeError, match="too small"):
        train_bpe(["ab"], 100, progress=False)
    with pytest.raises(LmforgeError, match="empty"):
        train_bpe([""], 300, progress=False)


def test_counting_chunks_equals_counting_whole_text():
    path = shared("gutenberg/pg11-alice-s-adventures-in-wonderland.txt")  # CRLF line ends
    whole = path.read_bytes().decode("utf-8")
    chunks = list(read_chunks(path, ReadStats(), chunk_bytes=4096))
    assert len(chunks) > 10 and "".join(chunks) == whole
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        assert count_words(chunks, pattern, workers=1) == Counter(regex.findall(pattern, whole))


@settings(deadline=None, max_examples=300)
@given(text=st.text(st.sampled_from(list("ab 1.'\r\n\t한!s")), max_size=60), cut_at=st.integers(0, 60))
def test_safe_cut_never_changes_pieces(text, cut_at):
    cut = safe_cut(text[:cut_at] if cut_at else text)
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        whole = regex.findall(pattern, text)
        assert regex.findall(pattern, text[:cut]) + regex.findall(pattern, text[cut:]) == whole


@pytest.mark.parametrize("fixture", ["gpt2_tok", "small_tok", "small_tok_gpt4"])
def test_save_load_round_trip(tmp_path, request, fixture):
    tok = request.getfixturevalue(fixture)
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.to_dict() == tok.to_dict()
    assert loaded.fingerprint == tok.fingerprint
    text = "Once upon a time, 한국어 <|endoftext|> 🙂"
    assert loaded.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")


def test_fingerprint_ignores_name_but_not_merges(small_tok):
    d = small_tok.to_dict()
    renamed = Tokenizer.from_dict({**d, "name": "other"})
    assert renamed.fingerprint == small_tok.fingerprint
    specials = {k: v - 1 for k, v in d["special_tokens"].items()}  # they continue the shorter vocabulary
    fewer = Tokenizer.from_dict({**d, "merges": d["merges"][:-1], "special_tokens": specials})
    assert fewer.fingerprint != small_tok.fingerprint


def test_load_errors(tmp_path, small_tok):
    with pytest.raises(LmforgeError, match="no tokenizer at"):
        Tokenizer.load(tmp_path / "missing")
    file = small_tok.save(tmp_path / "tok")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(LmforgeError, match="truncated"):
        Tokenizer.load(tmp_path / "tok")
    file.write_text(shared("gpt2/encoder.json").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(LmforgeError, match="encoder.json"):
        Tokenizer.load(file)
    file.write_text(json.dumps({"model": {}, "pre_tokenizer": {}}), encoding="utf-8")
    with pytest.raises(LmforgeError, match="Hugging Face"):
        Tokenizer.load(file)
    d = small_tok.to_dict()
    d["merges"][5] = ["\u4e00", "a"]  # a character that stands for no byte
    file.write_text(json.dumps(d), encoding="utf-8")
    with pytest.raises(LmforgeError, match="damaged"):
        Tokenizer.load(file)
    d = small_tok.to_dict()
    d["version"] = 99
    file.write_text(json.dumps(d), encoding="utf-8")
    with pytest.raises(LmforgeError, match="newer"):
        Tokenizer.load(file)
