"""Generation speed, ours vs `transformers` with the same weights, in one run.

For each preset: prefill tokens/s, decode tokens/s at batch 1 (128 new tokens after a
32-token prompt) and at batch 8 (aggregate), greedy, fp32; ours with the KV cache,
ours without it (the reference loop), and `transformers` `generate` with its cache.
The greedy tokens must be identical. One more row shows what the packed one-row step
(`lmforge.engine.cpu_decode`: oneDNN-packed, fused weights) adds: batch 1 through the model's
own layers (`Engine(model, packed=False)`). The bandwidth ceiling is what decode at batch 1
could reach if it did nothing but stream every weight once per token. lmforge against
llama.cpp, int8 and float16 weights, and where a token's time goes: `bench_decode.py`.

    python benchmarks/bench_generate.py [--presets gpt2 small] [--repeat 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import best_of, print_table

from lmforge.config import Config
from lmforge.engine import Engine, SamplingParams, generate_uncached
from lmforge.interop.hf import config_to_hf, state_dict_to_hf
from lmforge.model import GPT
from lmforge.weights import state_dict_for_saving

GREEDY = SamplingParams(temperature=0)
PROMPT, NEW = 32, 128


def twin_models(preset: str) -> tuple[GPT, torch.nn.Module]:
    """Our model and a `transformers` model holding the very same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    ours = GPT(Config.from_name(preset)).eval()
    hf_config = config_to_hf(ours.config)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config), attn_implementation="sdpa").eval()
    hf.load_state_dict(state_dict_to_hf(state_dict_for_saving(ours), ours.config), strict=False)
    hf.tie_weights()
    return ours, hf


def memory_bandwidth_gbs() -> float:
    """Read bandwidth: summing a 512 MiB tensor (best of 5)."""
    x = torch.ones(128 * 1024 * 1024)
    seconds = best_of({"sum": lambda: x.sum()}, 5)["sum"]
    return x.numel() * 4 / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["gpt2", "small"])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    bandwidth = memory_bandwidth_gbs()
    print(f"# Generation, fp32, {torch.get_num_threads()} threads; memory read bandwidth {bandwidth:.1f} GB/s\n")
    rows = []
    for preset in args.presets:
        ours, hf = twin_models(preset)
        plain = Engine(ours, packed=False)
        engine = Engine(ours)
        g = torch.Generator().manual_seed(1)
        vocab = ours.config.vocab_size
        prompts = torch.randint(0, vocab, (8, PROMPT), generator=g)
        long = torch.randint(0, vocab, (1, min(512, ours.config.context_length - 1)), generator=g)

        def hf_generate(batch: torch.Tensor) -> list[list[int]]:
            out = hf.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=NEW, min_new_tokens=NEW,
                              do_sample=False, use_cache=True, pad_token_id=0)
            return out[:, batch.size(1):].tolist()

        def ours_generate(batch: torch.Tensor) -> list[list[int]]:
            return [c.ids for c in engine.generate(batch.tolist(), max_new_tokens=NEW, sampling=GREEDY)]

        with torch.inference_mode():
            same = ours_generate(prompts) == hf_generate(prompts) and ours_generate(prompts[:1]) == hf_generate(prompts[:1])
            same = same and generate_uncached(ours, prompts[0].tolist(), 16)[0] == ours_generate(prompts[:1])[0][:16]
            t = best_of(
                {"ours": lambda: ours.hidden_states(long), "hf": lambda: hf.model(long) if hasattr(hf, "model") else hf.transformer(long)},
                args.repeat,
            )
            rows.append([f"{preset}: prefill {long.size(1)} tokens", long.size(1) / t["ours"], "", long.size(1) / t["hf"], t["hf"] / t["ours"], ""])
            for batch in (prompts[:1], prompts):
                t = best_of({"ours": lambda: ours_generate(batch), "hf": lambda: hf_generate(batch)}, args.repeat)
                start = time.perf_counter()
                generate_uncached(ours, batch[0].tolist(), 32)
                uncached = 32 / (time.perf_counter() - start)  # one row, first 32 tokens: the reference loop
                n = batch.size(0) * NEW
                rows.append([f"{preset}: decode, batch {batch.size(0)}", n / t["ours"], f"{uncached:.1f}", n / t["hf"], t["hf"] / t["ours"], "yes" if same else "NO"])
            # what the packed step adds (batch 1, the same 128 tokens)
            one = prompts[:1].tolist()
            t = best_of({"plain": lambda: plain.generate(one, max_new_tokens=NEW, sampling=GREEDY)}, args.repeat)
            rows.append([f"{preset}: decode, batch 1, through the model's own layers (packed=False)", NEW / t["plain"], "", "", "", ""])
        weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
        rows.append([f"{preset}: bandwidth ceiling, batch 1 ({weight_bytes / 1e6:.0f} MB of weights per token)", bandwidth * 1e9 / weight_bytes, "", "", "", ""])
    print_table(["preset, measurement (tokens/s)", "lmforge", "lmforge uncached", "transformers", "lmforge / transformers", "same greedy tokens"], rows)


if __name__ == "__main__":
    main()
