"""Focal loss (Lin et al. 2017) as a task loss: -(1 - p_y)^gamma * log p_y, down-weighting easy rows.

The worked example of docs/extending.md: a config class, a builder, and the `register` function that the
`llmcli.plugins` entry point names.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from llmcli.config import Strict


class FocalLoss(Strict):
    """Focal loss; gamma = 0 is plain cross-entropy."""

    name: Literal["focal"] = "focal"
    gamma: float = Field(2.0, ge=0.0, description="focusing strength: larger puts less weight on well-classified rows")


def focal_loss(logits: Any, labels: Any, gamma: float) -> Any:
    """Per-row focal loss: (N, C) logits, (N,) labels -> (N,)."""
    logp = logits.log_softmax(-1).gather(1, labels[:, None]).squeeze(1)  # (N,) log p_y
    return -((1 - logp.exp()) ** gamma) * logp


def build_focal(cfg: FocalLoss, *, n_classes: int, class_counts: Any = None) -> Any:
    """The task-loss contract: loss(logits (B, C), labels (B,)) -> scalar mean over the rows with a label (>= 0)."""

    def loss(logits: Any, labels: Any) -> Any:
        labeled = labels >= 0
        if not bool(labeled.any()):
            return logits.sum() * 0.0  # keeps the graph; contributes nothing
        return focal_loss(logits[labeled].float(), labels[labeled], cfg.gamma).mean()

    return loss


def register(registries: dict) -> None:
    """The `llmcli.plugins` entry point: add the focal task loss."""
    registries["task_loss"].register("focal", FocalLoss, "tests.plugin_pkg.focal:build_focal")
