"""Fixed-window neural LM (Bengio et al. 2003): each position sees its last `context` tokens only."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from llmcli.contracts import Backbone
from llmcli.errors import UserError

if TYPE_CHECKING:
    from llmcli.config import MLPConfig


class WindowMLP(nn.Module, Backbone):
    """(B, T) ids -> (B, T, D): h_t = W2 tanh(W1 [e_{t-n+1}; ...; e_t] + b1) + b2, padding the start with PAD (id 0).

    The generation cache is the last n-1 token ids. For the task head the states are mean-pooled over
    the record (`pool`), since no single window sees the whole record.
    """

    def __init__(self, cfg: MLPConfig, vocab_size: int) -> None:
        super().__init__()
        self.d_model = cfg.d_model
        self.block_size = cfg.block_size
        self.context = cfg.context
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, 0.0, 0.02)
        self.hidden = nn.Linear(cfg.context * cfg.d_model, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, idx: torch.Tensor, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """States for `idx`; with a cache (previous n-1 ids), `idx` continues that sequence."""
        n = self.context
        past = cache if cache is not None else idx.new_zeros(idx.shape[0], n - 1)  # (B, n-1), PAD = 0
        full = torch.cat([past, idx], dim=1)  # (B, n-1+T)
        windows = full.unfold(1, n, 1)  # (B, T, n)
        x = self.embed(windows).flatten(2)  # (B, T, n*D)
        h = self.out(self.drop(torch.tanh(self.hidden(x))))  # (B, T, D)
        return h, full[:, full.shape[1] - (n - 1):]

    def pool(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Mean of the window states over each record's real tokens (B, D)."""
        mask = (torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]).to(h.dtype)  # (B, T)
        return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


def build_mlp(cfg: MLPConfig, *, vocab_size: int, max_len: int) -> WindowMLP:
    """The fixed-window MLP backbone."""
    if max_len > cfg.block_size:
        raise UserError(f"model.block_size: {cfg.block_size} is shorter than data.max_len ({max_len})")
    return WindowMLP(cfg, vocab_size)


