"""The weighted objective and the conflict measure."""

from __future__ import annotations

import pytest
import torch

from llmcli.config import WeightedObjective
from llmcli.objectives import Weighted, grad_cosine


def test_grad_cosine_of_aligned_opposed_and_orthogonal_gradients():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    assert grad_cosine(w @ torch.tensor([1.0, 0.0]), w @ torch.tensor([2.0, 0.0]), [w]) == pytest.approx(1.0)
    assert grad_cosine(w @ torch.tensor([1.0, 1.0]), -(w @ torch.tensor([1.0, 1.0])), [w]) == pytest.approx(-1.0)
    assert grad_cosine(w @ torch.tensor([1.0, 0.0]), w @ torch.tensor([0.0, 3.0]), [w]) == pytest.approx(0.0)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_weighted_gradient_is_the_alpha_mix(alpha):
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    lm, task = (w**2).sum(), (3 * w).sum()
    logs = Weighted(WeightedObjective(alpha=alpha, log_grad_every=1)).backward(lm, task, [w], step=0)
    expected = alpha * 2 * w.detach() + (1 - alpha) * torch.tensor([3.0, 3.0])
    assert torch.allclose(w.grad, expected)
    assert "grad_cosine" in logs and logs["loss"] == pytest.approx(alpha * 5 + (1 - alpha) * -3)


def test_grad_cosine_is_logged_only_on_its_schedule():
    obj = Weighted(WeightedObjective(alpha=0.5, log_grad_every=10))
    w = torch.nn.Parameter(torch.ones(2))
    assert "grad_cosine" not in obj.backward(w.sum(), w.sum(), [w], step=3)
    assert "grad_cosine" in obj.backward(w.sum(), w.sum(), [w], step=20)
