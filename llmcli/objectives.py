"""Objectives: turn the LM loss L and task loss T into one update (populate .grad)."""

from __future__ import annotations

from typing import Any

import torch


def grad_cosine(lm_loss: torch.Tensor, task_loss: torch.Tensor, shared: list[torch.nn.Parameter]) -> float:
    """Cosine between the gradients of L and T on the shared weights (the conflict measure)."""
    g_l = torch.autograd.grad(lm_loss, shared, retain_graph=True, allow_unused=True)
    g_t = torch.autograd.grad(task_loss, shared, retain_graph=True, allow_unused=True)
    flat_l = torch.cat([g.flatten() if g is not None else torch.zeros(p.numel()) for g, p in zip(g_l, shared)])
    flat_t = torch.cat([g.flatten() if g is not None else torch.zeros(p.numel()) for g, p in zip(g_t, shared)])
    denom = flat_l.norm() * flat_t.norm()
    return float(flat_l @ flat_t / denom) if denom > 0 else 0.0


class Weighted:
    """L' = alpha * L + (1 - alpha) * T."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def backward(self, lm_loss: torch.Tensor, task_loss: torch.Tensor, shared: list, step: int) -> dict[str, float]:
        """Backpropagate the combined loss; every log_grad_every steps also measure grad_cosine."""
        logs: dict[str, float] = {}
        every = self.cfg.log_grad_every
        if every and step % every == 0:
            logs["grad_cosine"] = grad_cosine(lm_loss, task_loss, shared)
        loss = self.cfg.alpha * lm_loss + (1 - self.cfg.alpha) * task_loss
        loss.backward()
        logs["loss"] = float(loss.detach())
        return logs

    def score(self, lm_loss: float, task_loss: float) -> float:
        """The objective's value on held-out losses: lower is better (used to keep `best`)."""
        return self.cfg.alpha * lm_loss + (1 - self.cfg.alpha) * task_loss

    def state_dict(self) -> dict[str, Any]:
        """Objective state to checkpoint (none for a fixed weighting)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore objective state."""


def build_weighted(cfg: Any) -> Weighted:
    """The weighted objective."""
    return Weighted(cfg)
