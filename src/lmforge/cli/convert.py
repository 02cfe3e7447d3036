"""`lmforge convert`: weights between our folder and Hugging Face, llama2.c, OpenAI GPT-2."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.cli.common import add_command
from lmforge.errors import LmforgeError


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "convert",
        "convert weights: Hugging Face, llama2.c and OpenAI GPT-2 <-> our model folder",
        _convert,
        examples="""
        lmforge convert --from-hf hf-gpt2/ --out runs/gpt2
        lmforge convert --to-hf runs/gpt2 --out hf-export/
        lmforge convert --from-llama2c stories260K.bin --tokenizer tok512.bin --out runs/stories260K
        lmforge convert --from-openai-gpt2 models/124M --out runs/gpt2
        """,
        description="""
        Our model folder is model.safetensors + config.json + tokenizer.json. Import a
        Hugging Face folder (GPT2LMHeadModel, LlamaForCausalLM; safetensors, sharded or
        not), a llama2.c .bin with its tokenizer.bin, or OpenAI's original GPT-2 release
        folder; or export ours to a folder `transformers` loads.
        """,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="DIR", help="a Hugging Face model folder")
    source.add_argument("--to-hf", metavar="DIR", help="our model folder, to export")
    source.add_argument("--from-llama2c", metavar="MODEL.bin", help="a llama2.c checkpoint")
    source.add_argument("--from-openai-gpt2", metavar="DIR", help="OpenAI's GPT-2 release folder (hparams.json + checkpoint)")
    p.add_argument("--tokenizer", metavar="TOKENIZER.bin", help="with --from-llama2c: its tokenizer (default: found beside the model)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    p.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty folder")


def _convert(args: argparse.Namespace) -> int:
    from lmforge.interop.hf import load_hf, save_hf
    from lmforge.weights import load_pretrained, save_pretrained

    for flag in ("from_hf", "to_hf", "from_llama2c", "from_openai_gpt2", "tokenizer", "out"):
        if getattr(args, flag) == "":
            raise LmforgeError(f"--{flag.replace('_', '-')} is empty; name a path")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise LmforgeError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    if args.tokenizer and not args.from_llama2c:
        raise LmforgeError("--tokenizer goes with --from-llama2c")
    if args.to_hf is not None:
        model = load_pretrained(args.to_hf)
        save_hf(model, out, overwrite=True)
        print(f"wrote {out} (Hugging Face format: config.json, model.safetensors, tokenizer files)")
        return 0
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
    print(f"wrote {out}: {model.num_params():,} parameters, {model.config.n_layer} layers ({tok})")
    return 0
