"""Domain-generalisation methods: known answers, and each one training on two tiny domains."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from llmcli.config import CrossEntropyLoss, GroupDROConfig, IRMConfig
from llmcli.errors import UserError
from llmcli.training.dg import (
    IRM,
    GroupDRO,
    coral_penalty,
    covariance,
    group_dro_update,
    irm_penalty,
    mldg_loss,
    reverse_gradient,
)
from llmcli.training.losses import build_cross_entropy

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


def _ce(a: float, y: int) -> float:
    """Cross-entropy of logits (0, a) for label y, by hand."""
    return math.log1p(math.exp(-a)) if y == 1 else math.log1p(math.exp(a))


def _dscale(a: float, y: int) -> float:
    """d/dw CE(w * (0, a), y) at w = 1, by hand: a * (sigmoid(a) - y)."""
    return a * (1 / (1 + math.exp(-a)) - y)


def _hand_penalty(a: list[float], y: list[int]) -> float:
    """IRMv1 unbiased estimate: mean gradient on the even rows times mean gradient on the odd rows."""
    even = [_dscale(ai, yi) for ai, yi in list(zip(a, y))[::2]]
    odd = [_dscale(ai, yi) for ai, yi in list(zip(a, y))[1::2]]
    return (sum(even) / len(even)) * (sum(odd) / len(odd))


def test_irm_penalty_is_the_product_of_the_even_and_odd_rows_gradients():
    a, y = [0.5, -1.0, 2.0, 0.3, 1.1], [1, 0, 0, 1, 1]
    logits = _logits(1.0, torch.tensor(a))
    assert irm_penalty(logits, torch.tensor(y), CE).item() == pytest.approx(_hand_penalty(a, y), rel=1e-5)
    # halves that disagree give a negative estimate: it is unbiased, not a square
    assert irm_penalty(_logits(1.0, torch.tensor([2.0, 2.0])), torch.tensor([1, 0]), CE).item() < 0


def test_irm_penalty_is_zero_for_a_classifier_optimal_on_each_half_and_positive_otherwise():
    # p(y=1 | x=1) = 3/4 on the even rows and on the odd rows: w* = log 3 is optimal on each half
    x, y = torch.ones(8), torch.tensor([1, 1, 1, 1, 1, 1, 0, 0])
    assert irm_penalty(_logits(math.log(3), x), y, CE).item() == pytest.approx(0.0, abs=1e-10)
    assert irm_penalty(_logits(0.3, x), y, CE).item() > 1e-3  # both halves push w the same way


def _batch(rows: list[tuple[int, float, int]]) -> tuple[SimpleNamespace, dict]:
    """A batch of (domain, class-1 logit, label) rows and the model output DG methods read."""
    dom = torch.tensor([r[0] for r in rows])
    labels = torch.tensor([r[2] for r in rows])
    logits = _logits(1.0, torch.tensor([r[1] for r in rows]))
    return SimpleNamespace(domains=dom, labels=labels), {"logits": logits, "task_loss": CE(logits, labels)}


# two train domains (0, 1) interleaved, plus an unlabeled row and a row of a domain not trained on (7)
IRM_ROWS = [(0, 0.5, 1), (1, 1.5, 1), (0, -1.0, 0), (1, -0.5, 1), (0, 2.0, 0), (1, 0.2, 0), (0, 0.3, 1),
            (1, 0.9, -1), (7, 3.0, 1)]


def test_irm_task_loss_is_risk_plus_lambda_penalty_before_and_after_the_anneal_step():
    irm = IRM(IRMConfig(penalty_weight=100.0, anneal_steps=3), domains=[0, 1], names=["a", "b"])
    batch, out = _batch(IRM_ROWS)
    per = {d: ([r[1] for r in IRM_ROWS if r[0] == d and r[2] >= 0], [r[2] for r in IRM_ROWS if r[0] == d and r[2] >= 0])
           for d in (0, 1)}
    risk = sum(sum(_ce(ai, yi) for ai, yi in zip(*per[d])) / len(per[d][0]) for d in (0, 1)) / 2
    penalty = sum(_hand_penalty(*per[d]) for d in (0, 1)) / 2
    assert abs(penalty) > 0.01  # the test can tell risk + penalty from risk
    t_warm, logs = irm.task_loss(None, batch, out, CE, step=2)
    assert logs["irm_lambda"] == 1.0 and logs["irm_penalty"] == pytest.approx(penalty, rel=1e-5)
    assert t_warm.item() == pytest.approx(risk + penalty, rel=1e-5)
    t_on, logs = irm.task_loss(None, batch, out, CE, step=3)
    assert logs["irm_lambda"] == 100.0
    assert t_on.item() == pytest.approx(risk + 100.0 * penalty, rel=1e-5)  # not divided by lambda
    assert (t_on - t_warm).item() == pytest.approx(99.0 * penalty, rel=1e-4)


def test_irm_leaves_a_domain_with_one_labeled_row_out_of_the_penalty_only():
    rows = [(0, 0.5, 1), (0, -1.0, 0), (0, 2.0, 0), (1, 1.5, 1)]
    irm = IRM(IRMConfig(penalty_weight=10.0, anneal_steps=0), domains=[0, 1], names=["a", "b"])
    t, logs = irm.task_loss(None, *_batch(rows), CE, step=0)
    a0, y0 = [0.5, -1.0, 2.0], [1, 0, 0]
    risk = (sum(_ce(a, y) for a, y in zip(a0, y0)) / 3 + _ce(1.5, 1)) / 2
    assert logs["irm_penalty"] == pytest.approx(_hand_penalty(a0, y0), rel=1e-5)
    assert t.item() == pytest.approx(risk + 10.0 * _hand_penalty(a0, y0), rel=1e-5)


# ---------------------------------------------------------------- GroupDRO per optimiser step


def _hand_dro(q: list[float], losses: dict[int, float], eta: float) -> list[float]:
    """One exponentiated-gradient step by hand; domains without a loss keep their weight before renormalising."""
    raw = [w * math.exp(eta * losses[k]) if k in losses else w for k, w in enumerate(q)]
    return [w / sum(raw) for w in raw]


def _mb_losses(rows: list[tuple[int, float, int]]) -> dict[int, float]:
    """Per-domain mean cross-entropy of a micro-batch, by hand."""
    doms = sorted({r[0] for r in rows})
    return {d: sum(_ce(r[1], r[2]) for r in rows if r[0] == d) / sum(r[0] == d for r in rows) for d in doms}


MB1 = [(0, 0.5, 1), (1, -2.0, 1), (0, 1.0, 0), (1, 0.4, 0)]
MB2 = [(0, -0.3, 1), (0, 2.5, 0)]  # domain 1 absent; domain 2 absent from both


def test_group_dro_moves_q_once_per_step_from_the_mean_losses_of_its_micro_batches():
    dro = GroupDRO(GroupDROConfig(eta=0.5), domains=[0, 1, 2], names=["a", "b", "c"], grad_accum_steps=2)
    q0 = dro.q.clone()
    t1, logs1 = dro.task_loss(None, *_batch(MB1), CE, step=0)
    assert torch.equal(dro.q, q0)  # unchanged between the micro-batches
    t2, logs2 = dro.task_loss(None, *_batch(MB2), CE, step=0)
    assert torch.equal(dro.q, q0) and logs1 == logs2  # both micro-batches weigh with the q of the step's start
    l1, l2 = _mb_losses(MB1), _mb_losses(MB2)
    assert t1.item() == pytest.approx(sum(float(q0[k]) * v for k, v in l1.items()), rel=1e-5)
    assert t2.item() == pytest.approx(float(q0[0]) * l2[0], rel=1e-5)
    dro.end_step()
    mean = {0: (l1[0] + l2[0]) / 2, 1: l1[1]}  # each domain over the micro-batches it appeared in
    assert dro.q.tolist() == pytest.approx(_hand_dro(q0.tolist(), mean, 0.5), rel=1e-5)
    q1 = dro.q.clone()
    dro.end_step()  # nothing accumulated since: q stays
    assert torch.equal(dro.q, q1)
    assert dro.state_dict() == {"q": q1.tolist()}


def test_group_dro_with_one_micro_batch_per_step_updates_q_before_weighing_as_before():
    dro = GroupDRO(GroupDROConfig(eta=0.5), domains=[0, 1, 2], names=["a", "b", "c"])
    q0 = dro.q.tolist()
    t, _ = dro.task_loss(None, *_batch(MB1), CE, step=0)
    l1 = _mb_losses(MB1)
    q1 = _hand_dro(q0, l1, 0.5)
    assert dro.q.tolist() == pytest.approx(q1, rel=1e-5)
    assert t.item() == pytest.approx(sum(q1[k] * v for k, v in l1.items()), rel=1e-5)
    dro.end_step()  # the engine's per-step call does not move q a second time
    assert dro.q.tolist() == pytest.approx(q1, rel=1e-5)


def test_a_nan_batch_does_not_poison_the_group_dro_weights():
    q = torch.tensor([0.2, 0.3, 0.5])
    assert torch.equal(group_dro_update(q, torch.tensor([1.0, float("nan"), 0.0]), torch.ones(3), eta=0.1), q)
    dro = GroupDRO(GroupDROConfig(eta=0.5), domains=[0, 1], names=["a", "b"], grad_accum_steps=2)
    batch, out = _batch([(0, 0.5, 1), (1, 0.4, 0)])
    out["logits"] = out["logits"] * float("nan")
    dro.task_loss(None, batch, out, CE, step=0)
    dro.end_step()
    assert torch.equal(dro.q, torch.full((2,), 0.5))


def test_the_registry_hands_grad_accum_steps_to_group_dro():
    from llmcli.registry import registry

    dro = registry("dg").build(GroupDROConfig(), domains=[0, 1], names=["a", "b"], grad_accum_steps=4)
    assert dro.accum == 4


RUNTIME = {"domains": [0, 2], "names": ["a", "c"], "stream_domains": [0, 1, 2], "d_model": 8, "grad_accum_steps": 2}


@pytest.mark.parametrize("name", ["coral", "dann", "erm", "group_dro", "irm", "mldg"])
def test_each_dg_entry_is_its_class_built_from_the_engine_s_runtime_arguments(name):
    # the registry calls the class itself with every runtime argument the engine passes; each keeps what it needs
    from llmcli.contracts import DGMethod
    from llmcli.registry import registry

    entry = registry("dg").get(name)
    method = registry("dg").build(entry.config(), **RUNTIME)
    assert type(method).__name__ == entry.builder.split(":")[1] and isinstance(method, DGMethod)
    assert (method.domains, method.names, method.cfg) == ([0, 2], ["a", "c"], entry.config())
    method.end_step()  # every hook of the contract is there, defaults included
    method.load_state_dict(method.state_dict())
    assert isinstance(method.parameters(), list)


def test_a_dg_method_without_task_loss_is_refused_when_built_not_at_its_first_batch():
    from llmcli.contracts import DGMethod

    class NoLoss(DGMethod):
        """Forgets the one method the contract requires."""

    with pytest.raises(TypeError, match="task_loss"):
        NoLoss(IRMConfig(), domains=[0], names=["a"])


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


def test_dann_classifier_learns_from_the_whole_domain_loss_and_the_features_from_its_scaled_reversal():
    from types import SimpleNamespace

    from llmcli.config import DANNConfig
    from llmcli.training.dg import DANN

    torch.manual_seed(0)
    dann = DANN(DANNConfig(weight=0.2, reversal=0.5), domains=[0], names=["kjv"], stream_domains=[0, 3], d_model=4)
    feats, extra = torch.randn(3, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)  # labeled, LM-only
    out = {"features": feats, "task_loss": torch.tensor(0.7), "lm_only_features": extra,
           "lm_only_domains": torch.tensor([3, 3])}
    loss, logs = dann.task_loss(None, SimpleNamespace(domains=torch.zeros(3, dtype=torch.long)), out, CE, step=0)
    loss.backward()
    # the same domain loss with no reversal: the gradients a plain classifier of these features would get
    x = torch.cat([feats, extra]).detach().requires_grad_(True)
    plain = torch.nn.functional.cross_entropy(dann.classifier(x), torch.tensor([0, 0, 0, 1, 1]))
    grads = torch.autograd.grad(plain, [x, *dann.classifier.parameters()])
    assert float(loss.detach()) == pytest.approx(0.7 + float(plain.detach()))
    assert logs["domain_loss"] == pytest.approx(float(plain.detach()))
    for p, g in zip(dann.classifier.parameters(), grads[1:]):
        assert torch.allclose(p.grad, g, atol=1e-7)  # the classifier: the whole domain loss, unscaled
    assert torch.allclose(torch.cat([feats.grad, extra.grad]), -0.2 * 0.5 * grads[0], atol=1e-7)


# ---------------------------------------------------------------- training on two domains

TWO = ("data.train_domains=[kjv,web]", "train.sampler=balanced")


def train_records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("method", "key"), [("erm", None), ("group_dro", "dro_q_web"), ("irm", "irm_penalty"),
                                             ("coral", "coral"), ("mldg", "dg_task_loss"), ("dann", "domain_loss")])
def test_each_dg_method_trains_on_two_tiny_domains(tiny, tmp_path, method, key):
    from llmcli.training.engine import train

    extra = ("dg.anneal_steps=10",) if method == "irm" else ()
    run = train(tiny(*TWO, f"dg.name={method}", "train.steps=10", *extra), runs_dir=tmp_path, **QUIET)
    recs = train_records(run)
    tr = [r for r in recs if r["split"] == "train"]
    assert all(math.isfinite(r["task_loss"]) and math.isfinite(r["loss"]) for r in tr)
    if key:
        assert all(key in r for r in tr)
    assert json.loads((run / "meta.json").read_text())["status"] == "completed"


def test_a_dg_method_with_own_weights_resumes_exactly(tiny, tmp_path):
    from llmcli.training.engine import train

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


def test_dann_trains_on_one_labeled_domain_with_unlabeled_target_text(tiny, tmp_path):
    from llmcli.training.engine import Session, train

    with pytest.raises(UserError, match=r"'dann' needs at least two data.train_domains \(or, for dann, data.lm_only"):
        tiny("dg.name=dann")
    sess = Session(tiny("dg.name=dann", "data.lm_only_domains=[wyc]"), log=lambda m: None)
    assert sess.dg.classifier[-1].out_features == 2  # the labeled kjv and the unlabeled wyc text
    run = train(tiny("dg.name=dann", "data.lm_only_domains=[wyc]", "train.steps=6", "train.log_every=3"),
                runs_dir=tmp_path, **QUIET)
    logged = [r for r in train_records(run) if r["split"] == "train"]
    assert [r["step"] for r in logged] == [3, 6] and all(r["domain_loss"] > 0 for r in logged)
    assert all(0.0 <= r["domain_acc"] <= 1.0 for r in logged)
    with pytest.raises(UserError, match=r"'coral' needs at least two data.train_domains \(given"):
        tiny("dg.name=coral", "data.lm_only_domains=[wyc]")  # an alignment over labeled domains: target text is not one


def test_dann_classifies_lm_only_target_text_too(tiny, tmp_path):
    from llmcli.training.engine import Session

    sess = Session(tiny(*TWO, "dg.name=dann", "data.lm_only_domains=[wyc]"), log=lambda m: None)
    assert sess.dg.classifier[-1].out_features == 3  # kjv, web and the unlabeled wyc text
    assert any(p is sess.dg.parameters()[0] for g in sess.optimizer.param_groups for p in g["params"])


def test_balanced_sampler_gives_each_train_domain_an_equal_share(tiny):
    import numpy as np

    from llmcli.training.engine import Session, _batch_indices

    sess = Session(tiny(*TWO), log=lambda m: None)
    for step in range(3):
        idx = _batch_indices(sess, step)
        names = [sess.data.domains[i] for i in sess.data.domain_ids[idx]]
        assert names.count("kjv") == names.count("web") == 8
    assert np.array_equal(_batch_indices(sess, 2), _batch_indices(sess, 2))  # a pure function of the step
    pooled = Session(tiny("data.train_domains=[kjv,web]"), log=lambda m: None)
    assert pooled.cfg.train.sampler == "proportional" and len(_batch_indices(pooled, 0)) == 16
