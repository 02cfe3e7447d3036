"""`lmforge.data.prepare` and `TokenData`: token files that decode back to the corpus."""

from __future__ import annotations

import importlib
import json
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import SHARED, expected_tokens, ids, joined, small_tokenizer, write_jsonl, write_texts
from hypothesis import given, settings
from hypothesis import strategies as st

import lmforge.corpus
from lmforge.data import TokenData, prepare, token_dtype, val_rule
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

# `lmforge.data.prepare` is the function; the module of the same name holds the knobs patched here.
prepare_module = importlib.import_module("lmforge.data.prepare")

DOCS = [
    "Hello world.\nThis is document zero.",
    "Second document, with unicode: café, naïve, 東京, 🙂\n",
    "Third\r\nwith CRLF\r\nline ends\r\n",
    "It quotes <|endoftext|> as plain text, which must not split it.",
    "fifth " * 50,
    "6",
    "seventh\n\n\n   spaces   \n",
    "eighth: numbers 1234567 and 3.14159",
    "ninth document",
    "tenth and last",
]


def _leftovers(folder: Path) -> list[str]:
    """Temporary folders an interrupted write could leave beside its output."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_tokens_decode_back_to_the_documents_split_by_the_val_rule(tmp_path: Path) -> None:
    tok = small_tokenizer()
    write_texts(tmp_path / "corpus", DOCS)
    data = prepare([tmp_path / "corpus"], tok, tmp_path / "out", val_fraction=0.3)

    val_docs = [3, 6, 9]  # floor((i+1)*0.3) > floor(i*0.3), worked out by hand
    train = [d for i, d in enumerate(DOCS) if i not in val_docs]
    val = [DOCS[i] for i in val_docs]
    assert ids(data.split("train")) == expected_tokens(tok, train)
    assert ids(data.split("val")) == expected_tokens(tok, val)
    assert tok.decode(ids(data.split("train"))) == joined(train)
    assert tok.decode(ids(data.split("val"))) == joined(val)
    assert (data.meta["splits"]["train"]["documents"], data.meta["splits"]["val"]["documents"]) == (7, 3)
    assert data.meta["val_split"] == "documents"


def test_meta_json_describes_the_data(tmp_path: Path) -> None:
    tok = small_tokenizer()
    write_texts(tmp_path / "corpus", DOCS)
    prepare([tmp_path / "corpus"], tok, tmp_path / "out", val_fraction=0.2)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["format"] == "lmforge.tokens" and meta["version"] == 1
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size == 300 and meta["eot_id"] == tok.eot_id
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint and meta["tokenizer"]["name"] == tok.name
    assert meta["val_fraction"] == 0.2
    assert meta["sources"]["files"] == meta["sources"]["documents"] == 10
    assert meta["sources"]["replaced_bytes"] == 0
    assert meta["splits"]["train"]["file"] == "train.bin"
    assert sum(s["tokens"] for s in meta["splits"].values()) == len(expected_tokens(tok, DOCS))
    assert meta["lmforge_version"]
    assert Tokenizer.load(tmp_path / "out").fingerprint == tok.fingerprint  # the folder is self-contained
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 300), fraction=st.decimals(min_value=0, max_value="0.99", places=2).map(float))
def test_val_rule_picks_floor_n_f_documents_evenly(n: int, fraction: float) -> None:
    is_val = val_rule(fraction)
    picked = [i for i in range(n) if is_val(i)]
    f = Fraction(str(fraction))
    assert len(picked) == n * f.numerator // f.denominator
    # evenly spread: among the first k documents there are always floor(k*f) val ones
    for k in range(n + 1):
        assert sum(1 for i in picked if i < k) == k * f.numerator // f.denominator


def test_val_rule_counts_decimal_fractions_exactly() -> None:
    # 100 * 0.29 is 28.999999999999996 in binary floating point; the rule must still give 29.
    assert sum(val_rule(0.29)(i) for i in range(100)) == 29


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_val_fraction_out_of_range_is_refused(tmp_path: Path, fraction: float) -> None:
    write_texts(tmp_path / "corpus", ["text"])
    with pytest.raises(LmforgeError, match="--val-fraction"):
        prepare([tmp_path / "corpus"], small_tokenizer(), tmp_path / "out", val_fraction=fraction)
    assert not (tmp_path / "out").exists()


def test_one_document_gets_the_tail_of_its_tokens_as_val(tmp_path: Path, gpt2_tok: Tokenizer) -> None:
    tok = gpt2_tok
    text = (SHARED / "llms-from-scratch" / "the-verdict.txt").read_text(encoding="utf-8")
    data = prepare([SHARED / "llms-from-scratch" / "the-verdict.txt"], tok, tmp_path / "out", val_fraction=0.1)
    stream = expected_tokens(tok, [text])
    train, val = ids(data.split("train")), ids(data.split("val"))
    assert train + val == stream
    assert len(val) == len(stream) // 10
    assert val[-1] == tok.eot_id and tok.eot_id not in train
    assert data.meta["val_split"] == "tail-of-tokens"
    assert data.meta["splits"]["val"]["documents"] == 0
    assert (tmp_path / "out" / "train.bin").stat().st_size == 2 * len(train)


def test_no_val_fraction_means_no_val(tmp_path: Path) -> None:
    tok = small_tokenizer()
    write_texts(tmp_path / "corpus", DOCS[:3])
    data = prepare([tmp_path / "corpus"], tok, tmp_path / "out", val_fraction=0)
    assert ids(data.split("train")) == expected_tokens(tok, DOCS[:3])
    assert data.num_tokens("val") == 0 and len(data.split("val")) == 0
    assert data.meta["val_split"] == "none"


def test_jsonl_documents_come_from_the_named_field(tmp_path: Path) -> None:
    tok = small_tokenizer()
    texts = ["first record", "second\nrecord", "", "fourth record"]  # the empty one is skipped
    write_jsonl(tmp_path / "chats.jsonl", texts, field="content")
    data = prepare([tmp_path / "chats.jsonl"], tok, tmp_path / "out", text_field="content", val_fraction=0)
    kept = [t for t in texts if t]
    assert ids(data.split("train")) == expected_tokens(tok, kept)
    assert data.meta["sources"]["documents"] == 3 and data.meta["sources"]["empty_documents"] == 1
    assert data.meta["sources"]["text_field"] == "content"


def test_jsonl_without_the_field_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "chats.jsonl", ["a", "b"], field="content")
    with pytest.raises(LmforgeError, match="no field 'text'.*--text-field"):
        prepare([tmp_path / "chats.jsonl"], small_tokenizer(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_globs_and_folders_select_the_inputs(tmp_path: Path) -> None:
    tok = small_tokenizer()
    corpus = tmp_path / "corpus"
    write_texts(corpus / "a", ["alpha", "beta"], suffix=".md")
    write_texts(corpus / "b", ["gamma"], suffix=".txt")
    (corpus / "b" / "skipped.bin").write_bytes(b"\x00\x01 not text")

    by_glob = prepare([str(corpus / "**" / "*.md")], tok, tmp_path / "glob", val_fraction=0)
    assert tok.decode(ids(by_glob.split("train"))) == joined(["alpha", "beta"])

    by_folder = prepare([corpus], tok, tmp_path / "folder", val_fraction=0)
    assert tok.decode(ids(by_folder.split("train"))) == joined(["alpha", "beta", "gamma"])


def test_dtype_is_uint16_up_to_65536_ids_then_uint32(tmp_path: Path) -> None:
    assert token_dtype(300) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(2**32) == np.uint32
    with pytest.raises(LmforgeError, match="uint32"):
        token_dtype(2**32 + 1)

    # 256 bytes + 65,280 two-byte merges + <|endoftext|> = 65,537 ids (special ids continue the vocabulary)
    merges = [(a, b) for a in range(256) for b in range(256)][: 65536 - 256]
    big = Tokenizer(merges=merges, special_tokens={"<|endoftext|>": 65536})
    assert big.vocab_size == 65537
    write_texts(tmp_path / "corpus", ["wide ids", "second"])
    data = prepare([tmp_path / "corpus"], big, tmp_path / "out", val_fraction=0)
    assert data.meta["dtype"] == "uint32" and data.split("train").dtype == np.uint32
    assert ids(data.split("train")) == expected_tokens(big, ["wide ids", "second"])
    assert 65536 in ids(data.split("train"))
    assert (tmp_path / "out" / "train.bin").stat().st_size == 4 * data.num_tokens("train")


def test_token_files_are_flat_little_endian_arrays(tmp_path: Path) -> None:
    tok = small_tokenizer()
    write_texts(tmp_path / "corpus", DOCS[:2])
    prepare([tmp_path / "corpus"], tok, tmp_path / "out", val_fraction=0)
    raw = np.fromfile(tmp_path / "out" / "train.bin", dtype="<u2")
    assert raw.tolist() == expected_tokens(tok, DOCS[:2])


def test_undecodable_bytes_are_replaced_and_counted(tmp_path: Path) -> None:
    tok = small_tokenizer()
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    data = prepare([tmp_path / "corpus"], tok, tmp_path / "out", val_fraction=0)
    assert tok.decode(ids(data.split("train"))) == joined(["caf\ufffd cr\ufffdme"])
    assert data.meta["sources"]["replaced_bytes"] == 2
    assert data.meta["sources"]["files_with_replacements"] == 1
    assert data.meta["sources"]["replacement_examples"] == [str(tmp_path / "corpus" / "latin1.txt")]


def test_missing_input_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="does not exist"):
        prepare([tmp_path / "nope.txt"], small_tokenizer(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_input_without_text_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    write_texts(tmp_path / "corpus", ["", ""])
    with pytest.raises(LmforgeError, match="no text"):
        prepare([tmp_path / "corpus"], small_tokenizer(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_tokenizer_without_endoftext_is_refused(tmp_path: Path) -> None:
    write_texts(tmp_path / "corpus", ["text"])
    with pytest.raises(LmforgeError, match="no <\\|endoftext\\|>.*lmforge tokenizer train"):
        prepare([tmp_path / "corpus"], Tokenizer(merges=[]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_interrupt_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = Tokenizer.from_dict(small_tokenizer().to_dict())  # a copy: its encode is patched
    write_texts(tmp_path / "corpus", DOCS)
    calls = []

    def encode_then_interrupt(text: str) -> list[int]:
        calls.append(text)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return Tokenizer.encode(tok, text)

    monkeypatch.setattr(tok, "encode", encode_then_interrupt)
    monkeypatch.setattr(prepare_module, "_TASK_CHARS", 1)  # one task per document
    with pytest.raises(KeyboardInterrupt):
        prepare([tmp_path / "corpus"], tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_existing_output_is_refused_unless_overwrite(tmp_path: Path) -> None:
    tok = small_tokenizer()
    write_texts(tmp_path / "corpus", DOCS[:2])
    prepare([tmp_path / "corpus"], tok, tmp_path / "out", val_fraction=0)
    with pytest.raises(LmforgeError, match="already exists.*--overwrite"):
        prepare([tmp_path / "corpus"], tok, tmp_path / "out")

    write_texts(tmp_path / "corpus", DOCS[:3])
    data = prepare([tmp_path / "corpus"], tok, tmp_path / "out", overwrite=True, val_fraction=0)
    assert ids(data.split("train")) == expected_tokens(tok, DOCS[:3])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]


def test_overwrite_never_replaces_a_folder_of_other_files(tmp_path: Path) -> None:
    """Regression: --overwrite replaced any folder, deleting a user's unrelated files."""
    tok = small_tokenizer()
    write_texts(tmp_path / "corpus", DOCS[:2])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(LmforgeError, match=r"out already exists and is a folder that is not a data folder \(it has no meta.json"):
            prepare([tmp_path / "corpus"], tok, tmp_path / "out", overwrite=overwrite)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"] and (tmp_path / "out" / "keep.txt").read_text() == "mine"

    (tmp_path / "out" / "meta.json").write_text(json.dumps({"format": "something else"}))  # a meta.json, not ours
    with pytest.raises(LmforgeError, match="not a data folder"):
        prepare([tmp_path / "corpus"], tok, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"

    (tmp_path / "file").write_text("a file")
    with pytest.raises(LmforgeError, match="file already exists and is a file"):
        prepare([tmp_path / "corpus"], tok, tmp_path / "file", overwrite=True)
    assert (tmp_path / "file").read_text() == "a file"

    (tmp_path / "empty").mkdir()  # nothing to lose: an empty folder may be replaced
    data = prepare([tmp_path / "corpus"], tok, tmp_path / "empty", overwrite=True, val_fraction=0)
    assert ids(data.split("train")) == expected_tokens(tok, DOCS[:2])
    assert _leftovers(tmp_path) == []


def test_output_that_is_or_holds_an_input_is_refused(tmp_path: Path) -> None:
    """Regression: `--input corpus/books --out corpus --overwrite` deleted the corpus it had just read."""
    tok = small_tokenizer()
    books = write_texts(tmp_path / "corpus" / "books", DOCS[:2])
    prepare([tmp_path / "corpus" / "books"], tok, tmp_path / "data", val_fraction=0)
    before = sorted(str(p) for p in (tmp_path / "corpus").rglob("*"))
    cases = [
        ([tmp_path / "corpus" / "books"], tmp_path / "corpus", "holds the input"),
        ([tmp_path / "corpus" / "books"], tmp_path / "corpus" / "books", "holds the input"),
        ([books[0]], books[0], "is an input"),
        ([str(tmp_path / "corpus" / "books" / "*.txt")], tmp_path / "corpus", "holds the input"),
        ([tmp_path / "corpus" / "books" / ".." / "books"], tmp_path / "corpus" / "books", "holds the input"),
    ]
    for inputs, out, message in cases:
        for overwrite in (False, True):
            with pytest.raises(LmforgeError, match=message + ".*would replace the corpus it reads"):
                prepare(inputs, tok, out, overwrite=overwrite)
    assert sorted(str(p) for p in (tmp_path / "corpus").rglob("*")) == before

    # a data folder that a symbolic link in the corpus points into holds an input: the linked file
    (tmp_path / "data" / "note.txt").write_text("a note that is read as input")
    (tmp_path / "corpus" / "link.txt").symlink_to(tmp_path / "data" / "note.txt")
    with pytest.raises(LmforgeError, match="holds the input .*link.txt"):
        prepare([tmp_path / "corpus"], tok, tmp_path / "data", overwrite=True)
    assert (tmp_path / "data" / "note.txt").exists()

    # an --out inside an input folder is fine: it is not read (no text files) and nothing of the corpus is replaced
    (tmp_path / "corpus" / "link.txt").unlink()
    prepare([tmp_path / "corpus"], tok, tmp_path / "corpus" / "tokens", val_fraction=0)
    data = prepare([tmp_path / "corpus"], tok, tmp_path / "corpus" / "tokens", overwrite=True, val_fraction=0)
    assert ids(data.split("train")) == expected_tokens(tok, DOCS[:2])


def test_output_that_is_the_current_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: `--out .` was a raw ValueError."""
    tok = small_tokenizer()
    write_texts(tmp_path / "corpus", DOCS[:2])
    prepare([tmp_path / "corpus"], tok, tmp_path / "work" / "data", val_fraction=0)
    monkeypatch.chdir(tmp_path / "work" / "data")
    for out in (".", "", "..", "./", "/"):
        with pytest.raises(LmforgeError, match="names no folder of its own"):
            prepare([tmp_path / "corpus"], tok, out, overwrite=True)
    for out in (tmp_path / "work" / "data", tmp_path / "work", Path("../data")):  # a data folder, but the one we are in
        with pytest.raises(LmforgeError, match="is the current folder or holds it"):
            prepare([tmp_path / "corpus"], tok, out, overwrite=True)
    assert (tmp_path / "work" / "data" / "meta.json").exists()


def test_workers_must_be_positive(tmp_path: Path) -> None:
    write_texts(tmp_path / "corpus", DOCS[:2])
    for bad in (0, -1):
        with pytest.raises(LmforgeError, match="--workers"):
            prepare([tmp_path / "corpus"], small_tokenizer(), tmp_path / "out", num_threads=bad)
    assert not (tmp_path / "out").exists()


def test_a_file_bigger_than_a_chunk_gives_the_tokens_of_the_whole_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpt2_tok: Tokenizer
) -> None:
    tok = gpt2_tok
    source = SHARED / "gutenberg" / "pg11-alice-s-adventures-in-wonderland.txt"  # CRLF line ends, UTF-8
    monkeypatch.setattr(lmforge.corpus, "CHUNK_BYTES", 4096)
    chunks = list(lmforge.corpus.read_chunks(source, lmforge.corpus.ReadStats()))
    data = prepare([source], tok, tmp_path / "out", val_fraction=0)
    assert len(chunks) > 30
    whole = source.read_bytes().decode("utf-8")
    assert ids(data.split("train")) == tok.encode(whole) + [tok.eot_id]


@settings(max_examples=30, deadline=None)
@given(
    docs=st.lists(st.text(st.sampled_from("ab é\n\r.7"), min_size=1, max_size=40), min_size=1, max_size=25),
    task_chars=st.integers(1, 60),
    buffer_tokens=st.integers(1, 50),
    val_fraction=st.sampled_from([0, 0.25, 0.5]),
)
def test_grouping_and_buffering_keep_every_token_in_order(
    docs: list[str], task_chars: int, buffer_tokens: int, val_fraction: float
) -> None:
    tok = small_tokenizer()
    is_val = val_rule(val_fraction)
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare_module, "_TASK_CHARS", task_chars)
        mp.setattr(prepare_module, "_BUFFER_TOKENS", buffer_tokens)
        source = write_jsonl(Path(tmp) / "docs.jsonl", docs)
        data = prepare([source], tok, Path(tmp) / "out", val_fraction=val_fraction, num_threads=2)
        train = ids(data.split("train"))
        val = ids(data.split("val"))
    if data.meta["val_split"] == "tail-of-tokens":
        assert train + val == expected_tokens(tok, docs)
    else:
        assert train == expected_tokens(tok, [d for i, d in enumerate(docs) if not is_val(i)])
        assert val == expected_tokens(tok, [d for i, d in enumerate(docs) if is_val(i)])


# --- TokenData: opening a prepared folder ----------------------------------------------


@pytest.fixture(scope="module")
def prepared_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared folder, made once; the tests below get their own copy (and may damage it)."""
    root = tmp_path_factory.mktemp("prepared")
    write_texts(root / "corpus", DOCS)
    prepare([root / "corpus"], small_tokenizer(), root / "data", val_fraction=0.2)
    return root / "data"


@pytest.fixture
def prepared(prepared_once: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(prepared_once, tmp_path / "data"))


def test_open_gives_read_only_memmaps(prepared: Path) -> None:
    data = TokenData.open(prepared, small_tokenizer())
    train = data.split("train")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16 and not train.flags.writeable
    assert len(train) == data.num_tokens("train")
    assert data.eot_id == small_tokenizer().eot_id and data.vocab_size == 300
    assert data.tokenizer().fingerprint == small_tokenizer().fingerprint
    with pytest.raises(LmforgeError, match="no split 'test'"):
        data.split("test")


def test_open_with_another_tokenizer_names_both_and_the_fix(prepared: Path, gpt2_tok: Tokenizer) -> None:
    with pytest.raises(LmforgeError) as e:
        TokenData.open(prepared, gpt2_tok)
    message = str(e.value)
    assert "'gpt2'" in message and repr(small_tokenizer().name) in message
    assert "tokenizer.json" in message and "lmforge data prepare" in message


def test_a_truncated_bin_is_detected(prepared: Path) -> None:
    train = prepared / "train.bin"
    train.write_bytes(train.read_bytes()[:-2])
    with pytest.raises(LmforgeError, match="train.bin has .* bytes but meta.json says .*truncated"):
        TokenData.open(prepared)


def test_a_missing_bin_is_detected(prepared: Path) -> None:
    (prepared / "val.bin").unlink()
    with pytest.raises(LmforgeError, match="val.bin is missing"):
        TokenData.open(prepared)


def test_missing_folder_and_missing_meta_are_explained(tmp_path: Path, prepared: Path) -> None:
    with pytest.raises(LmforgeError, match="no prepared data at .*lmforge data prepare"):
        TokenData.open(tmp_path / "nowhere")
    (prepared / "meta.json").unlink()
    with pytest.raises(LmforgeError, match="no meta.json: it is not a prepared data folder"):
        TokenData.open(prepared)


@pytest.mark.parametrize(
    "content, error",
    [
        ('{"format": "lmforge.tok', "truncated or not JSON"),
        ('{"format": "lmforge.tokenizer", "version": 1}', "not lmforge token metadata"),
        ("[1, 2, 3]", "not lmforge token metadata"),
        ('{"format": "lmforge.tokens", "version": 99}', "upgrade lmforge"),
        ('{"format": "lmforge.tokens", "version": 1, "dtype": "uint16"}', "damaged"),
    ],
)
def test_bad_meta_json_is_explained(prepared: Path, content: str, error: str) -> None:
    (prepared / "meta.json").write_text(content)
    with pytest.raises(LmforgeError, match=error):
        TokenData.open(prepared)
