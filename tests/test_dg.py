"""Domain-generalisation methods: known answers, and each one training on two tiny domains."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmcli.config import CrossEntropyLoss
from llmcli.dg import coral_penalty, covariance, group_dro_update, irm_penalty, mldg_loss, reverse_gradient
from llmcli.errors import UserError
from llmcli.losses import build_cross_entropy

QUIET = {"progress": False, "log": lambda m: None}
CE = build_cross_entropy(CrossEntropyLoss(), n_classes=2)


def test_group_dro_weights_move_toward_the_domain_with_the_highest_loss():
    q = torch.full((3,), 1 / 3)
    losses, present = torch.tensor([0.5, 2.0, 1.0]), torch.ones(3)
    for _ in range(5):
        q = group_dro_update(q, losses, present, eta=0.1)
    assert q.sum().item() == pytest.approx(1.0)
    assert q[1] > q[2] > q[0]
    expected = torch.softmax(0.5 * losses, 0)  # five steps of eta 0.1 from uniform = softmax(0.5 * loss)
    assert torch.allclose(q, expected, atol=1e-6)
    q2 = group_dro_update(q, torch.tensor([9.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 1.0]), eta=0.1)
    assert torch.allclose(q2, q)  # an absent domain's loss does not move the weights


def _domain(n_pos: int, n_neg: int, x: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with feature x: n_pos labeled 1, n_neg labeled 0."""
    labels = torch.tensor([1] * n_pos + [0] * n_neg)
    return torch.full((n_pos + n_neg,), x), labels


def _logits(w: float, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.zeros_like(x), w * x], 1)  # (N, 2): class-1 logit w * x


def test_irm_penalty_is_zero_for_a_classifier_optimal_on_every_domain_and_positive_otherwise():
    # both domains have p(y=1 | x=1) = 3/4 (and the second p(y=1 | x=-1) = 1/4): w* = log 3 is optimal on each
    d1, d2 = _domain(3, 1, 1.0), _domain(6, 2, 1.0)
    d2 = (torch.cat([d2[0], torch.full((4,), -1.0)]), torch.cat([d2[1], torch.tensor([1, 0, 0, 0])]))
    w_star = math.log(3)
    for x, y in (d1, d2):
        assert irm_penalty(_logits(w_star, x), y, CE).item() == pytest.approx(0.0, abs=1e-10)
        assert irm_penalty(_logits(0.3, x), y, CE).item() > 1e-3
    # a domain whose own optimum differs (p = 9/10): log 3 is no longer optimal there
    x3, y3 = _domain(9, 1, 1.0)
    assert irm_penalty(_logits(w_star, x3), y3, CE).item() > 1e-3


def test_coral_penalty_is_zero_for_batches_with_equal_covariance_and_mean():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=g)
    y = x[torch.randperm(50, generator=g)]  # same rows, other order: same mean and covariance
    assert coral_penalty(x, y).item() == pytest.approx(0.0, abs=1e-10)
    assert torch.allclose(covariance(x + 3.0), covariance(x), atol=1e-5)  # a shift keeps the covariance
    assert coral_penalty(x, 2 * x).item() > 0.1
    assert torch.allclose(covariance(x), torch.cov(x.T), atol=1e-6)


def test_mldg_meta_gradient_equals_the_analytic_one_on_a_quadratic():
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    c = torch.tensor([[1.0, -0.3], [-0.3, 3.0]])
    b, d = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5])
    theta = torch.tensor([0.7, -0.4], requires_grad=True)
    lr, beta = 0.1, 0.8

    def f(p):
        return 0.5 * p[0] @ a @ p[0] + b @ p[0]

    def g(p):
        return 0.5 * p[0] @ c @ p[0] + d @ p[0]

    mldg_loss([theta], f, g, lr, beta).backward()
    t = theta.detach()
    moved = t - lr * (a @ t + b)
    expected = (a @ t + b) + beta * (torch.eye(2) - lr * a) @ (c @ moved + d)
    assert torch.allclose(theta.grad, expected, atol=1e-6)


def test_gradient_reversal_flips_the_gradient_sign():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = reverse_gradient(x, 0.5)
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.allclose(x.grad, -0.5 * torch.tensor([1.0, 2.0, 3.0]))


# ---------------------------------------------------------------- training on two domains

TWO = ("data.train_domains=[kjv,web]", "train.sampler=balanced")


def train_records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("method", "key"), [("erm", None), ("group_dro", "dro_q_web"), ("irm", "irm_penalty"),
                                             ("coral", "coral"), ("mldg", "dg_task_loss"), ("dann", "domain_loss")])
def test_each_dg_method_trains_on_two_tiny_domains(tiny, tmp_path, method, key):
    from llmcli.train import train

    extra = ("dg.anneal_steps=10",) if method == "irm" else ()
    run = train(tiny(*TWO, f"dg.name={method}", "train.steps=10", *extra), runs_dir=tmp_path, **QUIET)
    recs = train_records(run)
    tr = [r for r in recs if r["split"] == "train"]
    assert all(math.isfinite(r["task_loss"]) and math.isfinite(r["loss"]) for r in tr)
    if key:
        assert all(key in r for r in tr)
    assert json.loads((run / "meta.json").read_text())["status"] == "completed"


def test_a_dg_method_with_own_weights_resumes_exactly(tiny, tmp_path):
    from llmcli.train import train

    cfg = tiny(*TWO, "dg.name=dann")  # DANN: own trainable weights and optimiser state travel in the checkpoint
    full = train(cfg, runs_dir=tmp_path / "a", **QUIET)
    part = train(cfg, runs_dir=tmp_path / "b", stop_after=7, **QUIET)
    train(None, resume=part, **QUIET)
    drop = ("tokens_per_s", "time_s")
    strip = [{k: v for k, v in r.items() if k not in drop} for r in train_records(full)]
    assert strip == [{k: v for k, v in r.items() if k not in drop} for r in train_records(part)]


def test_a_dg_method_needs_two_train_domains(tiny):
    with pytest.raises(UserError, match=r"dg.name: 'coral' needs at least two data.train_domains"):
        tiny("dg.name=coral")
    assert tiny("dg.name=erm").dg.name == "erm"


def test_dann_classifies_lm_only_target_text_too(tiny, tmp_path):
    from llmcli.train import Session

    sess = Session(tiny(*TWO, "dg.name=dann", "data.lm_only_domains=[wyc]"), log=lambda m: None)
    assert sess.dg.classifier[-1].out_features == 3  # kjv, web and the unlabeled wyc text
    assert any(p is sess.dg.parameters()[0] for g in sess.optimizer.param_groups for p in g["params"])


def test_balanced_sampler_gives_each_train_domain_an_equal_share(tiny):
    import numpy as np

    from llmcli.train import Session, _batch_indices

    sess = Session(tiny(*TWO), log=lambda m: None)
    for step in range(3):
        idx = _batch_indices(sess, step)
        names = [sess.data.domains[i] for i in sess.data.domain_ids[idx]]
        assert names.count("kjv") == names.count("web") == 8
    assert np.array_equal(_batch_indices(sess, 2), _batch_indices(sess, 2))  # a pure function of the step
    pooled = Session(tiny("data.train_domains=[kjv,web]"), log=lambda m: None)
    assert pooled.cfg.train.sampler == "proportional" and len(_batch_indices(pooled, 0)) == 16
