"""Scoring a model on a set of records: the metric names here are part of llmcli's interface."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

# Metrics where higher is better; for the rest (losses, ppl, bpb) lower is better.
HIGHER_IS_BETTER = {"acc", "macro_f1"}
GAP_METRICS = ("acc", "macro_f1", "task_loss", "lm_loss", "ppl", "bpb")


@torch.inference_mode()
def score(model: Any, data: Any, idx: np.ndarray, batch_size: int, task_loss: Any, device: str = "cpu") -> dict[str, float]:
    """lm_loss, ppl, bpb, task_loss, acc, macro_f1 over the records `idx` (batched by length)."""
    from sklearn.metrics import f1_score

    was_training = model.training
    model.eval()
    idx = idx[np.argsort(data.lengths(idx), kind="stable")]  # similar lengths together: less padding
    nll_sum, n_tok, n_bytes, t_sum, n_lab = 0.0, 0, 0, 0.0, 0
    preds, golds = [], []
    token_bytes = data.token_bytes.to(device)
    for start in range(0, len(idx), batch_size):
        b = data.batch(idx[start : start + batch_size])
        tokens, lengths, labels = b.tokens.to(device), b.lengths.to(device), b.labels.to(device)
        h = model(tokens)  # (B, T, D)
        nll, mask = model.lm_nll(h, tokens, lengths)
        nll_sum += float(nll.sum())
        n_tok += int(mask.sum())
        n_bytes += int((token_bytes[tokens[:, 1:]] * mask).sum())
        logits = model.cls_head(model.pool(h, lengths))  # (B, C)
        lab = labels >= 0
        if lab.any():
            t_sum += float(task_loss(logits[lab], labels[lab])) * int(lab.sum())
            n_lab += int(lab.sum())
            preds.append(logits[lab].argmax(-1).cpu().numpy())
            golds.append(labels[lab].cpu().numpy())
    model.train(was_training)
    lm_loss = nll_sum / max(n_tok, 1)
    out = {"n": int(len(idx)), "lm_loss": lm_loss, "ppl": math.exp(min(lm_loss, 50.0)),
           "bpb": nll_sum / math.log(2) / max(n_bytes, 1)}
    if n_lab:
        p, g = np.concatenate(preds), np.concatenate(golds)
        out.update(task_loss=t_sum / n_lab, acc=float((p == g).mean()),
                   macro_f1=float(f1_score(g, p, average="macro", labels=np.unique(g), zero_division=0)))
    return out


def gaps(per_domain: dict[str, dict[str, float]], in_domains: list[str]) -> dict[str, dict[str, float]]:
    """gap_<metric> = in-domain minus out-of-domain, per OOD domain and their mean."""
    ind = {m: float(np.mean([per_domain[d][m] for d in in_domains])) for m in GAP_METRICS if m in per_domain[in_domains[0]]}
    ood = [d for d in per_domain if d not in in_domains]
    out = {d: {f"gap_{m}": ind[m] - per_domain[d][m] for m in ind if m in per_domain[d]} for d in ood}
    if ood:
        out["mean"] = {k: float(np.mean([out[d][k] for d in ood])) for k in out[ood[0]]}
    return out
