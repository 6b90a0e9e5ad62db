"""What a training run tells the person watching it: a bar on a terminal, plain lines elsewhere, and RUN/train.log.

On a terminal (stderr a tty, progress on) a tqdm bar shows the step and the last losses; engine messages are
printed around it (`tqdm.external_write_mode`), never glued onto the bar's line. In a pipe, a file, or with
--no-progress there is no bar: one plain line per train.log_every steps instead (step, losses, speed), so a log
never fills with carriage-return frames. Every line, bar or not, is also appended to RUN/train.log.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmcli.errors import UserError
from llmcli.runs import timestamp

# losses shown in a periodic line, in this order, when the train record has them
SHOWN = ("lm_loss", "task_loss", "loss")


def append_line(path: Path, line: str) -> None:
    """Append one line with a single write() on an O_APPEND descriptor: a reader never sees half a line."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, (line.rstrip("\n") + "\n").encode("utf-8"))
        finally:
            os.close(fd)
    except OSError as exc:
        raise UserError(f"{path}: write failed ({exc.strerror or exc})") from None


def train_line(rec: dict[str, Any], total: int, elapsed: float) -> str:
    """One periodic line from a train record of metrics.jsonl: step, losses, learning rate, speed."""
    losses = " ".join(f"{k}={rec[k]:.4f}" for k in SHOWN if k in rec) or "no finite loss (every batch skipped)"
    return (f"step {rec['step']}/{total}: train {losses} lr={rec['lr']:.3g} | "
            f"{rec.get('tokens_per_s', 0.0):.0f} tok/s, {elapsed:.1f} s elapsed")


class Progress:
    """The run's progress: the bar (terminal and progress on) or plain periodic lines, all copied to train.log."""

    def __init__(self, run_dir: Path, total: int, initial: int, log: Callable[[str], Any], progress: bool) -> None:
        from tqdm import tqdm

        self.log, self.total, self.file = log, total, Path(run_dir) / "train.log"
        self.t0 = time.perf_counter()
        show = progress and sys.stderr.isatty()  # a bar only where \r redraws a line: a terminal
        self.bar = tqdm(total=total, initial=initial, disable=not show, desc="train", unit="step", dynamic_ncols=True)

    def _file(self, msg: str) -> None:
        append_line(self.file, f"{timestamp()} {msg}")

    def note(self, msg: str) -> None:
        """A line for train.log only (how a run ended), best effort: a full disk must not hide the first error."""
        try:
            self._file(msg)
        except UserError:
            pass

    def message(self, msg: str) -> None:
        """An engine message: to the log (the bar cleared first and redrawn after) and to train.log."""
        self._file(msg)
        if self.bar.disable:
            self.log(msg)
            return
        with self.bar.external_write_mode(file=sys.stderr):
            self.log(msg)

    def step(self) -> None:
        """One optimiser step done."""
        self.bar.update(1)

    def train_record(self, rec: dict[str, Any]) -> None:
        """A logging window closed: the bar's postfix on a terminal, else a plain line; train.log either way."""
        line = train_line(rec, self.total, time.perf_counter() - self.t0)
        self._file(line)
        if self.bar.disable:
            self.log(line)
        elif "lm_loss" in rec:
            self.bar.set_postfix(lm=f"{rec['lm_loss']:.3f}", task=f"{rec['task_loss']:.3f}")

    def close(self) -> None:
        """Leave the terminal line clean (the bar's final state stays on screen)."""
        self.bar.close()
