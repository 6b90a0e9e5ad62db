"""Decoder-only pre-norm Transformer backbone (GPT-2 style) with a KV cache for generation."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.errors import UserError

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (B, H, T, Dh)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with one fused QKV projection."""

    def __init__(self, d_model: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)  # each (B, T, D)
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H, P+T, Dh)
        # With a cache, new queries may see every cached key; causality among the new ones still holds
        # when T > 1 only if there is no past, so a prefill uses is_causal and a step (T == 1) does not.
        # An explicit mask (left-padded batches) already holds causality.
        causal = (past is None or past[0].shape[2] == 0) and mask is None
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and T > 1, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, Dh)
        y = y.transpose(1, 2).contiguous().view(B, T, D)
        return self.proj(y), (k, v)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, bias=bias)
        self.attn = SelfAttention(d_model, n_head, dropout, bias)
        self.ln2 = nn.LayerNorm(d_model, bias=bias)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model, bias=bias),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model, bias=bias),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor, past: Any, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        a, present = self.attn(self.ln1(x), past, mask)
        x = x + a
        return x + self.mlp(self.ln2(x)), present


class GPT(nn.Module):
    """Token + position embeddings, n_layer blocks, a final norm: (B, T) ids -> (B, T, D) states."""

    def __init__(self, cfg: Any, vocab_size: int, block_size: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.d_model = cfg.d_model
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.pos = nn.Embedding(block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head, cfg.dropout, cfg.bias) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                pad: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """States for `idx`; with a cache, `idx` continues the cached sequence.

        pad: (B,) left-padding count of each row (batched generation): a row's positions start at its
        first real token and its padding is masked out of attention; pass the same `pad` at every step.
        """
        B, T = idx.shape
        start = cache[0][0].shape[2] if cache else 0
        if start + T > self.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        mask = None
        if pad is not None:
            pos = (pos[None, :] - pad[:, None]).clamp(min=0)  # (B, T): each row counts from its own start
            mask = padding_mask(pad, start, T)  # (B, 1, T, start + T)
        x = self.drop(self.embed(idx) + self.pos(pos))  # (B, T, D)
        present: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cache[i] if cache else None, mask)
            present.append(kv)
        return self.ln_f(x), present


def padding_mask(pad: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """(B, 1, T, start+T) bool: query at absolute position q sees real keys k <= q.

    A padding query also sees itself, so that no row of the softmax is empty (an all-masked row gives NaN,
    and 0 * NaN would leak into the real rows through the values).
    """
    q = torch.arange(start, start + T, device=pad.device)[:, None]  # (T, 1)
    k = torch.arange(start + T, device=pad.device)[None, :]  # (1, start+T)
    real = k[None] >= pad[:, None, None]  # (B, 1, start+T)
    return ((real & (k <= q)[None]) | (k == q)[None])[:, None]  # (B, 1, T, start+T)


def build_gpt(cfg: Any, *, vocab_size: int, max_len: int) -> GPT:
    """Build the GPT backbone for a vocabulary and the data's record length."""
    if cfg.d_model % cfg.n_head:
        raise UserError(f"model.d_model: {cfg.d_model} is not divisible by model.n_head ({cfg.n_head})")
    if max_len > cfg.block_size:
        raise UserError(f"model.block_size: {cfg.block_size} is shorter than data.max_len ({max_len})")
    return GPT(cfg, vocab_size, cfg.block_size)
