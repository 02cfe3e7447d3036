"""The engine's KV cache: every layer's keys and values for a batch of left-padded rows."""

from __future__ import annotations

import torch

from lmforge.config import Config


class KVCache:
    """Keys and values of every layer for B sequences, preallocated to `max_len` slots.

    k, v: (n_layer, B, nkv, max_len, hd). `length` slots are filled, the same number in
    every row (left padding aligns the rows); `pad[b]` leading slots of row b are padding.
    """

    def __init__(self, config: Config, pad: torch.Tensor, max_len: int, dtype: torch.dtype) -> None:
        shape = (config.n_layer, len(pad), config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=pad.device)
        self.v = torch.zeros(shape, dtype=dtype, device=pad.device)
        # each layer's keys and values over all max_len slots (B, nkv, max_len, hd): views made once,
        # which `update` and the compiled step write in place
        self.keys = [self.k[i] for i in range(config.n_layer)]
        self.values = [self.v[i] for i in range(config.n_layer)]
        self.pad = pad
        self.max_len = max_len
        self.length = 0
        self._last_layer = config.n_layer - 1

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, nkv, T, hd); return all filled slots (B, nkv, S, hd)."""
        start, end = self.length, self.length + k.size(2)
        keys, values = self.keys[layer], self.values[layer]
        keys.narrow(2, start, end - start).copy_(k)
        values.narrow(2, start, end - start).copy_(v)
        if layer == self._last_layer:
            self.length = end
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def positions(self, T: int) -> torch.Tensor:
        """Each row's positions for the next T tokens (B, T): slot index minus its padding."""
        slots = torch.arange(self.length, self.length + T, device=self.pad.device)
        return (slots[None] - self.pad[:, None]).clamp(min=0)

    def visible(self, T: int) -> torch.Tensor | None:
        """Which slots the next T tokens may see (B, 1, T, S), or None when plain causal suffices."""
        padded = bool(self.pad.any())
        if not padded and (self.length == 0 or T == 1):
            return None  # causal from slot 0, or one token that sees every filled slot
        S = self.length + T
        query = torch.arange(self.length, S, device=self.pad.device)[:, None]  # (T, 1)
        key = torch.arange(S, device=self.pad.device)[None]  # (1, S)
        allowed = (key <= query)[None] & (key >= self.pad[:, None, None])  # (B, T, S)
        allowed |= key == query  # a padding slot sees itself, so no row is all -inf (NaN)
        return allowed[:, None]
