"""Import OpenAI's GPT-2 vocabulary: `encoder.json` (token -> id) and `vocab.bpe` (the merges).

The two files say the same thing twice; we build the tokenizer from the merges and
check every id against encoder.json, so a mismatched pair of files is caught here
rather than showing up as subtly wrong ids later.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.tokenizer.bytes_unicode import printable_to_bytes
from lmforge.tokenizer.patterns import GPT2_PATTERN
from lmforge.tokenizer.tokenizer import Tokenizer, text_file


def _read(path: str | os.PathLike, what: str) -> str:
    return text_file(Path(path), f"GPT-2's {what}", missing=f"GPT-2 {what} not found at {path}")


def from_gpt2_files(encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> Tokenizer:
    """The GPT-2 tokenizer (50,257 ids, `<|endoftext|>` = 50256) from its two original files."""
    try:
        encoder = json.loads(_read(encoder_json, "encoder.json"))
    except (ValueError, RecursionError) as e:
        raise LmforgeError(f"{encoder_json} is not valid JSON ({e}); is it GPT-2's encoder.json?") from None
    if not isinstance(encoder, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in encoder.values()):
        raise LmforgeError(f"{encoder_json} is not GPT-2's encoder.json: that is one JSON object of token -> integer id")
    lines = _read(vocab_bpe, "vocab.bpe").split("\n")
    if not lines or not lines[0].startswith("#version"):
        raise LmforgeError(f"{vocab_bpe} does not start with '#version': is it GPT-2's vocab.bpe?")

    def bytes_of(token: str, where: str) -> bytes:
        try:
            return printable_to_bytes(token)
        except KeyError:
            raise LmforgeError(f"{where}: {token!r} is not in GPT-2's byte alphabet") from None

    id_bytes = {v: bytes_of(k, str(encoder_json)) for k, v in encoder.items() if k not in ("<|endoftext|>", "<|startoftext|>")}
    specials = {k: v for k, v in encoder.items() if k in ("<|endoftext|>", "<|startoftext|>")}
    try:
        byte_order = [id_bytes[i][0] for i in range(256)]
    except (KeyError, IndexError):
        raise LmforgeError(f"{encoder_json}: ids 0..255 must be the 256 single bytes") from None
    token_id = {bytes([b]): i for i, b in enumerate(byte_order)}
    merges = []
    for k, line in enumerate(ln for ln in lines[1:] if ln):
        parts = line.split(" ")
        if len(parts) != 2:
            raise LmforgeError(f"{vocab_bpe} line {k + 2}: expected two tokens separated by a space, got {line!r}")
        left, right = (bytes_of(p, f"{vocab_bpe} line {k + 2}") for p in parts)
        new_id = 256 + k
        if id_bytes.get(new_id) != left + right or left not in token_id or right not in token_id:
            raise LmforgeError(
                f"{vocab_bpe} line {k + 2} ({line!r}) disagrees with {encoder_json} for id {new_id}: "
                "the two files are not from the same vocabulary"
            )
        merges.append((token_id[left], token_id[right]))
        token_id[left + right] = new_id
    if len(token_id) != len(id_bytes):
        raise LmforgeError(f"{encoder_json} has {len(id_bytes)} tokens but {vocab_bpe} defines {len(token_id)}")
    try:
        return Tokenizer(merges, specials, GPT2_PATTERN, byte_order, name="gpt2")
    except LmforgeError as e:
        raise LmforgeError(f"{encoder_json}: {e}") from None
