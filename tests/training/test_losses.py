"""Task losses: cross-entropy (smoothing, balanced class weights) and Brier (mse), masked for unlabeled rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmcli.config import CrossEntropyLoss, MSELoss
from llmcli.training.losses import balanced_weights, build_cross_entropy, build_mse, class_counts


def test_balanced_weights_follow_scikit_learn():
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0, 0, 0, 1, 2, 2, -1])
    counts = class_counts(labels, 4)
    assert counts.tolist() == [3, 1, 2, 0]
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=labels[labels >= 0])
    assert np.allclose(balanced_weights(counts, 4).numpy(), [*expected, 0.0])  # an absent class weighs 0


def test_brier_score_known_value_and_masking():
    mse = build_mse(MSELoss(), n_classes=2)
    logits = torch.tensor([[0.0, 0.0], [9.0, 0.0]])
    # row 0: softmax (0.5, 0.5) vs one-hot (1, 0) -> 0.25 + 0.25 = 0.5; row 1 is unlabeled
    assert mse(logits, torch.tensor([0, -1])).item() == pytest.approx(0.5)
    assert mse(logits, torch.tensor([-1, -1])).item() == 0.0


@pytest.mark.parametrize("cfg", [CrossEntropyLoss(class_weights="balanced"), MSELoss(class_weights="balanced")])
def test_balanced_weights_weigh_rows_by_class(cfg):
    build = build_cross_entropy if cfg.name == "cross_entropy" else build_mse
    plain = build(cfg.model_copy(update={"class_weights": "none"}), n_classes=2)
    weighted = build(cfg, n_classes=2, class_counts=[3, 1])  # weights (2/3, 2)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, -1])
    rows = torch.stack([plain(logits[i : i + 1], labels[i : i + 1]) for i in range(2)])
    expected = (rows * torch.tensor([2 / 3, 2.0])).sum() / (2 / 3 + 2.0)
    assert weighted(logits, labels).item() == pytest.approx(expected.item())
    assert plain(logits, labels).item() == pytest.approx(rows.mean().item())


def test_label_smoothing_raises_the_loss_of_a_confident_right_answer():
    logits, labels = torch.tensor([[8.0, 0.0, 0.0]]), torch.tensor([0])
    sharp = build_cross_entropy(CrossEntropyLoss(), n_classes=3)(logits, labels)
    smooth = build_cross_entropy(CrossEntropyLoss(label_smoothing=0.2), n_classes=3)(logits, labels)
    assert smooth > sharp


def test_mse_and_balanced_weights_train_end_to_end(tiny, tmp_path):
    from llmcli.training.engine import train

    run = train(tiny("task_loss={name: mse, class_weights: balanced}"), runs_dir=tmp_path, progress=False,
                log=lambda m: None)
    assert (run / "checkpoints" / "last.safetensors").is_file()
