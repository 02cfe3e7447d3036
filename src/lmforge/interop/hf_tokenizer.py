"""Hugging Face tokenizers <-> our tokenizers, without the `tokenizers` package.

Our byte-level BPE `Tokenizer`: read from tokenizer.json when it is byte-level BPE we
reproduce exactly, else from GPT-2's vocab.json + merges.txt. Written as vocab.json +
merges.txt always, and tokenizer.json (which also carries the pre-tokenizer regex) +
tokenizer_config.json when the regex means the same in Hugging Face's regex engine
(Oniguruma) as in tiktoken's.

llama2.c's sentencepiece-style `Llama2cTokenizer`: written as the tokenizer.json of a
Llama tokenizer (BPE with byte fallback, "▁" for spaces) + tokenizer_config.json, and read
back from one. See `sentencepiece_tokenizer_json` for how scores become merges and which
inputs (few, named there) the two do not encode alike. `hf.py` reads and writes these
files beside the weights.
"""

from __future__ import annotations

import itertools
import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.io import atomic_write_text
from lmforge.tokenizer import GPT2_PATTERN, GPT4_PATTERN, Tokenizer, from_gpt2_files
from lmforge.tokenizer.bytes_unicode import bytes_to_printable, printable_to_bytes
from lmforge.tokenizer.llama2c import Llama2cTokenizer

# The Hugging Face (Oniguruma) spelling of our tiktoken-form GPT-4 pattern: Oniguruma reads
# `X{1,3}+` as (X{1,3})+, not as a possessive repeat, so the pattern must be written without it.
GPT4_PATTERN_ONIG = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_ONIG_DIFFERS = re.compile(r"\{\d*,?\d*\}\+")  # `X{n,m}+`: the spelling the two regex engines read differently
_ALPHABET = frozenset(bytes_to_printable(bytes(range(256))))  # GPT-2's printable stand-ins for bytes

# every file write_hf_tokenizer or write_hf_sentencepiece may write
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")


# --- reading -------------------------------------------------------------------------------
def load_hf_tokenizer(path: Path) -> Tokenizer | Llama2cTokenizer | None:
    """Our tokenizer from tokenizer.json (byte-level BPE, or a Llama-style BPE with byte
    fallback: a `Llama2cTokenizer`) or vocab.json + merges.txt; None (with a warning) if not exact.

    tokenizer.json comes first: it also says which regex cuts the text, which
    vocab.json + merges.txt leave implicit (GPT-2's).
    """
    reasons = []
    if (path / "tokenizer.json").is_file():
        try:
            d = read_json(path / "tokenizer.json")
            if isinstance(d, dict) and isinstance(d.get("model"), dict) and d["model"].get("byte_fallback"):
                return llama2c_from_hf_json(d)
            return tokenizer_from_hf_json(d)
        except LmforgeError as e:
            reasons.append(f"tokenizer.json: {e}")
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        try:
            return from_gpt2_files(path / "vocab.json", path / "merges.txt")
        except LmforgeError as e:
            reasons.append(f"vocab.json + merges.txt: {e}")
    if reasons:
        warnings.warn(f"{path}: no exact conversion of the tokenizer ({'; '.join(reasons)}); model.tokenizer is None", stacklevel=3)
    return None


def tokenizer_from_hf_json(d: Mapping[str, Any]) -> Tokenizer:
    """A `tokenizers` tokenizer.json -> our Tokenizer, when it is byte-level BPE we reproduce exactly.

    Exact means: no normalizer, GPT-2's byte alphabet, ids 0..255 the single bytes and
    merge k making id 256 + k, specials as added tokens. A post-processor template (a
    BOS some tokenizers prepend) is not applied: `encode` gives the text's ids only.
    """
    model = d.get("model") or {}
    if model.get("type") != "BPE":
        raise LmforgeError(f"tokenizer model {model.get('type')!r} is not BPE")
    unsupported = [k for k in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback") if model.get(k)]
    if unsupported or d.get("normalizer") is not None:
        raise LmforgeError(f"tokenizer options {unsupported + ['normalizer'] * (d.get('normalizer') is not None)} are not byte-level BPE")
    if (d.get("decoder") or {}).get("type") != "ByteLevel":
        raise LmforgeError(f"decoder {(d.get('decoder') or {}).get('type')!r} is not ByteLevel")
    pattern = _pattern_from_pre_tokenizer(d.get("pre_tokenizer") or {})
    try:
        added = d.get("added_tokens") or []
        plain = [t["content"] for t in added if not t.get("special")]
        specials = {t["content"]: int(t["id"]) for t in added}
        vocab = {tok: int(i) for tok, i in model["vocab"].items() if tok not in specials}
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LmforgeError(f"tokenizer.json is malformed ({type(e).__name__}: {e})") from None
    if plain:
        raise LmforgeError(f"non-special added tokens {plain[:3]} are matched before BPE, which lmforge does not do")
    return bpe_from_vocab(vocab, merges, specials, pattern, name="hf-bpe")


def _pattern_from_pre_tokenizer(pre: Mapping[str, Any]) -> str:
    """The regex a byte-level pre-tokenizer cuts text with: ByteLevel's own (GPT-2's), or a Split before it.

    A Split regex is taken as written (GPT-4 / Llama 3's in tiktoken's spelling). That is
    exact for regexes that match every character, as these do: text a regex skips stays
    a piece in `tokenizers` but is dropped by tiktoken.
    """
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return GPT2_PATTERN
    if kinds == ["Split", "ByteLevel"]:
        split, byte_level = steps
        regex = (split.get("pattern") or {}).get("Regex")
        if (
            regex is not None
            and split.get("behavior") == "Isolated"
            and not split.get("invert")
            and not byte_level.get("use_regex", True)
            and not byte_level.get("add_prefix_space")
            and not _ONIG_DIFFERS.search(regex)
        ):
            return GPT4_PATTERN if regex == GPT4_PATTERN_ONIG else regex
    raise LmforgeError(f"pre-tokenizer {kinds} is not one lmforge reproduces exactly (ByteLevel, or Split(regex) then ByteLevel)")


def bpe_from_vocab(
    vocab: Mapping[str, int], merges: list[tuple[str, ...]], specials: Mapping[str, int], pattern: str, name: str
) -> Tokenizer:
    """Our Tokenizer from a printable-alphabet vocab and its merges, if ids follow the merge order."""
    try:
        id_bytes = {i: printable_to_bytes(tok) for tok, i in vocab.items()}
    except KeyError:
        raise LmforgeError("the vocabulary is not in GPT-2's byte-level alphabet") from None
    if any(len(id_bytes.get(i, b"")) != 1 for i in range(256)):
        raise LmforgeError("ids 0..255 are not the 256 single bytes")
    byte_order = [id_bytes[i][0] for i in range(256)]
    token_id = {bytes([b]): i for i, b in enumerate(byte_order)}
    pairs = []
    for k, merge in enumerate(merges):
        if len(merge) != 2:
            raise LmforgeError(f"merge {k} ({merge}) is not a pair")
        left, right = (printable_to_bytes(p) if set(p) <= _ALPHABET else None for p in merge)
        if left not in token_id or right not in token_id or id_bytes.get(256 + k) != left + right:
            raise LmforgeError(f"merge {k} {merge} does not make id {256 + k}: ids do not follow the merge order")
        pairs.append((token_id[left], token_id[right]))
        token_id[left + right] = 256 + k
    if len(token_id) != len(id_bytes):
        raise LmforgeError(f"the vocabulary has {len(id_bytes) - len(token_id)} tokens no merge makes")
    try:
        return Tokenizer(pairs, specials, pattern, byte_order, name=name)
    except ValueError as e:  # tiktoken could not compile the pattern
        raise LmforgeError(f"the pre-tokenizer regex does not compile for tiktoken ({e})") from None


def read_json(file: Path) -> dict[str, Any]:
    """A JSON file as a dict; a missing, truncated or non-UTF-8 file is an LmforgeError."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"no {file.name} in {file.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{file} is truncated or not JSON ({e})") from None


# --- writing -------------------------------------------------------------------------------
def write_hf_tokenizer(out: Path, tokenizer: Tokenizer, context_length: int) -> tuple[list[str], list[str]]:
    """Write the tokenizer files into `out` (each atomically); return (their names, notes on
    what could not be written exactly): the caller says the notes its own way."""
    n_bpe = 256 + len(tokenizer.merges)
    tokens = [bytes_to_printable(tokenizer.token_bytes(i)) for i in range(n_bpe)]
    vocab = {tok: i for i, tok in enumerate(tokens)} | tokenizer.special_tokens
    merges = [(tokens[a], tokens[b]) for a, b in tokenizer.merges]
    atomic_write_text(out / "vocab.json", json.dumps(vocab, ensure_ascii=False) + "\n")
    atomic_write_text(out / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    written = ["vocab.json", "merges.txt"]
    hf_json = _tokenizer_json(tokenizer, vocab, merges)
    if hf_json is None:
        note = (f"the tokenizer's pattern {tokenizer.pattern!r} has no exact Hugging Face spelling: wrote vocab.json + merges.txt "
                "only (no tokenizer.json), which imply GPT-2's pattern")
        return written, [note]
    atomic_write_text(out / "tokenizer.json", json.dumps(hf_json, ensure_ascii=False) + "\n")
    eot = tokenizer.eot_id
    eos = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"} if eot is not None else {}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length, **eos}
    atomic_write_text(out / "tokenizer_config.json", json.dumps(tok_config, indent=2) + "\n")
    return [*written, "tokenizer.json", "tokenizer_config.json"], []


def _tokenizer_json(tokenizer: Tokenizer, vocab: dict[str, int], merges: list[tuple[str, str]]) -> dict[str, Any] | None:
    """The `tokenizers` JSON for our tokenizer, or None when its regex would mean something else there."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if tokenizer.pattern == GPT2_PATTERN:
        pre: dict[str, Any] = byte_level
    else:
        regex = GPT4_PATTERN_ONIG if tokenizer.pattern == GPT4_PATTERN else tokenizer.pattern
        if _ONIG_DIFFERS.search(regex):
            return None
        split = {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
        pre = {"type": "Sequence", "pretokenizers": [split, byte_level | {"use_regex": False}]}
    added = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for s, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre,
        "post_processor": byte_level | {"trim_offsets": False},
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,  # as tiktoken: a piece that is a token is taken whole
            "vocab": vocab,
            "merges": [list(m) for m in merges],
        },
    }


# --- llama2.c's sentencepiece-style tokenizer ----------------------------------------------
SPACE = "\u2581"  # "▁": sentencepiece's (and Hugging Face Llama's) spelling of a space inside a token
SP_SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>"}  # llama2.c's fixed ids (run.c: BOS 1, EOS 2)
_NEVER_MERGED = -1e10  # run.c merges a pair only into a piece scored above this
_PREPEND_SPACE = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": SPACE}, {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
]}
# What `tokenizers` cannot know about llama2.c's encode, stated wherever the export is reported.
SENTENCEPIECE_CAVEAT = (
    f"text holding '{SPACE}' (U+2581) itself encodes differently (Hugging Face reads it as a space); "
    "with the tokenizers library alone (not transformers), the text '<s>', '</s>' or '<unk>' becomes that special token"
)


def sentencepiece_tokenizer_json(tok: Llama2cTokenizer) -> tuple[dict[str, Any], list[str]]:
    """The `tokenizers` tokenizer.json that encodes as llama2.c's run.c (our `Llama2cTokenizer`)
    does, and notes on any piece of this vocabulary it cannot carry exactly ([] for real ones).

    Why it matches: run.c starts from one piece per UTF-8 character (its bytes as <0xNN>
    pieces when the character is not one) after a space it always puts first, then merges
    the adjacent pair whose joined piece scores best, leftmost on ties. `tokenizers` BPE
    with byte fallback starts alike, and merges the pair of lowest rank (leftmost among
    equal ones). So every split of every piece into two pieces becomes a merge, ranked by
    the joined piece's score; a tie between different pieces (Llama 2's runs of spaces,
    all scored -1e9) goes to the longer one, then to the longer left part, which is how
    run.c's leftmost-first grows a run of spaces. The space is the normalizer's
    Prepend("▁") + Replace(" ", "▁"), not the Metaspace pre-tokenizer, which adds no "▁"
    before a text that already starts with a space.

    What still differs (`SENTENCEPIECE_CAVEAT`): text holding "▁" itself, and the
    special tokens' own text with the tokenizers library alone (transformers is told
    `split_special_tokens`). In principle also a pair of tied splits of one piece that
    overlap (A+B = B+C), which real vocabularies do not produce.
    """
    names: list[str] = []
    seen: set[str] = set()
    unreadable, doubled = [], []
    for i, piece in enumerate(tok.pieces):
        name = SP_SPECIALS.get(i)
        if name is None:
            try:
                name = piece.decode("utf-8").replace(" ", SPACE)
            except UnicodeDecodeError:
                unreadable.append(i)
                name = None
        if name is None or name in seen:
            if name is not None:
                doubled.append(i)
            name = f"<lmforge-piece-{i}>"  # a unique name encode never produces (the piece is unreachable)
        seen.add(name)
        names.append(name)
    notes = []
    if unreadable:
        notes.append(f"{len(unreadable)} piece(s) (ids {unreadable[:5]}) are not UTF-8 text; they are named <lmforge-piece-ID> "
                     "there, never produced by encoding and decoded as that name")
    if doubled:
        notes.append(f"{len(doubled)} piece(s) (ids {doubled[:5]}) repeat an earlier piece; encoding gives the first, as run.c does, "
                     "and they are named <lmforge-piece-ID> there")
    if any(SPACE.encode() in p for p in tok.pieces):
        notes.append(f"pieces holding '{SPACE}' itself read as spaces there")
    missing = [b for b in range(256) if f"<0x{b:02X}>" not in seen]
    if missing:
        notes.append(f"no <0xNN> piece for {len(missing)} byte value(s) (e.g. 0x{missing[0]:02X}): our encode refuses a character "
                     "needing one, Hugging Face gives <unk>")

    first_id: dict[bytes, int] = {}
    for i, piece in enumerate(tok.pieces):
        first_id.setdefault(piece, i)
    usable = [i >= len(SP_SPECIALS) and not names[i].startswith("<lmforge-piece-") for i in range(len(names))]
    ranked = []
    for t, piece in enumerate(tok.pieces):
        if not usable[t] or tok.scores[t] <= _NEVER_MERGED:
            continue
        for k in range(1, len(piece)):
            a, b = first_id.get(piece[:k]), first_id.get(piece[k:])
            if a is not None and b is not None and usable[a] and usable[b]:
                ranked.append((-tok.scores[t], -len(piece), t, -k, a, b))
    ranked.sort()
    added = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
             for i, c in SP_SPECIALS.items()]
    bos = [{"SpecialToken": {"id": SP_SPECIALS[1], "type_id": 0}}]
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": _PREPEND_SPACE,
        "pre_tokenizer": None,
        "post_processor": {  # BOS first, as our encode (bos=True, eos=False) does
            "type": "TemplateProcessing",
            "single": [*bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [*bos, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": SP_SPECIALS[1], "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {SP_SPECIALS[1]: {"id": SP_SPECIALS[1], "ids": [1], "tokens": [SP_SPECIALS[1]]}},
        },
        "decoder": {"type": "Sequence", "decoders": [  # the first "▁" is the one the encoder put first
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": SP_SPECIALS[0],
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {name: i for i, name in enumerate(names)},
            "merges": [[names[a], names[b]] for *_, a, b in ranked],
        },
    }
    return doc, notes


def write_hf_sentencepiece(out: Path, tok: Llama2cTokenizer, context_length: int) -> tuple[list[str], list[str]]:
    """tokenizer.json + tokenizer_config.json for a llama2.c tokenizer, each atomically; returns
    (their names, notes on pieces that could not be carried exactly).

    The config names the generic PreTrainedTokenizerFast, which runs tokenizer.json as
    written: transformers 5 rebuilds a LlamaTokenizerFast's pipeline itself (with the
    Metaspace pre-tokenizer), which would encode a text that starts with a space unlike
    llama2.c. It adds BOS (not EOS) as our encode does, and reads "<s>" in a text as
    text (`split_special_tokens`), as llama2.c does.
    """
    doc, notes = sentencepiece_tokenizer_json(tok)
    atomic_write_text(out / "tokenizer.json", json.dumps(doc, ensure_ascii=False) + "\n")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SP_SPECIALS[1],
        "eos_token": SP_SPECIALS[2],
        "unk_token": SP_SPECIALS[0],
        "add_bos_token": True,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
    }
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"], notes


def llama2c_from_hf_json(d: Mapping[str, Any]) -> Llama2cTokenizer:
    """A Llama-style tokenizer.json (BPE with byte fallback, as `sentencepiece_tokenizer_json`
    writes) -> a `Llama2cTokenizer` that encodes alike, or an LmforgeError saying why not.

    run.c merges by a score per piece, `tokenizers` by a rank per merge: each piece gets
    minus the rank of its first merge, which is exact when every split of a piece into two
    pieces is a merge and the merges of different pieces do not interleave (what a
    sentencepiece conversion writes); a piece no merge makes is never merged (-1e10).
    """
    model = d.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise LmforgeError("the tokenizer is not BPE with byte fallback")
    odd = [k for k in ("dropout", "ignore_merges", "continuing_subword_prefix", "end_of_word_suffix") if model.get(k)]
    if odd:
        raise LmforgeError(f"tokenizer options {odd} are not sentencepiece's BPE")
    if d.get("normalizer") != _PREPEND_SPACE or d.get("pre_tokenizer") is not None:
        raise LmforgeError(
            "its space handling is not llama2.c's (a '▁' always put first, every ' ' read as '▁': the normalizer "
            "Prepend + Replace and no pre-tokenizer); the Metaspace pre-tokenizer, for one, puts none before a leading space"
        )
    try:
        vocab = {str(tok): int(i) for tok, i in model["vocab"].items()}
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
        added = {int(t["id"]): (t["content"], bool(t.get("special"))) for t in d.get("added_tokens") or []}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LmforgeError(f"tokenizer.json is malformed ({type(e).__name__}: {e})") from None
    names = sorted(vocab, key=vocab.get)
    if [vocab[n] for n in names] != list(range(len(names))):
        raise LmforgeError("the vocabulary's ids are not 0..N-1 without gaps")
    extra = {i: c for i, (c, special) in added.items() if i not in SP_SPECIALS or not special}
    if extra:
        raise LmforgeError(f"added tokens {sorted(extra.values())[:3]} are matched before BPE, which llama2.c does not do")
    if SPACE not in vocab:
        raise LmforgeError(f"the vocabulary has no '{SPACE}' token for the space put first")
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    listed: set[tuple[int, int]] = set()
    for rank, merge in enumerate(merges):
        if len(merge) != 2 or any(p not in vocab for p in merge) or merge[0] + merge[1] not in vocab:
            raise LmforgeError(f"merge {rank} {list(merge)} does not join two tokens into a token")
        t = vocab[merge[0] + merge[1]]
        first.setdefault(t, rank)
        last[t] = rank
        listed.add((vocab[merge[0]], vocab[merge[1]]))
    blocks = sorted((first[t], last[t], t) for t in first)
    for (_, end, a), (start, _, b) in itertools.pairwise(blocks):
        if start <= end:
            raise LmforgeError(f"the merges making {names[a]!r} and {names[b]!r} interleave: no score per token orders them alike")
    specials = set(SP_SPECIALS)
    for t in first:
        name = names[t]
        for k in range(1, len(name)):
            a, b = vocab.get(name[:k]), vocab.get(name[k:])
            if a is not None and b is not None and a not in specials and b not in specials and (a, b) not in listed:
                raise LmforgeError(f"{name!r} can be joined from {name[:k]!r} + {name[k:]!r}, which is not a merge: "
                                   "llama2.c would join it, this tokenizer does not")
    pieces = [b"\n<s>\n" if i == 1 else b"\n</s>\n" if i == 2 else n.replace(SPACE, " ").encode("utf-8") for i, n in enumerate(names)]
    if len(set(pieces)) != len(pieces):
        raise LmforgeError("two tokens stand for the same text (one spelled with '▁', one with ' ')")
    scores = [float(np.float32(-first[i])) if i in first else _NEVER_MERGED for i in range(len(names))]
    return Llama2cTokenizer(pieces, scores)
