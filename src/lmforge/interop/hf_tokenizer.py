"""Hugging Face tokenizers <-> our byte-level BPE `Tokenizer`, without the `tokenizers` package.

Read: tokenizer.json when it is byte-level BPE we reproduce exactly, else GPT-2's
vocab.json + merges.txt. Written: vocab.json + merges.txt always, and tokenizer.json
(which also carries the pre-tokenizer regex) + tokenizer_config.json when the regex means
the same in Hugging Face's regex engine (Oniguruma) as in tiktoken's. `hf.py` reads and
writes these beside the weights.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.io import atomic_write_text
from lmforge.tokenizer import GPT2_PATTERN, GPT4_PATTERN, Tokenizer, from_gpt2_files
from lmforge.tokenizer.bytes_unicode import bytes_to_printable, printable_to_bytes

# The Hugging Face (Oniguruma) spelling of our tiktoken-form GPT-4 pattern: Oniguruma reads
# `X{1,3}+` as (X{1,3})+, not as a possessive repeat, so the pattern must be written without it.
GPT4_PATTERN_ONIG = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_ONIG_DIFFERS = re.compile(r"\{\d*,?\d*\}\+")  # `X{n,m}+`: the spelling the two regex engines read differently
_ALPHABET = frozenset(bytes_to_printable(bytes(range(256))))  # GPT-2's printable stand-ins for bytes

# every file write_hf_tokenizer may write
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")


# --- reading -------------------------------------------------------------------------------
def load_hf_tokenizer(path: Path) -> Tokenizer | None:
    """Our Tokenizer from tokenizer.json (byte-level BPE) or vocab.json + merges.txt; None (with a warning) if not exact.

    tokenizer.json comes first: it also says which regex cuts the text, which
    vocab.json + merges.txt leave implicit (GPT-2's).
    """
    reasons = []
    if (path / "tokenizer.json").is_file():
        try:
            return tokenizer_from_hf_json(read_json(path / "tokenizer.json"))
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
def write_hf_tokenizer(out: Path, tokenizer: Tokenizer, context_length: int) -> list[str]:
    """Write the tokenizer files into `out` (each atomically); return their names."""
    n_bpe = 256 + len(tokenizer.merges)
    tokens = [bytes_to_printable(tokenizer.token_bytes(i)) for i in range(n_bpe)]
    vocab = {tok: i for i, tok in enumerate(tokens)} | tokenizer.special_tokens
    merges = [(tokens[a], tokens[b]) for a, b in tokenizer.merges]
    atomic_write_text(out / "vocab.json", json.dumps(vocab, ensure_ascii=False) + "\n")
    atomic_write_text(out / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    written = ["vocab.json", "merges.txt"]
    hf_json = _tokenizer_json(tokenizer, vocab, merges)
    if hf_json is None:
        warnings.warn(
            f"pattern {tokenizer.pattern!r} has no exact Hugging Face spelling; wrote vocab.json + merges.txt "
            "only, which imply GPT-2's pattern",
            stacklevel=3,
        )
        return written
    atomic_write_text(out / "tokenizer.json", json.dumps(hf_json, ensure_ascii=False) + "\n")
    eot = tokenizer.eot_id
    eos = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"} if eot is not None else {}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length, **eos}
    atomic_write_text(out / "tokenizer_config.json", json.dumps(tok_config, indent=2) + "\n")
    return [*written, "tokenizer.json", "tokenizer_config.json"]


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
