"""GPT-2's printable stand-ins for bytes, used by `vocab.bpe`, `encoder.json` and our save format.

Every byte gets one visible character (a space becomes "Ġ", a newline "Ċ") so that a
token can be written in a text file and split on spaces. The 188 printable Latin-1
bytes stand for themselves; the other 68 map to U+0100 onwards, in byte order.
"""

from __future__ import annotations


def _build() -> dict[int, str]:
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR: dict[int, str] = _build()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_CHAR.items()}
# The order GPT-2 gives the 256 single-byte tokens: printable bytes first (ids 0..187).
GPT2_BYTE_ORDER: list[int] = sorted(range(256), key=lambda b: ord(BYTE_TO_CHAR[b]))


def bytes_to_printable(data: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in data)


def printable_to_bytes(text: str) -> bytes:
    """Inverse of `bytes_to_printable`; raises KeyError on a character that stands for no byte."""
    return bytes(CHAR_TO_BYTE[c] for c in text)
