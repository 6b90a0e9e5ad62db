"""The model every run trains: a backbone with an LM head (L) and a classification head (T)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.contracts import Backbone, TaskLoss
from llmcli.registry import registry

if TYPE_CHECKING:
    from pydantic import BaseModel

    from llmcli.data.dataset import Batch


class TwoHeadModel(nn.Module):
    """backbone (B, T) -> (B, T, D); lm_head -> next-token logits; cls_head reads the backbone's pooled features."""

    backbone: Backbone

    def __init__(self, backbone: Backbone, d_model: int, vocab_size: int, n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if backbone.embed.weight.shape == self.lm_head.weight.shape:
            self.lm_head.weight = backbone.embed.weight  # tied: one matrix reads and writes tokens
        self.cls_head = nn.Linear(d_model, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, D)."""
        return self.backbone(tokens)[0]

    def pool(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The task head's features (B, D): the backbone's `pool` (by default the state at each row's last real
        token, its EOS, which has seen the whole record; the fixed-window MLP mean-pools)."""
        return self.backbone.pool(h, lengths)  # (B, D)

    def lm_nll(self, h: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position next-token NLL (B, T-1) and its mask of real targets (padding excluded)."""
        logits = self.lm_head(h[:, :-1])  # (B, T-1, V)
        targets = tokens[:, 1:]  # (B, T-1)
        mask = torch.arange(targets.shape[1], device=tokens.device)[None, :] < (lengths[:, None] - 1)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(targets)
        return nll * mask, mask

    def lm_loss(self, h: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Mean next-token NLL over real targets; when training, by the chunked fused head (no (B, T, V) logits)."""
        if not (torch.is_grad_enabled() and (h.requires_grad or self.lm_head.weight.requires_grad)):
            nll, mask = self.lm_nll(h, tokens, lengths)
            return nll.sum() / mask.sum().clamp(min=1)
        from llmcli.models.fused_ce import linear_cross_entropy

        targets = tokens[:, 1:]  # (B, T-1)
        mask = torch.arange(targets.shape[1], device=tokens.device)[None, :] < (lengths[:, None] - 1)  # (B, T-1)
        weight = mask.float() / mask.sum().clamp(min=1)  # (B, T-1): the mean as a weighted sum
        return linear_cross_entropy(h[:, :-1].reshape(-1, h.shape[-1]), self.lm_head.weight,
                                    targets.reshape(-1), weight.reshape(-1))

    def losses(self, batch: Batch, task_loss: TaskLoss) -> dict[str, torch.Tensor]:
        """Mean LM loss over real target tokens, and the task loss over labeled rows."""
        h = self(batch.tokens)  # (B, T, D)
        features = self.pool(h, batch.lengths)  # (B, D): what domain-generalisation methods align
        logits = self.cls_head(features)  # (B, C)
        return {
            "lm_loss": self.lm_loss(h, batch.tokens, batch.lengths),
            "task_loss": task_loss(logits, batch.labels),
            "logits": logits,
            "features": features,
        }

    def shared_parameters(self) -> list[nn.Parameter]:
        """Weights both losses flow through (the backbone, tied embedding included)."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def decay_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(decayed, not decayed): matrices decay; norms, biases and embeddings do not."""
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        decay, no_decay, seen = [], [], set()
        for p in self.parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
        return decay, no_decay


def build_model(model_cfg: BaseModel, *, vocab_size: int, n_classes: int, max_len: int) -> TwoHeadModel:
    """Backbone from the registry, wrapped with both heads."""
    backbone = registry("model").build(model_cfg, vocab_size=vocab_size, max_len=max_len)
    return TwoHeadModel(backbone, backbone.d_model, vocab_size, n_classes)


def n_params(model: nn.Module) -> int:
    """Unique parameters (a tied matrix counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
