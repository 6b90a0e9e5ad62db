"""Task losses. Rows with label -1 (unlabeled) are left out; a batch with none gives a zero loss.

Builders take `n_classes` and, optionally, `class_counts` (training labels per class), which the
`class_weights: balanced` option needs; without counts the weights are uniform.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from llmcli.contracts import TaskLoss

if TYPE_CHECKING:
    from llmcli.config import CrossEntropyLoss, MSELoss

PerRow = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (N, C) logits, (N,) labels -> (N,) losses


def balanced_weights(class_counts: npt.ArrayLike, n_classes: int) -> torch.Tensor:
    """w_c = n / (k * n_c), k = classes present (scikit-learn's `balanced`); a class absent from training gets 0."""
    counts = torch.as_tensor(np.asarray(class_counts, dtype=np.float64), dtype=torch.float32)
    if counts.numel() != n_classes:
        raise ValueError(f"class_counts has {counts.numel()} entries for {n_classes} classes")
    w = counts.sum() / ((counts > 0).sum().clamp(min=1) * counts.clamp(min=1))
    return torch.where(counts > 0, w, torch.zeros_like(w))


def class_counts(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Labeled records per class (label -1 ignored)."""
    lab = np.asarray(labels)
    return np.bincount(lab[lab >= 0], minlength=n_classes)


def _masked(per_row: PerRow, cfg: CrossEntropyLoss | MSELoss, n_classes: int,
            counts: npt.ArrayLike | None) -> TaskLoss:
    """Wrap a per-row loss (N,) into a masked, optionally class-weighted mean over labeled rows."""
    weights = balanced_weights(counts, n_classes) if cfg.class_weights == "balanced" and counts is not None else None

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # (B, C), (B,)
        lab = labels >= 0
        if not bool(lab.any()):
            return logits.sum() * 0.0  # keeps the graph; contributes nothing
        y = labels[lab]  # (N,)
        rows = per_row(logits[lab].float(), y)  # (N,)
        if weights is None:
            return rows.mean()
        w = weights.to(rows.device)[y]  # (N,)
        return (rows * w).sum() / w.sum().clamp(min=1e-12)

    return loss


def build_cross_entropy(cfg: CrossEntropyLoss, *, n_classes: int, class_counts: npt.ArrayLike | None = None) -> TaskLoss:
    """Masked cross-entropy with optional label smoothing and balanced class weights."""
    return _masked(lambda z, y: F.cross_entropy(z, y, reduction="none", label_smoothing=cfg.label_smoothing),
                   cfg, n_classes, class_counts)


def build_mse(cfg: MSELoss, *, n_classes: int, class_counts: npt.ArrayLike | None = None) -> TaskLoss:
    """Masked Brier score: sum over classes of (softmax - one-hot)^2, per row."""

    def brier(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # (N, C), (N,) -> (N,)
        return ((z.softmax(-1) - F.one_hot(y, z.shape[-1]).float()) ** 2).sum(-1)

    return _masked(brier, cfg, n_classes, class_counts)
