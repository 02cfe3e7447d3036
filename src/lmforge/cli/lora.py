"""`lmforge lora merge`: fold a LoRA adapter into its base, giving a normal model folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.cli.common import add_command, add_group


def register(sub: argparse._SubParsersAction) -> None:
    group = add_group(sub, "lora", "LoRA adapters: merge an adapter into its base model")
    p = add_command(
        group,
        "merge",
        "merge a LoRA adapter into its base model and write a normal model folder",
        _merge,
        examples="""
        lmforge lora merge --adapter runs/sft/adapter --out runs/sft-merged
        lmforge lora merge --base runs/gpt2 --adapter runs/sft/adapter --out runs/sft-merged
        """,
        description="""
        Loads the base (our folder, Hugging Face, llama2.c or a training run), applies the
        adapter (adapter.safetensors + adapter_config.json), folds B A * scale into each
        adapted weight and writes model.safetensors + config.json + the base's tokenizer.
        The result loads and runs like any model, with no LoRA code and no extra cost.
        Without --base, the base recorded in the adapter is used. An adapter trained over
        a 4-bit base (QLoRA) is merged into the full-precision base.
        """,
    )
    p.add_argument("--base", metavar="DIR", help="the base model (default: the one recorded in the adapter)")
    p.add_argument("--adapter", required=True, metavar="DIR", help="the adapter folder (save_adapter's output)")
    p.add_argument("--out", required=True, metavar="DIR", help="the merged model folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def _merge(args: argparse.Namespace) -> int:
    from lmforge.finetune.adapter import read_adapter_config
    from lmforge.finetune.lora import LoRAConfig, lora_layers, merge_lora
    from lmforge.io import atomic_output_dir
    from lmforge.loading import load_adapted
    from lmforge.weights import save_pretrained

    out = Path(args.out)
    meta = read_adapter_config(args.adapter)
    base = args.base or meta.get("base")
    model = load_adapted(args.adapter, base=args.base, dense_base=True)  # merge onto the full-precision base
    n_layers = len(lora_layers(model))
    merge_lora(model)
    empty = out.is_dir() and not any(out.iterdir())
    with atomic_output_dir(out, overwrite=args.overwrite or empty) as tmp:
        save_pretrained(model, tmp)
    lora = LoRAConfig.from_adapter_config(meta)
    rank = f"r={lora.r}, alpha={lora.alpha}{', rsLoRA' if lora.rslora else ''}"
    extras = f" and {len(meta['trainable'])} trained tensor(s)" if meta.get("trainable") else ""
    tok = "with the base's tokenizer" if model.tokenizer is not None else "the base has no tokenizer"
    print(f"merged {args.adapter} ({rank}, {n_layers} layers{extras}) into {base}")
    if meta.get("quantize"):
        print(f"note: the adapter was trained over a {meta['quantize']} copy of the base; merged into the full-precision base")
    print(f"wrote {out}: {model.num_params():,} parameters ({tok})")
    return 0
