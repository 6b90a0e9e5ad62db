"""Recurrent backbones (LSTM, GRU, Elman RNN): the generation cache is the hidden state."""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

import torch
from torch import nn

from llmcli.contracts import Backbone
from llmcli.errors import UserError

if TYPE_CHECKING:
    from llmcli.config import GRUConfig, LSTMConfig, RNNConfig

# the hidden state: (L, B, D), or the LSTM's (h, c) pair of them
State = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]  # noqa: UP007 - a runtime alias

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class Recurrent(nn.Module, Backbone):
    """Embedding, n_layer recurrent layers of width d_model: (B, T) ids -> (B, T, D) states.

    Right padding never reaches a real position's state (the recurrence only runs forward), so the
    classification head's "last real token" pooling reads the state after the whole record.
    """

    def __init__(self, cfg: LSTMConfig | GRUConfig | RNNConfig, vocab_size: int) -> None:
        super().__init__()
        self.d_model = cfg.d_model
        self.block_size = cfg.block_size
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)  # tied to the LM head: keep initial logits small
        self.drop = nn.Dropout(cfg.dropout)
        self.rnn = CELLS[cfg.name](cfg.d_model, cfg.d_model, num_layers=cfg.n_layer, batch_first=True,
                                   dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)

    def forward(self, idx: torch.Tensor, cache: State | None = None) -> tuple[torch.Tensor, State]:
        """States for `idx`; with a cache (the previous hidden state), `idx` continues that sequence."""
        x = self.drop(self.embed(idx))  # (B, T, D)
        y, state = self.rnn(x, cache)  # (B, T, D); state (L, B, D) or a pair of them for the LSTM
        return self.drop(y), state


def build_recurrent(cfg: LSTMConfig | GRUConfig | RNNConfig, *, vocab_size: int, max_len: int) -> Recurrent:
    """An LSTM / GRU / RNN backbone (cfg.name picks the cell)."""
    if max_len > cfg.block_size:
        raise UserError(f"model.block_size: {cfg.block_size} is shorter than data.max_len ({max_len})")
    return Recurrent(cfg, vocab_size)
