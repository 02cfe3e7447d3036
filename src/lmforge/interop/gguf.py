"""lmforge models -> GGUF, the one-file format llama.cpp (and ollama, LM Studio, ...) runs.

A GGUF file is key-value metadata (the architecture's hyperparameters, the tokenizer, the
chat template) followed by tensors under llama.cpp's names. Both families map onto an
architecture llama.cpp already has, so nothing here is approximated:

- GPT-2 family -> arch "gpt2": q, k, v fused into `attn_qkv` (as GPT-2's c_attn is), learned
  positions in `position_embd`, LayerNorm with biases, tanh GELU (which llama.cpp's CPU
  code reads from a float16 table: its f32 logits differ from ours by about 1e-4 there).
- Llama family -> arch "llama": RMSNorm, SwiGLU, RoPE, grouped-query attention, optional
  biases, Llama 3 frequency scaling as the `rope_freqs` tensor llama.cpp divides by.

Layouts: a GGUF tensor stored from a numpy array of shape (out, in) is what ggml calls
{in, out}, which is exactly nn.Linear's weight, so no weight is transposed. RoPE is the one
layout change: llama.cpp's "llama" rotates interleaved pairs (2i, 2i+1) of each head (rope
type NORM), our model rotates (i, i + hd/2) ("rotate half", Hugging Face's layout), so the
rows of q and k (weights and biases) are permuted inside each head, as llama.cpp's own
converter does with Hugging Face weights (`_rope_interleaved`). q.k is unchanged by the same
permutation on both sides.

A tied output head is left out: llama.cpp then reads `token_embd` as the output too.

Precision (`outtype`), by the rules of llama.cpp's converter: f32 writes every tensor in
float32; f16 and q8_0 keep 1-D tensors (norms, biases), norms and GPT-2's position table in
float32, and write the other matrices in float16, or Q8_0 (blocks of 32 int8 with a float16
scale, gguf's own quantizer) where a row is a multiple of 32 long, float16 where not.

Tokenizers: our byte-level BPE as llama.cpp's "gpt2" tokenizer (GPT-2's printable alphabet,
merges, the "gpt-2" pre-tokenizer for GPT-2's regex, "llama-bpe" for GPT-4's); llama2.c's
sentencepiece-style tokenizer as its "llama" tokenizer (scores, byte pieces, BOS first, a
space put before the text). A chat template the model was tuned with (a name, see
`lmforge.tokenizer.templates`) is written as the Jinja template that renders the same text
(`JINJA_TEMPLATES`), which is what llama.cpp and its front ends apply.

The file is written atomically (`lmforge.io.atomic_file`): a half-written GGUF never lands.
The `gguf` package (llama.cpp's own writer) is imported only when exporting.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from lmforge.config import Config
from lmforge.errors import LmforgeError
from lmforge.interop.hf_tokenizer import SP_SPECIALS, SPACE
from lmforge.io import atomic_file
from lmforge.model import GPT, rope_inv_freq
from lmforge.tokenizer import ENDOFTEXT, GPT2_PATTERN, GPT4_PATTERN, Tokenizer
from lmforge.tokenizer.bytes_unicode import bytes_to_printable
from lmforge.tokenizer.llama2c import Llama2cTokenizer
from lmforge.tokenizer.templates import ALPACA_PREAMBLE

OUTTYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32  # Q8_0 quantizes rows in blocks of this many values
# llama.cpp's pre-tokenizer names for the two regexes it knows that we use (llama-vocab.cpp):
# "llama-bpe" also takes a piece that is a token whole (ignore_merges), as tiktoken does
PRE_TOKENIZERS = {GPT2_PATTERN: "gpt-2", GPT4_PATTERN: "llama-bpe"}
_NEVER_MERGED = -1e10  # run.c merges a pair only into a piece scored above this
_BYTE_PIECE = re.compile(rb"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback piece


def _jinja(text: str) -> str:
    """`text` as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# Our chat templates (lmforge.tokenizer.templates, saved by name as tokenizer.chat_template)
# spelled in Jinja, the language llama.cpp and its front ends apply a GGUF's template in. Each
# renders exactly what its Template.render renders (tests/test_gguf.py checks every one).
JINJA_TEMPLATES: dict[str, str] = {
    "chat": (
        "{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
        "{{ '<|' + m['role'] + '|>\\n' + m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '\\n<|assistant|>\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
        "{% else %}{{ " + _jinja(ALPACA_PREAMBLE) + " }}{% endif %}"
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '\\n\\n### Instruction:\\n' + m['content'] }}"
        "{% elif m['role'] == 'assistant' %}{{ '\\n\\n### Response:\\n' + m['content'] }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '\\n\\n### Response:\\n' }}{% endif %}"
    ),
    "dialogue": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
        "{% elif m['role'] == 'user' %}{{ '\\n\\nHuman: ' + m['content'] }}"
        "{% else %}{{ '\\n\\nAssistant:' + m['content'] }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"
    ),
}


@dataclass
class GgufExport:
    """What `export_gguf` wrote: the file, its llama.cpp architecture and precision, how many
    tensors of each type it holds, and notes on what llama.cpp does not do exactly as we do."""

    path: Path
    arch: str
    outtype: str
    tensor_types: dict[str, int]  # "F32" / "F16" / "Q8_0" -> number of tensors
    chat_template: str | None = None  # the name of our chat template written as Jinja, if any
    notes: list[str] = field(default_factory=list)


def _gguf() -> Any:
    """The `gguf` package, imported only to export (it is llama.cpp's own writer)."""
    try:
        import gguf
    except ImportError:
        raise LmforgeError("writing GGUF needs the `gguf` package: pip install gguf") from None
    return gguf


# --- what can be exported ----------------------------------------------------------------
def gguf_arch(config: Config) -> str:
    """The llama.cpp architecture that computes exactly what `config` does ("gpt2" or "llama");
    else an LmforgeError naming what stands in the way."""
    if config.labels:
        raise LmforgeError(f"this model is a classifier (labels {config.labels}); llama.cpp runs language models: "
                           "export the base model or a merged language model")
    if config.positions == "learned":
        wanted = {"norm": "layernorm", "mlp": "gelu_tanh", "bias": True, "n_kv_head": config.n_head,
                  "head_dim": config.n_embd // config.n_head}
        arch, why = "gpt2", "llama.cpp's gpt2 architecture (LayerNorm with biases, tanh GELU, one key/value head per query head)"
    else:
        wanted = {"norm": "rmsnorm", "mlp": "swiglu"}
        arch, why = "llama", "llama.cpp's llama architecture (RMSNorm, SwiGLU, RoPE)"
    problems = [f"{k}={v!r} (has {getattr(config, k)!r})" for k, v in wanted.items() if getattr(config, k) != v]
    if problems:
        raise LmforgeError(f"this model has no GGUF equivalent: {config.positions} positions mean {why}, which needs "
                           f"{', '.join(problems)}")
    return arch


def _check_plain(model: GPT) -> None:
    """Refuse a model whose layers are not plain nn.Linear: LoRA adapters on top of the weights,
    or NF4 (4-bit) weights, neither of which a GGUF file of these architectures holds."""
    for name, layer in model.named_linears():
        kind = type(layer).__name__
        if type(layer) is nn.Linear:
            continue
        if "lora" in kind.lower():
            raise LmforgeError(f"{name} carries a LoRA adapter ({kind}); GGUF holds plain weights: merge it first "
                               "(lmforge lora merge --adapter ADAPTER --out MERGED, or lmforge.finetune.lora.merge_lora), "
                               "then export MERGED")
        raise LmforgeError(f"{name} is a {kind}, not a plain linear layer (4-bit NF4 weights, say): export the dense model "
                           "(lmforge.load, not load_quantized); llama.cpp quantizes with --outtype q8_0 here or its own llama-quantize")


# --- tensors ---------------------------------------------------------------------------------
def _rope_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Each head's rows (weight (rows, in) or bias (rows,)) from pairs (i, i + hd/2) to pairs
    (2i, 2i+1): row i goes to 2i, row i + hd/2 to 2i+1 (the inverse of
    `interop.llama2c.interleaved_to_half_rope`)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model: GPT) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, tensor in float32, llama.cpp's layout) for every tensor the file holds."""
    config = model.config
    arch = gguf_arch(config)
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    yield "token_embd.weight", sd["tok_emb.weight"]
    if arch == "gpt2":
        yield "position_embd.weight", sd["pos_emb.weight"]
    for i in range(config.n_layer):
        p, b = f"blocks.{i}.", f"blk.{i}."
        yield from _suffixed(sd, p + "norm1", b + "attn_norm")
        if arch == "gpt2":
            for suffix in ("weight", "bias"):
                yield f"{b}attn_qkv.{suffix}", torch.cat([sd[f"{p}attn.{x}.{suffix}"] for x in "qkv"])
        else:
            for suffix in ("weight", "bias") if config.bias else ("weight",):
                yield f"{b}attn_q.{suffix}", _rope_interleaved(sd[f"{p}attn.q.{suffix}"], config.n_head)
                yield f"{b}attn_k.{suffix}", _rope_interleaved(sd[f"{p}attn.k.{suffix}"], config.n_kv_head)
                yield f"{b}attn_v.{suffix}", sd[f"{p}attn.v.{suffix}"]
        yield from _suffixed(sd, p + "attn.o", b + "attn_output")
        yield from _suffixed(sd, p + "norm2", b + "ffn_norm")
        if arch == "gpt2":
            yield from _suffixed(sd, p + "mlp.fc", b + "ffn_up")
            yield from _suffixed(sd, p + "mlp.proj", b + "ffn_down")
        else:
            for ours, theirs in (("gate", "ffn_gate"), ("up", "ffn_up"), ("down", "ffn_down")):
                yield from _suffixed(sd, f"{p}mlp.{ours}", b + theirs)
    yield from _suffixed(sd, "norm_f", "output_norm")
    if not config.tie_embeddings:
        yield "output.weight", sd["lm_head.weight"]
    if arch == "llama" and config.rope_scaling is not None:
        # llama.cpp divides each base frequency by its factor: base / ours, in float64 then float32
        hd = config.head_dim
        base = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        yield "rope_freqs.weight", (base / rope_inv_freq(config).double()).float()


def _suffixed(sd: Mapping[str, torch.Tensor], ours: str, theirs: str) -> Iterator[tuple[str, torch.Tensor]]:
    """A module's weight and, if it has one, its bias."""
    for suffix in ("weight", "bias"):
        if f"{ours}.{suffix}" in sd:
            yield f"{theirs}.{suffix}", sd[f"{ours}.{suffix}"]


def tensor_type(name: str, shape: tuple[int, ...], outtype: str) -> str:
    """The type llama.cpp's converter gives this tensor: "F32", "F16" or "Q8_0".

    Float32 for f32; else float32 for 1-D tensors, norms, biases and the position table,
    which llama.cpp's kernels expect in float32, and for the rest float16 (f16) or Q8_0
    (q8_0), float16 where a row is not a whole number of 32-value blocks.
    """
    if outtype == "f32" or len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return "F32"
    if name == "position_embd.weight":
        return "F32"
    if outtype == "q8_0" and shape[-1] % Q8_BLOCK == 0:
        return "Q8_0"
    return "F16"


# --- tokenizers --------------------------------------------------------------------------------
@dataclass
class _Vocab:
    """What the tokenizer.* keys say."""

    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    ids: dict[str, int] = field(default_factory=dict)  # "bos" / "eos" / "unk" -> id
    add_bos: bool = False
    add_space_prefix: bool | None = None
    notes: list[str] = field(default_factory=list)


def _bpe_vocab(tok: Tokenizer, vocab_size: int, types: Any) -> _Vocab:
    """Our byte-level BPE as llama.cpp's "gpt2" tokenizer: each id's GPT-2 printable spelling,
    the merges as "left right", <|endoftext|> as BOS and EOS, no BOS added (our encode adds none)."""
    pre = PRE_TOKENIZERS.get(tok.pattern)
    if pre is None:
        raise LmforgeError(
            f"the tokenizer's pre-tokenizer pattern {tok.pattern!r} is not one llama.cpp has: a GGUF names one of llama.cpp's "
            "built-in pre-tokenizers and cannot carry a regex. Exportable: GPT-2's pattern (lmforge tokenizer train --pattern gpt2) "
            "and GPT-4's (--pattern gpt4)"
        )
    if tok.eot_id is None:
        raise LmforgeError(
            f"the tokenizer has no {ENDOFTEXT} token: llama.cpp's gpt2 tokenizer would then take id 11 as its end of text and "
            f"stop generating there. Train the tokenizer with {ENDOFTEXT} (the default special token) and the model with it"
        )
    if not tok.merges:
        raise LmforgeError("the tokenizer has no merges (only the 256 bytes); llama.cpp's gpt2 tokenizer needs at least one")
    n_bpe = 256 + len(tok.merges)
    specials = {i: s for s, i in tok.special_tokens.items()}
    tokens, kinds = [], []
    for i in range(vocab_size):
        if i < n_bpe:
            tokens.append(bytes_to_printable(tok.token_bytes(i)))
            kinds.append(types.NORMAL)
        elif i in specials:
            tokens.append(specials[i])
            kinds.append(types.CONTROL)
        else:  # the model's embedding is larger than the tokenizer (padded): ids nothing encodes to
            tokens.append(f"[PAD{i}]")
            kinds.append(types.UNUSED)
    merges = [f"{tokens[a]} {tokens[b]}" for a, b in tok.merges]  # tokens[:n_bpe] are the printable spellings
    eot = tok.eot_id
    return _Vocab("gpt2", pre, tokens, kinds, merges=merges, ids={"bos": eot, "eos": eot}, add_bos=False)


def _sentencepiece_vocab(tok: Llama2cTokenizer, vocab_size: int, types: Any) -> _Vocab:
    """llama2.c's tokenizer as llama.cpp's "llama" (sentencepiece) tokenizer.

    Both start from one piece per UTF-8 character (its bytes as <0xNN> pieces when the
    character is not one) after a space put first, then merge the adjacent pair whose joined
    piece scores best, leftmost on ties. Pieces are spelled with "▁" for a space, as
    sentencepiece does (llama.cpp turns the text's spaces into "▁" before it looks them up).
    """
    tokens, kinds, renamed, seen = [], [], [], set()
    for i, piece in enumerate(tok.pieces):
        name = SP_SPECIALS.get(i)  # <unk>, <s>, </s>: llama2.c's pieces for them are "\n<s>\n" and the like
        if name is not None:
            kind = types.UNKNOWN if i == 0 else types.CONTROL
        else:
            kind = types.BYTE if _BYTE_PIECE.fullmatch(piece) else types.NORMAL
            try:
                name = piece.decode("utf-8").replace(" ", SPACE)
            except UnicodeDecodeError:
                name = None
        if name is None or name in seen:  # llama.cpp needs one id per text: the first keeps it, as our encode does
            renamed.append(i)
            name, kind = f"<lmforge-piece-{i}>", types.UNUSED
        seen.add(name)
        tokens.append(name)
        kinds.append(kind)
    scores = list(tok.scores)
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        kinds.append(types.UNUSED)
        scores.append(_NEVER_MERGED)
    notes = [f"text holding '{SPACE}' (U+2581) itself encodes differently in llama.cpp, which reads it as a space"]
    if renamed:
        notes.append(f"{len(renamed)} piece(s) (ids {renamed[:5]}) are not UTF-8 text or repeat an earlier piece; they are "
                     "named <lmforge-piece-ID> there and never produced by encoding")
    unmerged = [i for i, s in enumerate(tok.scores) if s <= _NEVER_MERGED and i not in SP_SPECIALS]
    if unmerged:
        notes.append(f"{len(unmerged)} piece(s) (ids {unmerged[:5]}) score at most -1e10, which llama2.c never merges into "
                     "and llama.cpp may")
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "unk": 0}
    return _Vocab("llama", "default", tokens, kinds, scores=scores, ids=ids, add_bos=True, add_space_prefix=True, notes=notes)


def _vocab(tokenizer: object, vocab_size: int, types: Any) -> _Vocab:
    """The tokenizer.* keys for our tokenizer, checked against the model's vocabulary size."""
    if tokenizer is None:
        raise LmforgeError("the model has no tokenizer, and llama.cpp needs one in the GGUF file: save the tokenizer the model "
                           "was trained with beside it (tokenizer.json in the model folder), or pass tokenizer=")
    if not isinstance(tokenizer, (Tokenizer, Llama2cTokenizer)):
        raise LmforgeError(f"a {type(tokenizer).__name__} has no GGUF form; lmforge exports its byte-level BPE Tokenizer and "
                           "llama2.c's tokenizer")
    if tokenizer.vocab_size > vocab_size:
        raise LmforgeError(f"the tokenizer has {tokenizer.vocab_size} ids, the model's embedding only {vocab_size}: "
                           "it is not this model's tokenizer")
    if isinstance(tokenizer, Tokenizer):
        vocab = _bpe_vocab(tokenizer, vocab_size, types)
    else:
        vocab = _sentencepiece_vocab(tokenizer, vocab_size, types)
    seen: set[str] = set()
    doubled = [t for t in vocab.tokens if t in seen or seen.add(t)]
    if doubled:  # llama.cpp maps each text to one id and refuses a vocabulary where two ids share one
        raise LmforgeError(f"{len(doubled)} token text(s) stand for two ids (e.g. {doubled[0]!r}: a special token spelled like an "
                           "ordinary one); llama.cpp needs each token's text to be unique")
    return vocab


def chat_template_jinja(tokenizer: object) -> tuple[str | None, list[str]]:
    """(the name of the chat template the model was tuned with if it has a Jinja spelling, notes).

    None for a base model, which was tuned on no format: the file then carries no template
    and a front end uses its own default, as for any base model.
    """
    name = getattr(tokenizer, "chat_template", None)
    if not name:
        return None, []
    if name not in JINJA_TEMPLATES:
        note = (f"the chat template {name!r} has no Jinja spelling here; the GGUF file carries none (llama.cpp will "
                "fall back to its default)")
        return None, [note]
    return name, []


# --- the file -------------------------------------------------------------------------------
def export_gguf(
    model: GPT,
    out: str | os.PathLike,
    tokenizer: Tokenizer | Llama2cTokenizer | None = None,
    outtype: str = "f32",
    overwrite: bool = False,
) -> GgufExport:
    """Write `model` with its tokenizer (default: `model.tokenizer`) to the GGUF file `out`.

    Everything is checked before a byte is written: the architecture (`gguf_arch`), plain
    weights (no LoRA adapter, no NF4), a tokenizer llama.cpp can represent with the model's
    vocabulary size. The result lists the tensor types written and notes (rather than
    warnings) on what llama.cpp does not do exactly as we do.
    """
    if outtype not in OUTTYPES:
        raise LmforgeError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    out = Path(out)
    if out.is_dir():
        raise LmforgeError(f"{out} is a folder; name the .gguf file to write (e.g. {out / 'model.gguf'})")
    if os.path.lexists(out) and not out.is_file():
        raise LmforgeError(f"{out} exists and is not a regular file; name a new .gguf file")
    if out.exists() and not overwrite:
        raise LmforgeError(f"{out} already exists; choose another file or pass overwrite=True")
    config = model.config
    arch = gguf_arch(config)
    _check_plain(model)
    gguf = _gguf()
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    vocab = _vocab(tokenizer, config.vocab_size, gguf.TokenType)
    template, notes = chat_template_jinja(tokenizer)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    _write_hparams(writer, config, arch, outtype)
    _write_vocab(writer, vocab)
    if template is not None:
        writer.add_chat_template(JINJA_TEMPLATES[template])
    counts: dict[str, int] = {}
    for name, tensor in gguf_tensors(model):
        kind = tensor_type(name, tuple(tensor.shape), outtype)
        data = tensor.contiguous().numpy()
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        counts[kind] = counts.get(kind, 0) + 1
    with atomic_file(out) as f:
        _write_file(writer, f)
    return GgufExport(out, arch, outtype, counts, template, [*vocab.notes, *notes])


def _write_hparams(writer: Any, config: Config, arch: str, outtype: str) -> None:
    """The architecture's keys llama.cpp reads (llama-model.cpp), and the file's general.* keys."""
    gguf = _gguf()
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(config.name)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.mlp_hidden)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_kv_head)
    if arch == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
        return
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)


def _write_vocab(writer: Any, vocab: _Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.scores:
        writer.add_token_scores(vocab.scores)
    for kind, token_id in vocab.ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)  # neither of our encoders appends EOS
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)


def _write_file(writer: Any, f: BinaryIO) -> None:
    """Header, metadata, then tensors into `f`, the open temporary file `atomic_file` renames
    into place: the writer opens files by path itself, so it is handed this one instead."""
    writer.fout = [f]
    writer.state = _gguf().gguf_writer.WriterState.EMPTY
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.flush()


__all__ = ["JINJA_TEMPLATES", "OUTTYPES", "GgufExport", "export_gguf", "gguf_arch", "gguf_tensors", "tensor_type"]
