"""Speed of the pretrained path, side by side: llmcli against plain transformers on the same model and batches.

Parts (issue 18, item 8), each side in a subprocess of its own, so its peak RSS (`ru_maxrss`) is its own:
- train: tokens/s and peak RSS of llmcli's step (the engine's `_accumulate`, clip, optimiser and schedule step,
  as bench/train_throughput.py takes it, on a `Session` llmcli builds from a config naming the model) at
  alpha 0.5 and alpha 1, fp32 and under CPU bf16 autocast, against a plain transformers step
  (`model(input_ids, attention_mask, labels=...).loss.backward()`, clip, `torch.optim.AdamW`) on the same
  records in the same order (the batches llmcli's `_batch_indices` draws; an encoder's masks are llmcli's).
  What each computes: llmcli L (next-token or masked-LM NLL by the chunked fused head) and T (genre head on
  the pooled states; for an encoder a second forward of the unmasked input), backward of alpha L + (1 - alpha) T;
  transformers L only, through (B, T, V) logits. An encoder also gets `llmcli_one_pass` (alpha 0.5 with
  `model.task_input=masked`: T reads the masked input's states, one forward for both losses).
- eval: tokens/s of llmcli's `metrics.score` (LM and task metrics) against transformers' forward with labels
  under `inference_mode`, on the same test records batched alike, and the zero-shot perplexity of both on them
  (the issue's equality check; an encoder without an MLM head of its own is given llmcli's new head).
- prefix (issue 18, item 6): llmcli's step with the bottom blocks frozen (`train.freeze=[bottom:K]`, K = all but
  the top `--prefix-top` blocks), the whole model running every step (`train.prefix_cache=off`) against the
  frozen-prefix cache (`auto`; its one-off build, for the timed batches' records, reported apart): the same losses,
  and the speed-up a run and every sweep point with that prefix gets.
- generate (causal models): llmcli's greedy KV-cached generation (`evaluation.generate.complete`) against
  transformers' `model.generate(do_sample=False)` from the same prompt ids, N new tokens each (EOS held off for
  N tokens on both sides): the same tokens, and tokens/s.

Usage: python bench/pretrained.py --model builtin:smollm2 [--steps 5] [--warmup 1] [--batch 4] [--len 32]
       [--threads 2] [--eval-records 64] [--new-tokens 32] [--parts train,eval,generate,prefix] [--prefix-top 6]
       [--no-bf16] [--profile]
`--inline` runs every side in this one process (peak RSS is then not per side): a quick check of the code paths.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, emit  # noqa: E402

PROMPT = "In the beginning God created the heaven and the earth."
COMPUTES = {
    "llmcli": "L (fused head) + T, backward of 0.5 L + 0.5 T",
    "llmcli_alpha1": "L (fused head) + T, backward of 1.0 L + 0.0 T",
    "llmcli_bf16": "as llmcli, under torch.autocast('cpu', bfloat16)",
    "llmcli_one_pass": "as llmcli, model.task_input=masked: T from the masked input's states (one forward)",
    "transformers": "L only: model(input_ids, attention_mask, labels).loss, full (B, T, V) logits",
    "prefix_off": "as llmcli, bottom K blocks frozen, the whole model runs every step",
    "prefix_cached": "as llmcli, bottom K blocks frozen, their states read from the prefix cache",
}
TRAIN_SIDES = ("llmcli", "llmcli_alpha1", "llmcli_one_pass", "llmcli_bf16", "transformers")
EVAL_SIDES = ("llmcli", "llmcli_bf16", "transformers")
GEN_SIDES = ("llmcli", "transformers")
PREFIX_SIDES = ("prefix_off", "prefix_cached")


# ---------------------------------------------------------------- shared by both sides


def quiet(_: str) -> None:
    """Swallow llmcli's progress lines."""


def model_kind(spec: str) -> str:
    """hf_causal for a causal LM folder (its architecture is *ForCausalLM / *LMHeadModel), else hf_encoder."""
    from llmcli.models.pretrained import resolve

    arch = json.loads((resolve(spec).dir / "config.json").read_text()).get("architectures") or []
    return "hf_causal" if any("CausalLM" in a or "LMHeadModel" in a for a in arch) else "hf_encoder"


def overrides(job: dict[str, Any]) -> list[str]:
    """The config llmcli builds the run from: configs/tiny.yaml with the model, the KJV only, short records."""
    return [f"model={{name: {job['kind']}, path: '{job['model']}'}}", "data.tokenizer={name: pretrained}",
            f"data.source={{name: bible, versions: [kjv], label: genre, max_chapters_per_book: {job['chapters']}}}",
            f"data.max_len={job['len']}", f"data.processed_dir={job['tmp']}/processed", "train.device=cpu",
            f"train.batch_size={job['batch']}", f"train.threads={job['threads']}", "objective.log_grad_every=0",
            f"train.steps={job['steps'] + job['warmup']}", "schedule.warmup_steps=0"]


def config(job: dict[str, Any], *more: str) -> Any:
    """The run's config (plus `more` overrides)."""
    from llmcli.config import load_config

    return load_config(ROOT / "configs" / "tiny.yaml", [*overrides(job), *more])


def memory(loaded_kb: int) -> dict[str, float]:
    """Peak RSS of this process (ru_maxrss) and RSS right after loading the model, in MB."""
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "load_rss_mb": loaded_kb / 1024}


def rss_kb() -> int:
    """Resident set size now, in KB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def bf16(on: bool) -> Any:
    """CPU bf16 autocast when `on`, else nothing."""
    import contextlib

    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def profile_top(step: Any, n: int = 12) -> list[dict[str, Any]]:
    """torch.profiler over one call of `step`: the `n` ops with the most self CPU time (ms, share)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1), "share": round(e.self_cpu_time_total / total, 3)}
            for e in events[:n]]


def hf_model(job: dict[str, Any]) -> Any:
    """The model as a plain transformers user loads it (an encoder as AutoModelForMaskedLM), float32, offline."""
    import torch
    import transformers
    from transformers.utils import logging

    from llmcli.models.pretrained import resolve

    auto = transformers.AutoModelForCausalLM if job["kind"] == "hf_causal" else transformers.AutoModelForMaskedLM
    logging.set_verbosity_error()  # a bare encoder's new MLM head is reported as missing weights
    return auto.from_pretrained(str(resolve(job["model"]).dir), local_files_only=True, dtype=torch.float32)


def hf_masking(job: dict[str, Any], vocab_size: int) -> Any:
    """llmcli's BERT masking of the model's tokenizer (so both sides mask the same tokens)."""
    import transformers

    from llmcli.config import HFEncoderConfig
    from llmcli.models.hf import _masking
    from llmcli.models.pretrained import resolve

    return _masking(resolve(job["model"]), HFEncoderConfig(path=job["model"]), vocab_size, transformers)


def hf_inputs(job: dict[str, Any], masking: Any, tokens: Any, lengths: Any, step: int | None) -> dict[str, Any]:
    """input_ids, attention_mask and labels of right-padded records: next-token labels on the real tokens of a
    causal LM (transformers shifts them), or the masked input with labels at llmcli's masked positions."""
    import torch

    attention = (torch.arange(tokens.shape[1])[None, :] < lengths[:, None]).long()  # (B, T)
    if job["kind"] == "hf_causal":
        return {"input_ids": tokens, "attention_mask": attention, "labels": tokens.masked_fill(attention == 0, -100)}
    masked, picked = masking(tokens, lengths, step)  # (B, T), (B, T)
    return {"input_ids": masked, "attention_mask": attention, "labels": tokens.masked_fill(~picked, -100)}


# ---------------------------------------------------------------- train


def train_llmcli(job: dict[str, Any], side: str) -> dict[str, Any]:
    """Tokens/s of llmcli's own step (as train._loop takes it) over job['steps'] steps after the warm-up."""
    import torch

    from llmcli.training.engine import Session, _accumulate, _batch_indices

    one_pass = ["model.task_input=masked"] if side == "llmcli_one_pass" else []
    sess = Session(config(job, f"objective.alpha={1.0 if side == 'llmcli_alpha1' else 0.5}", *one_pass,
                          *prefix_sets(job, side)), quiet)
    loaded = rss_kb()
    total = job["warmup"] + job["steps"]
    if side == "llmcli":  # the batches of every side: the ones _accumulate draws (a pure function of the step)
        np.save(Path(job["tmp"]) / "batches.npy", np.stack([_batch_indices(sess, i) for i in range(total)]))
    build = build_prefix(sess, total) if side == "prefix_cached" else {}
    shared, losses = sess.model.shared_parameters(), []

    def step(i: int) -> int:
        sess.optimizer.zero_grad(set_to_none=True)
        with bf16(side == "llmcli_bf16"):
            lm, _, _, n_tokens = _accumulate(sess, i, shared)
        torch.nn.utils.clip_grad_norm_(sess.model.parameters(), sess.cfg.train.grad_clip)
        sess.optimizer.step()
        sess.scheduler.step()
        losses.append(lm)
        return n_tokens

    sess.model.train()
    out = {**timed_steps(step, job), **memory(loaded), **build, "lm_losses": losses, "first_lm_loss": losses[0],
           "computes": COMPUTES[side]}
    if job["profile"]:
        out["profile"] = profile_top(lambda: step(total))
    return out


def prefix_sets(job: dict[str, Any], side: str) -> list[str]:
    """The overrides of a prefix side: the bottom K blocks frozen, the cache on or off."""
    if side not in PREFIX_SIDES:
        return []
    from transformers import AutoConfig

    from llmcli.models.pretrained import resolve

    blocks = AutoConfig.from_pretrained(resolve(job["model"]).dir).num_hidden_layers
    k = max(1, blocks - job["prefix_top"])
    return [f"train.freeze=[bottom:{k}]", f"train.prefix_cache={'auto' if side == 'prefix_cached' else 'off'}"]


def build_prefix(sess: Any, total: int) -> dict[str, Any]:
    """Compute the cache for the records of the timed batches (untimed by the steps; its own wall reported)."""
    from llmcli.training.engine import _batch_indices

    if sess.prefix is None:
        raise SystemExit(f"prefix_cached: no prefix cache for this model and freeze ({'; '.join(sess.prefix_notes)})")
    idx = np.unique(np.concatenate([_batch_indices(sess, i) for i in range(total)]))
    start = time.perf_counter()
    sess.prefix.ensure(idx)
    return {"cache_build_s": round(time.perf_counter() - start, 3), "cache_records": len(idx),
            "frozen_blocks": sess.prefix.k}


def timed_steps(step: Any, job: dict[str, Any]) -> dict[str, float]:
    """Run the warm-up steps, then time job['steps'] steps: tokens per second of wall time and of this process's
    CPU time (all its threads: on a shared machine the steadier of the two), seconds per step."""
    for i in range(job["warmup"]):
        step(i)
    start, cpu, tokens = time.perf_counter(), time.process_time(), 0
    for i in range(job["warmup"], job["warmup"] + job["steps"]):
        tokens += step(i)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"tokens_per_s": tokens / wall, "s_per_step": wall / job["steps"], "tokens": tokens,
            "tokens_per_cpu_s": tokens / cpu}


def train_transformers(job: dict[str, Any], side: str) -> dict[str, Any]:
    """Tokens/s of a plain transformers step (loss from labels, backward, clip, AdamW) on llmcli's batches."""
    import torch

    from llmcli.data.dataset import ProcessedData

    cfg = config(job)
    torch.set_num_threads(job["threads"])
    data = ProcessedData(_processed(job))
    batches = np.load(Path(job["tmp"]) / "batches.npy")
    model = hf_model(job)
    loaded = rss_kb()
    masking = hf_masking(job, data.manifest["vocab_size"]) if job["kind"] == "hf_encoder" else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    losses = []

    def step(i: int) -> int:
        b = data.batch(batches[i])
        opt.zero_grad(set_to_none=True)
        loss = model(**hf_inputs(job, masking, b.tokens, b.lengths, i)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        return b.n_tokens

    model.train()
    out = {**timed_steps(step, job), **memory(loaded), "first_lm_loss": losses[0], "computes": COMPUTES[side]}
    if job["profile"]:
        out["profile"] = profile_top(lambda: step(len(batches) - 1))
    return out


def _processed(job: dict[str, Any]) -> Path:
    """The processed folder the parent wrote (llmcli's own cache key for the config)."""
    from llmcli.data.preprocess import processed_path

    return processed_path(config(job).data)


# ---------------------------------------------------------------- eval


def eval_records(data: Any, n: int) -> np.ndarray:
    """The first n KJV test records, in score's order (by length: similar lengths batched together)."""
    idx = data.indices("test")[:n]
    return idx[np.argsort(data.lengths(idx), kind="stable")]


def eval_llmcli(job: dict[str, Any], side: str) -> dict[str, Any]:
    """Tokens/s of llmcli's metrics.score on the test records (one untimed batch first) and its zero-shot ppl."""
    import torch

    from llmcli.evaluation.metrics import score

    sess = llmcli_session(job)
    loaded = rss_kb()
    backbone = sess.model.backbone
    if side == "llmcli" and getattr(backbone, "fresh_head", False):  # the transformers side scores with this head
        torch.save(backbone.mlm_head.state_dict(), Path(job["tmp"]) / "mlm_head.pt")
    idx = eval_records(sess.data, job["eval_records"])
    with bf16(side == "llmcli_bf16"):
        score(sess.model, sess.data, idx[: job["batch"]], job["batch"], sess.task_loss)  # warm-up
        start, cpu = time.perf_counter(), time.process_time()
        m = score(sess.model, sess.data, idx, job["batch"], sess.task_loss)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = int(sess.data.lengths(idx).sum())
    return {"tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu, "tokens": tokens,
            "lm_loss": m["lm_loss"], "ppl": m["ppl"],
            **memory(loaded)}


def llmcli_session(job: dict[str, Any]) -> Any:
    """llmcli's Session for the job's config (alpha 0.5)."""
    from llmcli.training.engine import Session

    return Session(config(job), quiet)


def _fit_fresh_head(model: Any, path: Path) -> None:
    """Give transformers' BERT MLM head llmcli's new one (dense, LayerNorm, decoder bias; the decoder is tied)."""
    import torch

    head = torch.load(path)
    pred = model.cls.predictions
    with torch.no_grad():
        pred.transform.dense.weight.copy_(head["transform.0.weight"])
        pred.transform.dense.bias.copy_(head["transform.0.bias"])
        pred.transform.LayerNorm.weight.copy_(head["transform.2.weight"])
        pred.transform.LayerNorm.bias.copy_(head["transform.2.bias"])
        pred.bias.copy_(head["decoder.bias"])


def eval_transformers(job: dict[str, Any], side: str) -> dict[str, Any]:
    """Tokens/s of transformers' forward with labels under inference_mode on the same records, and its ppl."""
    import math

    import torch

    from llmcli.data.dataset import ProcessedData

    torch.set_num_threads(job["threads"])
    data = ProcessedData(_processed(job))
    model = hf_model(job).eval()
    loaded = rss_kb()
    head = Path(job["tmp"]) / "mlm_head.pt"
    if job["kind"] == "hf_encoder" and head.is_file():
        _fit_fresh_head(model, head)
    masking = hf_masking(job, data.manifest["vocab_size"]) if job["kind"] == "hf_encoder" else None
    idx = eval_records(data, job["eval_records"])

    def run(part: np.ndarray) -> tuple[float, int]:
        nll, n = 0.0, 0
        for s in range(0, len(part), job["batch"]):
            b = data.batch(part[s : s + job["batch"]])
            inputs = hf_inputs(job, masking, b.tokens, b.lengths, None)
            targets = int((b.lengths - 1).sum()) if job["kind"] == "hf_causal" else int((inputs["labels"] >= 0).sum())
            nll += float(model(**inputs).loss) * targets
            n += targets
        return nll, n

    with torch.inference_mode():
        run(idx[: job["batch"]])  # warm-up
        start, cpu = time.perf_counter(), time.process_time()
        nll, n = run(idx)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = int(data.lengths(idx).sum())
    return {"tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu, "tokens": tokens,
            "lm_loss": nll / n, "ppl": math.exp(nll / n),
            **memory(loaded)}


# ---------------------------------------------------------------- generate


def prompt_ids(job: dict[str, Any]) -> tuple[Any, list[int]]:
    """The run's tokenizer (the processed folder's tokenizer.json) and the prompt as llmcli encodes it (BOS first)."""
    from llmcli.data.tokenizers import TextTokenizer
    from llmcli.evaluation.generate import _prompt_ids

    tok = TextTokenizer.load(_processed(job) / "tokenizer.json")
    return tok, _prompt_ids(tok, job["prompt"], job["len"] * 8)


def gen_llmcli(job: dict[str, Any], side: str) -> dict[str, Any]:
    """Best of job['repeats'] greedy generations of job['new_tokens'] tokens by llmcli (KV cache)."""
    from types import SimpleNamespace

    from llmcli.evaluation.generate import Sampling, complete

    sess = llmcli_session(job)
    sess.model.eval()  # as load_trained gives it: no dropout, and the backbone keeps its KV cache
    loaded = rss_kb()
    tok, _ = prompt_ids(job)
    n = job["new_tokens"]
    s = Sampling(max_new_tokens=n, min_new_tokens=n, temperature=0)
    best, best_cpu, tokens = float("inf"), float("inf"), []
    for _ in range(job["repeats"]):
        start, cpu = time.perf_counter(), time.process_time()
        *_, rows = complete(SimpleNamespace(model=sess.model, tokenizer=tok), [job["prompt"]], s)
        best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - cpu)
        tokens = rows[0].tokens
    return {"tokens_per_s": n / best, "tokens_per_cpu_s": n / best_cpu, "new_tokens": tokens, **memory(loaded)}


def gen_transformers(job: dict[str, Any], side: str) -> dict[str, Any]:
    """Best of job['repeats'] `model.generate(do_sample=False)` calls from the same prompt ids."""
    import torch

    torch.set_num_threads(job["threads"])
    model = hf_model(job).eval()
    loaded = rss_kb()
    tok, ids = prompt_ids(job)
    n = job["new_tokens"]
    x = torch.tensor([ids])  # (1, T)
    best, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(job["repeats"]):
        start, cpu = time.perf_counter(), time.process_time()
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                             pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
        best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - cpu)
    return {"tokens_per_s": n / best, "tokens_per_cpu_s": n / best_cpu, "new_tokens": out[0, len(ids):].tolist(),
            **memory(loaded)}


# ---------------------------------------------------------------- the sides, one process each


RUNNERS = {("train", "llmcli"): train_llmcli, ("train", "llmcli_alpha1"): train_llmcli,
           ("train", "llmcli_one_pass"): train_llmcli,
           ("train", "llmcli_bf16"): train_llmcli, ("train", "transformers"): train_transformers,
           ("train", "prefix_off"): train_llmcli, ("train", "prefix_cached"): train_llmcli,
           ("eval", "llmcli"): eval_llmcli, ("eval", "llmcli_bf16"): eval_llmcli,
           ("eval", "transformers"): eval_transformers,
           ("generate", "llmcli"): gen_llmcli, ("generate", "transformers"): gen_transformers}


def side(job: dict[str, Any], part: str, name: str) -> dict[str, Any]:
    """One side's figures: in a subprocess of its own (its own peak RSS), or here with --inline."""
    if job["inline"]:
        return RUNNERS[part, name](job, name)
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(job), part, name], capture_output=True,
                         text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{part}/{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    """a's tokens per CPU second over b's."""
    return round(a["tokens_per_cpu_s"] / b["tokens_per_cpu_s"], 4)


def run_train(job: dict[str, Any], sides: tuple[str, ...], shape: dict[str, Any]) -> None:
    """Training tokens/s and peak RSS per side, then llmcli's speed-up and memory ratio over transformers."""
    res = {s: side(job, "train", s) for s in sides}
    for s, r in res.items():
        profile = r.pop("profile", None)
        r.pop("lm_losses", None)  # llmcli sides only
        emit("pretrained_train_tokens_per_s", r.pop("tokens_per_s"), "tokens/s", side=s, **r, **shape)
        if profile:
            emit("pretrained_train_profile", r["s_per_step"], "s/step", side=s, top=profile, **shape)
    hf = res["transformers"]
    for s in [x for x in sides if x != "transformers"]:
        emit("pretrained_train_speedup", res[s]["tokens"] / res[s]["s_per_step"] / (hf["tokens"] / hf["s_per_step"]),
             "x", side=s, cpu_time_speedup=ratio(res[s], hf), peak_rss_ratio=round(res[s]["peak_rss_mb"] /
                                                                                  hf["peak_rss_mb"], 3), **shape)
    if "llmcli_bf16" in res:
        emit("pretrained_train_bf16_vs_fp32", res["llmcli"]["s_per_step"] / res["llmcli_bf16"]["s_per_step"], "x",
             cpu_time_speedup=ratio(res["llmcli_bf16"], res["llmcli"]), **shape)


def run_prefix(job: dict[str, Any], shape: dict[str, Any]) -> None:
    """One training step with the bottom blocks frozen: the whole model against the prefix cache, same batches."""
    res = {s: side(job, "train", s) for s in PREFIX_SIDES}  # both draw the engine's batches of the same steps
    off, cached = res["prefix_off"], res["prefix_cached"]
    for s in PREFIX_SIDES:
        r = res[s]
        emit("pretrained_prefix_tokens_per_s", r["tokens_per_s"], "tokens/s", side=s, s_per_step=r["s_per_step"],
             tokens=r["tokens"],
             tokens_per_cpu_s=r["tokens_per_cpu_s"], peak_rss_mb=r["peak_rss_mb"], computes=r["computes"],
             **{k: r[k] for k in ("cache_build_s", "cache_records") if k in r}, **shape)
    diff = max(abs(a - b) for a, b in zip(off["lm_losses"], cached["lm_losses"]))
    emit("pretrained_prefix_speedup", off["s_per_step"] / cached["s_per_step"], "x",
         cpu_time_speedup=ratio(cached, off), max_lm_loss_diff=diff, **shape)


def run_eval(job: dict[str, Any], sides: tuple[str, ...], shape: dict[str, Any]) -> None:
    """Eval tokens/s per side, the speed-up, bf16 against fp32, and the zero-shot perplexity of both sides."""
    res = {s: side(job, "eval", s) for s in sides}
    for s, r in res.items():
        emit("pretrained_eval_tokens_per_s", r["tokens_per_s"], "tokens/s", side=s,
             **{k: v for k, v in r.items() if k != "tokens_per_s"}, **shape)
    llm, hf = res["llmcli"], res["transformers"]
    emit("pretrained_eval_speedup", llm["tokens_per_s"] / hf["tokens_per_s"], "x", cpu_time_speedup=ratio(llm, hf),
         peak_rss_ratio=round(llm["peak_rss_mb"] / hf["peak_rss_mb"], 3), **shape)
    if "llmcli_bf16" in res:
        emit("pretrained_eval_bf16_vs_fp32", res["llmcli_bf16"]["tokens_per_s"] / llm["tokens_per_s"], "x",
             cpu_time_speedup=ratio(res["llmcli_bf16"], llm), **shape)
    emit("pretrained_zero_shot_ppl", llm["ppl"], "ppl", transformers_ppl=hf["ppl"],
         rel_diff=abs(llm["ppl"] - hf["ppl"]) / hf["ppl"], lm=("next-token" if job["kind"] == "hf_causal" else
                                                              "masked (llmcli's fixed eval mask)"), **shape)


def run_generate(job: dict[str, Any], shape: dict[str, Any]) -> None:
    """Greedy generation tokens/s per side, whether the tokens agree, and the speed-up."""
    res = {s: side(job, "generate", s) for s in GEN_SIDES}
    same = res["llmcli"]["new_tokens"] == res["transformers"]["new_tokens"]
    for s, r in res.items():
        emit("pretrained_generate_tokens_per_s", r["tokens_per_s"], "tokens/s", side=s, peak_rss_mb=r["peak_rss_mb"],
             tokens_per_cpu_s=r["tokens_per_cpu_s"], new_tokens=job["new_tokens"], **shape)
    emit("pretrained_generate_same_tokens", float(same), "bool", new_tokens=job["new_tokens"],
         first=res["llmcli"]["new_tokens"][:8], **shape)
    emit("pretrained_generate_speedup", res["llmcli"]["tokens_per_s"] / res["transformers"]["tokens_per_s"], "x",
         cpu_time_speedup=ratio(res["llmcli"], res["transformers"]), **shape)


def parse() -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a model folder, a .gguf or builtin:NAME")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    p.add_argument("--batch", type=int, default=4, help="records per batch (training and eval)")
    p.add_argument("--len", type=int, default=32, help="data.max_len: tokens per record at most")
    p.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    p.add_argument("--eval-records", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per side")
    p.add_argument("--repeats", type=int, default=2, help="generations per side (the best is reported)")
    p.add_argument("--chapters", type=int, default=2, help="first chapters of each KJV book (the data)")
    p.add_argument("--parts", default="train,eval,generate", help="any of train,eval,generate,prefix")
    p.add_argument("--prefix-top", type=int, default=6, help="prefix part: blocks trained on top of the frozen ones")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast sides")
    p.add_argument("--profile", action="store_true", help="torch.profiler's top ops of one training step per side")
    p.add_argument("--inline", action="store_true", help="every side in this process (peak RSS not per side)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    a = parse()
    if a.child:
        job, part, name = json.loads(a.child[0]), a.child[1], a.child[2]
        print(json.dumps(RUNNERS[part, name](job, name)), flush=True)
        return
    if not a.model:
        raise SystemExit("--model: name a model folder, a .gguf or builtin:NAME")
    from llmcli.data.preprocess import preprocess

    with tempfile.TemporaryDirectory() as tmp:
        job = {"model": a.model, "kind": model_kind(a.model), "steps": a.steps, "warmup": a.warmup, "batch": a.batch,
               "len": a.len, "threads": a.threads, "eval_records": a.eval_records, "new_tokens": a.new_tokens,
               "repeats": a.repeats, "chapters": a.chapters, "prompt": PROMPT, "tmp": tmp, "profile": a.profile,
               "inline": a.inline, "prefix_top": a.prefix_top}
        preprocess(config(job).data, log=quiet)  # once, before any side (each side then reads the cache)
        shape = {"model": a.model, "kind": job["kind"], "batch": a.batch, "len": a.len, "threads": a.threads,
                 "load_avg_1m": round(os.getloadavg()[0], 2)}
        parts = a.parts.split(",")
        # the one-pass side is an encoder's option (a causal LM's T already reads L's states)
        drop = (("llmcli_bf16",) if a.no_bf16 else ()) + (("llmcli_one_pass",) if job["kind"] == "hf_causal" else ())
        if "train" in parts:
            run_train(job, tuple(s for s in TRAIN_SIDES if s not in drop), {**shape, "steps": a.steps})
        if "eval" in parts:
            run_eval(job, tuple(s for s in EVAL_SIDES if s not in drop), {**shape, "records": a.eval_records})
        if "generate" in parts and job["kind"] == "hf_causal":
            run_generate(job, shape)
        if "prefix" in parts:
            run_prefix(job, {**shape, "steps": a.steps, "prefix_top": a.prefix_top})


if __name__ == "__main__":
    main()
