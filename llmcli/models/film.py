"""FiLM conditioning on the trade-off weight alpha ("You Only Train Once", Dosovitskiy & Djolonga, ICLR 2020).

A per-channel scale and shift computed from alpha, applied on the token embeddings, after every block and on
the backbone's output, all shared by the LM and classification heads: setting alpha after training picks a
point on the L-vs-T trade-off. The conditioned objective (llmcli/training/objectives.py) attaches it and sets alpha.
"""

from __future__ import annotations

import torch
from torch import nn


class AlphaFiLM(nn.Module):
    """alpha -> a per-channel (scale, shift) at each of `sites` places in the network; identity at initialisation."""

    def __init__(self, d_model: int, hidden: int, sites: int) -> None:
        super().__init__()
        self.sites = sites
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, 2 * sites * d_model))
        nn.init.zeros_(self.net[2].weight)  # start as the unconditioned model
        nn.init.zeros_(self.net[2].bias)
        self.register_buffer("alpha", torch.tensor(0.5), persistent=False)  # set per batch, not a weight

    def params(self) -> torch.Tensor:
        """(sites, 2, D): the scale and shift of every site."""
        a = self.alpha.reshape(1)
        feats = torch.cat([a, a.sqrt()])  # sqrt spreads the small-alpha end, where T dominates
        return self.net(feats).view(self.sites, 2, -1)

    def modulate(self, x: torch.Tensor, site: int) -> torch.Tensor:
        """x * (1 + scale) + shift with this site's parameters; x (B, T, D)."""
        g, b = self.params()[site]  # (D,), (D,)
        return x * (1 + g) + b  # (B, T, D)


def attach_film(model: nn.Module, hidden: int) -> AlphaFiLM:
    """Add an AlphaFiLM to a TwoHeadModel, hooked onto the embedding, every block (the backbone's
    `residual_blocks()`) and the backbone's output: alpha reaches every layer, as in YOTO, not just the ends."""
    backbone = model.backbone
    blocks = list(backbone.residual_blocks())
    film = AlphaFiLM(backbone.d_model, hidden, sites=len(blocks) + 2)
    model.alpha_film = film
    backbone.embed.register_forward_hook(lambda m, inp, out: film.modulate(out, 0))
    for i, block in enumerate(blocks, start=1):
        block.register_forward_hook(lambda m, inp, out, i=i: film.modulate(out, i))
    backbone.register_forward_hook(lambda m, inp, out: (film.modulate(out[0], film.sites - 1), *out[1:]))
    return film


def set_alpha(model: nn.Module, alpha: float) -> None:
    """Set the alpha a FiLM-conditioned model (attach_film) runs at."""
    model.alpha_film.alpha.fill_(alpha)
