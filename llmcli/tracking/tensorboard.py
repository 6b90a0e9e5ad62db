"""The TensorBoard tracker: event files in RUN/tb/ (torch.utils.tensorboard), so `tensorboard --logdir runs` shows
every run under the runs folder on one page."""

from __future__ import annotations

from typing import Any

from llmcli.tracking.base import Tracker


class TensorBoardTracker(Tracker):
    """Scalars per metrics.jsonl record at its step; the resolved config as a text summary."""

    name = "tensorboard"

    def start(self, config: dict[str, Any], resumed_at: int | None) -> int:
        """A SummaryWriter on RUN/tb/; resuming, the events after the checkpoint's step are purged (purge_step)."""
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        folder = self.run_dir / "tb"
        had = any(folder.glob("events.out.tfevents.*"))
        # readers hide every event at or after purge_step that an earlier attempt wrote past its checkpoint: the
        # resumed run writes those steps again, exactly (metrics.jsonl was cut back to the checkpoint the same way)
        purge = resumed_at + 1 if resumed_at is not None and had else None
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge)
        if not had:
            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
        return resumed_at if purge is not None else -1

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        """One scalar per tag (TensorBoard keeps float32), flushed at once so a live board and a crash see it."""
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()

    def close(self, status: str) -> None:
        """Flush and close the event file."""
        self.writer.close()

