"""Tokenizer speed, ours vs the references, in one run.

Training: seconds to learn an 8192-id byte-level BPE, ours vs Hugging Face `tokenizers`
(ByteLevel BPE, same vocab size, fed the same decoded text).
Encoding: MB/s of UTF-8 input, ours vs tiktoken with the same merges vs `tokenizers`
with the same merges, one text at a time on one thread and batched on all cores.

    python benchmarks/bench_tokenizer.py [--quick]
"""

from __future__ import annotations

import argparse
import os

from _common import SHARED, best_of, print_table

from lmforge.corpus import ReadStats, iter_documents, resolve_inputs
from lmforge.tokenizer import Tokenizer, from_gpt2_files, train_bpe
from lmforge.tokenizer.bytes_unicode import bytes_to_printable


def documents(paths) -> list[str]:
    return ["".join(doc) for doc in iter_documents(paths, ReadStats())]


def hf_train(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer, length=len(texts))
    return hf


def hf_from(tok: Tokenizer):
    """A `tokenizers` BPE with exactly our merges (the same ids as ours)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    n = 256 + len(tok.merges)
    vocab = {bytes_to_printable(tok.token_bytes(i)): i for i in range(n)}
    merges = [(bytes_to_printable(tok.token_bytes(a)), bytes_to_printable(tok.token_bytes(b))) for a, b in tok.merges]
    hf = HFTokenizer(models.BPE(vocab, merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return hf


def tiktoken_from(tok: Tokenizer):
    import tiktoken

    return tiktoken.Encoding("reference", pat_str=tok.pattern, mergeable_ranks=dict(tok.ranks), special_tokens={})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tinyshakespeare only, one repeat")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    repeat = 1 if args.quick else 3

    corpora = {"tinyshakespeare (1.1 MB)": documents([SHARED / "tinyshakespeare.txt"])}
    if not args.quick:
        prose = documents(resolve_inputs([SHARED / "gutenberg", SHARED / "nltk" / "gutenberg"]))
        corpora[f"gutenberg + nltk prose ({sum(len(t.encode()) for t in prose) / 1e6:.1f} MB)"] = prose

    print(f"# BPE training, vocab 8192 ({threads} cores)\n")
    rows, trained = [], None
    for name, texts in corpora.items():
        t = best_of({"ours": lambda: train_bpe(texts, 8192, progress=False), "hf": lambda: hf_train(texts, 8192)}, 1 if len(texts) > 1 else repeat)
        rows.append([name, t["ours"], t["hf"], t["ours"] / t["hf"]])
        trained = train_bpe(texts, 8192, progress=False) if trained is None else trained
    print_table(["corpus", "lmforge s", "tokenizers s", "lmforge / tokenizers"], rows)

    text_docs = corpora[list(corpora)[-1]]
    mb = sum(len(t.encode()) for t in text_docs) / 1e6
    # batched: the same text as many ~8 KB documents, the shape of a data-prep job
    pieces = [t[i : i + 8192] for t in text_docs for i in range(0, len(t), 8192)]
    print(f"\n# Encoding {mb:.1f} MB, MB/s (higher is better); tiktoken and tokenizers use our merges\n")
    rows = []
    gpt2 = from_gpt2_files(SHARED / "gpt2" / "encoder.json", SHARED / "gpt2" / "vocab.bpe")
    for label, tok in (("our BPE 8192", trained), ("GPT-2 50257", gpt2)):
        tk, hf = tiktoken_from(tok), hf_from(tok)
        same = tok.encode_batch(pieces[:200]) == tk.encode_ordinary_batch(pieces[:200]) == [e.ids for e in hf.encode_batch(pieces[:200])]
        single = best_of(
            {
                "lmforge": lambda: [tok.encode(t) for t in text_docs],
                "tiktoken": lambda: [tk.encode_ordinary(t) for t in text_docs],
                "tokenizers": lambda: [hf.encode(t) for t in text_docs],
            },
            repeat,
        )
        batched = best_of(
            {
                "lmforge": lambda: tok.encode_batch(pieces, num_threads=threads),
                "tiktoken": lambda: tk.encode_ordinary_batch(pieces, num_threads=threads),
                "tokenizers": lambda: hf.encode_batch(pieces),
            },
            repeat,
        )
        for mode, t in (("1 thread", single), (f"batched, {threads} threads", batched)):
            rows.append([f"{label}, {mode}", mb / t["lmforge"], mb / t["tiktoken"], mb / t["tokenizers"], t["tiktoken"] / t["lmforge"], "yes" if same else "NO"])
    print_table(["tokenizer, mode", "lmforge MB/s", "tiktoken MB/s", "tokenizers MB/s", "lmforge / tiktoken", "same ids"], rows)


if __name__ == "__main__":
    main()
