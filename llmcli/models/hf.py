"""`hf_causal`: a local Hugging Face causal LM directory as the backbone (optional extra `llmcli[hf]`).

The base transformer (no LM head of its own) produces the states; llmcli's two heads sit on top, the LM head
tied to the model's input embeddings. Nothing is downloaded: the directory must hold config + weights. The
token embeddings are resized to the run's vocabulary when it differs (llmcli trains its own tokenizer, so
those rows start fresh; the transformer blocks keep their pretrained weights).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llmcli.contracts import Backbone
from llmcli.errors import UserError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from llmcli.config import HFCausalConfig


class HFCausal(nn.Module, Backbone):
    """(B, T) ids -> (B, T, D) last hidden states; the cache is the model's own past_key_values."""

    def __init__(self, base: nn.Module, block_size: int) -> None:
        super().__init__()
        self.hf = base
        self.d_model = int(base.config.hidden_size)
        self.block_size = block_size
        # transformers >= 5.x renamed `past_key_values` to `cache` (argument and output field)
        self._cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    @property
    def embed(self) -> nn.Embedding:
        """The input token embeddings (tied to llmcli's LM head)."""
        return self.hf.get_input_embeddings()

    def forward(self, idx: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        """States for `idx`; with a cache, `idx` continues the cached sequence (right padding needs no mask:
        attention is causal, so no real position sees a pad)."""
        kw = {self._cache_arg: cache} if cache is not None else {}
        out = self.hf(input_ids=idx, use_cache=True, **kw)
        return out.last_hidden_state, out[self._cache_arg]  # (B, T, D), cache


def _block_size(config: PretrainedConfig) -> int:
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(getattr(config, key, None), int):
            return int(getattr(config, key))
    return 1 << 30  # no learned positions (e.g. rotary): no fixed limit


def build_hf_causal(cfg: HFCausalConfig, *, vocab_size: int, max_len: int) -> HFCausal:
    """Load `cfg.path` (local files only) and fit its embeddings to the run's vocabulary."""
    try:
        from transformers import AutoModel
    except ImportError:
        raise UserError("model.name: hf_causal needs the optional extra: pip install 'llmcli[hf]'") from None
    path = Path(cfg.path)
    if not (path / "config.json").is_file():
        raise UserError(f"model.path: {path} is not a Hugging Face model directory (no config.json)")
    try:
        base = AutoModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"model.path: cannot load {path} ({str(exc).splitlines()[0]})") from None
    block = min(_block_size(base.config), cfg.block_size or 1 << 30)
    if max_len > block:
        raise UserError(f"model.block_size: the model at {path} sees {block} positions, data.max_len is {max_len}")
    if base.get_input_embeddings().weight.shape[0] != vocab_size:
        base.resize_token_embeddings(vocab_size)
    return HFCausal(base, block)
