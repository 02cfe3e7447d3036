"""llama2.c import: stories260K reproduces llama2.c's documented greedy story, token for token.

The oracles are independent of the code under test: `expected_greedy.json` (a numpy
re-implementation whose text equals llama2.c's documented output), and, written here,
a run.c-style numpy forward pass, a tokenizer.bin reader, and run.c's encode and
decode spelled out naively.
"""

from __future__ import annotations

import json
import shutil
import struct
from glob import glob
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_text, shared
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.engine import Engine, generate_uncached
from lmforge.engine.sampling import SamplingParams
from lmforge.errors import LmforgeError
from lmforge.interop.hf_tokenizer import llama2c_from_hf_json, sentencepiece_tokenizer_json, write_hf_sentencepiece
from lmforge.interop.llama2c import load_llama2c
from lmforge.loading import load
from lmforge.tokenizer.llama2c import Llama2cTokenizer
from lmforge.weights import save_pretrained

GREEDY = SamplingParams(temperature=0)
BOS, EOS = 1, 2


# --- independent oracles ---------------------------------------------------------------
def read_tok_bin(path: Path) -> tuple[list[bytes], list[float]]:
    """tokenizer.bin: int32 max_token_length, then per piece float32 score, int32 length, bytes."""
    data = path.read_bytes()
    pieces, scores, offset = [], [], 4
    while offset < len(data):
        score, n = struct.unpack_from("<fi", data, offset)
        pieces.append(data[offset + 8 : offset + 8 + n])
        scores.append(score)
        offset += 8 + n
    return pieces, scores


def reference_encode(pieces: list[bytes], scores: list[float], text: str) -> list[int]:
    """run.c's encode, naively: BOS, dummy " ", per character its piece or bytes + 3, then
    repeatedly merge the adjacent pair whose joined piece has the best score (first on ties)."""
    vocab: dict[bytes, int] = {}
    for i, p in enumerate(pieces):
        vocab.setdefault(p, i)
    tokens = [BOS, vocab[b" "]] if text else [BOS]
    for ch in text:
        b = ch.encode("utf-8")
        tokens += [vocab[b]] if b in vocab else [x + 3 for x in b]
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = vocab.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
            if merged is not None and scores[merged] > best_score:
                best_score, best_id, best_idx = scores[merged], merged, i
        if best_idx == -1:
            return tokens
        tokens[best_idx : best_idx + 2] = [best_id]


def reference_decode(pieces: list[bytes], ids: list[int]) -> bytes:
    """run.c's decode along a sequence; BOS/EOS print nothing, every byte is kept."""
    out, prev = b"", None
    for t in ids:
        piece = pieces[t]
        if prev == BOS and piece[:1] == b" ":
            piece = piece[1:]
        if t in (BOS, EOS):
            piece = b""
        elif len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
            piece = bytes([int(piece[3:5], 16)])
        out += piece
        prev = t
    return out


def reference_logits(path: Path, tokens: list[int]) -> np.ndarray:
    """run.c's forward pass in float64 numpy (interleaved RoPE, legacy layout), one row per token."""
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = (int(v) for v in np.fromfile(path, "<i4", 7))
    shared_cls, vocab = vocab > 0, abs(vocab)
    hs = dim // n_heads
    kv_dim = n_kv * hs
    floats = np.fromfile(path, "<f4", offset=28).astype(np.float64)
    at = 0

    def take(*shape: int) -> np.ndarray:
        nonlocal at
        n = int(np.prod(shape))
        at += n
        return floats[at - n : at].reshape(shape)

    emb, rms_att = take(vocab, dim), take(n_layers, dim)
    wq, wk, wv, wo = take(n_layers, dim, dim), take(n_layers, kv_dim, dim), take(n_layers, kv_dim, dim), take(n_layers, dim, dim)
    rms_ffn, w1, w2, w3 = take(n_layers, dim), take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
    rms_final = take(dim)
    take(seq_len, hs // 2), take(seq_len, hs // 2)
    wcls = emb if shared_cls else take(vocab, dim)

    def rmsnorm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return w * x / np.sqrt((x * x).mean() + 1e-5)

    def rope(v: np.ndarray, pos: int) -> np.ndarray:
        v = v.copy()
        for i in range(0, len(v), 2):
            angle = pos / 10000.0 ** ((i % hs) / hs)
            c, s = np.cos(angle), np.sin(angle)
            v[i], v[i + 1] = v[i] * c - v[i + 1] * s, v[i] * s + v[i + 1] * c
        return v

    keys = [[] for _ in range(n_layers)]
    values = [[] for _ in range(n_layers)]
    out = []
    for pos, token in enumerate(tokens):
        x = emb[token].copy()
        for layer in range(n_layers):
            xb = rmsnorm(x, rms_att[layer])
            q, k, v = rope(wq[layer] @ xb, pos), rope(wk[layer] @ xb, pos), wv[layer] @ xb
            keys[layer].append(k)
            values[layer].append(v)
            K, V = np.stack(keys[layer]), np.stack(values[layer])
            heads = []
            for h in range(n_heads):
                g = h // (n_heads // n_kv)
                score = K[:, g * hs : (g + 1) * hs] @ q[h * hs : (h + 1) * hs] / np.sqrt(hs)
                att = np.exp(score - score.max())
                heads.append((att / att.sum()) @ V[:, g * hs : (g + 1) * hs])
            x = x + wo[layer] @ np.concatenate(heads)
            xb = rmsnorm(x, rms_ffn[layer])
            gate = w1[layer] @ xb
            x = x + w2[layer] @ (gate / (1 + np.exp(-gate)) * (w3[layer] @ xb))
        out.append(wcls @ rmsnorm(x, rms_final))
    return np.stack(out)


# --- fixtures --------------------------------------------------------------------------
WEIGHTS = "weights/stories260K"
SENTENCES = [
    "Once upon a time, there was a little girl named Lily.",
    "She loved to play outside in the park with her big, red ball!",
    "Tom said, \"I'm sorry, Mom. I didn't know what to do.\"\nThe end.",
    "  two leading spaces, trailing space ",
    "Zebras? 123 + 456 = 579; naïve café, ☃ and 안녕하세요 🙂",
    "Booo! She said sllllowly, \"oooo\" \u2014 it\u2019s 5\u20ac\u2026",  # equal-score pairs: leftmost merges first
]
# pieces of text for generated strings: single characters (ASCII, multi-byte pieces of the
# vocabulary, characters outside it) and runs of a repeated letter, where ties between
# equally scored pairs decide the result
TEXT_PARTS = [*"abcdehilnorstuyLOT .,!?'\"\n-", "é", "\u2019", "\u200a", "안", "🙂", "ooo", "oooo", "llll", "eee", "sss", "  "]


@pytest.fixture(scope="module")
def bin_path() -> Path:
    return shared(f"{WEIGHTS}/stories260K.bin")


@pytest.fixture(scope="module")
def tok_path() -> Path:
    return shared(f"{WEIGHTS}/tok512.bin")


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads(shared(f"{WEIGHTS}/expected_greedy.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def model(bin_path: Path):
    return load(bin_path)


@pytest.fixture(scope="module")
def tok(model) -> Llama2cTokenizer:
    return model.tokenizer


@pytest.fixture(scope="module")
def reference_vocab(tok_path: Path) -> tuple[list[bytes], list[float]]:
    return read_tok_bin(tok_path)


@pytest.fixture(scope="module")
def completion(model, expected):
    return Engine(model, model.tokenizer).generate([expected["prompt_ids"]], max_new_tokens=200, sampling=GREEDY)[0]


# --- the model reproduces llama2.c -----------------------------------------------------
def test_engine_greedy_reproduces_llama2c_story(completion, tok, expected) -> None:
    assert expected["prompt_ids"] == [BOS]
    assert len(expected["generated_ids"]) == 200
    assert completion.ids == expected["generated_ids"]
    assert completion.finish_reason == "length"
    # run.c prints the sequence that starts with the prompt's BOS (whose space rule applies)
    assert tok.decode(expected["prompt_ids"] + completion.ids) == expected["text"]
    assert expected["text"].startswith("Once upon a time, there was a little girl named Lily.")


def test_engine_text_and_stream_agree(model, tok, completion, expected) -> None:
    """The engine decodes the continuation after the prompt's last token (BOS, whose space
    rule applies): its text is exactly the story, and streaming one token at a time agrees."""
    assert completion.text == expected["text"]
    streamed = list(Engine(model, tok).stream(expected["prompt_ids"], max_new_tokens=60, sampling=GREEDY))
    assert [t for t, _ in streamed if t is not None] == expected["generated_ids"][:60]
    assert "".join(text for _, text in streamed) == tok.decode(expected["prompt_ids"] + expected["generated_ids"][:60])


def test_uncached_matches_and_logits_agree(model, expected) -> None:
    new, uncached = generate_uncached(model, expected["prompt_ids"], 50)
    assert new == expected["generated_ids"][:50]
    steps = list(Engine(model).steps([expected["prompt_ids"]], 50, GREEDY))  # the KV-cached path
    assert [int(token) for token, _ in steps] == new
    cached = torch.stack([logits[0] for _, logits in steps])
    torch.testing.assert_close(cached, torch.stack(uncached), atol=1e-4, rtol=0)


def test_logits_match_run_c_forward(model, bin_path, expected) -> None:
    """A run.c forward pass (interleaved RoPE on the unpermuted weights) gives our logits."""
    ids = expected["prompt_ids"] + expected["generated_ids"][:15]
    with torch.inference_mode():
        ours = model(torch.tensor([ids]))[0].double().numpy()
    np.testing.assert_allclose(ours, reference_logits(bin_path, ids), atol=1e-4, rtol=0)


def test_config_from_header(model) -> None:
    c = model.config
    assert (c.n_embd, c.mlp_hidden, c.n_layer, c.n_head, c.n_kv_head, c.vocab_size, c.context_length) == (64, 172, 5, 8, 4, 512, 512)
    assert (c.norm, c.mlp, c.positions, c.bias, c.norm_eps, c.rope_theta) == ("rmsnorm", "swiglu", "rope", False, 1e-5, 10000.0)
    assert c.tie_embeddings and model.lm_head.weight is model.tok_emb.weight
    assert not model.training


# --- other layouts: v1 ("ak42") and an unshared classifier -----------------------------
def _legacy_arrays(path: Path) -> tuple[list[int], dict[str, np.ndarray]]:
    header = [int(v) for v in np.fromfile(path, "<i4", 7)]
    dim, hidden, L, nh, nkv, V, seq = header
    kv = nkv * dim // nh
    shapes = {
        "emb": (V, dim), "rms_att": (L, dim), "wq": (L, dim, dim), "wk": (L, kv, dim), "wv": (L, kv, dim),
        "wo": (L, dim, dim), "rms_ffn": (L, dim), "w1": (L, hidden, dim), "w2": (L, dim, hidden), "w3": (L, hidden, dim),
        "rms_final": (dim,), "freq_real": (seq, dim // nh // 2), "freq_imag": (seq, dim // nh // 2),
    }  # fmt: skip
    floats, at, arrays = np.fromfile(path, "<f4", offset=28), 0, {}
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        arrays[name], at = floats[at : at + n].reshape(shape), at + n
    assert at == len(floats)
    return header, arrays


def test_version1_file_loads_to_the_same_model(bin_path, tmp_path, model) -> None:
    header, a = _legacy_arrays(bin_path)
    head = struct.pack("<Ii7iB", 0x616B3432, 1, *header, 1).ljust(256, b"\0")
    order = ["rms_att", "rms_ffn", "rms_final", "emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    v1 = tmp_path / "v1.bin"
    v1.write_bytes(head + b"".join(a[name].astype("<f4").tobytes() for name in order))
    other = load_llama2c(v1)
    assert other.tokenizer is None  # nothing beside it
    for name, tensor in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor), name


def test_unshared_classifier(bin_path, tmp_path) -> None:
    header, a = _legacy_arrays(bin_path)
    header[5] = -header[5]  # negative vocab_size: the classifier follows at the end
    wcls = (a["emb"][::-1] * 0.5).astype("<f4")
    f = tmp_path / "unshared.bin"
    f.write_bytes(struct.pack("<7i", *header) + bin_path.read_bytes()[28:] + wcls.tobytes())
    m = load_llama2c(f)
    assert not m.config.tie_embeddings
    assert torch.equal(m.lm_head.weight, torch.from_numpy(wcls.copy()))
    assert torch.equal(m.tok_emb.weight, torch.from_numpy(a["emb"].copy()))
    ids = [BOS, 403, 407, 261]
    np.testing.assert_allclose(m(torch.tensor([ids]))[0].detach().double().numpy(), reference_logits(f, ids), atol=1e-4, rtol=0)


def test_random_checkpoint_of_another_shape(tmp_path) -> None:
    """dim=128 (first byte 0x80, as in a pickle), 4 heads sharing 2 kv heads, head_size 32."""
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = 128, 48, 2, 4, 2, 40, 16
    kv_dim = dim * kv_heads // heads
    n = vocab * dim + layers * (2 * dim + 2 * dim * dim + 2 * kv_dim * dim + 3 * hidden * dim) + dim + seq_len * (dim // heads)
    floats = np.random.default_rng(0).normal(0, 0.2, n).astype("<f4")
    f = tmp_path / "random.bin"
    f.write_bytes(struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab, seq_len) + floats.tobytes())
    m = load_llama2c(f)
    ids = [1, 5, 39, 7, 7, 0, 22, 13, 9, 31]
    with torch.inference_mode():
        ours = m(torch.tensor([ids]))[0].double().numpy()
    np.testing.assert_allclose(ours, reference_logits(f, ids), atol=1e-4, rtol=0)


# --- tokenizer -------------------------------------------------------------------------
def test_tokenizer_reads_every_piece(tok, reference_vocab) -> None:
    pieces, scores = reference_vocab
    assert tok.vocab_size == 512 and tok.pieces == pieces and tok.scores == scores
    assert (tok.bos_id, tok.eos_id) == (BOS, EOS)


def test_encode_matches_reference_on_sentences(tok, reference_vocab) -> None:
    pieces, scores = reference_vocab
    for s in SENTENCES:
        assert tok.encode(s) == reference_encode(pieces, scores, s), s
    assert tok.encode("Once upon a time") == [BOS, 403, 407, 261, 378]


@settings(max_examples=150)
@given(st.lists(st.sampled_from(TEXT_PARTS), max_size=20).map("".join))
def test_encode_matches_reference(tok, reference_vocab, text: str) -> None:
    assert tok.encode(text) == reference_encode(*reference_vocab, text)


def test_round_trip_on_stories(tok) -> None:
    text = shared("tinystories/tinystories_sample.txt").read_text(encoding="utf-8")[:20000]
    for story in text.split("\n\n")[:40]:
        ids = tok.encode(story)
        assert ids[0] == BOS and BOS not in ids[1:]
        assert tok.decode(ids) == story
        assert len(ids) < len(story.encode("utf-8")) / 1.5  # the merges do happen


def test_byte_fallback_round_trips(tok) -> None:
    text = "안녕"  # not in a 512-piece English vocabulary: one byte piece per UTF-8 byte
    ids = tok.encode(text, bos=False)
    assert ids == [tok.pieces.index(b" ")] + [b + 3 for b in text.encode("utf-8")]
    assert tok.decode([BOS] + ids) == text
    assert tok.decode_bytes(ids[1:]) == text.encode("utf-8")


@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=30))
def test_round_trip_any_text(tok, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_bos_eos_and_empty(tok) -> None:
    assert tok.encode("") == [BOS]
    assert tok.encode("", bos=False) == []
    assert tok.encode("Lily", bos=False, eos=True)[-1] == EOS
    assert tok.decode([BOS, EOS]) == ""
    assert tok.decode([BOS, 403]) == "Once" and tok.decode([403]) == " Once"


@given(st.lists(st.integers(0, 511), max_size=12), st.lists(st.integers(0, 511), max_size=12))
def test_decode_is_runc_decode_and_concatenates(tok, reference_vocab, a: list[int], b: list[int]) -> None:
    pieces, _ = reference_vocab
    assert tok.decode_bytes(a + b) == reference_decode(pieces, a + b)
    bos_strips = bool(a) and a[-1] == BOS and bool(b) and pieces[b[0]].startswith(b" ")
    if not bos_strips:
        assert tok.decode_bytes(a + b) == tok.decode_bytes(a) + tok.decode_bytes(b)


def test_decode_rejects_unknown_ids(tok) -> None:
    for bad in (512, -1):
        with pytest.raises(LmforgeError, match="outside the vocabulary"):
            tok.decode([bad])


# --- lmforge.load and our model folder -------------------------------------------------
def test_load_bin_then_save_and_reload_folder(model, tok, tmp_path, expected) -> None:
    folder = save_pretrained(model, tmp_path / "stories")
    saved = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["format"] == "lmforge.sentencepiece"
    again = load(folder)
    assert isinstance(again.tokenizer, Llama2cTokenizer)
    ids = torch.tensor([expected["prompt_ids"] + expected["generated_ids"][:100]])
    with torch.inference_mode():
        assert torch.equal(again(ids), model(ids))
    assert again.config.tie_embeddings and again.lm_head.weight is again.tok_emb.weight
    assert again.tokenizer.pieces == tok.pieces and again.tokenizer.scores == tok.scores
    for s in SENTENCES:
        assert again.tokenizer.encode(s) == tok.encode(s)
    assert again.tokenizer.decode(expected["prompt_ids"] + expected["generated_ids"]) == expected["text"]


def test_tokenizer_json_keeps_non_utf8_pieces(tmp_path) -> None:
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n", b" ", b"a", b"\xff\xfe", b" a"]
    tok = Llama2cTokenizer(pieces, [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -0.5])
    again = Llama2cTokenizer.load(tok.save(tmp_path))
    assert again.pieces == pieces and again.scores == tok.scores
    assert again.encode("aa") == tok.encode("aa") == [BOS, 6, 4]


def test_tokenizer_found_beside_the_model_or_given(bin_path, tok_path, tmp_path) -> None:
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(bin_path, alone / "model.bin")
    assert load(alone / "model.bin").tokenizer is None
    given_tok = load_llama2c(alone / "model.bin", tokenizer_path=tok_path).tokenizer
    assert given_tok is not None and given_tok.vocab_size == 512
    shutil.copy(tok_path, alone / "tokA.bin")
    assert load(alone / "model.bin").tokenizer.pieces == given_tok.pieces  # the single tok*.bin
    shutil.copy(tok_path, alone / "tokB.bin")
    with pytest.warns(UserWarning, match="several tokenizers"):
        assert load(alone / "model.bin").tokenizer is None
    (alone / "tokenizer.bin").write_bytes(tok_path.read_bytes()[:2000])  # the Llama 2 name wins, and is checked
    with pytest.raises(LmforgeError, match="truncated"):
        load(alone / "model.bin")
    shutil.copy(tok_path, alone / "tok512.bin")  # named for this vocabulary: wins over tokenizer.bin
    assert load(alone / "model.bin").tokenizer.pieces == given_tok.pieces


# --- errors ----------------------------------------------------------------------------
def test_truncated_bin(bin_path, tmp_path) -> None:
    for size in (len(bin_path.read_bytes()) - 4, 1000, 10):
        f = tmp_path / f"cut{size}.bin"
        f.write_bytes(bin_path.read_bytes()[:size])
        with pytest.raises(LmforgeError, match="truncated|too short"):
            load(f)


def test_foreign_files(bin_path, tmp_path) -> None:
    text = tmp_path / "shakespeare.bin"
    text.write_bytes(shared("tinyshakespeare.txt").read_bytes()[:100_000])
    with pytest.raises(LmforgeError, match="not a llama2.c checkpoint"):
        load(text)
    pickle = tmp_path / "pytorch_model.bin"
    pickle.write_bytes(b"PK\x03\x04" + bytes(100))  # what torch.save writes
    with pytest.raises(LmforgeError, match="PyTorch checkpoint"):
        load(pickle)
    longer = tmp_path / "longer.bin"
    longer.write_bytes(bin_path.read_bytes() + bytes(4))
    with pytest.raises(LmforgeError, match="bytes more than"):
        load(longer)
    quantized = tmp_path / "q80.bin"
    quantized.write_bytes(struct.pack("<Ii7iB", 0x616B3432, 2, 64, 172, 5, 8, 4, 512, 512, 1).ljust(4096, b"\0"))
    with pytest.raises(LmforgeError, match="Q8_0"):
        load(quantized)
    with pytest.raises(LmforgeError, match="no llama2.c checkpoint"):
        load_llama2c(tmp_path / "missing.bin")


def test_tokenizer_errors(tok_path, tmp_path) -> None:
    data = tok_path.read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[: len(data) - 3])
    with pytest.raises(LmforgeError, match="truncated"):
        Llama2cTokenizer.load_bin(cut, 512)
    with pytest.raises(LmforgeError, match="another model's tokenizer"):
        Llama2cTokenizer.load_bin(tok_path, 256)
    with pytest.raises(LmforgeError, match="truncated or another"):
        Llama2cTokenizer.load_bin(tok_path, 32000)
    with pytest.raises(LmforgeError, match="no llama2.c tokenizer"):
        Llama2cTokenizer.load_bin(tmp_path / "missing.bin", 512)
    (tmp_path / "tokenizer.json").write_text('{"format": "lmforge.tokenizer"}', encoding="utf-8")
    with pytest.raises(LmforgeError, match="not a lmforge.sentencepiece"):
        Llama2cTokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"format": "lmforge.senten', encoding="utf-8")
    with pytest.raises(LmforgeError, match="truncated or not JSON"):
        Llama2cTokenizer.load(tmp_path)


# --- the tokenizer in Hugging Face's form ------------------------------------------------
# Exact means: `transformers.AutoTokenizer` on the exported folder gives our ids for every
# text (BOS first, byte fallback included) and decodes them back to the text.
VOCABS = {"tok512": f"{WEIGHTS}/tok512.bin", "llama2-32k": "weights/llama2c-tok32k/tokenizer.bin"}


def real_texts() -> list[str]:
    """Stories, novels (with Project Gutenberg's byte-order mark and curly quotes), Korean law
    and bills (byte fallback in the 512 vocabulary), and runs of spaces as in code."""
    texts = read_text(shared("tinystories/tinystories_valid_head.txt")).split("\n\n")[:60]
    for book in sorted(glob(str(shared("gutenberg") / "*.txt")))[:6]:
        text = read_text(Path(book))
        texts += [text[:4000], text[len(text) // 2 : len(text) // 2 + 4000]]
    texts += [read_text(Path(f))[:6000] for f in sorted(glob(str(shared("korean/konlpy") / "*" / "*.txt")))[:6]]
    texts += ["def f(x):\n    if x:\n        return [x,  x]\n" + " " * 37 + "end", " " * 17 + "z" + " " * 33, "\t\t tabs  and   spaces    "]
    return texts


@pytest.fixture(scope="module", params=list(VOCABS))
def exported(request, tmp_path_factory):
    """(our tokenizer, transformers' AutoTokenizer on the folder write_hf_sentencepiece wrote, that folder)."""
    from transformers import AutoTokenizer

    ours = Llama2cTokenizer.load_bin(shared(VOCABS[request.param]))
    folder = tmp_path_factory.mktemp(request.param)
    files, notes = write_hf_sentencepiece(folder, ours, context_length=512)
    assert files == ["tokenizer.json", "tokenizer_config.json"] and notes == []
    return ours, AutoTokenizer.from_pretrained(folder, model_max_length=10**9), folder


def test_hf_tokenizer_encodes_real_text_as_ours(exported) -> None:
    """transformers and the tokenizers library itself, on tokenizer.json as written."""
    from tokenizers import Tokenizer as RustTokenizer

    ours, theirs, folder = exported
    rust = RustTokenizer.from_file(str(folder / "tokenizer.json"))
    total = 0
    for text in real_texts():
        ids = ours.encode(text)
        assert theirs.encode(text) == ids, text[:80]
        assert rust.encode(text).ids == ids, text[:80]
        assert theirs.decode(ids, skip_special_tokens=True) == text == ours.decode(ids)
        total += len(ids)
    assert total > 40_000  # tens of thousands of ids compared


def test_hf_tokenizer_bos_eos_byte_fallback_and_specials(exported) -> None:
    ours, theirs, _ = exported
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.unk_token_id) == (BOS, EOS, 0)
    assert theirs.encode("") == ours.encode("") == [BOS]
    assert theirs.encode("Lily", add_special_tokens=False) == ours.encode("Lily", bos=False)
    assert theirs.encode("\x00\x7f\U0010ffff") == ours.encode("\x00\x7f\U0010ffff")  # bytes no vocabulary holds
    # llama2.c reads "<s>" in a text as text; transformers is told to (split_special_tokens)
    assert theirs.encode("a <s> b </s> <unk>") == ours.encode("a <s> b </s> <unk>")
    assert BOS not in ours.encode("a <s> b")[1:]


def test_hf_tokenizer_known_difference_is_the_one_stated(exported) -> None:
    """U+2581 ("▁") is a space to every sentencepiece-style tokenizer and a character to
    run.c: the one text difference the export states (SENTENCEPIECE_CAVEAT)."""
    ours, theirs, _ = exported
    assert theirs.encode("a\u2581b") == theirs.encode("a b") != ours.encode("a\u2581b")


@settings(max_examples=300)
@given(st.lists(st.sampled_from([*TEXT_PARTS, "    ", "\t", "the", " the", "<0x41>"]), max_size=25).map("".join))
def test_hf_tokenizer_matches_on_generated_text(exported, text: str) -> None:
    ours, theirs, _ = exported
    assert theirs.encode(text) == ours.encode(text)


def test_hf_tokenizer_reads_back_as_an_equal_llama2c_tokenizer(exported) -> None:
    ours, _, folder = exported
    back = llama2c_from_hf_json(json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")))
    assert back.vocab_size == ours.vocab_size
    assert [p for i, p in enumerate(back.pieces) if i > 2] == ours.pieces[3:]
    for text in real_texts()[::4] + SENTENCES:
        assert back.encode(text) == ours.encode(text), text[:80]


def test_hf_tokenizer_notes_what_it_cannot_carry() -> None:
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n", b" ", b"a", b"\xff\xfe", b" a", b"a"]
    doc, notes = sentencepiece_tokenizer_json(Llama2cTokenizer(pieces, [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -0.5, -4.0]))
    assert [n.split(" (")[0] for n in notes] == ["1 piece(s)", "1 piece(s)", "no <0xNN> piece for 256 byte value(s)"]
    assert "not UTF-8" in notes[0] and "repeat an earlier piece" in notes[1]
    assert doc["model"]["vocab"]["<lmforge-piece-5>"] == 5 and doc["model"]["vocab"]["<lmforge-piece-7>"] == 7
    assert doc["model"]["merges"] == [["\u2581", "a"]]


def test_hf_tokenizer_json_that_is_not_llama2c_is_refused(exported) -> None:
    _, _, folder = exported
    doc = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    metaspace = doc | {"normalizer": None, "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first"}}
    with pytest.raises(LmforgeError, match="leading space"):
        llama2c_from_hf_json(metaspace)
    merges = doc["model"]["merges"]
    joined = [a + b for a, b in merges]
    twice = next(k for k, m in enumerate(joined) if joined.count(m) > 1)  # a piece two merges make: drop one
    dropped = doc | {"model": doc["model"] | {"merges": merges[:twice] + merges[twice + 1 :]}}
    with pytest.raises(LmforgeError, match="which is not a merge"):
        llama2c_from_hf_json(dropped)
    moved = merges[:twice] + merges[twice + 1 :] + [merges[twice]]  # its two merges now rank apart, others between
    with pytest.raises(LmforgeError, match="interleave"):
        llama2c_from_hf_json(doc | {"model": doc["model"] | {"merges": moved}})
