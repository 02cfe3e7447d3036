"""Several processes, one training loop: process setup, model wrapping, full checkpoints.

The trainer runs unchanged on one process or under `torchrun --nproc_per_node=N`. This
module hides the difference:

- `init_distributed` reads torchrun's environment and joins the process group (gloo
  on CPU, NCCL on CUDA); without that environment it is one process and no group.
- `wrap_model` makes the model data-parallel: DDP keeps a full copy per rank and
  averages gradients; FSDP2 (`fully_shard`) keeps 1/N of every parameter, gradient
  and AdamW moment per rank and gathers each block's weights just for its compute.
- `full_state` / `load_full_state` turn either layout into the ordinary full state
  dict (plain GPT parameter names on CPU, optimizer state keyed by parameter name),
  so a checkpoint written by N processes resumes on M, and on one.

`wrap_model`, `full_state`, `load_full_state`, `all_reduce_mean` and `barrier` are
collective when `info.enabled`: all ranks must call them, in the same order, or the
ranks wait for each other forever. On one process every helper is a no-op or a plain
state dict.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from lmforge.device import pick_device
from lmforge.errors import LmforgeError
from lmforge.weights import check_tensors

STRATEGIES = ("ddp", "fsdp")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits among the training processes, and which device it owns."""

    rank: int  # 0 .. world_size-1, over all machines
    world_size: int
    local_rank: int  # index on this machine: picks the GPU
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, logs and writes checkpoints, so files are written once."""
        return self.rank == 0

    def main_only(self, say: Callable[[str], object]) -> Callable[[str], object]:
        """`say` on the main process, silence on the others: one report per run, not per rank."""
        return say if self.is_main else (lambda _: None)

    @staticmethod
    def launched_rank() -> int:
        """This process's rank as torchrun set it (0 when not launched by torchrun), for
        code that runs before or after the process group exists."""
        return _env_int("RANK") or 0

    @property
    def enabled(self) -> bool:
        """Whether collectives are needed (and a process group exists to run them);
        False on one process, where every helper here is a no-op."""
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise LmforgeError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def _prefer_loopback_for_gloo() -> None:
    """Let gloo find its peers on a single machine.

    Gloo binds to the interface that the machine's hostname resolves to; in containers
    that is often an address the other processes cannot reach (or none), and the group
    hangs or fails to connect. When the rendezvous address is loopback, every process
    is on this machine, so the loopback interface is always right.
    """
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    if os.environ.get("MASTER_ADDR", "127.0.0.1") not in _LOOPBACK:
        return
    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:
        return
    for lo in ("lo", "lo0"):
        if lo in names:
            os.environ["GLOO_SOCKET_IFNAME"] = lo
            return


def init_distributed(device: str | None = None) -> DistInfo:
    """Join torchrun's process group if launched by it; else describe the single process.

    torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. Without them (or with WORLD_SIZE=1)
    there is one process and no group, so plain `python -m lmforge ...` works without
    any of this. With several processes, CUDA ranks use NCCL and GPU `local_rank`
    (one GPU per process: NCCL refuses two ranks on one GPU); CPU ranks use gloo.
    `device` is a `pick_device` name; None means "auto". Calling it again returns the
    same answer without initialising twice.
    """
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if rank is None or world_size is None or world_size <= 1:
        return DistInfo(0, 1, 0, pick_device(device or "auto"))
    if not dist.is_available():
        raise LmforgeError("this torch build has no torch.distributed; run on one process (without torchrun)")
    local_rank = rank if local_rank is None else local_rank
    wanted = pick_device(device or "auto")
    if wanted.type == "mps":
        if device not in (None, "auto"):
            raise LmforgeError("several processes cannot share Apple's MPS device (no collective backend); use --device cpu")
        wanted = torch.device("cpu")
    if wanted.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise LmforgeError(
                f"LOCAL_RANK {local_rank} has no GPU: only {torch.cuda.device_count()} visible; "
                "start at most that many processes per machine (--nproc_per_node)"
            )
        wanted = torch.device("cuda", local_rank)
        torch.cuda.set_device(wanted)
    elif wanted.type != "cpu":
        raise LmforgeError(f"distributed training runs on cuda or cpu, not {wanted.type}")
    if not dist.is_initialized():
        backend = "nccl" if wanted.type == "cuda" else "gloo"
        if backend == "gloo":
            _prefer_loopback_for_gloo()
        # NCCL: bind the group to this rank's GPU up front (torch >= 2.3 takes device_id)
        takes_device = "device_id" in inspect.signature(dist.init_process_group).parameters
        kwargs = {"device_id": wanted} if backend == "nccl" and takes_device else {}
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=30), **kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, wanted)


def shutdown(info: DistInfo) -> None:
    """Leave the process group (NCCL warns, and may hang at exit, when it is left open)."""
    if info.enabled:
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (e.g. until rank 0 has finished writing a checkpoint)."""
    if info.enabled:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of `value` over ranks (a new tensor; fp32): the loss to log is the whole
    batch's, not rank 0's share. Unchanged (detached) on one process."""
    t = value.detach().float().clone()
    if not info.enabled:
        return t
    t = t.to(info.device)
    # sum, then divide: gloo before torch 2.13 has no ReduceOp.AVG
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / info.world_size


# --- wrapping ------------------------------------------------------------------------
def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 has no FSDP2, so nothing is an FSDP2 module
        return False
    return isinstance(model, FSDPModule)


def _broadcast_from_rank0(model: nn.Module) -> None:
    """Make every rank start from rank 0's weights.

    DDP does this itself; `fully_shard` just cuts each rank's own copy into shards, so
    ranks whose random init differed would train a model that never existed.
    """
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


def wrap_model(model: nn.Module, info: DistInfo, strategy: str = "ddp") -> nn.Module:
    """The model to train with: data-parallel over all ranks; `model` itself on one process.

    "ddp": DistributedDataParallel, which returns a wrapper (reach the GPT with `unwrap`).
    "fsdp": FSDP2; each Block is sharded as its own unit (its weights are gathered just
    for its forward and backward, then freed), then the root, which holds the
    embedding, final norm and head. A tied head and the embedding are one Parameter,
    so both live in the root unit and stay tied. FSDP2 changes `model` in place (its
    parameters become DTensor shards) and returns it.

    Move the model to `info.device` first; build the optimizer from the returned
    module (after wrapping: under FSDP the optimizer must hold the sharded parameters).
    """
    if strategy not in STRATEGIES:
        raise LmforgeError(f"unknown distributed strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [info.device.index] if info.device.type == "cuda" else None
        # The only buffer (RoPE's inv_freq) is computed, never trained: re-broadcasting
        # it before every forward is wasted communication. (torch 2.13 renamed the flag.)
        params = inspect.signature(DDP).parameters
        no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        return DDP(model, device_ids=device_ids, **no_buffer_sync)

    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise LmforgeError(f"--strategy fsdp needs FSDP2 (torch >= 2.6); this is torch {torch.__version__}: use ddp") from None

    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise LmforgeError(f"fsdp shards a GPT's blocks; {type(model).__name__} has no .blocks")
    _broadcast_from_rank0(model)
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if info.device.type != "cuda":
        # FSDP2 averages gradients with ReduceOp.AVG. Gloo only recently learned AVG
        # (torch 2.13's does; older builds fail with "Cannot use ReduceOp.AVG with
        # Gloo"), so on CPU ask for a sum and a division by the world size: the same mean.
        for module in model.modules():
            if _is_fsdp(module) and hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The GPT inside: through torch.compile's `._orig_mod` and DDP's `.module`.

    FSDP2 wraps nothing (it changes the model in place), so an FSDP model is returned
    as is; its forward still gathers the shards, so every rank must run it together.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _inside_compile(model)
    return _inside_compile(model.module) if isinstance(model, DDP) else model


def _inside_compile(model: nn.Module) -> nn.Module:
    """The module torch.compile wrapped (`._orig_mod`), or `model` itself."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


@contextlib.contextmanager
def no_sync(model: nn.Module, active: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on gradient-accumulation micro-steps (`active`).

    Gradients only need averaging once per optimizer step; before that each rank adds
    its micro-batches' gradients locally. Call it on EVERY micro-step: active on all
    but the last, inactive on the last.

    - DDP: `model.no_sync()`. DDP decides at forward time, so the forward must run
      inside the block; `backward()` may be inside or right after it.
    - FSDP2: `set_requires_gradient_sync(not active)`, which FSDP reads at backward
      time. The setting is left in place on exit (not restored), so a backward right
      after the block still skips the sync, and the next call (inactive on the last
      micro-step) turns syncing back on. Accumulated gradients stay unsharded on each
      rank until then (more memory on the accumulation steps).
    - one process, or another module: nothing to skip.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _inside_compile(model)  # the DDP or FSDP module is inside torch.compile's wrapper
    if _is_fsdp(model):
        model.set_requires_gradient_sync(not active)
        yield
        return

    if active and isinstance(model, DDP):
        with model.no_sync():
            yield
        return
    yield


# --- full state dicts -----------------------------------------------------------------
def _tied_aliases(model: nn.Module) -> set[str]:
    """Names of parameters that are another name's Parameter (a tied head: lm_head.weight).

    They are left out of saved state (safetensors refuses shared tensors, and the
    model ties them again itself), as `pretrained.save_pretrained` does.
    """
    return set(_alias_sources(model))


def _alias_sources(model: nn.Module) -> dict[str, str]:
    """alias name -> the first name of the same Parameter ("lm_head.weight" -> "tok_emb.weight")."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def _options(**kwargs: bool):
    """Full (unsharded) state dict options; flags this torch does not know are left at
    their defaults (broadcast_from_rank0 arrived after 2.2, and False is its default)."""
    import dataclasses

    from torch.distributed.checkpoint.state_dict import StateDictOptions

    known = {f.name for f in dataclasses.fields(StateDictOptions)}
    return StateDictOptions(full_state_dict=True, **{k: v for k, v in kwargs.items() if k in known})


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> tuple[dict[str, torch.Tensor], dict]:
    """The whole model and optimizer state, on CPU, in the layout every run shares.

    Collective: every rank must call it (it gathers the shards under FSDP), but only
    rank 0 gets the dicts; other ranks get two empty dicts and write nothing.

    The model dict has the plain GPT names ("blocks.0.attn.q.weight", no "module.")
    and leaves out a tied head. The optimizer dict is `optimizer.state_dict()` with
    parameter names instead of numbers ({"state": {name: {"step", "exp_avg",
    "exp_avg_sq"}}, "param_groups": [{..., "params": [names]}]}), the same on one
    process and on N, so a checkpoint resumes under any number of processes. The
    tensors are copies: training on does not change them.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not info.is_main:
        return {}, {}
    live = _live_storages(model, optimizer)
    aliases = _tied_aliases(unwrap(model))
    model_state = {k: _own_copy(v, live) for k, v in model_state.items() if k not in aliases}
    return model_state, _copy_tree(optim_state, live)


def _live_storages(model: nn.Module, optimizer: torch.optim.Optimizer) -> set[int]:
    """Where the live CPU tensors keep their data: on a CPU, get_state_dict hands back
    the parameters and AdamW's step counters themselves, not copies."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return {t.untyped_storage().data_ptr() for t in tensors if t.device.type == "cpu" and not _is_dtensor(t)}


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5 (no FSDP2 there either)
        return False
    return isinstance(t, DTensor)


def _own_copy(t: torch.Tensor, live: set[int]) -> torch.Tensor:
    """A contiguous CPU tensor that training on will not change."""
    t = t.detach().cpu()
    if t.untyped_storage().data_ptr() in live or not t.is_contiguous():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _copy_tree(obj, live: set[int]):
    if isinstance(obj, torch.Tensor):
        return _own_copy(obj, live)
    if isinstance(obj, dict):
        return {k: _copy_tree(v, live) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy_tree(v, live) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_copy_tree(v, live) for v in obj)
    return obj


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_state: dict[str, torch.Tensor] | None,
    optimizer_state: dict | None,
    info: DistInfo,
) -> None:
    """Put a `full_state` pair (read from disk) into the model and optimizer.

    Collective: every rank calls it with the full dicts it read itself; each keeps its
    shard (FSDP) or all of it (DDP, one process). A tied head left out of the saved
    dict is filled from the embedding. Names and shapes are checked here first, on
    every rank alike (so all ranks fail together instead of one hanging the rest):
    with full state dicts, `set_state_dict` itself would silently keep the current
    value of a missing key. The caller's dicts are not modified. `optimizer` or
    `optimizer_state` None loads the weights only; `model_state` None the optimizer only
    (the weights already in place).
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict, set_state_dict

    inner = unwrap(model)
    options = _options(broadcast_from_rank0=False)
    if model_state is None:  # the weights are in place already (an adapter run read its adapters): the optimizer only
        _check_optimizer_state(inner, optimizer, optimizer_state)
        set_optimizer_state_dict(model, optimizer, _copy_structure(optimizer_state), options=options)
        return
    model_state = dict(model_state)
    for alias, source in _alias_sources(inner).items():
        if alias not in model_state and source in model_state:
            model_state[alias] = model_state[source]
    _check_model_state(inner, model_state)
    # broadcast_from_rank0=False: every rank passes the full dicts it read from disk
    if optimizer is None or optimizer_state is None:
        set_model_state_dict(model, model_state, options=options)
        return
    _check_optimizer_state(inner, optimizer, optimizer_state)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=_copy_structure(optimizer_state), options=options)


def _check_model_state(inner: nn.Module, model_state: dict[str, torch.Tensor]) -> None:
    expected = {k: tuple(v.shape) for k, v in inner.state_dict().items()}  # global shapes, also for DTensors
    check_tensors(model_state, expected, "the checkpoint", against="this model (was it written for another preset?)")


def _check_optimizer_state(inner: nn.Module, optimizer: torch.optim.Optimizer, optimizer_state: dict) -> None:
    """Same parameter names in the same groups, moments of the parameters' shapes: a
    missing entry would otherwise restart that parameter's AdamW moments from zero."""
    names = {id(p): n for n, p in inner.named_parameters()}  # a tied Parameter once, by its first name
    shapes = {n: tuple(p.shape) for n, p in inner.named_parameters()}
    ours = [[names.get(id(p), "?") for p in g["params"]] for g in optimizer.param_groups]
    theirs = [list(g.get("params", [])) for g in optimizer_state.get("param_groups", [])]
    if ours != theirs:
        raise LmforgeError(
            f"the checkpoint's optimizer has parameter groups {[len(g) for g in theirs]} (by name), this one "
            f"{[len(g) for g in ours]}, or different names in them; was it written for another preset or optimizer setup?"
        )
    saved_keys = {k for g in optimizer_state.get("param_groups", []) for k in g}
    our_keys = {k for g in optimizer.param_groups for k in g}
    if saved_keys != our_keys:
        raise LmforgeError(
            f"the checkpoint's optimizer is not this run's ({type(optimizer).__name__}): resume with the --optimizer and "
            "--optimizer-states the checkpoint was written with (fp32 moments in memory are torch's fused AdamW, paged ones "
            "lmforge's; 8-bit moments move freely between memory and paged)"
        )
    params = dict(inner.named_parameters())
    for name, entry in optimizer_state.get("state", {}).items():
        expected = _state_shapes(optimizer, params[name]) if name in params else {}
        if set(entry) - {"step"} != set(expected):
            raise LmforgeError(
                f"the checkpoint's optimizer state of {name} holds {sorted(set(entry) - {'step'})}, this run's optimizer keeps "
                f"{sorted(expected)}: resume with the --optimizer and --optimizer-states the checkpoint was written with"
            )
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != expected.get(key):
                raise LmforgeError(f"the checkpoint's optimizer state {name}/{key} has shape {tuple(value.shape)}, expected "
                                   f"{expected.get(key)} for the parameter of shape {shapes.get(name)}")


def _state_shapes(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """What `optimizer` keeps per parameter besides its step: its own account (`state_shapes`), or AdamW's two moments."""
    if hasattr(optimizer, "state_shapes"):
        return optimizer.state_shapes(p)
    return {"exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}


def _copy_structure(obj):
    """New dicts, lists and tensors: set_state_dict rewrites keys in place, and
    `Optimizer.load_state_dict` keeps tensors that already have the right dtype and
    device as they are, so AdamW would then update the caller's tensors in place."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _copy_structure(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy_structure(v) for v in obj]
    return obj


__all__ = [
    "STRATEGIES",
    "DistInfo",
    "all_reduce_mean",
    "barrier",
    "full_state",
    "init_distributed",
    "load_full_state",
    "no_sync",
    "shutdown",
    "unwrap",
    "wrap_model",
]
