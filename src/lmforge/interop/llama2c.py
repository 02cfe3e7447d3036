"""llama2.c checkpoints (`model.bin`) and their sentencepiece-style `tokenizer.bin`.

karpathy/llama2.c writes a Llama model as raw little-endian fp32 arrays behind a tiny
header, and its tokenizer as a list of (score, piece) records. `load_llama2c` turns
the model into our `GPT` with its tokenizer attached (`lmforge.tokenizer.llama2c`, which
encodes and decodes exactly as llama2.c's `run.c` does).

Checkpoint layouts (see llama2.c `export.py`):

- version 0 ("legacy", what `run.c` reads): 7 int32 (dim, hidden_dim, n_layers,
  n_heads, n_kv_heads, vocab_size, seq_len; a negative vocab_size means the output
  classifier is not shared and follows at the end), then token_embedding, rms_att,
  wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, two RoPE tables (skipped: we compute
  them), [wcls].
- version 1: uint32 magic "ak42", int32 version, the same 7 int32 (vocab_size
  positive), a uint8 shared-classifier flag, zeros up to 256 bytes, then rms_att,
  rms_ffn, rms_final, token_embedding, wq, wk, wv, wo, w1, w2, w3, [wcls].
- version 2 (int8 Q8_0) is refused with a message saying how to re-export.

RoPE: llama2.c rotates interleaved pairs (2i, 2i+1) of each head, our model rotates
(i, i + hd/2) ("rotate half", as Hugging Face Llama does). Permuting the rows of wq
and wk inside each head (as HF's convert_llama_weights_to_hf does) makes the two
identical: q.k is unchanged by a permutation applied to both.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.config import Config
from lmforge.errors import LmforgeError
from lmforge.model import GPT
from lmforge.tokenizer.llama2c import Llama2cTokenizer
from lmforge.weights import TensorStream, empty_model

MAGIC = 0x616B3432  # "ak42" as a little-endian uint32 (the bytes on disk read "24ka")
V0_HEADER_BYTES = 7 * 4
V1_HEADER_BYTES = 256
FLOAT_BYTES = 4



# --- checkpoint header -----------------------------------------------------------------
@dataclass(frozen=True)
class Llama2cHeader:
    """The shape of a llama2.c checkpoint and where its floats start."""

    version: int
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    data_offset: int  # bytes before the first float

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    def arrays(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every fp32 array in file order, RoPE tables included."""
        L, D, H, V = self.n_layers, self.dim, self.hidden_dim, self.vocab_size
        weights = {
            "token_embedding": (V, D),
            "rms_att": (L, D),
            "rms_ffn": (L, D),
            "rms_final": (D,),
            "wq": (L, D, D),
            "wk": (L, self.kv_dim, D),
            "wv": (L, self.kv_dim, D),
            "wo": (L, D, D),
            "w1": (L, H, D),
            "w2": (L, D, H),
            "w3": (L, H, D),
            "freq_cis_real": (self.seq_len, self.head_size // 2),
            "freq_cis_imag": (self.seq_len, self.head_size // 2),
            "wcls": (V, D),
        }
        if self.version == 0:
            order = ["token_embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final"]
            order += ["freq_cis_real", "freq_cis_imag"]
        else:
            order = ["rms_att", "rms_ffn", "rms_final", "token_embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
        if not self.shared_classifier:
            order.append("wcls")
        return [(name, weights[name]) for name in order]

    def file_size(self) -> int:
        """The exact size in bytes of a checkpoint with this header."""
        floats = sum(int(np.prod(shape)) for _, shape in self.arrays())
        return self.data_offset + FLOAT_BYTES * floats

    def describe(self) -> str:
        return (
            f"dim={self.dim} hidden_dim={self.hidden_dim} n_layers={self.n_layers} n_heads={self.n_heads} "
            f"n_kv_heads={self.n_kv_heads} vocab_size={self.vocab_size} seq_len={self.seq_len}"
        )

    def config(self, name: str) -> Config:
        """Our Config for this model: Llama switches, llama2.c's fixed eps and RoPE base."""
        return Config(
            name=name,
            vocab_size=self.vocab_size,
            context_length=self.seq_len,
            n_layer=self.n_layers,
            n_head=self.n_heads,
            n_kv_head=self.n_kv_heads,
            n_embd=self.dim,
            head_dim=self.head_size,
            mlp="swiglu",
            mlp_hidden=self.hidden_dim,
            norm="rmsnorm",
            norm_eps=1e-5,  # run.c's rmsnorm
            positions="rope",
            rope_theta=10000.0,  # run.c's RoPE
            bias=False,
            tie_embeddings=self.shared_classifier,
        )


def read_header(path: str | os.PathLike) -> Llama2cHeader:
    """Parse and sanity-check a llama2.c checkpoint header, and check the file's size against it."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"no llama2.c checkpoint at {path}")
    with open(path, "rb") as f:
        head = f.read(V1_HEADER_BYTES)
    try:
        if len(head) >= 8 and struct.unpack("<I", head[:4])[0] == MAGIC:
            header = _versioned_header(path, head)
        else:
            header = _legacy_header(path, head)
        _check_shape(path, header)
        _check_size(path, header)
    except LmforgeError:
        # only now: a real checkpoint's first bytes (dim=640 is 80 02 00 00) may look like a pickle's
        _refuse_other_formats(path, head)
        raise
    return header


def _refuse_other_formats(path: Path, head: bytes) -> None:
    """Name the usual wrong files (a PyTorch or GGUF checkpoint) instead of reporting a bad shape."""
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise LmforgeError(
            f"{path} is a PyTorch checkpoint (zip/pickle), not a llama2.c .bin: for Hugging Face weights "
            "give the model folder (with config.json and model.safetensors) instead"
        )
    if head.startswith(b"GGUF"):
        raise LmforgeError(f"{path} is a GGUF file (llama.cpp), not a llama2.c .bin checkpoint")


def _legacy_header(path: Path, head: bytes) -> Llama2cHeader:
    if len(head) < V0_HEADER_BYTES:
        raise LmforgeError(f"{path} has {len(head)} bytes: too short for a llama2.c checkpoint header ({V0_HEADER_BYTES} bytes)")
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack("<7i", head[:V0_HEADER_BYTES])
    return Llama2cHeader(0, dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, vocab > 0, V0_HEADER_BYTES)


def _versioned_header(path: Path, head: bytes) -> Llama2cHeader:
    if len(head) < V1_HEADER_BYTES:
        raise LmforgeError(f"{path} is truncated: its 'ak42' header needs {V1_HEADER_BYTES} bytes, the file has {len(head)}")
    (version,) = struct.unpack("<i", head[4:8])
    if version == 2:
        raise LmforgeError(
            f"{path} is a llama2.c version 2 (int8 Q8_0 quantized) checkpoint, which lmforge does not read; "
            "re-export the model in fp32 with llama2.c's `python export.py out.bin --version 0` (or --version 1)"
        )
    if version != 1:
        raise LmforgeError(f"{path} has llama2.c's 'ak42' magic but version {version}; lmforge reads versions 0 and 1")
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack("<7i", head[8:36])
    # the flag is authoritative in v1; abs() because export.py's legacy export negates vocab_size in place
    return Llama2cHeader(1, dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, bool(head[36]), V1_HEADER_BYTES)


def _check_shape(path: Path, h: Llama2cHeader) -> None:
    """A random file's first 28 bytes almost never describe a buildable transformer."""
    fields = (h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len)
    plausible = (
        all(v > 0 for v in fields)
        and h.dim % h.n_heads == 0
        and h.n_heads % h.n_kv_heads == 0
        and h.head_size % 2 == 0
    )
    if not plausible:
        raise LmforgeError(
            f"{path} is not a llama2.c checkpoint: its header reads {h.describe()}, which is no valid model "
            "(all positive, n_heads dividing dim into even heads, n_kv_heads dividing n_heads)"
        )


def _check_size(path: Path, h: Llama2cHeader) -> None:
    actual, expected = path.stat().st_size, h.file_size()
    if actual < expected:
        raise LmforgeError(
            f"{path} is truncated: a llama2.c v{h.version} checkpoint with {h.describe()} "
            f"({'shared' if h.shared_classifier else 'separate'} classifier) has {expected:,} bytes, "
            f"this file has {actual:,}; download or export it again"
        )
    if actual > expected:
        raise LmforgeError(
            f"{path} has {actual - expected:,} bytes more than a llama2.c v{h.version} checkpoint with "
            f"{h.describe()} ({expected:,} bytes): it is not an fp32 llama2.c checkpoint of that shape "
            "(or it is corrupt)"
        )


# --- checkpoint weights ----------------------------------------------------------------
def read_arrays(path: str | os.PathLike, header: Llama2cHeader) -> dict[str, np.ndarray]:
    """Every array of the checkpoint by its llama2.c name, memory-mapped (nothing is read yet)."""
    floats = np.memmap(path, dtype="<f4", mode="r", offset=header.data_offset)
    arrays, start = {}, 0
    for name, shape in header.arrays():
        n = int(np.prod(shape))
        arrays[name] = floats[start : start + n].reshape(shape)
        start += n
    return arrays


def interleaved_to_half_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's output rows from pairs (2i, 2i+1) to pairs (i, i + hd/2).

    Row 2i of a head becomes row i and row 2i+1 becomes row i + hd/2, so the pair
    llama2.c rotates together lands where our "rotate half" RoPE rotates together.
    """
    rows, cols = w.shape
    hd = rows // n_heads
    return w.view(n_heads, hd // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def llama2c_tensors(arrays: dict[str, np.ndarray], header: Llama2cHeader) -> Iterator[tuple[str, torch.Tensor]]:
    """Our GPT's weights by name, one at a time (w1 -> gate, w3 -> up, w2 -> down).

    One at a time so that loading holds a single tensor beyond the model, not a
    second copy of it (a 7B llama2.c export is 27 GB).
    """

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32))  # copies out of the read-only memory map

    yield "tok_emb.weight", t(arrays["token_embedding"])
    if not header.shared_classifier:
        yield "lm_head.weight", t(arrays["wcls"])
    for i in range(header.n_layers):
        p = f"blocks.{i}."
        yield p + "norm1.weight", t(arrays["rms_att"][i])
        yield p + "attn.q.weight", interleaved_to_half_rope(t(arrays["wq"][i]), header.n_heads)
        yield p + "attn.k.weight", interleaved_to_half_rope(t(arrays["wk"][i]), header.n_kv_heads)
        yield p + "attn.v.weight", t(arrays["wv"][i])
        yield p + "attn.o.weight", t(arrays["wo"][i])
        yield p + "norm2.weight", t(arrays["rms_ffn"][i])
        yield p + "mlp.gate.weight", t(arrays["w1"][i])
        yield p + "mlp.up.weight", t(arrays["w3"][i])
        yield p + "mlp.down.weight", t(arrays["w2"][i])
    yield "norm_f.weight", t(arrays["rms_final"])


def _copy_weights(model: GPT, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy every weight into the model; a tied head is the embedding, so it comes once."""
    target = model.state_dict()
    unfilled = set(target) - ({"lm_head.weight"} if model.config.tie_embeddings else set())
    for name, tensor in tensors:
        target[name].copy_(tensor)
        unfilled.discard(name)
    assert not unfilled, f"llama2c import left {sorted(unfilled)} unset"  # a bug here, not bad input


def load_llama2c(
    path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> GPT:
    """A llama2.c checkpoint (v0 or v1 fp32) -> GPT in eval mode, with `.tokenizer` set.

    The tokenizer is `tokenizer_path` if given, else the one llama2.c keeps beside the
    model (see `find_tokenizer`); with none there, `.tokenizer` is None.
    """
    path = Path(path)
    header = read_header(path)
    model = empty_model(header.config(path.stem), device)
    _copy_weights(model, llama2c_tensors(read_arrays(path, header), header))
    model.tokenizer = _tokenizer(path, header, tokenizer_path)
    return model.eval()


def llama2c_stream(path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None) -> TensorStream:
    """A llama2.c checkpoint's weights one tensor at a time (`llama2c_tensors`), in the default
    dtype as `load_llama2c` gives them, for a loader that builds the model as they come.

    The floats are read through a memory map of the file, as `load_llama2c` reads them:
    the pages read stay mapped (clean page cache, counted in RSS) until the stream is
    done with; the tensors themselves come one at a time.
    """
    path = Path(path)
    header = read_header(path)
    tensors = llama2c_tensors(read_arrays(path, header), header)
    return TensorStream(header.config(path.stem), torch.get_default_dtype(), tensors, str(path), _tokenizer(path, header, tokenizer_path))


def _tokenizer(path: Path, header: Llama2cHeader, tokenizer_path: str | os.PathLike | None) -> Llama2cTokenizer | None:
    """`tokenizer_path`, else the tokenizer llama2.c keeps beside the model; None when there is none."""
    tok_file = Path(tokenizer_path) if tokenizer_path is not None else find_tokenizer(path, header.vocab_size)
    return Llama2cTokenizer.load_bin(tok_file, header.vocab_size) if tok_file is not None else None


def find_tokenizer(model_path: str | os.PathLike, vocab_size: int) -> Path | None:
    """The tokenizer.bin beside a llama2.c model, or None.

    llama2.c names a custom tokenizer `tok{vocab_size}.bin` and the Llama 2 one
    `tokenizer.bin`; failing both, a single other `tok*.bin` is taken. Several
    candidates and none named for this vocabulary is ambiguous: warn, take none.
    """
    model_path = Path(model_path)
    folder = model_path.parent
    for name in (f"tok{vocab_size}.bin", "tokenizer.bin"):
        if (folder / name).is_file() and folder / name != model_path:
            return folder / name
    others = sorted(p for p in folder.glob("tok*.bin") if p.is_file() and p != model_path)
    if len(others) == 1:
        return others[0]
    if others:
        warnings.warn(
            f"several tokenizers beside {model_path} ({', '.join(p.name for p in others)}) and none named "
            f"tok{vocab_size}.bin: loading the model without one; pass tokenizer_path to load_llama2c",
            stacklevel=3,
        )
    return None
