"""train.device resolution and the precision that goes with it."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

from llmcli.config import validate_config
from llmcli.device import autocast, resolve_device
from llmcli.errors import UserError


def _train(device: str):
    return validate_config({"train": {"device": device}}).train


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_auto_falls_back_to_cpu_and_cuda_without_a_gpu_is_a_user_error():
    assert resolve_device(_train("auto")) == "cpu"
    assert resolve_device(_train("cpu")) == "cpu"
    with pytest.raises(UserError, match="train.device"):
        resolve_device(_train("cuda"))


def test_cpu_runs_without_autocast_and_cuda_under_bf16():
    assert isinstance(autocast("cpu"), contextlib.nullcontext)
    with warnings.catch_warnings():  # without a GPU torch warns that it will not autocast; the choice is checked
        warnings.simplefilter("ignore")
        ctx = autocast("cuda")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16


def test_training_keeps_freed_memory_in_the_heap_on_glibc(tiny, tmp_path, monkeypatch):
    """train sets glibc's mmap/trim thresholds (no page faults per step); elsewhere the call is a no-op."""
    import platform
    import sys

    import llmcli.device
    from llmcli.training.engine import train

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert llmcli.device.keep_freed_memory() is glibc  # mallopt accepted both thresholds
    calls = []
    real = llmcli.device.keep_freed_memory
    monkeypatch.setattr(llmcli.device, "keep_freed_memory", lambda: calls.append(1) or real())
    train(tiny("train.steps=1", "train.eval_every=1"), runs_dir=tmp_path, progress=False, log=lambda m: None)
    assert calls == [1]
