"""Where to run: chosen at run time, never hard-coded."""

from __future__ import annotations

import torch

from lmforge.errors import LmforgeError


def pick_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA when present, then Apple's MPS, else the CPU; any torch device name is accepted."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise LmforgeError(f"--device {name!r} is not a device name (try auto, cpu, cuda, cuda:1, mps): {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmforgeError("--device cuda was asked for but no CUDA device is available; use --device auto or cpu")
    return device


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can still get on `device`: free CUDA memory, or the memory
    Linux reports available (MemAvailable: free plus reclaimable caches); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
