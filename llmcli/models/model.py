"""The model every run trains: a backbone with an LM head (L) and a classification head (T).

L is next-token prediction for a causal backbone, the masked-LM loss for an encoder (`Backbone.causal()` False:
the backbone masks the input, L is the NLL of the original tokens at the masked positions, and T reads a second
forward of the unmasked input). The LM head is the backbone's own where it has one (a pretrained model's),
else a linear head tied to the token embedding.
"""

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
    from llmcli.models.prefix_cache import Prefix


class LMHead(nn.Module):
    """A head that transforms the states before its linear decoder (BERT's MLM head: dense, GELU, LayerNorm)."""

    def __init__(self, decoder: nn.Linear, transform: nn.Module) -> None:
        super().__init__()
        self.decoder, self.transform = decoder, transform

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(..., D) states -> (..., V) logits."""
        return self.decoder(self.transform(h))


def head_parts(head: nn.Module) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
    """(transform, decoder weight (V, D), decoder bias (V,) or None) of an `nn.Linear` or `LMHead`."""
    if isinstance(head, LMHead):
        return head.transform, head.decoder.weight, head.decoder.bias
    if isinstance(head, nn.Linear):
        return nn.Identity(), head.weight, head.bias
    raise TypeError(f"an LM head is an nn.Linear or an llmcli.models.model.LMHead, not {type(head).__name__}")


def fused_nll(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
              row_weight: torch.Tensor) -> torch.Tensor:
    """sum_i row_weight_i * CE(h_i @ weight.T + bias, targets_i) for h (N, D) by the chunked fused head."""
    from llmcli.models.fused_ce import linear_cross_entropy

    if bias is not None:  # the bias as one more input column: exact, and (N, V) logits are still never stored
        h = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)  # (N, D+1)
        weight = torch.cat([weight, bias[:, None].to(weight.dtype)], dim=1)  # (V, D+1)
    return linear_cross_entropy(h, weight, targets, row_weight)


class TwoHeadModel(nn.Module):
    """backbone (B, T) -> (B, T, D); lm_head -> token logits; cls_head reads the backbone's pooled features."""

    backbone: Backbone

    def __init__(self, backbone: Backbone, d_model: int, vocab_size: int, n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        own = backbone.lm_head()
        if own is None:
            self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
            if backbone.embed.weight.shape == self.lm_head.weight.shape:
                self.lm_head.weight = backbone.embed.weight  # tied: one matrix reads and writes tokens
        else:
            # the backbone's own head is already a submodule of the backbone: registered here too it would be
            # stored twice in every checkpoint, so it is a plain attribute (`.to()` and `parameters()` reach it
            # through the backbone)
            object.__setattr__(self, "lm_head", own)
        self.cls_head = nn.Linear(d_model, n_classes)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None,
                prefix: Prefix | None = None) -> torch.Tensor:
        """Hidden states (B, T, D); `lengths` (B,) of right-padded records lets an encoder mask its padding.
        `prefix`: the records' cached states below block k (`llmcli.models.prefix_cache`): only blocks k.. run."""
        if prefix is not None:
            return prefix.run(self.backbone, tokens, lengths)
        return self.backbone.states(tokens, lengths) if lengths is not None else self.backbone(tokens)[0]

    def pool(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The task head's features (B, D): the backbone's `pool` (by default the state at each row's last real
        token, its EOS, which has seen the whole record; the fixed-window MLP and encoders mean-pool)."""
        return self.backbone.pool(h, lengths)  # (B, D)

    def lm_kind(self) -> str:
        """"causal" (L = next-token NLL) or "masked" (L = masked-LM NLL of an encoder)."""
        return "causal" if self.backbone.causal() else "masked"

    def lm_targets(self, tokens: torch.Tensor) -> torch.Tensor:
        """The token each position of `lm_nll` predicts: the next one (B, T-1), or the position's own (B, T)."""
        return tokens[:, 1:] if self.backbone.causal() else tokens

    def _lm_rows(self, h: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, step: int | None,
                 picked: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(states that predict (B, T', D), their targets (B, T'), mask of real targets (B, T')) of the LM loss:
        causal, T' = T - 1 from `h`; masked LM, T' = T from a forward of the masked input (or `h` itself when
        it already is that forward's states, `picked` (B, T) bool its masked positions)."""
        if self.backbone.causal():
            return h[:, :-1], tokens[:, 1:], _real(tokens.shape[1] - 1, lengths - 1)
        if picked is not None:
            return h, tokens, picked
        masked, chosen = self.backbone.mask_tokens(tokens, lengths, step)  # (B, T), (B, T) bool
        return self.backbone.states(masked, lengths), tokens, chosen

    def lm_nll(self, h: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, step: int | None = None,
               picked: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position LM NLL, zero off its mask of real targets, aligned with `lm_targets`: next-token (B, T-1)
        from the states `h`; masked LM (B, T) at the masked positions, from a forward of the masked input."""
        states, targets, mask = self._lm_rows(h, tokens, lengths, step, picked)
        transform, weight, bias = head_parts(self.lm_head)
        if self.backbone.causal():
            logits = F.linear(transform(states), weight, bias)  # (B, T-1, V)
            nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(targets)
            return nll * mask, mask
        logits = F.linear(transform(states[mask]), weight, bias)  # (N, V): the masked positions only
        nll = torch.zeros(targets.shape, dtype=torch.float32, device=tokens.device)  # (B, T)
        nll[mask] = F.cross_entropy(logits.float(), targets[mask], reduction="none")
        return nll, mask

    def lm_loss(self, h: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, step: int | None = None,
                picked: torch.Tensor | None = None) -> torch.Tensor:
        """Mean LM NLL over real targets; when training, by the chunked fused head (no (B, T, V) logits).
        `picked`: `h` already is an encoder's masked-input states, these (B, T) its masked positions."""
        transform, weight, bias = head_parts(self.lm_head)
        if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
            nll, mask = self.lm_nll(h, tokens, lengths, step, picked)
            return nll.sum() / mask.sum().clamp(min=1)
        states, targets, mask = self._lm_rows(h, tokens, lengths, step, picked)
        if self.backbone.causal():  # every position, pads weighted 0 (B*(T-1) rows)
            rows, targets = transform(states).reshape(-1, states.shape[-1]), targets.reshape(-1)
            row_weight = (mask.float() / mask.sum().clamp(min=1)).reshape(-1)  # the mean as a weighted sum
        else:  # the ~15 % masked positions only (N rows)
            rows, targets = transform(states[mask]), targets[mask]
            row_weight = torch.full(targets.shape, 1.0 / max(len(targets), 1), device=rows.device)
        return fused_nll(rows, weight, bias, targets, row_weight)

    def losses(self, batch: Batch, task_loss: TaskLoss, step: int | None = None, prefix: Prefix | None = None,
               grads: tuple[bool, bool] = (True, True)) -> dict[str, torch.Tensor]:
        """Mean LM loss over real target tokens, and the task loss over labeled rows; `step` (training) draws an
        encoder's masks; `prefix`: the batch's cached frozen-prefix states (an encoder's masked input runs whole);
        `grads`: whether L and T need a graph (`Objective.grads_needed`): one the update gives zero weight is
        computed for the logs only, without a graph and so without its backward."""
        lm_grad, task_grad = grads
        on = torch.is_grad_enabled()
        picked = None
        if step is not None and self.backbone.task_reads_masked():
            # one forward of the masked input serves both losses (`model.task_input: masked`): the prefix cache
            # holds unmasked states, so it is not read here
            masked, picked = self.backbone.mask_tokens(batch.tokens, batch.lengths, step)  # (B, T), (B, T) bool
            with torch.set_grad_enabled(on and (task_grad or lm_grad)):
                h = self.backbone.states(masked, batch.lengths)  # (B, T, D)
        else:
            # a causal LM's L reads the same states as T; an encoder's L runs its own forward of the masked input
            with torch.set_grad_enabled(on and (task_grad or (lm_grad and self.backbone.causal()))):
                h = self(batch.tokens, batch.lengths, prefix)  # (B, T, D); an encoder's from the unmasked input
        with torch.set_grad_enabled(on and task_grad):
            features = self.pool(h, batch.lengths)  # (B, D): what domain-generalisation methods align
            logits = self.cls_head(features)  # (B, C)
        # L before T, as always: the graph's order sets the order gradients are summed in (bit-identical runs)
        with torch.set_grad_enabled(on and lm_grad):
            lm = self.lm_loss(h, batch.tokens, batch.lengths, step, picked)
        with torch.set_grad_enabled(on and task_grad):
            task = task_loss(logits, batch.labels)
        return {"lm_loss": lm, "task_loss": task, "logits": logits, "features": features}

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


def _real(width: int, n: torch.Tensor) -> torch.Tensor:
    """(B, width) bool: the first n[b] positions of each row."""
    return torch.arange(width, device=n.device)[None, :] < n[:, None]


def build_model(model_cfg: BaseModel, *, vocab_size: int, n_classes: int, max_len: int) -> TwoHeadModel:
    """Backbone from the registry, wrapped with both heads."""
    backbone = registry("model").build(model_cfg, vocab_size=vocab_size, max_len=max_len)
    return TwoHeadModel(backbone, backbone.d_model, vocab_size, n_classes)


def n_params(model: nn.Module) -> int:
    """Unique parameters (a tied matrix counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
