"""Task losses. Rows with label -1 (unlabeled) are left out; a batch with none gives a zero loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def build_cross_entropy(cfg: Any, *, n_classes: int) -> Any:
    """Masked cross-entropy with optional label smoothing."""

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # (B, C), (B,)
        if not bool((labels >= 0).any()):
            return logits.sum() * 0.0  # keeps the graph; contributes nothing
        return F.cross_entropy(logits.float(), labels, ignore_index=-1, label_smoothing=cfg.label_smoothing)

    return loss
