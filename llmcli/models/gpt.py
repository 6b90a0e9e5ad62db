"""Decoder-only pre-norm Transformer backbone (GPT-2 style) with a KV cache for generation."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.contracts import Backbone
from llmcli.errors import UserError

if TYPE_CHECKING:
    from llmcli.config import GPTConfig


class KVCache:
    """Keys and values of every layer, (B, H, T, Dh) each, for decoding one token per step.

    The prefill's keys/values are kept as computed, so a training forward pays nothing for the cache. The
    first cached step moves them into buffers of `capacity` (= block_size) positions; from then on a step
    writes its token in place and attends over a view of the filled part: no per-step torch.cat, which would
    re-copy the whole past of every layer at every token.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0  # positions filled (the same in every layer once a forward has finished)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.weights: list[tuple] | None = None  # GPT.decode_weights(), gathered by the first one-token step

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this layer's new keys/values (B, H, T, Dh); return all of them (B, H, length+T, Dh)."""
        if layer == len(self.k):  # prefill: nothing cached for this layer yet
            self.k.append(k)
            self.v.append(v)
            return k, v
        start, T = self.length, k.shape[2]
        if self.k[layer].shape[2] != self.capacity:  # first step after the prefill: move into buffers
            self.k[layer] = self._buffer(self.k[layer])
            self.v[layer] = self._buffer(self.v[layer])
        K, V = self.k[layer], self.v[layer]  # (B, H, capacity, Dh)
        K[:, :, start:start + T] = k
        V[:, :, start:start + T] = v
        return K[:, :, :start + T], V[:, :, :start + T]

    def _buffer(self, filled: torch.Tensor) -> torch.Tensor:
        B, H, T, Dh = filled.shape
        buf = filled.new_empty(B, H, self.capacity, Dh)  # (B, H, capacity, Dh)
        buf[:, :, :T] = filled
        return buf


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with one fused QKV projection."""

    def __init__(self, d_model: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cache: KVCache, layer: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)  # each (B, T, D)
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        first = cache.length == 0
        k, v = cache.update(layer, k, v)  # (B, H, P+T, Dh)
        # With a cache, new queries may see every cached key; causality among the new ones still holds
        # when T > 1 only if there is no past, so a prefill uses is_causal and a step (T == 1) does not.
        # An explicit mask (left-padded batches) already holds causality.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=first and mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.proj(y)


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

    def forward(self, x: torch.Tensor, cache: KVCache, layer: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, layer, mask)
        fc, _, proj, drop = self.mlp  # called part by part: the Sequential (checkpoint names) and GELU dispatch
        return x + drop(proj(F.gelu(fc(self.ln2(x)))))  # are pure overhead in a one-token decoding step


class GPT(nn.Module, Backbone):
    """Token + position embeddings, n_layer blocks, a final norm: (B, T) ids -> (B, T, D) states."""

    def __init__(self, cfg: GPTConfig, vocab_size: int, block_size: int) -> None:
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
            if isinstance(m, nn.Linear) and m.bias is not None:  # an embedding has no bias
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                pad: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """States for `idx`; with a cache, `idx` continues the cached sequence.

        pad: (B,) left-padding count of each row (batched generation): a row's positions start at its
        first real token and its padding is masked out of attention; pass the same `pad` at every step.
        """
        B, T = idx.shape
        cache = cache if cache is not None else KVCache(self.block_size)
        start = cache.length
        if start + T > self.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.block_size}")
        if T == 1 and start and not torch.is_grad_enabled() and not self.training:
            if cache.weights is None:
                cache.weights = self.decode_weights()
            if cache.weights:  # [] when a module must run as itself (hooks, quantised layers)
                return self._step(idx, cache, pad)
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        mask = None
        if pad is not None:
            pos = (pos[None, :] - pad[:, None]).clamp(min=0)  # (B, T): each row counts from its own start
            mask = padding_mask(pad, start, T)  # (B, 1, T, start + T)
        x = self.drop(self.embed(idx) + self.pos(pos))  # (B, T, D)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, mask)
        cache.length = start + T
        return self.ln_f(x), cache

    def residual_blocks(self) -> list[nn.Module]:
        """The transformer blocks, in order."""
        return list(self.blocks)

    def _hooked(self) -> bool:
        """Whether a forward hook (or pre-hook) sits inside the backbone, e.g. the conditioned mode's FiLM, or a
        global one: _step would skip it, so such a model decodes through its modules."""
        from torch.nn.modules import module as nn_module

        inner = [m for m in self.modules() if m is not self]
        return (any(m._forward_hooks or m._forward_pre_hooks for m in inner)
                or bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks))

    def _step(self, idx: torch.Tensor, cache: KVCache, pad: torch.Tensor | None) -> tuple[torch.Tensor, KVCache]:
        """forward() for one new token per row in evaluation, written with functional calls on (B, D) rows.

        A decoding step does ~1 us of arithmetic per op and several us of module and shape bookkeeping; this
        path does the same arithmetic (tests compare it with forward) with fewer calls, on weights gathered
        once per cache (`decode_weights`) instead of ~60 module attribute lookups per step.
        """
        B, D = idx.shape[0], self.d_model
        start = cache.length
        pos = torch.full((B,), start, device=idx.device) if pad is None else (start - pad).clamp(min=0)  # (B,)
        mask = None if pad is None else padding_mask(pad, start, 1)  # (B, 1, 1, start+1)
        x = F.embedding(idx[:, 0], self.embed.weight) + F.embedding(pos, self.pos.weight)  # (B, D)
        for i, (ln1, qkv, proj, ln2, fc, fc2, H) in enumerate(cache.weights):
            q, k, v = _linear(F.layer_norm(x, (D,), *ln1), qkv).view(B, 3, H, 1, D // H).unbind(1)  # (B, H, 1, Dh)
            k, v = cache.update(i, k, v)  # (B, H, start+1, Dh)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, 1, Dh)
            x = x + _linear(y.reshape(B, D), proj)
            x = x + _linear(F.gelu(_linear(F.layer_norm(x, (D,), *ln2), fc)), fc2)
        cache.length = start + 1
        return F.layer_norm(x, (D,), self.ln_f.weight, self.ln_f.bias)[:, None], cache  # (B, 1, D)

    def decode_weights(self) -> list[tuple]:
        """Per block: LayerNorm (weight, bias) pairs and Linear (weight.T contiguous, bias) pairs, and n_head.

        (1, in) @ (in, out) on a contiguous transposed copy runs ~1.3x faster than F.linear's (out, in)
        GEMV at these sizes; the copies live as long as the cache (one generation), weights do not change.
        [] when _step cannot stand in for the modules: a forward hook inside the backbone (the conditioned
        mode's FiLM) or a Linear that is not a plain nn.Linear (a quantised one).
        """
        linears = [m for b in self.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp[0], b.mlp[2])]
        if self._hooked() or any(type(m) is not nn.Linear for m in linears):
            return []

        def lin(m: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
            return m.weight.t().contiguous(), m.bias

        return [((b.ln1.weight, b.ln1.bias), lin(b.attn.qkv), lin(b.attn.proj), (b.ln2.weight, b.ln2.bias),
                 lin(b.mlp[0]), lin(b.mlp[2]), b.attn.n_head) for b in self.blocks]


def _linear(x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """x @ W.T + b with W.T given contiguous: (B, in) -> (B, out)."""
    wt, b = wb
    return x @ wt if b is None else torch.addmm(b, x, wt)


def padding_mask(pad: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """(B, 1, T, start+T) bool: query at absolute position q sees real keys k <= q.

    A padding query also sees itself, so that no row of the softmax is empty (an all-masked row gives NaN,
    and 0 * NaN would leak into the real rows through the values).
    """
    q = torch.arange(start, start + T, device=pad.device)[:, None]  # (T, 1)
    k = torch.arange(start + T, device=pad.device)[None, :]  # (1, start+T)
    real = k[None] >= pad[:, None, None]  # (B, 1, start+T)
    return ((real & (k <= q)[None]) | (k == q)[None])[:, None]  # (B, 1, T, start+T)


def build_gpt(cfg: GPTConfig, *, vocab_size: int, max_len: int) -> GPT:
    """Build the GPT backbone for a vocabulary and the data's record length."""
    if cfg.d_model % cfg.n_head:
        raise UserError(f"model.d_model: {cfg.d_model} is not divisible by model.n_head ({cfg.n_head})")
    if max_len > cfg.block_size:
        raise UserError(f"model.block_size: {cfg.block_size} is shorter than data.max_len ({max_len})")
    return GPT(cfg, vocab_size, cfg.block_size)
