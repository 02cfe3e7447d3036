"""`lmforge.estimate` against the model it describes: counts, bytes, saved tensors, peaks."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lmforge.cli import main as lmforge_main
from lmforge.cli.estimate import parse_size, register
from lmforge.config import PRESETS, Config
from lmforge.errors import LmforgeError
from lmforge.estimate import (
    ADAMW8BIT_BLOCK,
    ADAMW8BIT_CHUNK,
    ADAMW8BIT_CODES,
    ADAMW8BIT_MIN_SIZE,
    CHECKPOINT_RNG_STATE,
    LORA_ALL_LINEAR,
    LORA_TARGETS,
    LOSS_BLOCK_FLOATS,
    LOSS_BLOCK_ROWS,
    LOSS_FROZEN_HEAD_BLOCK_ROWS,
    Setup,
    activations,
    adapter_tensors,
    base_weight_bytes,
    check_training_fits,
    count_params,
    estimate,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    lora_activations,
    loss_block_rows,
    loss_buffers,
    moment_bytes,
    param_tensors,
    quantized_bytes,
    step_buffers,
    training_memory,
    training_plan,
    weight_bytes,
)
from lmforge.finetune import lora as lora_module
from lmforge.finetune.lora import LoRAConfig, apply_lora
from lmforge.finetune.nf4 import quantize_model
from lmforge.model import GPT, rope_cos_sin
from lmforge.ops import loss as ops_loss
from lmforge.train import adamw8bit
from lmforge.train.adamw8bit import AdamW8bit
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


def saved_bytes(config: Config, checkpointing: bool, prepare=lambda model: None) -> int:
    """Bytes of the distinct storages autograd saves for backward (parameters and buffers
    excluded) in the trainer's forward, `model(idx, targets)`: the blockwise loss saves the
    gradients it took, of the hidden states and of the head weight. `prepare(model)` adapts
    the model first (LoRA, NF4)."""
    torch.manual_seed(0)
    model = GPT(config).train()
    model.gradient_checkpointing = checkpointing
    prepare(model)
    params = {p.untyped_storage().data_ptr() for p in (*model.parameters(), *model.buffers())}
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


def step_peak(config: Config, batch: int, context: int, checkpointing: bool, optimizer: str = "adamw",
              paged: Path | None = None) -> int:
    """Allocator peak over model construction and two AdamW steps as the trainer takes
    them: `model(x, y)` (the blockwise loss), backward, `build_optimizer`'s AdamW (fused,
    or 8-bit, in memory or `paged` in that folder)."""

    def steps() -> None:
        torch.manual_seed(0)
        model = GPT(config).train()
        model.gradient_checkpointing = checkpointing
        opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), kind=optimizer, paged=paged)
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


# --- the optimizer: 8-bit and paged moments ---------------------------------------------------


def test_optimizer_constants_follow_the_trainer():
    # estimate.py imports no torch, so it repeats these
    assert (ADAMW8BIT_BLOCK, ADAMW8BIT_CHUNK, ADAMW8BIT_MIN_SIZE) == (adamw8bit.BLOCK, adamw8bit.CHUNK, adamw8bit.MIN_8BIT_SIZE)
    p = torch.nn.Parameter(torch.zeros(ADAMW8BIT_MIN_SIZE))
    opt = AdamW8bit([p])
    p.grad = torch.ones_like(p)
    opt.step()
    assert ADAMW8BIT_CODES == sum(t.nbytes for codes in opt._codes.values() for t in codes)  # the code books and their tables


@pytest.mark.parametrize("variant", VARIANTS[::5], ids=lambda v: "-".join(str(x) for x in v.values()))
def test_param_tensors_are_the_models(variant):
    config = Config(**TINY, **variant)
    assert sorted(param_tensors(config)) == sorted(p.numel() for p in GPT(config).parameters())


@given(numel=st.integers(1, 3 * ADAMW8BIT_CHUNK), optimizer=st.sampled_from(["adamw", "adamw8bit"]))
def test_moment_bytes_equal_adamw8bit_state_bytes(numel, optimizer):
    opt = AdamW8bit([torch.nn.Parameter(torch.empty(1))], bits=8 if optimizer == "adamw8bit" else 32)
    assert moment_bytes(numel, optimizer) == opt.state_bytes(torch.empty(numel, device="meta"))


MOMENT_CASES = {
    "gpt2-like, tied": Config.from_name("small", n_layer=2),
    "llama-like, untied, GQA": Config.from_name("micro", n_layer=2, vocab_size=300, tie_embeddings=False),
    "tiny: most tensors under 4096 values": Config(**TINY),
}


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor of the optimizer's state but the step counters (a scalar each)."""
    return sum(t.nbytes for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor) and t.dim() > 0)


@pytest.mark.parametrize("case", MOMENT_CASES)
@pytest.mark.parametrize(("optimizer", "paged"), [("adamw", False), ("adamw8bit", False), ("adamw", True), ("adamw8bit", True)],
                         ids=["adamw", "adamw8bit", "adamw-paged", "adamw8bit-paged"])
def test_moments_equal_a_real_optimizers_state(case, optimizer, paged, tmp_path):
    """After one step the state holds exactly the estimate's bytes, tensor by tensor; paged, all of it in files."""
    config = MOMENT_CASES[case]
    torch.manual_seed(0)
    model = GPT(config).train()
    folder = tmp_path / "states" if paged else None
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), kind=optimizer, paged=folder)
    x, y = torch.randint(config.vocab_size, (2, 2, 8))
    model(x, y).backward()
    opt.step()
    plan = training_plan(config, 2, 8, Setup(optimizer=optimizer, paged=paged))
    assert state_bytes(opt) == plan.moments == sum(moment_bytes(p.numel(), optimizer) for p in model.parameters())
    assert plan.paged == (plan.moments if paged else 0)
    moments = [t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    files = {t.untyped_storage().filename is not None for t in moments}
    assert files == {paged}  # paged moments are memory-mapped files, the others anonymous memory


@pytest.mark.parametrize("numel", [100, ADAMW8BIT_MIN_SIZE - 1, 5000, 100 * ADAMW8BIT_BLOCK + 7, ADAMW8BIT_CHUNK + 300])
@pytest.mark.parametrize("optimizer", ["adamw8bit", "adamw"], ids=["8-bit", "32-bit (paged adamw)"])
def test_step_buffers_equal_allocator_peak(numel, optimizer):
    """What one tensor's steady-state AdamW8bit step allocates, as `step_buffers` counts it."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(numel))
    opt = AdamW8bit([p], lr=1e-3, weight_decay=0.1, bits=8 if optimizer == "adamw8bit" else 32)
    p.grad = torch.randn_like(p)
    opt.step()  # the moments and the code tables exist from here on
    p.grad = torch.randn_like(p)
    measured = allocator_peak(opt.step)
    assert step_buffers(numel, optimizer, paged=optimizer == "adamw") == pytest.approx(measured, abs=64)  # a scalar or two
    assert step_buffers(numel, "adamw", paged=False) == 0  # torch's fused AdamW steps in place


OPTIMIZER_PEAK_CASES = {
    # batch, context, and which phase sets the peak (plain, checkpointed) with 8-bit moments
    "nano": (Config.from_name("nano", n_layer=2), 2, 64, ("optimizer step", "optimizer step")),
    "micro, small vocab": PEAK_CASES["micro, small vocab"][:3] + (("top block", "first block"),),
    "nano, small vocab, many tokens": PEAK_CASES["nano, small vocab, many tokens"][:3] + (("final norm", "top block"),),
    "small, GPT-2 vocab": (Config.from_name("small", n_layer=3), 2, 128, ("loss", "loss")),
}


@pytest.mark.parametrize("case", OPTIMIZER_PEAK_CASES)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize(("optimizer", "paged"), [("adamw8bit", False), ("adamw", True), ("adamw8bit", True)],
                         ids=["adamw8bit", "adamw-paged", "adamw8bit-paged"])
def test_peak_with_8bit_or_paged_moments_matches_allocator(case, checkpointing, optimizer, paged, tmp_path):
    """The allocator reports the paged moments' mapped files too: they count there, not in the
    resident peak (the OS writes them out when memory runs short)."""
    config, batch, context, phases = OPTIMIZER_PEAK_CASES[case]
    plan = training_plan(config, batch, context, Setup(optimizer=optimizer, paged=paged, checkpointing=checkpointing))
    if not paged:
        assert plan.peak_phase == phases[checkpointing]  # each phase gets tested, the optimizer's step too
    measured = step_peak(config, batch, context, checkpointing, optimizer, tmp_path / "states" if paged else None)
    assert plan.peak + plan.paged == pytest.approx(measured, rel=0.001)  # measured at most 0.01% apart on torch 2.13


def test_8bit_or_paged_moments_lower_the_peak_of_a_large_model():
    config = Config.from_name("gpt2-xl")
    n = count_params(config).total
    fp32, int8, paged = (training_plan(config, 1, 512, Setup(optimizer=o, paged=p)) for o, p in
                         (("adamw", False), ("adamw8bit", False), ("adamw", True)))
    assert fp32.moments == paged.moments == paged.paged == 8 * n and paged.resident_moments == 0
    # a byte each for m and v and an fp32 absmax per 256 values of each; small tensors keep fp32
    assert int8.moments == pytest.approx(2.03125 * n, rel=0.002)
    assert fp32.peak_phase == int8.peak_phase == paged.peak_phase == "embeddings"  # where the weights dominate
    assert fp32.peak - int8.peak == fp32.moments - int8.moments - int8.code_tables
    assert fp32.peak - paged.peak == fp32.moments


# --- LoRA and QLoRA ----------------------------------------------------------------------------

LORA_CASES = {
    "gpt2-like, q k v o": (Config.from_name("small", vocab_size=300, n_layer=2), ("q", "k", "v", "o")),
    "gpt2-like, all-linear": (Config.from_name("small", vocab_size=300, n_layer=2), ("all-linear",)),
    "llama-like, GQA, v and down": (Config.from_name("micro", vocab_size=300, n_layer=3), ("v", "down")),
    "llama-like, all-linear": (Config.from_name("micro", vocab_size=300, n_layer=3), ("all-linear",)),
    "dropout, reference attention, q v up": (SAVED_CASES["dropout, reference attention, MQA"], ("q", "v", "up")),
    "dropout, fused attention, untied, o fc": (SAVED_CASES["dropout, fused attention, untied"], ("o", "fc")),
}


def test_lora_names_follow_the_trainer():
    assert LORA_TARGETS == lora_module.TARGETS and LORA_ALL_LINEAR == lora_module.ALL_LINEAR


def adapted(r: int, targets: tuple[str, ...], quantize: bool):
    def prepare(model: GPT) -> None:
        if quantize:
            quantize_model(model)
        apply_lora(model, LoRAConfig(r=r, targets=targets))

    return prepare


@pytest.mark.parametrize("case", LORA_CASES)
@pytest.mark.parametrize("quantize", [False, True], ids=["LoRA", "QLoRA"])
def test_lora_weights_gradients_and_moments_equal_a_real_adapted_model(case, quantize):
    config, targets = LORA_CASES[case]
    r = 8
    torch.manual_seed(0)
    model = GPT(config).train()
    adapted(r, targets, quantize)(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(adapter_tensors(config, r, targets)) == sorted(p.numel() for p in trainable)
    setup = Setup(optimizer="adamw8bit", lora_r=r, lora_targets=targets, quantize="nf4" if quantize else "")
    plan = training_plan(config, 2, 8, setup)
    # every weight the model holds: parameters and the 4-bit layers' buffers (not RoPE's frequencies, a constant)
    held = [*model.parameters(), *(b for name, b in model.named_buffers() if name != "inv_freq")]
    assert plan.weights == sum(t.nbytes for t in held)
    if quantize:
        assert plan.weights - 4 * plan.trainable == base_weight_bytes(config, "nf4") < count_params(config).total * 4
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), kind="adamw8bit")
    x, y = torch.randint(config.vocab_size, (2, 2, 8))
    model(x, y).backward()
    assert plan.gradients == sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    opt.step()
    assert plan.moments == state_bytes(opt)
    assert plan.trainable == sum(p.numel() for p in trainable)


def test_lora_refuses_what_the_trainer_refuses():
    config = Config.from_name("small")
    with pytest.raises(LmforgeError, match="gate"):  # GPT-2 has no gate
        training_plan(config, 1, 8, Setup(lora_r=8, lora_targets=("gate",)))
    with pytest.raises(LmforgeError, match="--lora-r"):
        training_plan(config, 1, 8, Setup(lora_r=100_000))
    with pytest.raises(LmforgeError, match="--lora-r"):
        Setup(quantize="nf4")
    with pytest.raises(LmforgeError, match="--optimizer"):
        Setup(optimizer="sgd")


@pytest.mark.parametrize("case", LORA_CASES)
@pytest.mark.parametrize("quantize", [False, True], ids=["LoRA", "QLoRA"])
def test_lora_activations_equal_saved_tensors(case, quantize):
    """Frozen Linears save nothing, adapters their input and A x, and the first block
    saves only from its first adapter on (its input, from frozen embeddings, needs no gradient)."""
    config, targets = LORA_CASES[case]
    est = lora_activations(config, BATCH, CONTEXT, 8, targets)
    assert est.saved == pytest.approx(saved_bytes(config, False, adapted(8, targets, quantize)), rel=TOLERANCE)
    assert est.saved < activations(config, BATCH, CONTEXT).saved
    rope = 2 * CONTEXT * config.head_dim * 4 if config.positions == "rope" else 0
    rng = config.n_layer * CHECKPOINT_RNG_STATE
    assert est.kept - rope - rng == pytest.approx(saved_bytes(config, True, adapted(8, targets, quantize)), rel=TOLERANCE)


def lora_step_peak(config: Config, batch: int, context: int, setup: Setup) -> int:
    """Peak bytes of tensors during two steps of an adapted model (LoRA or QLoRA), its
    weights, buffers and batch included: the allocator's events from the steps' start on,
    plus what was resident then (QLoRA builds the dense model first: not the step's peak)."""
    torch.manual_seed(0)
    model = GPT(config).train()
    model.gradient_checkpointing = setup.checkpointing
    adapted(setup.lora_r, setup.lora_targets, bool(setup.quantize))(model)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), kind=setup.optimizer)
    x, y = torch.randint(config.vocab_size, (2, batch, context))  # one storage
    resident = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (*model.parameters(), *model.buffers(), x)}

    def steps() -> None:
        for _ in range(2):
            model(x, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return sum(resident.values()) + allocator_peak(steps)


LORA_PEAK_CASES = {
    # config, batch, context, setup, and the phase that sets the peak
    "GPT-2 vocab: the loss": (Config.from_name("small", n_layer=3), 2, 128, Setup(lora_r=8), "loss"),
    "QLoRA, all-linear, checkpointed: the loss": (
        Config.from_name("small", n_layer=3), 2, 128,
        Setup(lora_r=8, lora_targets=("all-linear",), quantize="nf4", checkpointing=True), "loss"),
    "RMSNorm, all-linear: the final norm": (Config.from_name("micro", vocab_size=256, n_layer=2), 2, 256,
                                           Setup(lora_r=8, lora_targets=("all-linear",)), "final norm"),
    "SwiGLU, q k v o, 8-bit: the top block's MLP": (Config.from_name("micro", vocab_size=256, n_layer=2), 2, 256,
                                                     Setup(lora_r=8, optimizer="adamw8bit"), "top block"),
    "GELU, dropout, QLoRA, checkpointed: the MLP's forward": (
        PEAK_CASES["small, untied, dropout"][0], 2, 128,
        Setup(lora_r=8, quantize="nf4", checkpointing=True), "top block (forward)"),
    "GELU, dropout, all-linear": (
        PEAK_CASES["small, untied, dropout"][0], 2, 128, Setup(lora_r=8, lora_targets=("all-linear",)), "top block"),
}


@pytest.mark.parametrize("case", LORA_PEAK_CASES)
def test_lora_peak_matches_allocator(case):
    config, batch, context, setup, phase = LORA_PEAK_CASES[case]
    plan = training_plan(config, batch, context, setup)
    assert plan.peak_phase == phase
    # measured at most 0.3% apart on torch 2.13 (an adapted output projection's own
    # small gradients and A x are left out of the top block's)
    assert plan.peak == pytest.approx(lora_step_peak(config, batch, context, setup), rel=0.005)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_finetuning_peaks_agree_with_the_readmes_measurements(checkpointing):
    """The README's fine-tuning memory rows (benchmarks/bench_finetune_memory.py, allocator
    peaks of `gpt2` at 4 x 256, r=16 on all-linear), measured independently of this module."""
    config = Config.from_name("gpt2")
    measured = {False: (859, 1141, 2355), True: (332, 614, 2049)}[checkpointing]  # MiB: QLoRA, LoRA, full
    setups = [Setup(lora_r=16, lora_targets=("all-linear",), quantize=q, checkpointing=checkpointing) for q in ("nf4", "")]
    setups.append(Setup(checkpointing=checkpointing))
    for setup, mib in zip(setups, measured, strict=True):
        assert training_plan(config, 4, 256, setup).peak / 2**20 == pytest.approx(mib, rel=0.005)
    qlora = training_plan(config, 4, 256, setups[0])
    assert qlora.gradients == 4 * qlora.trainable and qlora.trainable < 0.03 * count_params(config).total


# --- will it fit -------------------------------------------------------------------------------

GIB = 2**30


def test_gpt2_xl_in_24_gib():
    config = Config.from_name("gpt2-xl")
    # fp32 AdamW: weights, gradients and two moments are 16 bytes a parameter (23.2 GiB)
    # before any activation; at 2 x 1024 the loss's phase needs 27.3 GiB
    plain = training_plan(config, 2, 1024, Setup())
    assert not plain.fits(24 * GIB) and plain.peak > 27 * GIB
    assert training_plan(config, 1, 1024, Setup()).peak >= 16 * count_params(config).total
    small = training_plan(config, 1, 512, Setup(optimizer="adamw8bit", checkpointing=True))
    assert small.fits(24 * GIB) and small.peak < 15 * GIB


def test_the_refusal_breaks_the_need_down_and_names_what_helps():
    config = Config.from_name("gpt2-xl")
    with pytest.raises(LmforgeError) as e:
        check_training_fits(config, 2, 1024, False, 24 * GIB)
    message = str(e.value)
    assert "\n" not in message
    assert "needs about 27.3 GiB to train" in message and "only 24.0 GiB are available" in message
    for part in ("weights 5.8 GiB", "gradients 5.8 GiB", "moments 11.6 GiB", "activations 9.4 GiB", "peak at loss"):
        assert part in message
    suggested = "--optimizer adamw8bit (18.7 GiB, fits), --optimizer-states paged (15.7 GiB, fits) or --gradient-checkpointing"
    assert suggested in message
    # with all three on, none is suggested again, and paged moments are said to be on disk
    with pytest.raises(LmforgeError) as e:
        check_training_fits(config, 64, 1024, True, 24 * GIB, optimizer="adamw8bit", paged=True)
    assert "--optimizer adamw8bit" not in str(e.value) and "--gradient-checkpointing" not in str(e.value)
    assert "paged to disk" in str(e.value)
    check_training_fits(config, 1, 512, True, 24 * GIB, optimizer="adamw8bit")  # fits: nothing raised


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


def test_cli_train_verdicts(capsys):
    assert run_cli("--preset", "gpt2-xl", "--train", "--optimizer", "adamw8bit", "--checkpointing", "--memory", "24GiB") == 0
    out = capsys.readouterr().out
    for field in ("training, 1 x 1024 tokens: adamw8bit, checkpointing", "optimizer moments (8-bit)",
                  "activations (checkpointed)", "peak of a step (modeled)", "peak set by"):
        assert field in out
    assert "verdict: fits: needs 14.86 GiB of the 24.00 GiB of --memory (9.14 GiB to spare)" in out
    assert run_cli("--preset", "gpt2-xl", "--optimizer", "adamw", "--batch", "2", "--memory", "24G") == 0  # --train implied
    out = capsys.readouterr().out
    assert "verdict: does not fit: needs 27.32 GiB, 3.32 GiB more than the 24.00 GiB of --memory" in out
    assert "--optimizer adamw8bit (18.7 GiB, fits)" in out and "--gradient-checkpointing" in out
    assert run_cli("--preset", "gpt2-xl", "--train", "--memory", "24GiB") == 0  # 16 bytes a parameter: 2% to spare
    assert "verdict: fits, but tight" in capsys.readouterr().out


def test_cli_train_paged_and_qlora(capsys):
    assert run_cli("--preset", "gpt2-xl", "--train", "--optimizer-states", "paged", "--memory", "24GiB") == 0
    out = capsys.readouterr().out
    assert "paged to disk (not resident)" in out and "11.61 GiB" in out and "verdict: fits" in out
    assert run_cli("--preset", "gpt2", "--train", "--lora-r", "16", "--lora-targets", "all-linear", "--quantize", "nf4",
                   "--batch", "4", "--context", "256", "--memory", "1GiB") == 0
    out = capsys.readouterr().out
    assert "QLoRA r=16 on all-linear" in out and "weights (frozen NF4 base + adapters)" in out and "verdict: fits" in out


def test_cli_train_json(capsys):
    assert run_cli("--preset", "nano", "--train", "--optimizer", "adamw8bit", "--memory", "512MiB", "--json") == 0
    d = json.loads(capsys.readouterr().out)
    plan = training_plan(Config.from_name("nano"), 1, 256, Setup(optimizer="adamw8bit"))
    assert d["plan"]["peak"] == plan.peak and d["plan"]["moments"] == plan.moments
    assert d["plan"]["setup"]["optimizer"] == "adamw8bit"
    assert d["memory"] == 512 * 2**20 and d["fits"] is True


@pytest.mark.parametrize(("text", "size"), [("24GiB", 24 * GIB), ("512MiB", 512 * 2**20), ("24G", 24 * GIB), ("24 gib", 24 * GIB),
                                            ("1.5GiB", 3 * GIB // 2), ("16GB", 16 * 10**9), ("1000", 1000), ("2T", 2 * 2**40),
                                            ("9" * 40, int("9" * 40))])
def test_memory_sizes(text, size):
    assert parse_size(text, "--memory") == size


@pytest.mark.parametrize("bad", ["abc", "", "-1", "nan", "inf", "0", "0.1", "24XB", "1.5", "1e9", "9" * 400 + "G"])
def test_bad_memory_is_one_line(bad, capsys):
    assert lmforge_main(["estimate", "--preset", "nano", "--memory", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmforge: error: --memory")


BAD_TRAINING_FLAGS = [["--optimizer", "sgd"], ["--optimizer-states", "disk"], ["--lora-r", "-1"], ["--lora-targets", "x"],
                      ["--quantize", "nf4"], ["--lora-r", "100000"], ["--lora-r", "8", "--lora-targets", "gate"]]


@pytest.mark.parametrize("argv", BAD_TRAINING_FLAGS)
def test_bad_training_flags_are_one_line(argv, capsys):
    assert lmforge_main(["estimate", "--preset", "gpt2", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmforge: error: ")


def test_readme_shows_the_real_output(capsys):
    """The README's "will it fit?" example: its command, then its output as printed."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    command = "lmforge estimate --preset gpt2-xl --train --optimizer adamw8bit --checkpointing --memory 24GiB"
    assert command in readme
    shown = readme.split("```text\ngpt2-xl: ", 1)[1].split("```", 1)[0]
    assert run_cli(*command.split()[2:]) == 0
    assert "gpt2-xl: " + shown == capsys.readouterr().out
