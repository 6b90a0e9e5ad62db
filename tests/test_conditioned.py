"""The alpha-conditioned (YOTO) model: FiLM sites and their starting point."""

from __future__ import annotations

import torch

from llmcli.conditioned import attach_film

from .test_model import small_model


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
    from llmcli.conditioned import Conditioned
    from llmcli.config import ConditionedObjective

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
    from llmcli.conditioned import conditioned_config

    given = conditioned_config(tiny("objective.name=conditioned", "objective.alpha_beta=[1,1]"))
    assert given.objective.alpha_beta == (1.0, 1.0)
    default = conditioned_config(tiny())
    assert default.objective.name == "conditioned" and default.objective.alpha_beta == (3.0, 1.0)


def test_a_bad_alpha_range_or_beta_is_one_clear_error(tiny):
    import pytest

    from llmcli.errors import UserError

    with pytest.raises(UserError, match=r"objective: alpha_min 0.8 is above alpha_max 0.2"):
        tiny("objective.name=conditioned", "objective.alpha_min=0.8", "objective.alpha_max=0.2")
    with pytest.raises(UserError, match=r"objective.alpha_beta.1: Input should be greater than 0 \(given: -1\)"):
        tiny("objective.name=conditioned", "objective.alpha_beta=[2,-1]")
