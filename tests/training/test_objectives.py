"""The weighted objective and the conflict measure."""

from __future__ import annotations

import pytest
import torch

from llmcli.config import WeightedObjective
from llmcli.training.objectives import Weighted, grad_cosine


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


def test_the_weighted_objective_asks_for_no_graph_of_a_loss_it_gives_zero_weight_but_when_measuring():
    need = {a: Weighted(WeightedObjective(alpha=a, log_grad_every=10)).grads_needed for a in (0.0, 0.5, 1.0)}
    assert (need[0.0](3), need[0.5](3), need[1.0](3)) == ((False, True), (True, True), (True, False))
    assert need[0.0](20) == need[1.0](20) == (True, True)  # grad_cosine needs both gradients


def _fields(run, keys):
    import json

    return [{k: r[k] for k in keys if k in r} for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_a_loss_with_zero_weight_gets_no_backward_and_the_run_trains_the_same(tiny, tmp_path, monkeypatch, alpha):
    from llmcli.models.load import load_trained
    from llmcli.training.engine import train

    quiet = {"progress": False, "log": lambda m: None}
    cfg = tiny(f"objective.alpha={alpha}", "objective.log_grad_every=0", "train.steps=6", "train.eval_every=6",
               "train.log_every=2")
    from llmcli.models.model import TwoHeadModel

    graphs, real = [], TwoHeadModel.lm_loss

    def spy(self, *args, **kwargs):  # whether L is built with a graph, call by call
        graphs.append(torch.is_grad_enabled())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TwoHeadModel, "lm_loss", spy)
    fast = train(cfg, runs_dir=tmp_path / "fast", **quiet)
    fast_graphs, graphs[:] = list(graphs), []
    monkeypatch.setattr(Weighted, "grads_needed", lambda self, step: (True, True))  # the graph of both, as before
    full = train(cfg, runs_dir=tmp_path / "full", **quiet)
    assert any(graphs)  # training builds L's graph when it is asked to
    assert any(fast_graphs) == (alpha == 1)  # at alpha 0 L never had one
    # the update is the same: what the weighted loss reaches moves the same way; the loss it drops is still logged
    same = ("lm_loss", "ppl", "bpb") if alpha == 1 else ("lm_loss", "ppl", "bpb", "task_loss", "acc", "macro_f1")
    val = [[r for r in _fields(run, ("step", "split", "domain", *same)) if r.get("split") == "val"] for run in (fast, full)]
    assert val[0] and val[0] == val[1]  # bit for bit
    train_fast, train_full = (_fields(r, ("split", "lm_loss", "task_loss")) for r in (fast, full))
    for a, b in zip(train_fast, train_full):
        for k in ("lm_loss", "task_loss"):
            assert (k in a) == (k in b) and a.get(k, 0.0) == pytest.approx(b.get(k, 0.0), rel=1e-5)
    if alpha == 1:  # T had no graph: the task head, which only T reaches, got no gradient, so no weight decay either
        fast_head, full_head = (load_trained(r, "last").model.cls_head.weight for r in (fast, full))
        assert not torch.equal(fast_head, full_head)


# ---------------------------------------------------------------- gradient methods: known answers

from llmcli.config import (  # noqa: E402
    ConstrainedObjective,
    MGDAObjective,
    PCGradObjective,
    UncertaintyObjective,
    validate_config,
)
from llmcli.errors import UserError  # noqa: E402
from llmcli.training.objectives import MGDA, Constrained, PCGrad, Uncertainty, mgda_weight, pcgrad_direction  # noqa: E402


def linear_losses(g_lm, g_task):
    """A shared weight w and a task-only head h: L = g_lm.w, T = g_task.w + 2h^2 (grads known exactly)."""
    w = torch.nn.Parameter(torch.zeros(len(g_lm)))
    h = torch.nn.Parameter(torch.tensor(1.5))
    return w, h, w @ torch.tensor(g_lm), w @ torch.tensor(g_task) + 2 * h**2


@pytest.mark.parametrize(
    ("g1", "g2", "gamma"),
    [([1.0, 0.0], [0.0, 1.0], 0.5), ([2.0, 0.0], [0.0, 1.0], 0.2), ([1.0, 0.0], [3.0, 0.0], 1.0),
     ([3.0, 0.0], [1.0, 0.0], 0.0), ([1.0, 1.0], [1.0, 1.0], 0.5)],
)
def test_mgda_weight_is_the_two_task_min_norm_point(g1, g2, gamma):
    assert mgda_weight(torch.tensor(g1), torch.tensor(g2)) == pytest.approx(gamma)


def test_mgda_sets_the_min_norm_direction_on_shared_weights_and_own_gradients_on_heads():
    w, h, lm, task = linear_losses([2.0, 0.0], [0.0, 1.0])
    logs = MGDA(MGDAObjective(log_grad_every=1)).backward(lm, task, [w], step=0)
    assert torch.allclose(w.grad, torch.tensor([0.4, 0.8]))  # 0.2 * (2, 0) + 0.8 * (0, 1)
    assert float(w.grad @ torch.tensor([2.0, -1.0])) == pytest.approx(0.0, abs=1e-6)  # orthogonal to g1 - g2
    assert h.grad.item() == pytest.approx(6.0)  # d(2h^2)/dh at 1.5, untouched by the weighting
    assert logs["weight_lm"] == pytest.approx(0.2) and logs["grad_cosine"] == pytest.approx(0.0)


def test_pcgrad_removes_the_conflicting_component():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    d, conflict = pcgrad_direction(g1, g2)
    assert conflict and torch.allclose(d, torch.tensor([0.5, 1.5]))  # (0.5, 0.5) + (0, 1)
    w, h, lm, task = linear_losses([1.0, 0.0], [-1.0, 1.0])
    logs = PCGrad(PCGradObjective(log_grad_every=1)).backward(lm, task, [w], step=0)
    assert torch.allclose(w.grad, d) and h.grad.item() == pytest.approx(6.0)
    # each projected gradient has no negative component along the other task's gradient
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g1 @ g2) / (g1 @ g1) * g1
    assert float(p1 @ g2) >= -1e-6 and float(p2 @ g1) >= -1e-6
    assert float(w.grad @ g1) > 0 and float(w.grad @ g2) > 0
    assert logs["conflict"] == 1.0 and logs["grad_cosine"] == pytest.approx(-1 / 2**0.5)


def test_pcgrad_leaves_agreeing_gradients_alone():
    d, conflict = pcgrad_direction(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert not conflict and torch.allclose(d, torch.tensor([2.0, 1.0]))


def test_gradient_methods_add_to_earlier_micro_batches():
    w, _, lm, task = linear_losses([1.0, 0.0], [0.0, 1.0])
    w.grad = torch.tensor([10.0, 10.0])
    PCGrad(PCGradObjective()).backward(lm, task, [w], step=1)
    assert torch.allclose(w.grad, torch.tensor([11.0, 11.0]))


# ---------------------------------------------------------------- constrained: dual ascent on a toy problem


def toy_constrained(cfg, steps, x0=0.0, lam0=None):
    """min x^2 s.t. (x - 2)^2 <= epsilon by SGD on x; returns x and the lambda history."""
    obj = Constrained(cfg)
    if lam0 is not None:
        obj.load_state_dict({"lambda": lam0})
    x = torch.nn.Parameter(torch.tensor(x0))
    opt = torch.optim.SGD([x], lr=0.05)
    lams = []
    for step in range(steps):
        opt.zero_grad()
        logs = obj.backward(x**2, (x - 2) ** 2, [x], step)
        lams.append(logs["lambda"])
        opt.step()
    return float(x.detach()), lams, obj


def test_constrained_multiplier_rises_while_violated_and_reaches_the_kkt_point():
    # epsilon = 1: the optimum is x* = 1 with multiplier lambda* = 1 (2x + 2 lambda (x - 2) = 0 at x = 1)
    x, lams, _ = toy_constrained(ConstrainedObjective(epsilon=1.0, dual_lr=0.2), 2000)
    assert lams[1] > lams[0] and lams[2] > lams[1]  # (0 - 2)^2 = 4 > 1: violated, lambda climbs
    assert x == pytest.approx(1.0, abs=0.02) and lams[-1] == pytest.approx(1.0, abs=0.05)


def test_constrained_multiplier_decays_to_zero_when_slack():
    # epsilon = 5: x = 0 satisfies (x - 2)^2 = 4 <= 5, so the unconstrained optimum x = 0 is the answer
    x, lams, obj = toy_constrained(ConstrainedObjective(epsilon=5.0, dual_lr=0.2), 500, lam0=2.0)
    assert lams[0] == 2.0 and all(b <= a for a, b in zip(lams, lams[1:]))
    assert obj.state_dict() == {"lambda": 0.0} and x == pytest.approx(0.0, abs=1e-3)


def test_constrained_accuracy_bound_is_decided_by_the_held_out_probe():
    acc = {"value": 0.2}
    obj = Constrained(ConstrainedObjective(beta=0.6, dual_lr=1.0, log_grad_every=0))
    obj.set_probe(lambda step: {"acc": acc["value"]})
    w = torch.nn.Parameter(torch.tensor(1.0))
    logs = [obj.backward(w**2, (w - 1) ** 2 + 0.1, [w], s) for s in range(3)]
    assert [lg["lambda"] for lg in logs] == pytest.approx([0.0, 0.4, 0.8])  # beta - acc = 0.4 per step
    assert logs[0]["constraint"] == 0.2 and logs[0]["violation"] == pytest.approx(0.4)
    acc["value"] = 0.9  # satisfied on held-out data: lambda falls back to 0
    for s in range(3, 10):
        obj.backward(w**2, (w - 1) ** 2 + 0.1, [w], s)
    assert obj.state_dict()["lambda"] == 0.0


@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        ({"name": "constrained", "epsilon": -1}, "objective.epsilon: Input should be greater than 0"),
        ({"name": "constrained", "beta": 1.5}, "objective.beta: Input should be less than 1"),
        ({"name": "constrained"}, "objective: set exactly one of epsilon"),
        ({"name": "constrained", "epsilon": 1, "beta": 0.5}, "objective: set exactly one of epsilon"),
        ({"name": "gradnorm"},
         "unknown objective 'gradnorm' (valid: conditioned, constrained, mgda, pcgrad, uncertainty, weighted)"),
    ],
)
def test_bad_objective_settings_are_one_line_errors(section, fragment):
    with pytest.raises(UserError) as err:
        validate_config({"objective": section})
    assert fragment in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- uncertainty weighting


def test_uncertainty_log_variances_learn_log_two_l():
    # d/ds [exp(-s) L + s/2] = 0  at  s = log(2 L)
    obj = Uncertainty(UncertaintyObjective())
    opt = torch.optim.SGD(obj.parameters(), lr=0.1)
    for step in range(3000):
        opt.zero_grad()
        logs = obj.backward(torch.tensor(2.0), torch.tensor(0.25), [], step)
        opt.step()
    assert logs["log_var_lm"] == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=1e-3)
    assert logs["log_var_task"] == pytest.approx(torch.log(torch.tensor(0.5)).item(), abs=1e-3)


def test_uncertainty_state_round_trips_exactly():
    a = Uncertainty(UncertaintyObjective(init_log_var_lm=0.1234567, init_log_var_task=-2.5))
    b = Uncertainty(UncertaintyObjective())
    held = b.log_vars
    b.load_state_dict(a.state_dict())
    assert b.log_vars is held and torch.equal(b.log_vars, a.log_vars)


# ---------------------------------------------------------------- objectives inside a training run


def _records(run):
    import json

    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_uncertainty_log_variances_train_log_and_checkpoint(tiny, tmp_path):
    import json

    from llmcli.training.engine import train

    run = train(tiny("objective={name: uncertainty, log_grad_every: 5}"), runs_dir=tmp_path,
                progress=False, log=lambda m: None)
    recs = [r for r in _records(run) if r["split"] == "train"]
    assert all({"log_var_lm", "log_var_task", "lm_loss", "task_loss", "grad_cosine"} <= set(r) for r in recs)
    saved = json.loads((run / "checkpoints" / "last.json").read_text())["objective"]["log_vars"]
    assert saved != [0.0, 0.0] and saved[0] == pytest.approx(recs[-1]["log_var_lm"], abs=0.05)


@pytest.mark.parametrize("objective", ["uncertainty", "constrained"])
def test_resume_is_exact_with_stateful_objectives(tiny, tmp_path, objective):
    from llmcli.training.engine import TIMING_KEYS, train

    quiet = {"progress": False, "log": lambda m: None}
    sets = [f"objective={{name: {objective}, log_grad_every: 5}}"] + (
        ["objective.beta=0.9", "objective.dual_lr=0.5"] if objective == "constrained" else [])
    full = train(tiny(*sets), runs_dir=tmp_path / "full", **quiet)
    part = train(tiny(*sets), runs_dir=tmp_path / "part", stop_after=7, **quiet)
    train(None, resume=part, **quiet)

    def strip(run):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in _records(run)]

    assert strip(part) == strip(full)
    if objective == "constrained":
        lams = [r["lambda"] for r in _records(full) if r["split"] == "train"]
        assert lams[-1] > 0 and all("violation" in r for r in _records(full) if r["split"] == "train")


def test_the_optional_hooks_are_no_op_defaults_of_the_base_class():
    from llmcli.training.objectives import Objective
    from tests.models.test_model import small_model

    obj = Weighted(WeightedObjective())
    m = small_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert obj.wrap_model(m) is None and obj.prepare(m, 3) is None and obj.prepare(m, None) is None
    assert obj.set_probe(lambda step: {"acc": 1.0}) is None and obj.parameters() == []
    assert set(m.state_dict()) == set(before) and all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
    for hook in ("wrap_model", "prepare", "set_probe", "parameters"):
        assert getattr(Objective, hook).__doc__, hook  # each default says what it is for
