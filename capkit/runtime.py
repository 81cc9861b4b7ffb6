"""
The machine a run uses: choosing the device (cuda > mps > cpu), torch.compile for the training step, and the
library versions a run records in its metadata.

    from capkit.runtime import pick_device
    device = pick_device("auto")

Imports nothing of capkit's but errors.py.
"""
from __future__ import annotations

import importlib.metadata
import platform

import torch
import torch._dynamo

from capkit.errors import ConfigError


def pick_device(name: str) -> torch.device:
    """"auto" -> cuda > mps > cpu; any other name must be a device this machine has (ConfigError otherwise)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device name: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: no CUDA GPU is visible here; use device='cpu' (or 'auto')")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not _mps_available():
        raise ConfigError(f"device {name!r}: Apple's MPS backend is not available here; use 'cpu' or 'auto'")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    return device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


COMPILE_PAD_MULTIPLE = 8  # compile=True: caption lengths rounded up to a multiple of this (a few static shapes)


def compile_step(module, device):
    """torch.compile for the training step: static shapes (the collate pads captions to a multiple of
    COMPILE_PAD_MULTIPLE) and, on CUDA, CUDA graphs ("reduce-overhead"), since the frozen decoder's step
    is launch-bound. Measured on an H100 with torch 2.11 (docs/performance.md): dynamic=True did not finish
    compiling the 0.6B decoder's step in 170 s (and hit an inductor assertion in another run); static
    shapes compiled in 65-90 s per shape and ran a batch-64 step in 31 ms, 17 ms with CUDA graphs (eager: 112 ms).
    Each new (batch size, padded length) compiles once, so the recompile limit is raised above dynamo's 8."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(module, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else None)


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "open_clip_torch", "transformers", "tokenizers", "rouge_score"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
