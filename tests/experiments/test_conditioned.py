"""The alpha-conditioned (YOTO) model and sweep mode: FiLM sites, the objective, the front scored by `evaluate`."""

from __future__ import annotations

import json

import pytest
import torch

from llmcli.models.film import attach_film
from tests.models.test_model import small_model


def test_film_starts_as_the_identity_and_has_a_site_per_block():
    m = small_model()
    tokens = torch.randint(3, 50, (2, 8))
    plain, _ = m.backbone(tokens)
    film = attach_film(m, hidden=8)
    assert film.sites == 2 + len(m.backbone.blocks)  # embedding, every block, output
    for a in (0.0, 1.0):
        film.alpha.fill_(a)
        assert torch.equal(m.backbone(tokens)[0], plain)


def test_alpha_reaches_a_block_through_its_own_site():
    m = small_model()
    film = attach_film(m, hidden=8)
    with torch.no_grad():  # only the second block's site (index 2) depends on alpha
        film.net[2].weight.view(film.sites, 2, -1, 8)[2].normal_()
    seen = []
    for block in m.backbone.blocks:
        block.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().clone()))
    outs = {}
    tokens = torch.randint(3, 50, (2, 8))
    for a in (0.0, 1.0):
        film.alpha.fill_(a)
        seen.clear()
        m.backbone(tokens)
        outs[a] = list(seen)
    assert torch.equal(outs[0.0][0], outs[1.0][0])  # the first block's output does not see alpha
    assert not torch.allclose(outs[0.0][1], outs[1.0][1])  # the second block's does


def _draws(objective: dict, n: int = 2000) -> torch.Tensor:
    from llmcli.config import ConditionedObjective
    from llmcli.training.objectives import Conditioned

    obj = Conditioned(ConditionedObjective(**objective))
    m = small_model()
    attach_film(m, hidden=8)
    torch.manual_seed(0)
    out = []
    for step in range(n):
        obj.prepare(m, step)
        out.append(obj.alpha)
    obj.prepare(m, None)
    assert obj.alpha == obj.cfg.alpha == float(m.alpha_film.alpha)  # evaluation uses the configured alpha
    return torch.tensor(out)


def test_training_alphas_follow_the_configured_beta_on_the_configured_range():
    high = _draws({"alpha_beta": (3.0, 1.0)})  # the default
    assert abs(float(high.mean()) - 0.75) < 0.02 and float((high < 0.5).float().mean()) < 0.16  # P(a < .5) = 1/8
    flat = _draws({"alpha_beta": (1.0, 1.0), "alpha_min": 0.2, "alpha_max": 0.6})
    assert 0.2 <= float(flat.min()) and float(flat.max()) <= 0.6 and abs(float(flat.mean()) - 0.4) < 0.01


def test_the_sweep_keeps_a_conditioned_objective_given_in_the_config(tiny):
    from llmcli.experiments.conditioned_sweep import conditioned_config

    given = conditioned_config(tiny("objective.name=conditioned", "objective.alpha_beta=[1,1]"))
    assert given.objective.alpha_beta == (1.0, 1.0)
    default = conditioned_config(tiny())
    assert default.objective.name == "conditioned" and default.objective.alpha_beta == (3.0, 1.0)


def test_a_bad_alpha_range_or_beta_is_one_clear_error(tiny):
    from llmcli.errors import UserError

    with pytest.raises(UserError, match=r"objective: alpha_min 0.8 is above alpha_max 0.2"):
        tiny("objective.name=conditioned", "objective.alpha_min=0.8", "objective.alpha_max=0.2")
    with pytest.raises(UserError, match=r"objective.alpha_beta.1: Input should be greater than 0 \(given: -1\)"):
        tiny("objective.name=conditioned", "objective.alpha_beta=[2,-1]")


def test_the_conditioned_objective_is_the_weighted_one_at_the_drawn_alpha(tiny):
    from llmcli.registry import registry
    from llmcli.training.objectives import Conditioned, Weighted

    obj = registry("objective").build(tiny("objective.name=conditioned", "objective.alpha=0.3").objective)
    assert type(obj) is Conditioned and isinstance(obj, Weighted)
    obj.alpha = 0.9  # as prepare(model, step) draws it
    w = torch.ones((), requires_grad=True)
    logs = obj.backward(2 * w, 3 * w, [], step=1)
    assert list(logs) == ["alpha", "loss"] and logs["alpha"] == 0.9
    assert float(w.grad) == pytest.approx(0.9 * 2 + 0.1 * 3)  # backward at the batch's alpha
    assert obj.score(2.0, 3.0) == pytest.approx(0.3 * 2 + 0.7 * 3)  # score at the evaluation alpha


def test_the_conditioned_front_is_scored_by_evaluate_with_the_weighted_task_loss(tiny, tmp_path):
    """Exact and conditioned points are measured identically: the training class counts (balanced weights),
    eval.max_examples, on the conditioned run's `last` checkpoint with the FiLM alpha set to the grid value."""
    from llmcli.data.dataset import ProcessedData
    from llmcli.data.preprocess import preprocess
    from llmcli.evaluation.evaluate import evaluate, scored_indices
    from llmcli.evaluation.metrics import score
    from llmcli.experiments.conditioned_sweep import at_alpha
    from llmcli.experiments.sweep import sweep_alpha
    from llmcli.models.load import load_trained
    from llmcli.registry import registry

    cfg = tiny("train.steps=10", "train.eval_every=5", "task_loss.class_weights=balanced", "eval.max_examples=40")
    sweep = sweep_alpha(cfg, [0.25, 0.5], mode="conditioned", runs_dir=tmp_path, progress=False, log=lambda m: None)
    run = sweep / "conditioned"
    at = {a: json.loads((run / "eval" / f"test-alpha-{a:g}.json").read_text()) for a in (0.25, 0.5)}
    quiet = {"checkpoint": "last", "write": False, "log": lambda m: None}
    assert at[0.25]["domains"] == evaluate(run, prepare=at_alpha(0.25), **quiet)["domains"]
    # at the config's alpha (0.5) no hook is needed: exactly what `llmcli eval --checkpoint last` reports
    assert at[0.5]["domains"] == evaluate(run, **quiet)["domains"]
    assert at[0.25]["condition"] == {"alpha": 0.25} and at[0.25]["checkpoint"] == "last"
    assert at[0.25]["step"] == 10 and all(m["n"] <= 40 for m in at[0.25]["domains"].values())
    assert at[0.25]["domains"] != at[0.5]["domains"]  # the hook reached the model

    t = load_trained(run, "last")  # the same weights and examples under the unweighted task loss score otherwise
    t.model.alpha_film.alpha.fill_(0.25)
    data = ProcessedData(preprocess(t.cfg.data, log=lambda m: None))
    unweighted = registry("task_loss").build(t.cfg.task_loss, n_classes=len(data.label_names))  # no counts: uniform
    kjv = score(t.model, data, scored_indices(t.cfg, data, "test")["kjv"], t.cfg.eval.batch_size, unweighted)
    assert kjv["n"] == at[0.25]["domains"]["kjv"]["n"] and kjv["lm_loss"] == at[0.25]["domains"]["kjv"]["lm_loss"]
    assert kjv["task_loss"] != pytest.approx(at[0.25]["domains"]["kjv"]["task_loss"])
