"""One dataclass describes every model lmforge builds, with named presets.

The GPT-2 family (LayerNorm, GELU, learned positions, tied embeddings, biases) and the
Llama family (RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases) are the same
decoder with different switches. The config travels as `config.json` beside the
weights; nothing about a model is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.fields import check_fields
from lmforge.io import atomic_write_text

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu_tanh", "gelu", "swiglu")  # gelu_tanh is GPT-2's "gelu_new"
POSITIONS = ("learned", "rope")
ATTENTIONS = ("sdpa", "reference")
POSITIVE = ("vocab_size", "context_length", "n_layer", "n_head", "n_embd")
DERIVED_WHEN_ZERO = ("n_kv_head", "head_dim", "mlp_hidden")  # 0: from n_head / n_embd


@dataclass
class Config:
    name: str = "custom"
    vocab_size: int = 50257
    context_length: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0  # 0: same as n_head (multi-head); 1: multi-query; else grouped-query
    n_embd: int = 768
    head_dim: int = 0  # 0: n_embd // n_head
    mlp: str = "gelu_tanh"
    mlp_hidden: int = 0  # 0: 4 * n_embd
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    positions: str = "learned"
    rope_theta: float = 10000.0
    # Llama 3 frequency scaling: {"factor", "low_freq_factor", "high_freq_factor", "original_context_length"}
    rope_scaling: dict[str, float] | None = None
    bias: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = True
    attention: str = "sdpa"  # the fused kernel; "reference" is the readable softmax(QK^T/sqrt(d)) path
    init_std: float = 0.02
    # a classification head (`GPT.score`) beside the LM head, one output per label; none when empty
    labels: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self._check_sizes()  # before anything is derived from them
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.n_head and not self.head_dim:
            if self.n_embd % self.n_head:
                raise LmforgeError(
                    f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                    f"choose n_head among {_divisors(self.n_embd)} or set head_dim explicitly"
                )
            self.head_dim = self.n_embd // self.n_head
        self.mlp_hidden = self.mlp_hidden or 4 * self.n_embd
        self.validate()

    def _check_sizes(self) -> None:
        """Sizes are positive; those where 0 means "derive it" are not negative; the
        numbers are finite and in range."""
        for name in POSITIVE:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise LmforgeError(f"{name} must be a positive integer, got {value!r}")
        for name in DERIVED_WHEN_ZERO:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise LmforgeError(f"{name} must be a positive integer (or 0: derived from the other sizes), got {value!r}")
        if self.n_kv_head > self.n_head:
            raise LmforgeError(
                f"n_kv_head={self.n_kv_head} is more than n_head={self.n_head}: each key/value head serves a group of "
                f"query heads; choose n_kv_head among {_divisors(self.n_head)} (or 0: as many as n_head)"
            )
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value < math.inf:
                raise LmforgeError(f"{name} must be a positive number, got {value!r}")
        if not _is_number(self.init_std) or not 0 <= self.init_std < math.inf:
            raise LmforgeError(f"init_std must be a number >= 0, got {self.init_std!r}")
        if self.rope_scaling is not None:
            bad = {k: v for k, v in self.rope_scaling.items() if not _is_number(v) or not 0 < v < math.inf}
            if bad:
                raise LmforgeError(f"rope_scaling values must be positive numbers, got {bad}")

    def validate(self) -> None:
        """Reject combinations that cannot build, saying how to fix them."""
        self._check_sizes()
        for name, value, allowed in (
            ("norm", self.norm, NORMS),
            ("mlp", self.mlp, MLPS),
            ("positions", self.positions, POSITIONS),
            ("attention", self.attention, ATTENTIONS),
        ):
            if value not in allowed:
                raise LmforgeError(f"{name}={value!r} is not one of {', '.join(allowed)}")
        for name in DERIVED_WHEN_ZERO:  # derived by now: positive
            if getattr(self, name) <= 0:
                raise LmforgeError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_head % self.n_kv_head:
            raise LmforgeError(
                f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}: each key/value head "
                f"serves a whole group of query heads; choose n_kv_head among {_divisors(self.n_head)}"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise LmforgeError(f"RoPE rotates pairs of dimensions: head_dim={self.head_dim} must be even")
        if self.rope_scaling is not None:
            missing = {"factor", "low_freq_factor", "high_freq_factor", "original_context_length"} - set(self.rope_scaling)
            if missing:
                raise LmforgeError(f"rope_scaling needs {sorted(missing)} (Llama 3 style frequency scaling)")
        if not 0.0 <= self.dropout < 1.0:
            raise LmforgeError(f"dropout must be in [0, 1), got {self.dropout}")
        if len(set(self.labels)) != len(self.labels) or not all(isinstance(x, str) and x for x in self.labels):
            raise LmforgeError(f"labels must be distinct non-empty names, got {self.labels}")

    # --- presets and overrides ---------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        """A named preset, with any field overridden: `Config.from_name("gpt2", n_layer=2)`."""
        if name not in PRESETS:
            raise LmforgeError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], "name": name, **overrides})

    def replace(self, **changes: Any) -> Config:
        """A copy with `changes`; sizes that were derived (kv heads, head_dim, MLP width)
        are derived again from the new values unless given."""
        d = self.to_dict()
        derived = {"n_kv_head": self.n_head, "head_dim": self.n_embd // self.n_head, "mlp_hidden": 4 * self.n_embd}
        for name, value in derived.items():
            if name not in changes and d[name] == value:
                d[name] = 0
        return Config.from_dict({**d, **changes})

    # --- JSON --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> Config:
        """A config from its JSON fields, each checked for its type; `source` (a file)
        is named in any error, a value that does not fit included."""
        values = check_fields(cls, d, source or "model config", key="config field")
        try:
            return cls(**values)
        except LmforgeError as e:
            if source is None:
                raise
            raise LmforgeError(f"{source}: {e}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write `config.json` into the folder `path`."""
        file = Path(path) / "config.json"
        atomic_write_text(file, json.dumps(self.to_dict(), indent=2) + "\n")
        return file

    @classmethod
    def load(cls, path: str | os.PathLike) -> Config:
        """`config.json` of a model folder (or that file itself), every field checked."""
        if path is None or str(path) == "":
            raise LmforgeError("no model config given: name a model folder or its config.json")
        p = Path(path)
        file = p / "config.json" if p.is_dir() else p
        if file.exists() and not file.is_file():  # a FIFO or a device would block or never end
            raise LmforgeError(f"{file} is not a regular file; name a model folder or its config.json")
        try:
            d = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LmforgeError(f"no config.json at {p}") from None
        except OSError as e:
            raise LmforgeError(f"cannot read {file}: {e.strerror or e}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LmforgeError(f"{file} is truncated or not JSON ({e})") from None
        return cls.from_dict(d, source=str(file))


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


_GPT2 = dict(vocab_size=50257, context_length=1024, norm="layernorm", mlp="gelu_tanh", positions="learned", bias=True, tie_embeddings=True)
_LLAMA = dict(norm="rmsnorm", mlp="swiglu", positions="rope", bias=False, tie_embeddings=False)

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600),
    "llama-3.2-1b": dict(
        _LLAMA,
        vocab_size=128256,
        context_length=131072,
        n_layer=16,
        n_head=32,
        n_kv_head=8,
        n_embd=2048,
        head_dim=64,
        mlp_hidden=8192,
        rope_theta=500000.0,
        rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 8192},
        tie_embeddings=True,
    ),
    # Small CPU presets. `small` is the GPT-2-family shape the training benchmarks use.
    "small": dict(_GPT2, context_length=256, n_layer=6, n_head=6, n_embd=384),
    "micro": dict(_LLAMA, vocab_size=8192, context_length=512, n_layer=6, n_head=6, n_kv_head=2, n_embd=384, mlp_hidden=768, tie_embeddings=True),
    "nano": dict(_LLAMA, vocab_size=4096, context_length=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, mlp_hidden=256, tie_embeddings=True),
    # the best shape for minutes of CPU training: both sweeps found it (benchmarks/bench_shakespeare.py, bench_quickstart.py)
    "tiny": dict(_LLAMA, vocab_size=2048, context_length=128, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, mlp_hidden=384, tie_embeddings=True),
}
