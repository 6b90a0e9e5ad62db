"""Domain-generalisation methods: how the task loss T is formed from a batch drawn over several train domains.

The contract (registry kind "dg") is `llmcli.contracts.DGMethod`: `task_loss(model, batch, out, loss_fn, step)
-> (T, logs)` where `out` is `TwoHeadModel.losses(...)` (`task_loss`, `logits` (B, C), `features` (B, D)) and
`loss_fn(logits, labels)` the run's task loss; T (a scalar tensor) goes to the objective beside L, so any DG
method combines with any objective. The registry names each class here directly: it is built as
`cls(cfg, domains=, names=, stream_domains=, d_model=, grad_accum_steps=)` and takes what it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx

from llmcli.contracts import DGMethod, TaskLoss

if TYPE_CHECKING:
    from llmcli.config import CORALConfig, DANNConfig, ERMConfig, GroupDROConfig, IRMConfig, MLDGConfig
    from llmcli.data.dataset import Batch

Params = list[torch.Tensor]
Out = dict[str, torch.Tensor]  # TwoHeadModel.losses(...): task_loss, logits (B, C), features (B, D); lm_only_*


def per_domain(out: Out, batch: Batch, loss_fn: TaskLoss, domains: Sequence[int]) -> list[tuple[int, torch.Tensor]]:
    """(position in `domains`, task loss over that domain's labeled rows) for each domain with labeled rows."""
    res = []
    for k, d in enumerate(domains):
        rows = (batch.domains == d) & (batch.labels >= 0)  # (B,)
        if bool(rows.any()):
            res.append((k, loss_fn(out["logits"][rows], batch.labels[rows])))
    return res


class ERM(DGMethod):
    """The task loss pooled over every labeled row, whatever its domain."""

    cfg: ERMConfig

    def task_loss(self, model: nn.Module, batch: Batch, out: Out, loss_fn: TaskLoss,
                  step: int) -> tuple[torch.Tensor, dict]:
        """The model's own pooled task loss."""
        return out["task_loss"], {}


# ---------------------------------------------------------------- GroupDRO


def group_dro_update(q: torch.Tensor, losses: torch.Tensor, present: torch.Tensor, eta: float) -> torch.Tensor:
    """One exponentiated-gradient step: q_d <- q_d exp(eta * loss_d) for domains present, renormalised."""
    if not bool(torch.isfinite(losses).all()):  # a NaN batch (skipped by train.on_nan) must not poison q for good
        return q
    q = q * torch.exp(eta * losses * present)
    return q / q.sum()


class GroupDRO(DGMethod):
    """Sagawa et al. 2020: T = sum_d q_d T_d, with q pushed toward the domains with the highest loss.

    q moves once per optimiser step. With one micro-batch per step (train.grad_accum_steps = 1) q is updated
    from that batch's losses and then weighs them, the order of Sagawa et al.'s Algorithm 1 and DomainBed.
    With k > 1 micro-batches the weights must be fixed before the step's later batches are seen: every
    micro-batch weighs with the q of the start of the step, and end_step() updates q once from each domain's
    mean loss over the micro-batches it appeared in.
    """

    cfg: GroupDROConfig

    def __init__(self, cfg: GroupDROConfig, *, domains: Sequence[int], names: Sequence[str], grad_accum_steps: int = 1,
                 **_: Any) -> None:
        super().__init__(cfg, domains=domains, names=names)
        self.q = torch.full((len(self.domains),), 1.0 / len(self.domains))
        self.accum = grad_accum_steps
        self._reset()

    def _reset(self) -> None:
        self._sum = torch.zeros(len(self.domains))  # (K,) summed per-domain losses of this step's micro-batches
        self._seen = torch.zeros(len(self.domains))  # (K,) how many of them held the domain

    def task_loss(self, model: nn.Module, batch: Batch, out: Out, loss_fn: TaskLoss,
                  step: int) -> tuple[torch.Tensor, dict]:
        """Weight this batch's per-domain losses by q (updating q first when a step is a single micro-batch)."""
        pairs = per_domain(out, batch, loss_fn, self.domains)
        if not pairs:
            return out["task_loss"], {}
        losses = torch.zeros(len(self.domains))
        present = torch.zeros(len(self.domains))
        for k, v in pairs:
            losses[k], present[k] = float(v.detach()), 1.0
        if self.accum == 1:
            self.q = group_dro_update(self.q, losses, present, self.cfg.eta)
        else:
            self._sum += losses
            self._seen += present
        loss = sum(float(self.q[k]) * v for k, v in pairs)
        return loss, {f"dro_q_{n}": float(w) for n, w in zip(self.names, self.q)}

    def end_step(self) -> None:
        """With k > 1 micro-batches: one update of q from the step's mean per-domain losses."""
        if self.accum > 1 and bool(self._seen.any()):
            mean = self._sum / self._seen.clamp(min=1.0)  # (K,); absent domains: 0, and present = 0 keeps them
            self.q = group_dro_update(self.q, mean, (self._seen > 0).float(), self.cfg.eta)
        self._reset()

    def state_dict(self) -> dict[str, Any]:
        """The domain weights."""
        # the in-progress sums are not saved: train.py writes a checkpoint only between optimiser steps, after
        # end_step() has folded the step into q (a SIGINT/SIGTERM only sets a flag read at the step boundary)
        return {"q": self.q.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the domain weights."""
        if "q" in state:
            self.q = torch.tensor(state["q"], dtype=torch.float32)


# ---------------------------------------------------------------- IRMv1


def irm_penalty(logits: torch.Tensor, labels: torch.Tensor, loss_fn: TaskLoss) -> torch.Tensor:
    """IRMv1 penalty, unbiased: product of the loss gradients wrt a dummy scale w = 1 on the even and odd rows.

    ||dR/dw||^2 squared on one sample is biased upward by Var/n (positive even where the classifier is optimal
    for the domain); the product of two independent halves is not (Arjovsky et al. 2019, Sec. 3.2 / App. D;
    DomainBed's IRM._irm_penalty). One value may be negative. Needs two rows or more.
    """
    scale = torch.ones((), device=logits.device, requires_grad=True)
    (g_even,) = torch.autograd.grad(loss_fn(logits[::2] * scale, labels[::2]), [scale], create_graph=True)
    (g_odd,) = torch.autograd.grad(loss_fn(logits[1::2] * scale, labels[1::2]), [scale], create_graph=True)
    return g_even * g_odd


class IRM(DGMethod):
    """Arjovsky et al. 2019 (IRMv1), as in DomainBed's IRM.update: T = mean_d R_d + lambda * mean_d penalty_d.

    lambda = 1 for the first anneal_steps optimiser steps, then penalty_weight. T is not rescaled by 1/lambda
    (the IRM paper's colored-MNIST script rescales its one whole loss; here T is weighed against L by the
    objective, so a rescale would cut the task's weight and hand MGDA / PCGrad / a constraint T/lambda).
    """

    cfg: IRMConfig

    def task_loss(self, model: nn.Module, batch: Batch, out: Out, loss_fn: TaskLoss,
                  step: int) -> tuple[torch.Tensor, dict]:
        """Mean per-domain risk (domains with a labeled row) + lambda * mean penalty (domains with two or more)."""
        rows = [(batch.domains == d) & (batch.labels >= 0) for d in self.domains]
        rows = [r for r in rows if bool(r.any())]
        if not rows:
            return out["task_loss"], {}
        z, y = out["logits"], batch.labels
        risk = torch.stack([loss_fn(z[r], y[r]) for r in rows]).mean()
        pens = [irm_penalty(z[r], y[r], loss_fn) for r in rows if int(r.sum()) >= 2]
        penalty = torch.stack(pens).mean() if pens else torch.zeros((), device=z.device)
        lam = self.cfg.penalty_weight if step >= self.cfg.anneal_steps else 1.0
        return risk + lam * penalty, {"irm_penalty": float(penalty.detach()), "irm_lambda": lam}


# ---------------------------------------------------------------- CORAL


def covariance(x: torch.Tensor) -> torch.Tensor:
    """Unbiased feature covariance (D, D) of rows x (N, D)."""
    xc = x - x.mean(0, keepdim=True)  # (N, D)
    return xc.T @ xc / max(x.shape[0] - 1, 1)


def coral_penalty(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the means plus of the covariances of two feature batches (DomainBed's CORAL)."""
    mean_diff = (x.mean(0) - y.mean(0)).pow(2).mean()
    cov_diff = (covariance(x) - covariance(y)).pow(2).mean()
    return mean_diff + cov_diff


class CORAL(DGMethod):
    """Sun & Saenko 2016: pooled task loss + weight * mean CORAL penalty over pairs of train domains."""

    cfg: CORALConfig

    def task_loss(self, model: nn.Module, batch: Batch, out: Out, loss_fn: TaskLoss,
                  step: int) -> tuple[torch.Tensor, dict]:
        """Align the pooled features (B, D) of every pair of domains with at least two rows in the batch."""
        feats = [out["features"][batch.domains == d] for d in self.domains]
        feats = [f.float() for f in feats if f.shape[0] >= 2]
        pairs = [coral_penalty(a, b) for i, a in enumerate(feats) for b in feats[i + 1 :]]
        if not pairs:
            return out["task_loss"], {}
        penalty = torch.stack(pairs).mean()
        return out["task_loss"] + self.cfg.weight * penalty, {"coral": float(penalty.detach())}


# ---------------------------------------------------------------- MLDG


def mldg_loss(params: Params, f_train: Callable[[Params], torch.Tensor], f_test: Callable[[Params], torch.Tensor],
              inner_lr: float, beta: float) -> torch.Tensor:
    """F(theta) + beta * G(theta - inner_lr * grad F(theta)); its gradient is MLDG's meta-gradient (second order)."""
    f = f_train(params)
    grads = torch.autograd.grad(f, params, create_graph=True, allow_unused=True)
    moved = [p - inner_lr * g if g is not None else p for p, g in zip(params, grads)]
    return f + beta * f_test(moved)


class _Classify(nn.Module):
    """tokens, lengths -> class logits, so torch.func.functional_call can run the task path at moved weights."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.model(tokens)  # (B, T, D)
        return self.model.cls_head(self.model.pool(h, lengths))  # (B, C)


class MLDG(DGMethod):
    """Li et al. 2018: each step one present train domain (rotating with the step) is the meta-test domain."""

    cfg: MLDGConfig

    def task_loss(self, model: nn.Module, batch: Batch, out: Out, loss_fn: TaskLoss,
                  step: int) -> tuple[torch.Tensor, dict]:
        """F on the meta-train rows, G on the meta-test rows after one virtual step (own forward passes)."""
        labeled = batch.labels >= 0
        present = [d for d in self.domains if bool(((batch.domains == d) & labeled).any())]
        if len(present) < 2:
            return out["task_loss"], {}
        test_dom = present[step % len(present)]
        test_rows = (batch.domains == test_dom) & labeled  # (B,)
        train_rows = labeled & ~test_rows
        wrapped = _Classify(model)
        named = [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad]
        names, params = [n for n, _ in named], [p for _, p in named]
        def rows_loss(rows: torch.Tensor) -> Callable[[Params], torch.Tensor]:
            tokens, lengths = batch.tokens[rows], batch.lengths[rows]
            tokens = tokens[:, : int(lengths.max())]  # drop padding columns only the other rows needed

            def f(p: Params) -> torch.Tensor:
                logits = torch.func.functional_call(wrapped, dict(zip(names, p)), (tokens, lengths))  # (N, C)
                return loss_fn(logits, batch.labels[rows])

            return f

        # the meta-gradient differentiates through a gradient: attention must use the composite (math) kernel,
        # whose backward is itself differentiable (the fused CPU/flash kernels have no double backward)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            loss = mldg_loss(params, rows_loss(train_rows), rows_loss(test_rows), self.cfg.inner_lr, self.cfg.beta)
        return loss, {}


# ---------------------------------------------------------------- DANN


class _Reverse(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by -scale on the way back."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The gradient-reversal layer (Ganin et al. 2016)."""
    return _Reverse.apply(x, scale)


class DANN(DGMethod):
    """Pooled task loss + domain cross-entropy of a classifier that sees the features through a gradient reversal.

    The classifier learns from the whole domain loss, the features from weight * reversal times its gradient,
    reversed: the roles of DomainBed's DANN (its discriminator steps on the full loss with an optimiser of its
    own; the featuriser gets lambda * -loss). Scaling the classifier's loss by `weight` too would leave it near the
    domain prior (it did on MiniLM: domain_acc stayed at the labeled rows' share), so the reversal read nothing.
    """

    cfg: DANNConfig

    def __init__(self, cfg: DANNConfig, *, domains: Sequence[int], names: Sequence[str], stream_domains: Sequence[int],
                 d_model: int, **_: Any) -> None:
        super().__init__(cfg, domains=domains, names=names)
        self.stream = list(stream_domains)  # the classifier's classes: every domain in the training stream
        self.lookup = torch.full((max(self.stream) + 1,), -1, dtype=torch.long)
        self.lookup[self.stream] = torch.arange(len(self.stream))
        self.classifier = nn.Sequential(nn.Linear(d_model, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, len(self.stream)))

    def parameters(self) -> list[nn.Parameter]:
        """The domain classifier's weights."""
        return list(self.classifier.parameters())

    def task_loss(self, model: nn.Module, batch: Batch, out: Out, loss_fn: TaskLoss,
                  step: int) -> tuple[torch.Tensor, dict]:
        """The features learn to fool the domain classifier while it learns to tell the domains apart."""
        feats, domains = out["features"], batch.domains  # (B, D), (B,)
        if "lm_only_features" in out:  # data.lm_only_domains' rows (the engine's LM-only stream): a domain, no labels
            feats = torch.cat([feats, out["lm_only_features"]])  # (B + B', D)
            domains = torch.cat([domains, out["lm_only_domains"]])  # (B + B',)
        self.classifier.to(feats.device)
        target = self.lookup.to(feats.device)[domains]  # (B + B',)
        logits = self.classifier(reverse_gradient(feats, self.cfg.weight * self.cfg.reversal).float())  # (B, K)
        domain_loss = F.cross_entropy(logits, target)
        acc = float((logits.argmax(-1) == target).float().mean())
        return out["task_loss"] + domain_loss, {"domain_loss": float(domain_loss.detach()), "domain_acc": acc}

    def state_dict(self) -> dict[str, Any]:
        """The classifier's weights as lists (float32 values round-trip exactly through JSON)."""
        return {k: v.detach().cpu().tolist() for k, v in self.classifier.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy the classifier's weights in place (the optimiser holds these very tensors)."""
        with torch.no_grad():
            for k, v in self.classifier.state_dict().items():
                if k in state:
                    v.copy_(torch.tensor(state[k], dtype=v.dtype))

