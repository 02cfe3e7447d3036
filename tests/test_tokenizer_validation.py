"""Issue 11, "trust nothing that can be checked", for tokenizers: special ids, special strings,
pre-tokenizer patterns and tokenizer.json files are checked when a tokenizer is trained,
built or loaded, and refused with a message that says what is wrong and how to fix it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.errors import LmforgeError
from lmforge.tokenizer import GPT2_PATTERN, GPT4_PATTERN, Tokenizer, reference_encode, resolve_pattern, train_bpe
from lmforge.tokenizer.llama2c import Llama2cTokenizer
from lmforge.tokenizer.patterns import PROBE_TEXTS, check_pattern, engine_encode
from lmforge.weights import load_tokenizer

TEXT = "Hello, World 123\n대한민국 🙂 naïve\t<|endoftext|>"


def byte_tokenizer_dict(**change) -> dict:
    """tokenizer.json of a tokenizer with no merges (ids 0..255 the bytes) and <|endoftext|> = 256."""
    return {**Tokenizer([], {"<|endoftext|>": 256}).to_dict(), **change}


# --- special token ids ------------------------------------------------------------------------
@pytest.mark.parametrize("bad_id", [-1, 2**32, 2**64, 10**9, 257, 1000])
def test_special_ids_outside_the_vocabulary_are_refused_with_the_allowed_range(bad_id):
    with pytest.raises(LmforgeError, match=r"continue the vocabulary.*ids 0\.\.255.*must have id 256"):
        Tokenizer([], {"<|endoftext|>": bad_id})


@pytest.mark.parametrize("bad_id", [1.0, 256.0, True, "256", None, [256]])
def test_special_ids_must_be_integers(bad_id):
    with pytest.raises(LmforgeError, match="not an integer"):
        Tokenizer([], {"<|endoftext|>": bad_id})


def test_special_ids_may_not_take_a_bpe_id_or_share_one_or_leave_a_gap():
    with pytest.raises(LmforgeError, match=r"id 5 \(the id of a BPE token\)"):
        Tokenizer([], {"<|endoftext|>": 5})
    with pytest.raises(LmforgeError, match=r"'<a>' and '<b>' both have id 256.*ids 256\.\.257"):
        Tokenizer([], {"<a>": 256, "<b>": 256})
    with pytest.raises(LmforgeError, match=r"'<b>' has id 258.*ids 256\.\.257"):
        Tokenizer([], {"<a>": 256, "<b>": 258})
    ok = Tokenizer([(104, 105)], {"<b>": 258, "<a>": 257})  # any order, as long as they continue the ids
    assert ok.vocab_size == 259
    assert ok.encode("<a>hi<b>", allowed_special="all") == [257, 256, 258]


def test_special_id_of_a_billion_in_a_file_is_refused_naming_the_file(tmp_path):
    """It used to load as a vocabulary of a billion ids (and pretrain tried to allocate 512 GB)."""
    file = tmp_path / "tokenizer.json"
    file.write_text(json.dumps(byte_tokenizer_dict(special_tokens={"<|endoftext|>": 256, "<|x|>": 1e9})))
    with pytest.raises(LmforgeError, match=rf"{re.escape(str(file))}.*'<\|x\|>' has id 1000000000\.0, which is not an integer"):
        Tokenizer.load(tmp_path)
    file.write_text(json.dumps(byte_tokenizer_dict(special_tokens={"<|endoftext|>": 256, "<|x|>": 10**9})))
    with pytest.raises(LmforgeError, match=rf"{re.escape(str(file))}: .*'<\|x\|>' has id 1000000000;.*ids 256\.\.257"):
        Tokenizer.load(tmp_path)
    file.write_text(json.dumps(byte_tokenizer_dict(special_tokens={"<|endoftext|>": -1})))
    with pytest.raises(LmforgeError, match=rf"{re.escape(str(file))}: .*has id -1"):
        load_tokenizer(tmp_path)


# --- special token strings --------------------------------------------------------------------
def test_empty_special_token_is_refused_at_train_before_reading_the_corpus():
    def corpus():
        raise AssertionError("the corpus was read before the specials were checked")
        yield ""

    with pytest.raises(LmforgeError, match="empty string.*hang.*remove it"):
        train_bpe(corpus(), 300, special_tokens=["<|endoftext|>", ""], progress=False)


def test_empty_or_unencodable_special_token_in_a_file_is_refused(tmp_path):
    file = tmp_path / "tokenizer.json"
    file.write_text(json.dumps(byte_tokenizer_dict(special_tokens={"<|endoftext|>": 256, "": 257})))
    with pytest.raises(LmforgeError, match=rf"{re.escape(str(file))}: a special token is the empty string"):
        Tokenizer.load(file)
    with pytest.raises(LmforgeError, match="lone surrogate"):
        Tokenizer([], {"<\ud800>": 256})


# --- merges and the rest of the file ----------------------------------------------------------
@pytest.mark.parametrize(
    "merges",
    [[(0, 256)], [(0, -1)], [(0, 1.0)], [(True, 1)], [(0, 1, 2)], [5], [(104, 105), (104, 105)]],
)
def test_bad_merge_lists_are_refused(merges):
    with pytest.raises(LmforgeError, match="merge"):
        Tokenizer(merges)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(version="1"), "version is '1', not an integer"),
        (dict(merges={"ab": 1}), "merges must be a list"),
        (dict(merges=[["h", "i", "x"]]), "merge 0 is ['h', 'i', 'x'], not a pair"),
        (dict(merges=[["h", 7]]), "not a pair of token strings"),
        (dict(merges=[["hi", "x"]]), "uses the token 'hi', which no earlier merge makes"),
        (dict(merges=[["\u4e00", "a"]]), "not in GPT-2's byte alphabet"),
        (dict(merges=[["h", "i"], ["h", "i"]]), "two merges produce the same token 'hi'"),
        (dict(byte_order=list(range(255))), "256 byte values"),
        (dict(byte_order=["0"] * 256), "256 byte values"),
        (dict(special_tokens=[["<|endoftext|>", 256]]), "special_tokens must be an object"),
        (dict(pattern=5), "regex string"),
        (dict(name=5), "name is 5, not a string"),
        (dict(pattern=None), "regex string"),
    ],
)
def test_damaged_fields_are_named(tmp_path, change, message):
    file = tmp_path / "tokenizer.json"
    file.write_text(json.dumps(byte_tokenizer_dict(**change)))
    with pytest.raises(LmforgeError, match=re.escape(str(file))) as e:
        Tokenizer.load(file)
    assert message in str(e.value), str(e.value)


def test_missing_field_is_named(tmp_path):
    d = byte_tokenizer_dict()
    del d["merges"]
    with pytest.raises(LmforgeError, match="lacks 'merges'"):
        Tokenizer.from_dict(d, "x.json")


# --- patterns ---------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN])
def test_built_in_patterns_pass_the_check(pattern):
    check_pattern(pattern)
    engine = tiktoken.Encoding("t", pat_str=pattern, mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={})
    check_pattern(pattern, engine)


def test_llama3_style_pattern_passes():
    llama3 = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    check_pattern(llama3)


def test_pattern_that_skips_characters_is_refused_at_train_before_reading_the_corpus():
    """'[a-z]+' used to turn "Hello, World 123" into "elloorld" without a word."""

    def corpus():
        raise AssertionError("the corpus was read before the pattern was checked")
        yield ""

    with pytest.raises(LmforgeError, match=r"does not cover every character: it skips 'H' \(U\+0048 LATIN CAPITAL LETTER H\), ',' .*\|\\s\+\|\."):
        train_bpe(corpus(), 300, pattern="[a-z]+", progress=False)


@pytest.mark.parametrize("pattern", ["x*", r"(?<=a)", r"\b", r"[a-z]*|\s+|.", r"$|\s+|.", r".|\s+|(?:)"])
def test_pattern_that_can_match_the_empty_string_is_refused(pattern):
    """'x*' used to save a tokenizer whose every encode panicked inside tiktoken."""
    with pytest.raises(LmforgeError, match="can match the empty string.*`\\+` instead of `\\*`"):
        resolve_pattern(pattern)
    with pytest.raises(LmforgeError, match="can match the empty string"):
        Tokenizer([], {}, pattern=pattern)


def test_pattern_that_skips_a_script_the_sample_texts_lack_is_refused():
    """Tibetan is in no probe sentence: the pass over every character finds the gap."""
    with pytest.raises(LmforgeError, match=r"U\+0F00 TIBETAN SYLLABLE OM"):
        check_pattern(r"[^\u0f00-\u0fff]+")


def test_pattern_only_python_regex_understands_is_refused_before_training():
    def corpus():
        raise AssertionError("the corpus was read before the pattern was checked")
        yield ""

    with pytest.raises(LmforgeError, match=r"does not compile in tiktoken's regex engine"):
        train_bpe(corpus(), 300, pattern=r"\X|\s+|.", progress=False)
    with pytest.raises(LmforgeError, match=r"neither gpt2 nor gpt4 nor a valid regex"):
        Tokenizer([], {}, pattern="(")


def test_bad_pattern_in_a_saved_tokenizer_is_refused_at_load(tmp_path):
    file = tmp_path / "tokenizer.json"
    file.write_text(json.dumps(byte_tokenizer_dict(pattern="[a-z]+")))
    with pytest.raises(LmforgeError, match=rf"{re.escape(str(file))}: pattern '\[a-z\]\+' does not cover every character"):
        Tokenizer.load(tmp_path)
    file.write_text(json.dumps(byte_tokenizer_dict(pattern="x*")))
    with pytest.raises(LmforgeError, match="can match the empty string"):
        load_tokenizer(tmp_path)


def test_custom_pattern_with_a_catch_all_trains_and_round_trips():
    pattern = r"[a-z]+|\s+|."
    text = "Hello, World 123 " * 20 + "대한민국 🙂"
    tok = train_bpe([text], 300, pattern=pattern, progress=False)
    assert tok.pattern == pattern
    for probe in (TEXT, *PROBE_TEXTS):
        ids = tok.encode(probe)
        assert tok.decode(ids) == probe
        assert ids == reference_encode(tok, probe)


@settings(max_examples=200)
@given(text=st.text(st.characters(exclude_categories=()), max_size=60))
def test_a_pattern_that_passes_the_check_loses_nothing(text):
    tok = Tokenizer([], {}, pattern=r"\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+|\s+")
    assert tok.decode(tok.encode(text)) == text


def test_tiktoken_panic_on_an_empty_piece_becomes_an_error():
    """The last line of defence, should a pattern slip past the probe: tiktoken's Rust panic
    (a BaseException) is turned into an LmforgeError, not a crash."""
    engine = tiktoken.Encoding("t", pat_str="x*", mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={})
    with pytest.raises(LmforgeError, match="can match the empty string"):
        engine_encode("x*", "abc", engine.encode_ordinary)


# --- tokenizer.json files ---------------------------------------------------------------------
def _write(folder: Path, content: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "tokenizer.json"
    file.write_bytes(content if isinstance(content, bytes) else content.encode())
    return file


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"format": "lmforge.tokenizer", "merges": [', "truncated or not JSON"),
        ("[1, 2, 3]", "not an lmforge tokenizer file (it holds a JSON list, not an object)"),
        ('"text"', "not an lmforge tokenizer file"),
        (b"\xff\xfe{}", "not UTF-8"),
        ("[" * 100_000 + "]" * 100_000, "truncated or not JSON"),
        ('{"a": ' + "1" * 5000 + "}", "truncated or not JSON"),
    ],
)
def test_bad_tokenizer_json_in_a_model_folder_is_an_error_naming_it(tmp_path, content, message):
    file = _write(tmp_path / "model", content)
    for load in (load_tokenizer, Tokenizer.load):
        with pytest.raises(LmforgeError, match=re.escape(str(file))) as e:
            load(tmp_path / "model")
        assert message in str(e.value), str(e.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"format": "lmforge.sentencepiece", "version": 1, "pieces": [', "truncated or not JSON"),
        ("[1]", "it holds a JSON list"),
        ('{"format": "lmforge.sentencepiece", "version": 1, "pieces": 5}', "'pieces' must be a list"),
        ('{"format": "lmforge.sentencepiece", "version": 1, "pieces": [{"piece": 5, "score": 0}]}', "piece 0"),
        ('{"format": "lmforge.sentencepiece", "version": 1, "pieces": [{"piece": "a", "score": "x"}]}', "piece 0"),
        ('{"format": "lmforge.sentencepiece", "version": 1, "pieces": ["ab"]}', "piece 0"),
        ('{"format": "lmforge.sentencepiece", "version": 1, "max_token_length": "9", "pieces": []}', "max_token_length"),
        ('{"format": "lmforge.sentencepiece", "version": 1, "pieces": [{"piece": "a", "score": 0}]}', "<unk>, <s>, </s>"),
    ],
)
def test_bad_sentencepiece_tokenizer_json_is_an_error_naming_it(tmp_path, content, message):
    file = _write(tmp_path / "model", content)
    with pytest.raises(LmforgeError, match=re.escape(str(file))) as e:
        Llama2cTokenizer.load(tmp_path / "model")
    assert message in str(e.value), str(e.value)
    if "sentencepiece" in content:  # the dispatcher sends it to the same checks
        with pytest.raises(LmforgeError, match=re.escape(str(file))):
            load_tokenizer(tmp_path / "model")


def test_a_folder_without_tokenizer_json_has_none_but_a_broken_one_is_an_error(tmp_path):
    (tmp_path / "model").mkdir()
    assert load_tokenizer(tmp_path / "model") is None
    (tmp_path / "model" / "tokenizer.json").mkdir()
    with pytest.raises(LmforgeError, match="not a regular file but a folder"):
        load_tokenizer(tmp_path / "model")
    (tmp_path / "model" / "tokenizer.json").rmdir()
    (tmp_path / "model" / "tokenizer.json").symlink_to(tmp_path / "gone.json")
    with pytest.raises(LmforgeError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "model")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_not_read(tmp_path):
    """Reading a FIFO with no writer blocks forever; it is refused before it is opened."""
    (tmp_path / "model").mkdir()
    os.mkfifo(tmp_path / "model" / "tokenizer.json")
    for load in (load_tokenizer, Tokenizer.load, Llama2cTokenizer.load):
        with pytest.raises(LmforgeError, match=r"not a regular file but a FIFO \(named pipe\), so it is not read"):
            load(tmp_path / "model")


def test_save_and_load_still_round_trip(tmp_path, small_tok):
    back = Tokenizer.load(small_tok.save(tmp_path / "tok"))
    assert back.to_dict() == small_tok.to_dict()
    assert load_tokenizer(tmp_path / "tok").fingerprint == small_tok.fingerprint
