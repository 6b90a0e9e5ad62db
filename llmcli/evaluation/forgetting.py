"""Forgetting, measured: the base model's LM figures beside a run's, per domain (the eval result's `forgetting`).

For a run that starts from pretrained weights (`backbone.pretrained_record()` is not None, LoRA runs included),
eval also scores the base model as `model.path` loads it (the same builder, no adapters, no training) on exactly
the records it scores the run on, with `metrics.score`: lm_loss / ppl / bpb before and after, and after / before.
A base that ships no LM head of its own (a sentence encoder: hf_encoder's `fresh_head`) has nothing to score
zero-shot, so its "before" is the frozen base with only its new MLM head fitted first (`eval.base_head_steps`
steps of the masked-LM loss on the run's training split, AdamW at `eval.base_head_lr`, seeded by the run's seed).

The base figures cost a second pass over the eval data (and, for a head fit, its steps), so they are cached in
`cache_root() / "base_lm"`, keyed by everything they depend on (the base weights' sha256, the model config, the
scored tokens, eval's batching, the head fit's settings and records, the library versions): the runs of a sweep on
one base pay once. A cache file that cannot be read or does not hold its own key is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmcli.errors import UserError
from llmcli.files import atomic_write_json, sha256_json

FORMAT = 1  # bump when what the cached figures mean changes
LM_KEYS = ("lm_loss", "ppl", "bpb")
ZERO_SHOT, FITTED_HEAD = "zero-shot", "fitted head"


@dataclass
class HeadFit:
    """How the new MLM head of a base without one is fitted before "before" is scored."""

    steps: int
    lr: float
    batch_size: int
    seed: int
    domains: list[str]  # the run's L domains: its train split's records of these
    data: Any  # the run's own ProcessedData
    idx: np.ndarray  # (N,) the training-split records the head is fitted on

    def settings(self) -> dict[str, Any]:
        """The fit's settings as the eval JSON and the cache key record them."""
        return {"steps": self.steps, "lr": self.lr, "batch_size": self.batch_size, "seed": self.seed,
                "split": "train", "domains": self.domains, "records": int(len(self.idx)),
                "optimizer": "AdamW (weight_decay 0)", "trained": "the head's transform and decoder bias "
                "(the decoder is tied to the frozen word embeddings); the encoder frozen"}


def measure(t: Any, data: Any, scored: dict[str, np.ndarray], per_domain: dict[str, dict[str, float]],
            in_domain: list[str], task_loss: Any, *, data_config: str | Path | None = None,
            log: Any = print) -> dict[str, Any] | None:
    """The eval result's `forgetting` for the loaded run `t` (None for a from-scratch run): per scored domain the
    base model's lm_loss / ppl / bpb (before), the run's (after) and their ratios (after / before)."""
    record = t.model.backbone.pretrained_record()
    if record is None:
        return None
    t0 = time.perf_counter()
    fit = head_fit(t, data, data_config, log)
    key = cache_key(t, data, scored, fit)
    path = cache_root_base_lm() / f"{sha256_json(key)[:32]}.json"
    cached = read_cache(path, key, list(scored), log)
    if cached is None:
        log(f"eval: scoring the base model {record['path']} for the forgetting figures"
            + (f" (fitting its new MLM head first: {fit.steps} steps)" if fit else ""))
        cached = base_figures(t, data, scored, task_loss, fit, log)
        write_cache(path, key, cached, log)
    after, refit = per_domain, None
    if fit is not None and head_untrained(t.cfg):
        log(f"eval: the run never trained its new MLM head ({head_untrained(t.cfg)}): its 'after' LM figures are its "
            f"fine-tuned encoder with the same head fit as 'before' ({fit.steps} steps)")
        after, refit = refit_figures(t, data, scored, task_loss, fit, log)
    rows = {d: compare(cached["figures"][d], after[d]) for d in scored}
    return {
        "before": FITTED_HEAD if fit else ZERO_SHOT,
        "after": FITTED_HEAD if refit is not None else "as trained",
        "how": describe(record, fit) + ("; after: the run's encoder, frozen, with its MLM head fitted the same way "
                                        "(the run never trained it)" if refit is not None else ""),
        **({"after_head_fit": refit} if refit is not None else {}),
        "base_model": record,
        **({"head_fit": {**fit.settings(), **(cached["head_fit"] or {})}} if fit else {}),
        "lm": t.model.lm_kind(),
        "domains": rows,
        "mean": {"in_domain": _mean(rows, in_domain), "out_of_domain": _mean(rows, [d for d in rows if d not in in_domain])},
        "cache": {"file": str(path), "hit": cached.get("hit", False)},
        "seconds": round(time.perf_counter() - t0, 2),
    }


def cache_root_base_lm() -> Path:
    """Where the base model's figures are cached: `cache_root() / "base_lm"` ($LLMCLI_CACHE, else ~/.cache/llmcli)."""
    from llmcli.models.pretrained import cache_root

    return cache_root() / "base_lm"


def describe(record: dict[str, Any], fit: HeadFit | None) -> str:
    """How "before" was obtained, in one sentence (the eval JSON's `forgetting.how` and the table's caption)."""
    if fit is None:
        return f"the base model {record['path']} as loaded (its own LM head, no adapters, no training), zero-shot"
    return (f"the base model {record['path']} ships no MLM head: the frozen base encoder with only its new MLM head "
            f"fitted first ({fit.steps} steps of the masked-LM loss on the train split of {', '.join(fit.domains)}, "
            f"batch {fit.batch_size}, AdamW lr {fit.lr:g}, seed {fit.seed})")


def compare(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """One domain's before / after LM figures and their ratios (after / before: > 1 means the run lost LM quality)."""
    out: dict[str, float] = {}
    for k in LM_KEYS:
        out[f"{k}_before"], out[f"{k}_after"] = float(before[k]), float(after[k])
    out["ppl_ratio"] = out["ppl_after"] / out["ppl_before"]
    out["bpb_ratio"] = out["bpb_after"] / out["bpb_before"]
    return out


def _mean(rows: dict[str, dict[str, float]], domains: list[str]) -> dict[str, float]:
    """The mean per-domain ratios over some domains (empty when there are none)."""
    picked = [rows[d] for d in domains if d in rows]
    return {k: float(np.mean([r[k] for r in picked])) for k in ("ppl_ratio", "bpb_ratio")} if picked else {}


# ---------------------------------------------------------------- the base model and its figures


def fresh_head(backbone: Any) -> bool:
    """Whether the backbone's LM head was created new at load (an encoder whose folder holds no MLM head)."""
    from llmcli.models.hf import HFEncoder

    return isinstance(backbone, HFEncoder) and backbone.fresh_head


def head_fit(t: Any, data: Any, data_config: str | Path | None, log: Any) -> HeadFit | None:
    """The head fit a base without an LM head needs (None for one with its own): on the run's own train split."""
    if not fresh_head(t.model.backbone):
        return None
    cfg = t.cfg
    if data_config is not None:  # `data` is another config's: the head is fitted on the run's own split
        from llmcli.data.dataset import ProcessedData
        from llmcli.data.preprocess import preprocess

        data = ProcessedData(preprocess(cfg.data, log=log))
    domains = [d for d in data.train_domains if d not in cfg.train.exclude_domains] + data.lm_only_domains
    idx = data.indices("train", domains)
    if not len(idx):
        raise UserError(f"eval.base_head_steps: the run's train split ({', '.join(domains)}) has no records to fit "
                        "the base model's new MLM head on")
    return HeadFit(cfg.eval.base_head_steps, cfg.eval.base_head_lr, cfg.train.batch_size, cfg.seed, domains, data, idx)


def head_untrained(cfg: Any) -> str | None:
    """Why a run never trained its LM head (None if it did): L had no weight, or the head was frozen. An encoder
    whose head was new at load then still has a random head, so its own LM figures say nothing of forgetting."""
    if cfg.objective.name == "weighted" and cfg.objective.alpha == 0:
        return "objective.alpha = 0"
    if "lm_head" in cfg.train.freeze:
        return "train.freeze names lm_head"
    return None


def refit_figures(t: Any, data: Any, scored: dict[str, np.ndarray], task_loss: Any,
                  fit: HeadFit, log: Any = print) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """The run's LM figures with its MLM head fitted as the base's was, from the base's own fresh head (on a copy: the
    loaded run is untouched); the tied decoder is the run's word embeddings, as in the run."""
    import copy

    import torch

    from llmcli.evaluation.metrics import score

    model = copy.deepcopy(t.model).eval()
    tied = model.backbone.embed.weight
    with torch.no_grad():  # same start as the base's fit: AdamW's decay moved the unused head a little
        for mine, base in zip(model.lm_head.parameters(), build_base(t).lm_head.parameters()):
            if mine is not tied:
                mine.copy_(base)
    fitted = fit_head(model, fit)
    prefix = base_prefix(model, t, data, log)
    figures = {d: score(model, data, idx, t.cfg.eval.batch_size, task_loss, prefix=prefix) for d, idx in scored.items()}
    return figures, fitted


def build_base(t: Any) -> Any:
    """The base model as the run's builders load it from `model.path` (no adapters, no objective layers), in eval
    mode; heads created new (the task head, an encoder's new MLM head) start from the run's seed."""
    import torch

    from llmcli.models.model import build_model

    with torch.random.fork_rng(devices=[]):  # the caller's RNG stays as it was
        torch.manual_seed(t.cfg.seed)
        model = build_model(t.cfg.model, vocab_size=t.manifest["vocab_size"], n_classes=len(t.manifest["label_names"]),
                            max_len=t.cfg.data.max_len)
    now, was = model.backbone.pretrained_record(), t.model.backbone.pretrained_record()
    if now is None or now["sha256"] != was["sha256"]:  # LoRA runs were checked at load; a full fine-tune is not
        raise UserError(f"model.path: {was['path']} changed while eval ran (sha256 {was['sha256'][:16]}...)")
    return model.eval()


def fit_head(model: Any, fit: HeadFit) -> dict[str, float]:
    """Fit the base's new MLM head on the masked-LM loss, the encoder frozen; its first and last batch losses."""
    import torch
    import torch.nn.functional as F

    from llmcli.data.dataset import epoch_stream, stream_seed

    backbone, head = model.backbone, model.lm_head
    model.requires_grad_(False)
    tied = backbone.embed.weight  # the decoder's weight: the frozen word embeddings
    params = [p for p in head.parameters() if p is not tied]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=fit.lr, weight_decay=0.0)
    seed, losses = stream_seed(fit.seed, "base_head"), []
    for step in range(fit.steps):
        b = fit.data.batch(fit.idx[epoch_stream(len(fit.idx), seed, step * fit.batch_size, fit.batch_size)])
        with torch.no_grad():  # the encoder is frozen: its states need no graph
            masked, picked = backbone.mask_tokens(b.tokens, b.lengths, step)  # (B, T), (B, T) bool
            states = backbone.states(masked, b.lengths)[picked]  # (N, D) at the masked positions
        if not len(states):
            continue
        loss = F.cross_entropy(head(states).float(), b.tokens[picked])  # head: (N, V) logits
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.requires_grad_(False)
    return {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def base_figures(t: Any, data: Any, scored: dict[str, np.ndarray], task_loss: Any,
                 fit: HeadFit | None, log: Any = print) -> dict[str, Any]:
    """The base model's LM figures (n, lm_loss, ppl, bpb) on each domain's scored records, by `metrics.score`."""
    from llmcli.evaluation.metrics import score

    model = build_base(t)
    fitted = fit_head(model, fit) if fit else None
    prefix = base_prefix(model, t, data, log)
    figures = {}
    for d, idx in scored.items():
        m = score(model, data, idx, t.cfg.eval.batch_size, task_loss, prefix=prefix)
        figures[d] = {"n": m["n"], **{k: m[k] for k in LM_KEYS}}
    return {"figures": figures, "head_fit": fitted}


def base_prefix(model: Any, t: Any, data: Any, log: Any = print) -> Any:
    """The frozen-prefix cache the base model's figures read, or None (the whole base model runs).

    With the run's train.freeze, the base's bottom blocks are the very tensors the run kept frozen (LoRA on the top
    blocks, a fine-tune of the top ones), so the cache key, and the states the run's own eval just read, are the
    same: the base model's figures then cost its top blocks only (SmolLM2, 24 of 30 frozen: the full base forward
    over 5 x 600 test records was most of a sweep point's eval). A prefix the run changed (init_from) is another
    key: computed once, as for any run. `train.prefix_cache: off` keeps the whole model running."""
    if t.cfg.train.prefix_cache == "off":
        return None
    from llmcli.models.prefix_cache import open_cache

    cache, _ = open_cache(model, t.cfg.train.freeze, data, storage=t.cfg.train.prefix_cache_dtype,
                          batch_size=t.cfg.eval.batch_size, device=str(next(model.parameters()).device), log=log)
    return cache


# ---------------------------------------------------------------- the cache


def _records_digest(data: Any, idx: np.ndarray) -> str:
    """sha256 of the token ids of some records, in order (their lengths included)."""
    h = hashlib.sha256(np.ascontiguousarray(data.lengths(idx), dtype=np.int64).tobytes())
    for start, end in zip(data.offsets[idx], data.offsets[idx + 1]):
        h.update(np.ascontiguousarray(data.tokens[start:end], dtype=np.int64).tobytes())
    return h.hexdigest()


def cache_key(t: Any, data: Any, scored: dict[str, np.ndarray], fit: HeadFit | None) -> dict[str, Any]:
    """Everything the base figures depend on (JSON): a change in any of it never reuses a cached figure."""
    import torch
    import transformers

    model = t.cfg.model.model_dump(mode="json")
    model.pop("path", None)  # the weights are named by their sha256 (one model may be spelled several ways)
    model.pop("task_input", None)  # what an encoder's task head reads in training: the base is never trained
    return {
        "format": FORMAT,
        "base_sha256": t.model.backbone.pretrained_record()["sha256"],
        "model": model,
        "vocab_size": int(t.manifest["vocab_size"]),
        "max_len": int(t.cfg.data.max_len),
        "tokenizer_sha256": data.manifest.get("tokenizer_sha256"),
        "token_bytes": hashlib.sha256(data.token_bytes.numpy().tobytes()).hexdigest(),  # bpb's denominators
        "eval_batch_size": int(t.cfg.eval.batch_size),
        "eval_max_examples": t.cfg.eval.max_examples,
        # read through the prefix cache (base_prefix) or not: fp16 storage rounds the states
        "prefix_cache": "off" if t.cfg.train.prefix_cache == "off" else t.cfg.train.prefix_cache_dtype,
        "scored": {d: _records_digest(data, idx) for d, idx in scored.items()},  # split, domains and cap, exactly
        "head_fit": None if fit is None else {**{k: v for k, v in fit.settings().items() if k != "trained"},
                                              "records_sha256": _records_digest(fit.data, fit.idx)},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def _valid(obj: Any, key: dict[str, Any], domains: list[str]) -> bool:
    """A cache file's content is the figures of exactly this key: every domain, every figure a positive number."""
    if not isinstance(obj, dict) or obj.get("key") != key or not isinstance(obj.get("figures"), dict):
        return False
    figures = obj["figures"]
    if sorted(figures) != sorted(domains) or not isinstance(obj.get("head_fit", {}), (dict, type(None))):
        return False
    for f in figures.values():
        vals = [f.get(k) if isinstance(f, dict) else None for k in LM_KEYS]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in vals):
            return False
    return True


def read_cache(path: Path, key: dict[str, Any], domains: list[str], log: Any) -> dict[str, Any] | None:
    """The cached base figures of `key` (with hit=True), or None when there are none or the file is damaged."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        log(f"eval: {path}: unreadable base-model cache ({type(exc).__name__}); recomputing it")
        return None
    if not _valid(obj, key, domains):
        log(f"eval: {path}: the base-model cache does not hold this key's figures; recomputing it")
        return None
    return {"figures": obj["figures"], "head_fit": obj.get("head_fit"), "hit": True}


def write_cache(path: Path, key: dict[str, Any], cached: dict[str, Any], log: Any) -> None:
    """Write the base figures atomically; a cache that cannot be written only costs the next eval a recompute."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"key": key, **cached})
    except (OSError, UserError) as exc:
        log(f"eval: cannot cache the base model's figures in {path.parent} ({exc}); the next eval recomputes them")


# ---------------------------------------------------------------- the eval tables

TABLE = (("ppl before", "ppl_before"), ("ppl ratio", "ppl_ratio"), ("bpb before", "bpb_before"))


def table_columns(result: dict[str, Any]) -> list[str]:
    """The eval table's forgetting columns (none for a from-scratch run or `--no-base`)."""
    return [name for name, _ in TABLE] if result.get("forgetting") else []


def table_cells(result: dict[str, Any], domain: str | None) -> list[float | None]:
    """One row's forgetting cells (domain None: the mean-gap rows, which have none)."""
    f = result.get("forgetting")
    if not f:
        return []
    row = f["domains"].get(domain, {}) if domain is not None else {}
    return [row.get(k) for _, k in TABLE]


def caption(result: dict[str, Any]) -> str:
    """The eval table caption's forgetting part: what "before" is, what the ratio means, its means."""
    f = result.get("forgetting")
    if not f:
        return ""
    means = ", ".join(f"{where} {f['mean'][key]['ppl_ratio']:.3f}" for where, key in
                      (("in-domain", "in_domain"), ("OOD", "out_of_domain")) if f["mean"].get(key))
    return (f"; ppl / bpb before: {f['how']}; ppl ratio = ppl / ppl before (> 1: the run lost LM quality on that "
            f"domain, < 1: it gained)" + (f", mean {means}" if means else ""))


def comparison_columns(results: list[dict[str, Any]]) -> list[str]:
    """The several-runs table's forgetting columns, where any run has the figures."""
    return ["in ppl ratio", "ood ppl ratio"] if any(r.get("forgetting") for r in results) else []


def comparison_cells(result: dict[str, Any], results: list[dict[str, Any]]) -> list[float | None]:
    """One run's mean in-domain and OOD ppl ratio (None where it has none)."""
    if not comparison_columns(results):
        return []
    mean = (result.get("forgetting") or {}).get("mean", {})
    return [mean.get(k, {}).get("ppl_ratio") for k in ("in_domain", "out_of_domain")]
