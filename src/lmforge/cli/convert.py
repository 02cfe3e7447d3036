"""`lmforge convert`: weights between our folder and Hugging Face, llama2.c, OpenAI GPT-2, and
out to one GGUF file (llama.cpp, ollama)."""

from __future__ import annotations

import argparse
import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from lmforge.cli.common import add_command
from lmforge.errors import LmforgeError
from lmforge.text import plural

# lmforge.interop.gguf.OUTTYPES, spelled here so that parsing does not import torch (a test keeps them equal)
GGUF_OUTTYPES = ("f32", "f16", "q8_0")


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "convert",
        "convert weights: Hugging Face, llama2.c and OpenAI GPT-2 <-> our model folder; any model -> GGUF",
        _convert,
        examples="""
        lmforge convert --from-hf path/to/hf-gpt2 --out runs/gpt2                  # a Hugging Face folder
        lmforge convert --to-hf runs/gpt2 --out hf-export/
        lmforge convert --from-llama2c data/stories260K/stories260K.bin --tokenizer data/stories260K/tok512.bin --out runs/stories260K
        lmforge convert --from-openai-gpt2 models/124M --out runs/gpt2
        lmforge convert --to-gguf runs/gpt2 --out gpt2.gguf --outtype q8_0              # for llama.cpp / ollama
        """,
        description="""
        Our model folder is model.safetensors + config.json + tokenizer.json. Import a
        Hugging Face folder (GPT2LMHeadModel, LlamaForCausalLM; safetensors, sharded or
        not), a llama2.c .bin with its tokenizer.bin, or OpenAI's original GPT-2 release
        folder; or export any model lmforge reads (a training run gives its newest
        checkpoint) to a folder `transformers` loads, with its tokenizer: ours as GPT-2
        style files, llama2.c's as a Llama tokenizer.json (BPE with byte fallback).

        --to-gguf writes any of those models as one GGUF file that llama.cpp runs (ollama
        and LM Studio too): the GPT-2 family as llama.cpp's gpt2 architecture, the Llama
        family as its llama, with the tokenizer and the chat template the model was tuned
        with. --outtype sets the precision: f32 (exact), f16, or q8_0 (8-bit blocks, about a
        quarter of f32's size); norms and biases stay f32 as in llama.cpp's own converter.
        """,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="DIR", help="a Hugging Face model folder")
    source.add_argument("--to-hf", metavar="PATH", help="a model to export: our model folder, a training run or checkpoint, a llama2.c .bin")
    source.add_argument("--to-gguf", metavar="PATH", help="a model to export as one GGUF file (llama.cpp): any path --to-hf takes")
    source.add_argument("--from-llama2c", metavar="MODEL.bin", help="a llama2.c checkpoint")
    source.add_argument("--from-openai-gpt2", metavar="DIR", help="OpenAI's GPT-2 release folder (hparams.json + checkpoint)")
    p.add_argument("--tokenizer", metavar="TOKENIZER.bin", help="with --from-llama2c: its tokenizer (default: found beside the model)")
    p.add_argument("--outtype", choices=GGUF_OUTTYPES, help="with --to-gguf: the precision of the weights (default: f32)")
    p.add_argument("--out", required=True, metavar="PATH", help="the folder to write (with --to-gguf: the .gguf file)")
    p.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty folder (or over an existing .gguf file)")


def _convert(args: argparse.Namespace) -> int:
    for flag in ("from_hf", "to_hf", "to_gguf", "from_llama2c", "from_openai_gpt2", "tokenizer", "out"):
        if getattr(args, flag) == "":
            raise LmforgeError(f"--{flag.replace('_', '-')} is empty; name a path")
    if args.outtype is not None and args.to_gguf is None:
        raise LmforgeError("--outtype goes with --to-gguf: it is the precision of the GGUF file written")
    if args.tokenizer and not args.from_llama2c:
        raise LmforgeError("--tokenizer goes with --from-llama2c")
    out = Path(args.out)
    if args.to_gguf is not None:  # --out is a file here
        with _notes():
            return _to_gguf(args.to_gguf, out, args.outtype or "f32", args.overwrite)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise LmforgeError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    with _notes():
        return _to_hf(args.to_hf, out) if args.to_hf is not None else _to_ours(args, out)


@contextlib.contextmanager
def _notes() -> Iterator[None]:
    """What the readers and writers warn about (a tokenizer left out, several candidates
    beside a model) as this command's own `note:` lines, never Python's raw warning text."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for message in dict.fromkeys(str(w.message) for w in caught):
                print(f"note: {message}")


def _to_hf(source: str, out: Path) -> int:
    from lmforge.finetune.adapter import is_adapter_dir
    from lmforge.interop.hf import export_hf
    from lmforge.interop.hf_tokenizer import SENTENCEPIECE_CAVEAT
    from lmforge.loading import load, resolve_model_path
    from lmforge.tokenizer.llama2c import Llama2cTokenizer

    resolved = resolve_model_path(source)  # a run or a quickstart's folder: its newest intact checkpoint
    if is_adapter_dir(resolved):
        raise LmforgeError(f"{source} is a LoRA adapter, which Hugging Face folders do not hold: merge it into its base first "
                           f"(lmforge lora merge --adapter {source} --out MERGED), then export MERGED")
    model = load(resolved)
    export = export_hf(model, out, overwrite=True)
    print(f"wrote {out} (Hugging Face format): {', '.join(export.files)}")
    if model.tokenizer is None:
        print("note: the model has no tokenizer, so none was written; give transformers one yourself")
    elif isinstance(model.tokenizer, Llama2cTokenizer) and "tokenizer.json" in export.files:
        print("note: tokenizer.json encodes as llama2.c does (BOS first, byte fallback), except: " + SENTENCEPIECE_CAVEAT)
    for note in export.notes:
        print(f"note: {note}")
    return 0


def _to_gguf(source: str, out: Path, outtype: str, overwrite: bool) -> int:
    from lmforge.finetune.adapter import is_adapter_dir
    from lmforge.interop.gguf import export_gguf
    from lmforge.loading import load, resolve_model_path

    if out.is_dir():
        raise LmforgeError(f"--out {out} is a folder; with --to-gguf name the file to write, e.g. --out {out / 'model.gguf'}")
    if os.path.lexists(out) and not overwrite:  # before the model is read: a mistake is said at once
        raise LmforgeError(f"{out} already exists; choose another --out or pass --overwrite")
    resolved = resolve_model_path(source)  # a run or a quickstart's folder: its newest intact checkpoint
    if is_adapter_dir(resolved):
        raise LmforgeError(f"{source} is a LoRA adapter, which a GGUF file does not hold: merge it into its base first "
                           f"(lmforge lora merge --adapter {source} --out MERGED), then export MERGED")
    model = load(resolved)
    export = export_gguf(model, out, outtype=outtype, overwrite=True)
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(export.tensor_types.items(), key=lambda kv: -kv[1]))
    size = out.stat().st_size / 2**20
    print(f"wrote {out} (GGUF, llama.cpp architecture {export.arch}, {outtype}: {kinds} tensors, {size:,.1f} MiB)")
    if export.chat_template:
        print(f"with the chat template the model was tuned with ({export.chat_template}), as Jinja")
    for note in export.notes:
        print(f"note: {note}")
    return 0


def _to_ours(args: argparse.Namespace, out: Path) -> int:
    from lmforge.interop.hf import load_hf
    from lmforge.weights import save_pretrained

    if args.from_hf is not None:
        model = load_hf(args.from_hf)
    elif args.from_llama2c is not None:
        from lmforge.interop.llama2c import load_llama2c

        model = load_llama2c(args.from_llama2c, tokenizer_path=args.tokenizer)
    else:
        from lmforge.interop.openai_gpt2 import load_openai_gpt2

        model = load_openai_gpt2(args.from_openai_gpt2)
    save_pretrained(model, out)
    tok = "with its tokenizer" if model.tokenizer is not None else "no tokenizer found"
    print(f"wrote {out}: {model.num_params():,} parameters, {plural(model.config.n_layer, 'layer')} ({tok})")
    return 0
