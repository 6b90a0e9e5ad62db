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


def test_freed_memory_is_kept_in_the_heap_on_glibc():
    """train sets glibc's mmap/trim thresholds (no page faults per step); elsewhere it is a no-op."""
    import platform
    import sys

    from llmcli.device import keep_freed_memory

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc
