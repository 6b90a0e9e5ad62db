"""Where a run computes: `train.device` resolved to cpu/cuda, and the mixed precision that goes with it."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from typing import TYPE_CHECKING, Any

from llmcli.errors import UserError

if TYPE_CHECKING:
    from llmcli.config import TrainConfig


def resolve_device(train_cfg: TrainConfig) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; an explicit 'cuda' without one is a user error."""
    import torch

    want = train_cfg.device
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: 'cuda' requested but no CUDA device is available (use cpu or auto)")
    return want


def autocast(device: str) -> Any:
    """bf16 autocast on CUDA (matmuls in bf16, reductions and the loss in fp32); fp32 on CPU, unchanged."""
    import torch

    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def keep_freed_memory() -> bool:
    """glibc: serve blocks up to 32 MiB from the heap and keep freed memory, instead of mmap/munmap each time.

    By default glibc gives every freed block above its mmap threshold (128 KiB, adapting) back to the OS, so a
    training step page-faults its activations in afresh, zero-filled by the kernel: 7.5 % of a CPU step at the
    throughput-bench shape (bench/train_throughput.py, A/B in docs/performance.md). This is what the
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ variables do, set from inside the process; the cost is that
    the process keeps its peak heap until it exits. Returns whether it applied (False off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: libc's, without a find_library subprocess
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h> constants
    return bool(mallopt(m_mmap_threshold, 32 * 2**20)) and bool(mallopt(m_trim_threshold, 2**30))
