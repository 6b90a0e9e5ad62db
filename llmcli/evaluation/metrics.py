"""Scoring a model on a set of records: the metric names here are part of llmcli's interface."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from llmcli.contracts import TaskLoss
    from llmcli.data.dataset import ProcessedData
    from llmcli.models.model import TwoHeadModel
    from llmcli.models.prefix_cache import PrefixCache

# Metrics where higher is better; for the rest (losses, ppl, bpb) lower is better.
HIGHER_IS_BETTER = {"acc", "macro_f1", "macro_recall"}
GAP_METRICS = ("acc", "macro_f1", "macro_recall", "ece", "task_loss", "lm_loss", "ppl", "bpb")
ECE_BINS = 15


@torch.inference_mode()
def score(model: TwoHeadModel, data: ProcessedData, idx: np.ndarray, batch_size: int, task_loss: TaskLoss,
          device: str = "cpu", details: dict[str, Any] | None = None,
          prefix: PrefixCache | None = None) -> dict[str, float]:
    """lm_loss, ppl, bpb, task_loss, acc, macro_f1, macro_recall, ece over the records `idx` (batched by length).

    `details`, when given, receives the class probabilities ("probs", (N, C)) and gold labels ("golds", (N,)).
    `prefix`: the run's frozen prefix cache (llmcli.models.prefix_cache): blocks k.. run from its states.
    """
    was_training = model.training
    model.eval()
    idx = idx[np.argsort(data.lengths(idx), kind="stable")]  # similar lengths together: less padding
    if prefix is not None:
        prefix.ensure(idx)  # computes what is not cached yet (once)
    nll_sum, n_tok, n_bytes, t_sum, n_lab = 0.0, 0, 0, 0.0, 0
    probs, golds = [], []
    token_bytes = data.token_bytes.to(device)
    for start in range(0, len(idx), batch_size):
        b = data.batch(idx[start : start + batch_size])
        tokens, lengths, labels = b.tokens.to(device), b.lengths.to(device), b.labels.to(device)
        given = prefix.states(idx[start : start + batch_size], device) if prefix is not None else None
        h = model(tokens, lengths) if given is None else model(tokens, lengths, given)  # (B, T, D)
        nll, mask = model.lm_nll(h, tokens, lengths)
        nll_sum += float(nll.sum())
        n_tok += int(mask.sum())
        n_bytes += int((token_bytes[model.lm_targets(tokens)] * mask).sum())  # bytes of the predicted tokens
        logits = model.cls_head(model.pool(h, lengths))  # (B, C)
        lab = labels >= 0
        if lab.any():
            t_sum += float(task_loss(logits[lab], labels[lab])) * int(lab.sum())
            n_lab += int(lab.sum())
            probs.append(logits[lab].float().softmax(-1).cpu().numpy())
            golds.append(labels[lab].cpu().numpy())
    model.train(was_training)
    lm_loss = nll_sum / max(n_tok, 1)
    out = {"n": int(len(idx)), "lm_loss": lm_loss, "ppl": math.exp(min(lm_loss, 50.0)),
           "bpb": nll_sum / math.log(2) / max(n_bytes, 1)}
    if n_lab:
        p, g = np.concatenate(probs), np.concatenate(golds)
        out.update(task_loss=t_sum / n_lab, **classification_metrics(p, g))
        if details is not None:
            details.update(probs=p, golds=g)
    return out


def classification_metrics(probs: np.ndarray, golds: np.ndarray) -> dict[str, float]:
    """acc, macro_f1, macro_recall (over the classes present in `golds`) and top-1 ECE with 15 bins."""
    from sklearn.metrics import accuracy_score, f1_score, recall_score
    from torchmetrics.functional.classification import multiclass_calibration_error

    pred = probs.argmax(-1)  # (N,)
    present = np.unique(golds)  # a class absent from the split has no recall to average
    ece = multiclass_calibration_error(torch.from_numpy(probs), torch.from_numpy(golds.astype(np.int64)),
                                       num_classes=probs.shape[1], n_bins=ECE_BINS, norm="l1")
    return {"acc": float(accuracy_score(golds, pred)),
            "macro_f1": float(f1_score(golds, pred, average="macro", labels=present, zero_division=0)),
            "macro_recall": float(recall_score(golds, pred, average="macro", labels=present, zero_division=0)),
            "ece": float(ece)}


def reliability_bins(probs: np.ndarray, golds: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Per confidence bin (uniform on [0, 1]): mean confidence, accuracy and count of the top-1 predictions."""
    conf = probs.max(-1)  # (N,)
    correct = (probs.argmax(-1) == golds).astype(np.float64)
    # the same binning as torchmetrics' ECE: bin i holds confidences in (i/n, (i+1)/n]
    which = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    safe = np.maximum(count, 1)
    return {"confidence": (np.bincount(which, conf, n_bins) / safe).tolist(),
            "accuracy": (np.bincount(which, correct, n_bins) / safe).tolist(),
            "count": count.tolist()}


def gaps(per_domain: dict[str, dict[str, float]], in_domains: list[str]) -> dict[str, dict[str, float]]:
    """gap_<metric> = in-domain minus out-of-domain, per OOD domain and their mean."""
    ind = {m: float(np.mean([per_domain[d][m] for d in in_domains])) for m in GAP_METRICS if m in per_domain[in_domains[0]]}
    ood = [d for d in per_domain if d not in in_domains]
    out = {d: {f"gap_{m}": ind[m] - per_domain[d][m] for m in ind if m in per_domain[d]} for d in ood}
    if ood:
        out["mean"] = {k: float(np.mean([out[d][k] for d in ood])) for k in out[ood[0]]}
    return out
