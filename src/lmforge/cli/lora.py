"""`lmforge lora merge`: fold a LoRA adapter into its base, giving a normal model folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.cli.common import add_command, add_group
from lmforge.errors import LmforgeError
from lmforge.text import plural


def register(sub: argparse._SubParsersAction) -> None:
    group = add_group(sub, "lora", "LoRA adapters: merge an adapter into its base model")
    p = add_command(
        group,
        "merge",
        "merge a LoRA adapter into its base model and write a normal model folder",
        _merge,
        examples="""
        lmforge lora merge --adapter runs/qlora --out runs/qlora-merged                # a LoRA run: its newest adapter
        lmforge lora merge --adapter runs/qlora/checkpoints/step-00000232 --base copy-of-base --out runs/qlora-merged
        """,
        description="""
        Loads the base (our folder, Hugging Face, llama2.c or a training run), applies the
        adapter (adapter.safetensors + adapter_config.json), folds B A * scale into each
        adapted weight and writes model.safetensors + config.json + the base's tokenizer.
        The result loads and runs like any model, with no LoRA code and no extra cost.
        Without --base, the base recorded in the adapter is used: where it was, where it is
        relative to the adapter, or a checkpoint of its training run with the same weights.
        A --base (a copy, when the recorded one is gone) must hold the weights the adapter
        was made on (their sha256, recorded in the adapter). An adapter trained over a
        4-bit base (QLoRA) is merged into the full-precision base.
        """,
    )
    p.add_argument("--base", metavar="DIR", help="the base model, e.g. a copy of it (default: the one recorded in the adapter)")
    p.add_argument("--adapter", required=True, metavar="DIR",
                   help="a LoRA run folder (its newest checkpoint's adapter), a checkpoint of it, or an adapter folder")
    p.add_argument("--out", required=True, metavar="DIR", help="the merged model folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def _merge(args: argparse.Namespace) -> int:
    from lmforge.finetune.adapter import is_adapter_dir, read_adapter_config
    from lmforge.finetune.lora import LoRAConfig, lora_layers, merge_lora
    from lmforge.io import atomic_output_dir
    from lmforge.loading import find_adapter_base, load_adapted, resolve_model_path
    from lmforge.weights import save_pretrained

    out = Path(args.out)
    adapter = resolve_model_path(args.adapter)  # a LoRA run (or its checkpoint): its newest adapter
    if not is_adapter_dir(adapter):
        shown = f"{args.adapter} ({adapter})" if adapter != Path(args.adapter) else args.adapter
        raise LmforgeError(f"--adapter {shown} is a whole model, not a LoRA adapter: only a run trained with --lora-r "
                           "(or a folder save_adapter wrote) has an adapter to merge; use the model as it is")
    meta = read_adapter_config(adapter)
    base = find_adapter_base(adapter, args.base)  # load_adapted finds the same one (and checks a given --base)
    model = load_adapted(adapter, base=args.base, dense_base=True)  # merge onto the full-precision base
    n_layers = len(lora_layers(model))
    merge_lora(model)
    empty = out.is_dir() and not any(out.iterdir())
    with atomic_output_dir(out, overwrite=args.overwrite or empty) as tmp:
        save_pretrained(model, tmp)
    lora = LoRAConfig.from_adapter_config(meta)
    rank = f"r={lora.r}, alpha={lora.alpha}{', rsLoRA' if lora.rslora else ''}"
    extras = f" and {plural(len(meta['trainable']), 'trained tensor')}" if meta.get("trainable") else ""
    tok = "with the base's tokenizer" if model.tokenizer is not None else "the base has no tokenizer"
    # the base is only read: say what was written where, not "merged into the base"
    print(f"wrote a merged model (base {base} + adapter {adapter}: {rank}, {plural(n_layers, 'layer')}{extras}) to {out}; "
          f"{base} is unchanged")
    if meta.get("quantize"):
        print(f"note: the adapter was trained over an {meta['quantize'].upper()} (4-bit) copy of the base; "
              "it was merged into the full-precision base")
    print(f"{out}: {model.num_params():,} parameters ({tok})")
    return 0
