"""Where a run computes: `train.device` resolved to cpu/cuda, and the mixed precision that goes with it."""

from __future__ import annotations

import contextlib
from typing import Any

from llmcli.errors import UserError


def resolve_device(train_cfg: Any) -> str:
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
