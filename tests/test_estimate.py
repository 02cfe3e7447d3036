"""`lmforge.estimate` against the model it describes: counts, bytes, saved tensors, peaks."""

from __future__ import annotations

import argparse
import itertools
import json

import pytest
import torch

from lmforge.cli.estimate import register
from lmforge.config import PRESETS, Config
from lmforge.errors import LmforgeError
from lmforge.estimate import (
    CHECKPOINT_RNG_STATE,
    LOSS_BLOCK_FLOATS,
    LOSS_BLOCK_ROWS,
    LOSS_FROZEN_HEAD_BLOCK_ROWS,
    activations,
    count_params,
    estimate,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    loss_block_rows,
    loss_buffers,
    quantized_bytes,
    training_memory,
    weight_bytes,
)
from lmforge.model import GPT, rope_cos_sin
from lmforge.ops import loss as ops_loss
from lmforge.train.optim import build_optimizer

# --- parameters ------------------------------------------------------------------------------

# Published counts (Hugging Face model cards / `num_parameters()` of the reference
# checkpoints, tied heads counted once), checked by hand against the formulas.
KNOWN = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "llama-3.2-1b": 1_235_814_400,
}


def meta_num_params(config: Config) -> int:
    with torch.device("meta"):  # shapes only: gpt2-xl costs no memory
        return GPT(config).num_params()


@pytest.mark.parametrize("name", PRESETS)
def test_params_equal_num_params_for_every_preset(name):
    config = Config.from_name(name)
    assert count_params(config).total == meta_num_params(config)
    if name in KNOWN:
        assert count_params(config).total == KNOWN[name]


TINY = {"vocab_size": 97, "context_length": 16, "n_layer": 2, "n_head": 4, "n_embd": 32}
VARIANTS = [
    dict(zip(("tie_embeddings", "bias", "positions", "n_kv_head", "mlp", "norm"), combo))
    for combo in itertools.product((True, False), (True, False), ("learned", "rope"), (4, 2, 1), ("gelu_tanh", "swiglu"), ("layernorm", "rmsnorm"))
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_params_equal_num_params_for_variants(variant):
    config = Config(**TINY, **variant)
    model = GPT(config)  # tiny: built for real, with real tied weights
    assert count_params(config).total == model.num_params()


def test_params_with_explicit_head_dim_and_hidden():
    config = Config(**TINY, head_dim=12, mlp_hidden=40, n_kv_head=2, positions="rope", mlp="swiglu")
    assert count_params(config).total == GPT(config).num_params()


def test_breakdown_of_gpt2_by_hand():
    p = count_params(Config.from_name("gpt2"))
    assert p.embeddings == 50257 * 768 + 1024 * 768
    assert p.attention == 12 * (4 * 768 * 768 + 4 * 768)
    assert p.mlp == 12 * (2 * 768 * 3072 + 3072 + 768)
    assert p.norms == 25 * 2 * 768
    assert p.head == 0  # tied


# --- weights and KV cache --------------------------------------------------------------------


def test_weight_bytes_per_dtype():
    config = Config.from_name("gpt2")
    n = KNOWN["gpt2"]
    assert weight_bytes(config, "fp32") == 4 * n
    assert weight_bytes(config, "bf16") == weight_bytes(config, "fp16") == 2 * n
    # int8: the 12 x 6 block Linear weights at 1 byte + an fp32 scale per output row; the rest bf16
    linears = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]
    q = 12 * sum(o * i for o, i in linears)
    assert weight_bytes(config, "int8") == q + 12 * sum(4 * o for o, _ in linears) + 2 * (n - q)


def test_nf4_bytes_by_hand():
    # 768 x 768 = 589,824 weights: 294,912 bytes of codes, 9,216 8-bit absmaxes, 36 fp32 scales
    assert quantized_bytes(768, 768, "nf4") == 294_912 + 9_216 + 36 * 4
    assert quantized_bytes(768, 768, "int8") == 589_824 + 768 * 4


def test_kv_cache_by_hand():
    gpt2, llama = Config.from_name("gpt2"), Config.from_name("llama-3.2-1b")
    assert kv_cache_bytes_per_token(gpt2, "fp32") == 2 * 12 * 12 * 64 * 4 == 73_728
    assert kv_cache_bytes_per_token(llama, "bf16") == 2 * 16 * 8 * 64 * 2 == 32_768  # GQA: 8 kv heads, not 32
    assert kv_cache_bytes_per_token(llama, "nf4") == 32_768  # quantized weights, 16-bit cache
    assert kv_cache_bytes(llama, "bf16", context=8192, batch=4) == 32_768 * 8192 * 4 == 1 << 30


def test_invalid_dtype_context_batch():
    config = Config.from_name("nano")
    with pytest.raises(LmforgeError, match="fp64"):
        weight_bytes(config, "fp64")
    with pytest.raises(LmforgeError, match="context"):
        estimate(config, context=config.context_length + 1)
    with pytest.raises(LmforgeError, match="batch"):
        estimate(config, batch=0)


# --- activations vs what autograd really saves ----------------------------------------------

# The estimate is derived tensor by tensor and matches torch 2.13 on CPU to the byte. The
# tolerance lets a torch release save a few more scalars or statistics without failing,
# while any forgotten tensor of real size -- the smallest is one (N, n_embd) activation,
# checked below to be over 3x the tolerance -- fails the test.
TOLERANCE = 0.005
BATCH, CONTEXT = 2, 24
SAVED_CASES = {
    "gpt2-like": Config.from_name("small", vocab_size=300, n_layer=2),
    "llama-like, GQA": Config.from_name("micro", vocab_size=300, n_layer=3),
    "dropout, reference attention, MQA": Config.from_name("micro", vocab_size=300, n_layer=2, n_kv_head=1, dropout=0.1, attention="reference"),
    "dropout, fused attention, untied": Config.from_name("small", vocab_size=300, n_layer=2, dropout=0.1, tie_embeddings=False),
}


def saved_bytes(config: Config, checkpointing: bool) -> int:
    """Bytes of the distinct storages autograd saves for backward (parameters excluded) in
    the trainer's forward, `model(idx, targets)`: the blockwise loss saves the gradients
    it took, of the hidden states and of the head weight."""
    torch.manual_seed(0)
    model = GPT(config).train()
    model.gradient_checkpointing = checkpointing
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()  # views of one storage count once
        return t

    idx = torch.randint(config.vocab_size, (BATCH, CONTEXT))
    targets = torch.randint(config.vocab_size, (BATCH, CONTEXT))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, targets)
    return sum(storages.values())


def head_gradient_bytes(config: Config) -> int:
    """The head weight's gradient, which the loss saves but the estimate counts with the gradients."""
    return config.vocab_size * config.n_embd * 4


@pytest.mark.parametrize("case", SAVED_CASES)
def test_activations_equal_saved_tensors(case):
    config = SAVED_CASES[case]
    est = activations(config, BATCH, CONTEXT)
    assert BATCH * CONTEXT * config.n_embd * 4 > 3 * TOLERANCE * est.saved  # the tolerance can catch a missing tensor
    assert est.saved + head_gradient_bytes(config) == pytest.approx(saved_bytes(config, checkpointing=False), rel=TOLERANCE)


@pytest.mark.parametrize("case", SAVED_CASES)
def test_checkpointing_keeps_block_inputs(case):
    config = SAVED_CASES[case]
    est = activations(config, BATCH, CONTEXT)
    # RoPE's cos/sin reach the blocks as arguments, which the checkpoint holds itself
    # (not through saved-tensor hooks); the estimate counts them
    rope = 2 * CONTEXT * config.head_dim * 4 if config.positions == "rope" else 0
    # so does each block's CPU RNG state, which the checkpoint keeps to replay dropout
    rng = config.n_layer * torch.get_rng_state().nbytes
    assert CHECKPOINT_RNG_STATE == torch.get_rng_state().nbytes
    assert est.kept - rope - rng + head_gradient_bytes(config) == pytest.approx(saved_bytes(config, checkpointing=True), rel=TOLERANCE)
    assert est.checkpointed == est.kept + est.block - est.block_input < est.saved  # the recomputed block's input is kept


@pytest.mark.parametrize("case", SAVED_CASES)
def test_one_block_saves_what_recomputation_holds(case):
    """With checkpointing a block's activations come back during its backward: one block's worth."""
    config = SAVED_CASES[case]
    torch.manual_seed(0)
    model = GPT(config).train()
    x = torch.randn(BATCH, CONTEXT, config.n_embd, requires_grad=True)
    rope = rope_cos_sin(model.inv_freq, torch.arange(CONTEXT)[None], x.dtype) if config.positions == "rope" else None
    # parameters are weights, and the RoPE tables are shared by all blocks (counted outside)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {t.untyped_storage().data_ptr() for t in rope or ()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in skip:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.blocks[0](x, rope, None, None)
    assert activations(config, BATCH, CONTEXT).block == pytest.approx(sum(storages.values()), rel=TOLERANCE)


# --- the training peak vs the CPU allocator --------------------------------------------------


def allocator_peak(fn) -> int:
    """Peak bytes of CPU tensor memory while `fn()` runs, from the allocation events the
    allocator reports to the profiler (exact, unlike RSS)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def step_peak(config: Config, batch: int, context: int, checkpointing: bool) -> int:
    """Allocator peak over model construction and two AdamW steps as the trainer takes
    them: `model(x, y)` (the blockwise loss), backward, `build_optimizer`'s fused AdamW."""

    def steps() -> None:
        torch.manual_seed(0)
        model = GPT(config).train()
        model.gradient_checkpointing = checkpointing
        opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
        x, y = torch.randint(config.vocab_size, (2, batch, context))
        for _ in range(2):
            model(x, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return allocator_peak(steps)


PEAK_CASES = {
    # batch, context, and which phase of `backward_phases` sets the peak (plain, checkpointed)
    "nano": (Config.from_name("nano", n_layer=2), 2, 64, ("loss", "loss")),
    "micro, small vocab": (Config.from_name("micro", vocab_size=256, n_layer=2), 2, 256, ("top block", "first block")),
    "nano, few tokens": (Config.from_name("nano", n_layer=2), 1, 16, ("embeddings", "embeddings")),
    "nano, small vocab, many tokens": (Config.from_name("nano", vocab_size=256, n_layer=2), 6, 256, ("final norm", "top block")),
    "small, untied, dropout": (Config.from_name("small", n_layer=2, vocab_size=512, dropout=0.1, tie_embeddings=False), 2, 128, ("top block", "first block")),
}


@pytest.mark.parametrize("case", PEAK_CASES)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_peak_matches_allocator(case, checkpointing):
    config, batch, context, phases = PEAK_CASES[case]
    t = training_memory(config, batch, context)
    assert (t.peak_phase_checkpointed if checkpointing else t.peak_phase) == phases[checkpointing]  # each phase gets tested
    estimated = t.peak_checkpointed if checkpointing else t.peak
    # measured at most 0.01% apart on torch 2.13 (a few hundred bytes: AdamW's step
    # counters; benchmarks/bench_memory.py); 0.5% leaves room for kernel workspaces to
    # change and still catches a missing (N, mlp_hidden) gradient in the larger cases
    assert estimated == pytest.approx(step_peak(config, batch, context, checkpointing), rel=0.005)


# --- the blockwise loss ----------------------------------------------------------------------


def test_loss_constants_follow_the_trainer():
    # estimate.py imports no torch, so it repeats these
    assert LOSS_BLOCK_ROWS == ops_loss.BLOCK_ROWS
    assert LOSS_FROZEN_HEAD_BLOCK_ROWS == ops_loss.FROZEN_HEAD_BLOCK_ROWS
    assert LOSS_BLOCK_FLOATS == ops_loss.BLOCK_FLOATS


LOSS_CASES = [
    # tokens, n_embd, vocab: fewer tokens than a block; several blocks and a short last one;
    # a GPT-2 vocabulary (padded to 50,272 floats a row); a vocabulary BLOCK_FLOATS caps to 111 rows
    (48, 32, 97),
    (1000, 64, 300),
    (2048, 48, 50257),
    (700, 16, 300_000),
]


@pytest.mark.parametrize("head_trains", [True, False], ids=["head trains", "frozen head"])
@pytest.mark.parametrize(("tokens", "n_embd", "vocab"), LOSS_CASES)
def test_loss_buffers_equal_allocator_peak(tokens, n_embd, vocab, head_trains):
    """Every byte linear_cross_entropy allocates, at its peak, as the estimate counts them."""
    torch.manual_seed(0)
    h = torch.randn(tokens, n_embd, requires_grad=True)
    weight = torch.randn(vocab, n_embd, requires_grad=head_trains)
    targets = torch.randint(vocab, (tokens,))
    targets[::7] = ops_loss.IGNORE_INDEX
    peak = allocator_peak(lambda: ops_loss.linear_cross_entropy(h, weight, targets))
    assert loss_buffers(tokens, n_embd, vocab, head_trains) == pytest.approx(peak, abs=64)  # a scalar or two
    if vocab == 300_000:
        assert loss_block_rows(tokens, vocab, head_trains) == ops_loss.BLOCK_FLOATS // vocab == 111


def test_loss_blocks_of_gpt2_by_hand():
    """At gpt2 4 x 1024 the loss holds 512 rows of logits and their softmax, each row padded
    from 50,257 to 50,272 floats: 196 MiB, where the plain route's logits would be 785 MiB."""
    assert training_memory(Config.from_name("gpt2"), batch=4, context=1024).loss_blocks == 2 * 512 * 50272 * 4


def test_checkpointing_lowers_the_estimate():
    t = training_memory(Config.from_name("gpt2"), batch=4, context=1024)
    assert t.activations_checkpointed < t.activations / 2
    assert t.peak_checkpointed < t.peak
    assert t.total == t.weights * 4 + t.activations  # fp32 weights, gradients, two moments


# --- CLI -------------------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lmforge")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["estimate", *argv])
    return args.func(args)


def test_cli_table(capsys):
    assert run_cli("--preset", "gpt2", "--dtype", "bf16", "--context", "512", "--batch", "2") == 0
    out = capsys.readouterr().out
    assert "124.44 M" in out and "124,439,808" in out
    for field in ("embeddings", "attention", "mlp", "norms", "head", "nf4", "int8", "per token", "2 x 512 tokens"):
        assert field in out
    assert "36.00 KiB" in out  # bf16 KV per token: 2 * 12 * 12 * 64 * 2 bytes
    assert "36.00 MiB" in out  # ... for 2 x 512 tokens
    for field in ("gradients", "AdamW moments", "activations saved for backward", "peak of a step", "checkpointed"):
        assert field in out
    assert "loss, transient (2 x 512 x vocab)" in out and "196.38 MiB" in out  # 2 x 512 rows x 50,272 floats


def test_cli_json_and_config_file(tmp_path, capsys):
    Config.from_name("micro", n_layer=3).save(tmp_path)
    assert run_cli("--config", str(tmp_path / "config.json"), "--json", "--batch", "4", "--context", "128") == 0
    d = json.loads(capsys.readouterr().out)
    config = Config.load(tmp_path)
    assert d["params"]["total"] == meta_num_params(config)
    assert d["kv_bytes"] == kv_cache_bytes(config, "fp32", 128, 4)
    assert d["training"]["activations"] == activations(config, 4, 128).saved
    assert set(d["weight_bytes"]) == {"fp32", "bf16", "fp16", "int8", "nf4"}


def test_cli_rejects_bad_dtype_and_preset():
    with pytest.raises(LmforgeError, match="fp64"):
        run_cli("--preset", "nano", "--dtype", "fp64")
    with pytest.raises(LmforgeError, match="unknown preset"):
        run_cli("--preset", "gpt5")
    with pytest.raises(LmforgeError, match="context"):
        run_cli("--preset", "nano", "--context", "100000")
    with pytest.raises(SystemExit):  # argparse: one of --preset / --config is required
        run_cli("--dtype", "bf16")
