"""Exception types the command line turns into one line on stderr and an exit code."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator


class UserError(Exception):
    """Bad input: a config, data file, run folder, checkpoint or CLI argument. Printed as one line, exit 2."""


class RunFailed(Exception):
    """A run could not go on (e.g. its loss became NaN): printed as one line, exit 1."""


class Interrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after writing a resumable checkpoint; exit 128 + signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


# What torch and the C allocator say when memory runs out (CPU: "DefaultCPUAllocator: can't allocate memory: you
# tried to allocate N bytes"; CUDA: "CUDA out of memory. Tried to allocate 2.00 GiB"; MPS: "not enough memory").
_OOM_WORDS = ("out of memory", "can't allocate memory", "not enough memory", "failed to allocate")
_ASKED = re.compile(r"(?:tried to allocate|Tried to allocate)\s+([\d.]+\s*(?:[KMGT]i?B|bytes))", re.IGNORECASE)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is memory running out (MemoryError, torch's OutOfMemoryError or an allocator RuntimeError)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in _OOM_WORDS)


def _size(n_bytes: float) -> str:
    """A byte count as a person reads it (1.5 GiB)."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:.0f} {unit}" if unit == "bytes" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    raise AssertionError("unreachable")


def resource_error(exc: BaseException, what: str) -> UserError:
    """One line for an out-of-memory `exc`: `what` (the field/flag and its value) and the size asked for."""
    found = _ASKED.search(str(exc))
    asked = found.group(1) if found else None
    if asked and asked.lower().endswith("bytes"):
        asked = _size(float(asked.split()[0]))
    why = f"out of memory (an allocation of {asked} failed)" if asked else "out of memory"
    return UserError(f"{what}: {why}; make it smaller")


@contextlib.contextmanager
def too_big(what: str) -> Iterator[None]:
    """Turn memory running out inside the block into `resource_error(exc, what)`; other errors pass through."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise resource_error(exc, what) from None
