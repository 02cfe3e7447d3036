"""llama2.c's sentencepiece-style tokenizer (`tokenizer.bin`), exact to its `run.c`.

The file is a list of (score, piece) records. `Llama2cTokenizer` reads it, encodes and
decodes as `run.c` does, and saves itself into our model folders as `tokenizer.json`
(format "lmforge.sentencepiece"), beside the weights `lmforge.interop.llama2c` imports.
"""

from __future__ import annotations

import base64
import heapq
import json
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.io import atomic_write_text
from lmforge.tokenizer.tokenizer import TOKENIZER_FILE, read_tokenizer_json

FORMAT = "lmforge.sentencepiece"  # the "format" of its tokenizer.json, which `lmforge.weights` dispatches on
FORMAT_VERSION = 1
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


class Llama2cTokenizer:
    """llama2.c's sentencepiece-style BPE: pieces (raw bytes, "▁" already turned into " ") with scores.

    encode is run.c's `encode`; decode is run.c's `decode` applied along the sequence,
    with two deliberate differences, both so that text round-trips:

    - BOS (1) and EOS (2) decode to nothing: they mark sequence boundaries (their
      pieces are "\\n<s>\\n" and "\\n</s>\\n"; run.c never prints the BOS a sequence
      starts with and stops at a generated one);
    - every byte is kept, where run.c's `safe_printf` drops single non-printable
      bytes (which would lose byte-fallback characters such as Korean).

    Streaming: decode_bytes(a + b) == decode_bytes(a) + decode_bytes(b), except when `a`
    ends with BOS and b's first piece starts with a space, which run.c (like
    sentencepiece) strips after BOS. Decoding a continuation token by token is
    therefore exact as long as the token before it (BOS after a bare-BOS prompt) is
    decoded together with it: decode_bytes([prev] + ids)[len(decode_bytes([prev])):].
    """

    bos_id = 1
    eos_id = 2

    def __init__(self, pieces: Sequence[bytes], scores: Sequence[float], max_token_length: int | None = None) -> None:
        if len(pieces) != len(scores):
            raise LmforgeError(f"a tokenizer needs one score per piece: got {len(pieces)} pieces and {len(scores)} scores")
        if len(pieces) <= self.eos_id:
            raise LmforgeError(f"a llama2.c tokenizer has <unk>, <s>, </s> first: got only {len(pieces)} pieces")
        self.pieces = [bytes(p) for p in pieces]
        self.scores = [float(np.float32(s)) for s in scores]  # run.c compares float32 scores
        self.max_token_length = max_token_length if max_token_length is not None else max(map(len, self.pieces))
        self._ids: dict[bytes, int] = {}
        for i, piece in enumerate(self.pieces):
            self._ids.setdefault(piece, i)  # duplicates: the first id wins
        self._byte_ids = self._find_byte_ids()
        self._text = [self._piece_text(i) for i in range(len(self.pieces))]

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def _find_byte_ids(self) -> dict[int, int]:
        """byte value -> id of its "<0xXX>" piece (run.c assumes id = byte + 3; we look it up)."""
        out: dict[int, int] = {}
        for i, piece in enumerate(self.pieces):
            if m := _BYTE_PIECE.fullmatch(piece):
                out.setdefault(int(m.group(1), 16), i)
        return out

    def _piece_text(self, i: int) -> bytes:
        """The bytes id `i` stands for, before the after-BOS rule."""
        if i in (self.bos_id, self.eos_id):
            return b""
        if m := _BYTE_PIECE.fullmatch(self.pieces[i]):
            return bytes([int(m.group(1), 16)])
        return self.pieces[i]

    # --- tokenizer.bin -----------------------------------------------------------------
    @classmethod
    def load_bin(cls, path: str | os.PathLike, vocab_size: int | None = None) -> Llama2cTokenizer:
        """Read llama2.c's tokenizer.bin: int32 max_token_length, then per piece float32 score, int32 length, bytes.

        The file does not store its size: with `vocab_size` (the model's), exactly that
        many pieces must fill the file, so a tokenizer of another model is an error.
        """
        path = Path(path)
        if not path.is_file():
            raise LmforgeError(f"no llama2.c tokenizer at {path}")
        data = path.read_bytes()
        if len(data) < 4:
            raise LmforgeError(f"{path} is not a llama2.c tokenizer.bin: {len(data)} bytes")
        (max_len,) = struct.unpack_from("<i", data, 0)
        pieces, scores, offset = [], [], 4
        while offset < len(data) and (vocab_size is None or len(pieces) < vocab_size):
            if offset + 8 > len(data):
                raise LmforgeError(f"{path} is truncated inside piece {len(pieces)} (at byte {offset} of {len(data)})")
            score, n = struct.unpack_from("<fi", data, offset)
            offset += 8
            if n < 0 or offset + n > len(data):
                raise LmforgeError(
                    f"{path} is truncated or not a llama2.c tokenizer.bin: piece {len(pieces)} claims {n} bytes "
                    f"at byte {offset}, the file has {len(data)}"
                )
            pieces.append(data[offset : offset + n])
            scores.append(score)
            offset += n
        if vocab_size is not None and len(pieces) < vocab_size:
            raise LmforgeError(
                f"{path} holds {len(pieces)} pieces, the model has {vocab_size} token ids: "
                "it is truncated or another model's tokenizer"
            )
        if offset < len(data):
            raise LmforgeError(
                f"{path} holds more than {vocab_size} pieces ({len(data) - offset} bytes left over): it is another "
                "model's tokenizer; pass the right one (llama2.c names custom ones tok<vocab_size>.bin)"
            )
        return cls(pieces, scores, max_len)

    # --- our tokenizer.json ------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write `tokenizer.json` into the folder `path` (or to `path` itself if it ends in .json).

        Pieces are stored as text, or as base64 for one that is not valid UTF-8, so
        every byte survives; scores are float32 values, exact in JSON.
        """
        entries = []
        for piece, score in zip(self.pieces, self.scores, strict=True):
            try:
                entries.append({"piece": piece.decode("utf-8"), "score": score})
            except UnicodeDecodeError:
                entries.append({"piece_base64": base64.b64encode(piece).decode("ascii"), "score": score})
        doc = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "max_token_length": self.max_token_length,
            "pieces": entries,
        }
        path = Path(path)
        file = path if path.suffix == ".json" else path / TOKENIZER_FILE
        atomic_write_text(file, json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
        return file

    @classmethod
    def load(cls, path: str | os.PathLike) -> Llama2cTokenizer:
        """Read `tokenizer.json` written by `save` (from a folder or the file itself)."""
        file, doc = read_tokenizer_json(path)
        return cls.from_dict(doc, source=str(file))

    @classmethod
    def from_dict(cls, doc: Any, source: str = "tokenizer") -> Llama2cTokenizer:
        """A tokenizer from the contents of its tokenizer.json; every field is checked (`source` names it in errors)."""
        fmt = doc.get("format") if isinstance(doc, dict) else None
        if fmt != FORMAT:
            what = f"its format is {fmt!r}" if isinstance(doc, dict) else f"it holds a JSON {type(doc).__name__}, not an object"
            raise LmforgeError(f"{source} is not a {FORMAT} tokenizer ({what})")
        if doc.get("version") != FORMAT_VERSION:
            raise LmforgeError(f"{source} has format version {doc.get('version')!r}; this lmforge reads version {FORMAT_VERSION}")
        entries, max_len = doc.get("pieces"), doc.get("max_token_length")
        if not isinstance(entries, list):
            raise LmforgeError(f"{source} is damaged: 'pieces' must be a list of {{piece, score}} objects; re-create it")
        if max_len is not None and not (isinstance(max_len, int) and not isinstance(max_len, bool) and max_len >= 0):
            raise LmforgeError(f"{source} is damaged: max_token_length is {max_len!r}, not a count of bytes; re-create it")
        pieces, scores = [], []
        for i, entry in enumerate(entries):
            try:
                pieces.append(_entry_bytes(entry))
                scores.append(_entry_score(entry))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise LmforgeError(f"{source} has a malformed piece list: piece {i} is {entry!r} ({e}); re-create it") from None
        try:
            return cls(pieces, scores, max_len)
        except LmforgeError as e:
            raise LmforgeError(f"{source}: {e}") from None

    # --- encode ------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """run.c's encode: BOS, a dummy-prefix space, one piece per character (its UTF-8 bytes
        as byte pieces when the character is not a piece), then merge best-scored pairs.

        BOS is on by default because a llama2.c model saw BOS before every story (run.c
        prompts with it) and because it makes decode(encode(text)) == text.
        """
        ids = [self.bos_id] if bos else []
        if text:
            ids += self._merge(self._character_ids(text.encode("utf-8", "surrogatepass")))
        if eos:
            ids.append(self.eos_id)
        return ids

    def _character_ids(self, data: bytes) -> list[int]:
        """The dummy prefix, then each UTF-8 character's piece, or byte pieces if it has none."""
        space = self._ids.get(b" ")
        if space is None:
            raise LmforgeError("this vocabulary has no ' ' piece for sentencepiece's dummy prefix; it is not a llama2.c tokenizer")
        ids = [space]
        char = bytearray()
        for k, b in enumerate(data):
            if b & 0xC0 != 0x80:  # a leading or ASCII byte starts a new character
                char.clear()
            char.append(b)
            continues = k + 1 < len(data) and data[k + 1] & 0xC0 == 0x80
            if continues and len(char) < 4:
                continue
            piece_id = self._ids.get(bytes(char))
            ids += [piece_id] if piece_id is not None else [self._byte_id(c) for c in char]
            char.clear()
        return ids

    def _byte_id(self, byte: int) -> int:
        try:
            return self._byte_ids[byte]
        except KeyError:
            raise LmforgeError(f"this vocabulary has no <0x{byte:02X}> byte piece, so it cannot encode that byte") from None

    def _merge(self, ids: list[int]) -> list[int]:
        """run.c's merge loop: merge the adjacent pair whose joined piece scores best (leftmost
        on ties) until none joins into a piece, in O(n log n) with a heap.

        Nodes keep their first index, so the leftmost current pair is the one with the
        smallest left index; heap entries that no longer match their pair are skipped.
        """
        n = len(ids)
        nxt = [*range(1, n), -1]
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []

        def push(i: int) -> None:
            j = nxt[i] if i >= 0 else -1
            if j < 0:
                return
            merged = self._ids.get(self.pieces[ids[i]] + self.pieces[ids[j]])
            if merged is not None and self.scores[merged] > -1e10:  # run.c's starting best_score
                heapq.heappush(heap, (-self.scores[merged], i, ids[i], ids[j]))

        for i in range(n - 1):
            push(i)
        alive = [True] * n
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = nxt[i] if alive[i] else -1
            if j < 0 or ids[i] != left or ids[j] != right:
                continue  # stale: this pair has changed since it was pushed
            ids[i] = self._ids[self.pieces[left] + self.pieces[right]]
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prv[nxt[j]] = i
            push(prv[i])
            push(i)
        return [t for t, keep in zip(ids, alive, strict=True) if keep]

    # --- decode ------------------------------------------------------------------------
    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes run.c prints for `ids` (see the class docstring for the two differences)."""
        out = bytearray()
        prev = None
        for t in ids:
            t = int(t)
            if not 0 <= t < len(self.pieces):
                raise LmforgeError(f"token id {t} is outside the vocabulary 0..{len(self.pieces) - 1}")
            text = self._text[t]
            if prev == self.bos_id and self.pieces[t].startswith(b" "):
                text = text[1:]  # sentencepiece drops the dummy-prefix space after BOS
            out += text
            prev = t
        return bytes(out)

    def decode(self, ids: Sequence[int]) -> str:
        """decode_bytes as text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"Llama2cTokenizer(vocab_size={self.vocab_size})"


def _entry_bytes(entry: dict) -> bytes:
    if not isinstance(entry, dict):
        raise TypeError("not an object")
    if "piece_base64" in entry:
        if not isinstance(entry["piece_base64"], str):
            raise TypeError("piece_base64 is not a string")
        return base64.b64decode(entry["piece_base64"], validate=True)
    if not isinstance(entry["piece"], str):
        raise TypeError("piece is not a string")
    return entry["piece"].encode("utf-8")


def _entry_score(entry: dict) -> float:
    score = entry["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise ValueError("the score is not a number")
    return float(score)
