"""Objectives: turn the LM loss L and task loss T into one update (populate .grad).

Interface (see docs/design.md, docs/objectives.md): `backward(lm_loss, task_loss, shared, step) -> logs`
leaves gradients in `.grad` of every parameter (shared weights and both heads), `score(lm, task)` is the
objective's value on held-out losses (lower is better), `state_dict()/load_state_dict()` are JSON-able,
and `parameters()` lists the objective's own trainable tensors (added to the optimiser by the loop).
Every objective logs `loss` (its own value) and, every `log_grad_every` steps, `grad_cosine`; the loop logs
the raw `lm_loss` and `task_loss` beside them, so runs compare whatever their objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from llmcli import contracts

if TYPE_CHECKING:
    from llmcli.config import (
        ConditionedObjective,
        ConstrainedObjective,
        ObjectiveBase,
        UncertaintyObjective,
        WeightedObjective,
    )

Probe = Callable[[int], dict[str, float]]  # step -> {"acc": ..., "task_loss": ...} on a held-out batch


def _flat(grads: tuple[torch.Tensor | None, ...], shared: list[torch.nn.Parameter]) -> torch.Tensor:
    """One flat vector (P,) from per-parameter gradients; an unused parameter contributes zeros."""
    return torch.cat([g.flatten() if g is not None else p.new_zeros(p.numel()) for g, p in zip(grads, shared)])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two flat vectors; 0 when either is zero."""
    denom = a.norm() * b.norm()
    return float(a @ b / denom) if denom > 0 else 0.0


def grad_cosine(lm_loss: torch.Tensor, task_loss: torch.Tensor, shared: list[torch.nn.Parameter]) -> float:
    """Cosine between the gradients of L and T on the shared weights (the conflict measure)."""
    if not shared:
        return 0.0
    g_l = torch.autograd.grad(lm_loss, shared, retain_graph=True, allow_unused=True)
    g_t = torch.autograd.grad(task_loss, shared, retain_graph=True, allow_unused=True)
    return cosine(_flat(g_l, shared), _flat(g_t, shared))


class Objective(contracts.Objective):
    """Shared plumbing: the config and the grad_cosine schedule (the no-op hooks and empty state come from
    contracts.Objective)."""

    def __init__(self, cfg: ObjectiveBase) -> None:
        self.cfg = cfg

    def due(self, step: int) -> bool:
        """Whether grad_cosine is measured at this step."""
        every = self.cfg.log_grad_every
        return bool(every) and step % every == 0


class Weighted(Objective):
    """L' = alpha * L + (1 - alpha) * T."""

    def __init__(self, cfg: WeightedObjective | ConditionedObjective) -> None:
        super().__init__(cfg)
        self.alpha = cfg.alpha  # the training alpha: fixed here, drawn per batch by Conditioned

    def grads_needed(self, step: int) -> tuple[bool, bool]:
        """At alpha 0 L has no weight, at alpha 1 T has none: no graph for it, but on grad_cosine's steps."""
        if self.due(step):
            return True, True
        return self.alpha != 0, self.alpha != 1

    def backward(self, lm_loss: torch.Tensor, task_loss: torch.Tensor, shared: list, step: int) -> dict[str, float]:
        """Backpropagate the combined loss; every log_grad_every steps also measure grad_cosine."""
        logs: dict[str, float] = {}
        if self.due(step):
            logs["grad_cosine"] = grad_cosine(lm_loss, task_loss, shared)
        loss = self.alpha * lm_loss + (1 - self.alpha) * task_loss
        loss.backward()
        logs["loss"] = float(loss.detach())
        return logs

    def score(self, lm_loss: float, task_loss: float) -> float:
        """The objective's value on held-out losses at the config's alpha: lower is better (used to keep `best`)."""
        return self.cfg.alpha * lm_loss + (1 - self.cfg.alpha) * task_loss


class Conditioned(Weighted):
    """Weighted objective whose alpha is drawn per batch (Beta(a, b) on [alpha_min, alpha_max]) and fed to the model
    through FiLM layers (llmcli/models/film.py), so one run covers the trade-off ("You Only Train Once").

    `score` stays Weighted's: held-out losses at the config's (evaluation) alpha.
    """

    def wrap_model(self, model: torch.nn.Module) -> None:
        """Give the model its FiLM layers (before the optimiser is built, so they are trained)."""
        from llmcli.models.film import attach_film

        attach_film(model, self.cfg.film_hidden)

    def prepare(self, model: torch.nn.Module, step: int | None) -> None:
        """Draw this step's alpha (torch's seeded RNG: exact resume holds); step None = evaluation alpha."""
        from llmcli.models.film import set_alpha

        if step is None:
            self.alpha = self.cfg.alpha
        else:
            lo, hi = self.cfg.alpha_min, self.cfg.alpha_max
            self.alpha = lo + (hi - lo) * self._unit_draw()
        set_alpha(model, self.alpha)

    def _unit_draw(self) -> float:
        """One draw in [0, 1] from Beta(a, b), through torch's seeded generator (uniform when a = b = 1)."""
        a, b = self.cfg.alpha_beta
        if a == b == 1.0:
            return float(torch.rand(()))
        return float(torch.distributions.Beta(torch.tensor(a), torch.tensor(b)).sample())

    def backward(self, lm_loss: torch.Tensor, task_loss: torch.Tensor, shared: list, step: int) -> dict[str, float]:
        """alpha * L + (1 - alpha) * T with this batch's alpha, which is logged first."""
        return {"alpha": self.alpha, **super().backward(lm_loss, task_loss, shared, step)}


class Constrained(Objective):
    """min L  s.t.  T <= epsilon  (or held-out acc >= beta), by Lagrangian dual ascent on one multiplier.

    Primal: L + lambda * g, with g = T - epsilon, or g = beta - exp(-T) for the accuracy bound (exp(-T), the
    geometric mean of the true-class probability, is a differentiable lower proxy of accuracy). Dual:
    lambda <- max(0, lambda + dual_lr * violation), where the violation is T - epsilon on the batch, or
    beta - acc with acc the true accuracy on a held-out batch (the proxy-constraint scheme of Cotter et al. 2019).
    """

    def __init__(self, cfg: ConstrainedObjective) -> None:
        super().__init__(cfg)
        self.lam = float(cfg.lambda_init)
        self.probe: Probe | None = None

    def set_probe(self, probe: Probe) -> None:
        """Give the objective a held-out measurement (needed for the `beta` bound)."""
        self.probe = probe

    def backward(self, lm_loss: torch.Tensor, task_loss: torch.Tensor, shared: list, step: int) -> dict[str, float]:
        """Step the primal Lagrangian at the current lambda, then take one projected dual-ascent step."""
        logs: dict[str, float] = {}
        if self.due(step):
            logs["grad_cosine"] = grad_cosine(lm_loss, task_loss, shared)
        eps, beta = self.cfg.epsilon, self.cfg.beta
        g = task_loss - eps if eps is not None else beta - torch.exp(-task_loss)
        loss = lm_loss + self.lam * g
        loss.backward()
        if eps is not None:
            value, violation = float(task_loss.detach()), float(task_loss.detach()) - eps
        else:
            if self.probe is None:
                raise RuntimeError("constrained objective with beta needs a held-out probe (set_probe)")
            value = float(self.probe(step)["acc"])
            violation = beta - value
        logs.update({"loss": float(loss.detach()), "lambda": self.lam, "constraint": value, "violation": violation})
        self.lam = max(0.0, self.lam + self.cfg.dual_lr * violation)
        return logs

    def score(self, lm_loss: float, task_loss: float) -> float:
        """L plus the current multiplier times the (proxy) violation when positive."""
        eps, beta = self.cfg.epsilon, self.cfg.beta
        g = task_loss - eps if eps is not None else beta - math.exp(-task_loss)
        return lm_loss + self.lam * max(0.0, g)

    def state_dict(self) -> dict[str, Any]:
        """The multiplier."""
        return {"lambda": self.lam}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the multiplier."""
        self.lam = float(state.get("lambda", self.cfg.lambda_init))


class _GradientMethod(Objective):
    """Methods that combine the two gradients on the shared weights; each head keeps its own task's gradient."""

    def combine(self, g_lm: torch.Tensor, g_task: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The update direction (P,) on the shared weights, and extra logs."""
        raise NotImplementedError

    def backward(self, lm_loss: torch.Tensor, task_loss: torch.Tensor, shared: list, step: int) -> dict[str, float]:
        """Two backward passes (heads accumulate), then the shared .grad is replaced by the combined direction."""
        before = [p.grad for p in shared]  # earlier micro-batches of a gradient-accumulation step
        grads = []
        for i, loss in enumerate((lm_loss, task_loss)):
            for p in shared:
                p.grad = None
            loss.backward(retain_graph=i == 0)
            grads.append(_flat(tuple(p.grad for p in shared), shared) if shared else lm_loss.new_zeros(0))
        g_lm, g_task = grads
        direction, logs = self.combine(g_lm, g_task)
        offset = 0
        for p, prev in zip(shared, before):
            n = p.numel()
            d = direction[offset : offset + n].view_as(p)
            p.grad = d.clone() if prev is None else prev + d
            offset += n
        if self.due(step):
            logs["grad_cosine"] = cosine(g_lm, g_task)
        logs["loss"] = float(lm_loss.detach() + task_loss.detach())
        return logs

    def score(self, lm_loss: float, task_loss: float) -> float:
        """Both tasks count equally."""
        return lm_loss + task_loss


def pcgrad_direction(g1: torch.Tensor, g2: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """PCGrad (Yu et al. 2020) for two tasks: on conflict, project each onto the normal plane of the other; sum."""
    dot = g1 @ g2
    if dot >= 0:
        return g1 + g2, False
    p1 = g1 - dot / (g2 @ g2).clamp(min=1e-20) * g2
    p2 = g2 - dot / (g1 @ g1).clamp(min=1e-20) * g1
    return p1 + p2, True


class PCGrad(_GradientMethod):
    """Projecting conflicting gradients."""

    def combine(self, g_lm: torch.Tensor, g_task: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Projected sum; logs whether the gradients conflicted."""
        d, conflict = pcgrad_direction(g_lm, g_task)
        return d, {"conflict": float(conflict)}


def mgda_weight(g1: torch.Tensor, g2: torch.Tensor) -> float:
    """gamma in [0, 1] minimising |gamma g1 + (1 - gamma) g2|^2 (Sener & Koltun 2018, two-task closed form)."""
    diff = g1 - g2
    denom = float(diff @ diff)
    if denom == 0.0:
        return 0.5
    return min(1.0, max(0.0, float((g2 - g1) @ g2) / denom))


class MGDA(_GradientMethod):
    """Min-norm convex combination of the two gradients on the shared weights."""

    def combine(self, g_lm: torch.Tensor, g_task: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """gamma g_lm + (1 - gamma) g_task; logs gamma as `weight_lm`."""
        gamma = mgda_weight(g_lm, g_task)
        return gamma * g_lm + (1 - gamma) * g_task, {"weight_lm": gamma}


class Uncertainty(Objective):
    """Kendall et al. 2018: sum_i exp(-s_i) L_i + s_i / 2 with learned log-variances s = (s_lm, s_task)."""

    def __init__(self, cfg: UncertaintyObjective) -> None:
        super().__init__(cfg)
        self.log_vars = torch.nn.Parameter(torch.tensor([cfg.init_log_var_lm, cfg.init_log_var_task]))

    def parameters(self) -> list[torch.nn.Parameter]:
        """The two log-variances (trained by the run's optimiser, never weight-decayed)."""
        return [self.log_vars]

    def _value(self, lm: Any, task: Any, s: Any) -> Any:
        return torch.exp(-s[0]) * lm + torch.exp(-s[1]) * task + 0.5 * (s[0] + s[1])

    def backward(self, lm_loss: torch.Tensor, task_loss: torch.Tensor, shared: list, step: int) -> dict[str, float]:
        """Backpropagate the uncertainty-weighted sum (its log-variances get gradients too)."""
        logs: dict[str, float] = {}
        if self.due(step):
            logs["grad_cosine"] = grad_cosine(lm_loss, task_loss, shared)
        loss = self._value(lm_loss, task_loss, self.log_vars)
        loss.backward()
        s = self.log_vars.detach().cpu().tolist()
        logs.update({"loss": float(loss.detach()), "log_var_lm": s[0], "log_var_task": s[1]})
        return logs

    def score(self, lm_loss: float, task_loss: float) -> float:
        """The objective at the current log-variances."""
        return float(self._value(torch.tensor(lm_loss), torch.tensor(task_loss), self.log_vars.detach().cpu()))

    def state_dict(self) -> dict[str, Any]:
        """The log-variances (float32 values round-trip exactly through JSON)."""
        return {"log_vars": self.log_vars.detach().cpu().tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the log-variances in place (the optimiser holds this very tensor)."""
        if "log_vars" in state:
            with torch.no_grad():
                self.log_vars.copy_(torch.tensor(state["log_vars"], dtype=self.log_vars.dtype))
