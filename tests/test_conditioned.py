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
