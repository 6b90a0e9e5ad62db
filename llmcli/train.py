"""`llmcli train`: one run folder from one config, or the continuation of one (--resume)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmcli.errors import UserError
from llmcli.io import append_jsonl, atomic_write_text, read_json
from llmcli.runs import create_run_dir, load_run_config, new_meta, update_meta

# metrics.jsonl keys that measure the machine, not the model: excluded from reproducibility checks.
TIMING_KEYS = ("tokens_per_s", "time_s")


class Session:
    """Everything a training run holds: data, model, objective, optimiser, schedule."""

    def __init__(self, cfg: Any, log: Any, resuming: bool = False) -> None:
        import torch

        from llmcli.data.dataset import ProcessedData
        from llmcli.data.preprocess import preprocess
        from llmcli.device import resolve_device
        from llmcli.distributed import broadcast_parameters, main_first, setup
        from llmcli.losses import class_counts
        from llmcli.models.model import build_model
        from llmcli.models.transfer import apply_transfer
        from llmcli.registry import registry

        self.cfg = cfg
        # ranks on one machine share its cores: threads = cores / local ranks (torchrun sets LOCAL_WORLD_SIZE)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // local))
        self.device = resolve_device(cfg.train)
        self.dist = setup(self.device)
        with main_first(self.dist):  # rank 0 preprocesses (or validates the cache); the others then read it
            self.data = ProcessedData(preprocess(cfg.data, log=log))
        torch.manual_seed(cfg.seed)
        n_classes = len(self.data.label_names)
        self.model = build_model(cfg.model, vocab_size=self.data.manifest["vocab_size"], n_classes=n_classes,
                                 max_len=cfg.data.max_len).to(self.device)
        self.train_idx = self.data.indices("train", self.data.train_domains + self.data.lm_only_domains)
        counts = class_counts(self.data.labels[self.train_idx], n_classes)
        self.task_loss = registry("task_loss").build(cfg.task_loss, n_classes=n_classes, class_counts=counts)
        self.objective = registry("objective").build(cfg.objective)
        if hasattr(self.objective, "wrap_model"):  # objectives that add layers (conditioned) do it before the optimiser
            self.objective.wrap_model(self.model)
        apply_transfer(self.model, cfg.train, self.data, load=not resuming)  # a resume loads its own checkpoint
        if cfg.train.compile:  # in place: parameter names and checkpoints stay those of the eager model
            self.model.backbone.compile(dynamic=True)  # dynamic: batch lengths vary (T = longest record)
        own = list(self.objective.parameters())  # e.g. learned log-variances: trained, never decayed
        for p in own:
            p.data = p.data.to(self.device)
        broadcast_parameters(list(self.model.parameters()) + own, self.dist)  # every rank starts from rank 0's
        decay, no_decay = self.model.decay_groups()
        self.optimizer = registry("optimizer").build(cfg.optim, decay=decay, no_decay=no_decay + own)
        self.scheduler = registry("schedule").build(cfg.schedule, optimizer=self.optimizer,
                                                    total_steps=cfg.train.steps)
        self.val_idx = {d: self._val_subset(d) for d in self.data.domains}
        if hasattr(self.objective, "set_probe"):
            self.objective.set_probe(self.probe)

    def probe(self, step: int) -> dict[str, float]:
        """Metrics on one held-out batch (in-domain validation records, rotating with the step)."""
        from llmcli.data.dataset import epoch_stream
        from llmcli.metrics import score

        pool = np.concatenate([self.val_idx[d] for d in self.data.train_domains])
        pool = pool[self.data.labels[pool] >= 0]
        if not len(pool):
            raise UserError("objective: the held-out probe needs labeled in-domain validation records (data.split.val)")
        n = min(self.cfg.train.batch_size, len(pool))
        idx = pool[epoch_stream(len(pool), self.cfg.seed, step * n, n)]
        return score(self.model, self.data, idx, n, self.task_loss, self.device)

    def _val_subset(self, domain: str) -> np.ndarray:
        idx = self.data.indices("val", [domain])
        cap = self.cfg.train.val_max_examples
        if cap and len(idx) > cap:
            idx = np.sort(np.random.default_rng(self.cfg.seed).choice(idx, cap, replace=False))
        return idx

    def validate(self, step: int) -> tuple[list[dict[str, Any]], float]:
        """Per-domain validation records and the in-domain objective score (lower is better)."""
        from llmcli.metrics import score

        records = []
        if hasattr(self.objective, "prepare"):
            self.objective.prepare(self.model, None)
        for d, idx in self.val_idx.items():
            if len(idx):
                m = score(self.model, self.data, idx, self.cfg.eval.batch_size, self.task_loss, self.device)
                records.append({"step": step, "split": "val", "domain": d, **m})
        ind = [r for r in records if r["domain"] in self.data.train_domains]
        if not ind:
            return records, float("nan")
        value = float(np.mean([self.objective.score(r["lm_loss"], r.get("task_loss", 0.0)) for r in ind]))
        return records, value


def train(cfg: Any, *, runs_dir: str | Path = "runs", resume: str | Path | None = None,
          progress: bool = True, log: Any = print, run_dir: Path | None = None, stop_after: int | None = None) -> Path:
    """Train a run (or continue `resume`) and return its folder.

    stop_after: leave the run after this many steps with a resumable checkpoint (status `stopped`).
    """
    if resume is not None:
        run_dir = Path(resume)
        cfg = load_run_config(run_dir)
        if not (run_dir / "checkpoints" / "last.safetensors").is_file():
            raise UserError(f"{run_dir}: nothing to resume (no checkpoints/last.safetensors)")
    sess = Session(cfg, log, resuming=resume is not None)
    if resume is not None:
        _check_world(run_dir, sess.dist.world)
    if resume is None and sess.dist.main:
        run_dir = create_run_dir(Path(runs_dir), cfg.name) if run_dir is None else Path(run_dir)
        _start_run(run_dir, cfg, sess)
    if sess.dist.world == 1:
        return _loop(sess, Path(run_dir), resume is not None, progress, log, stop_after)
    return _loop_distributed(sess, run_dir, resume is not None, progress, log, stop_after)


def _check_world(run_dir: Path, world: int) -> None:
    """A run resumes with the world size it was trained with (the data shards and batch split depend on it)."""
    saved = read_json(run_dir / "meta.json", "run meta").get("world_size", 1)
    if saved != world:
        how = f"torchrun --nproc_per_node {saved} -m llmcli train" if saved > 1 else "llmcli train (one process)"
        raise UserError(f"{run_dir / 'meta.json'}: world_size is {saved} but this resume runs {world} processes; "
                        f"resume it with {how} --resume")


def _loop_distributed(sess: Session, run_dir: Any, resuming: bool, progress: bool, log: Any,
                      stop_after: int | None) -> Path:
    """The same loop on every rank; only rank 0 writes the run folder, the others a scratch mirror of it."""
    import shutil

    from llmcli.distributed import broadcast_object, mirror

    run_dir = Path(broadcast_object(str(run_dir), sess.dist))  # after rank 0 has created it
    if sess.dist.main:
        return _loop(sess, run_dir, resuming, progress, log, stop_after)
    scratch = mirror(run_dir)
    try:
        _loop(sess, scratch, resuming, False, lambda m: None, stop_after)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return run_dir


def _start_run(run_dir: Path, cfg: Any, sess: Session) -> None:
    import shutil

    from llmcli.config import dump_config
    from llmcli.models.model import n_params

    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    shutil.copyfile(sess.data.path / "tokenizer.json", run_dir / "tokenizer.json")
    shutil.copyfile(sess.data.path / "manifest.json", run_dir / "data_manifest.json")
    (run_dir / "metrics.jsonl").touch()
    meta = new_meta(cfg.seed, {"name": cfg.name, "n_params": n_params(sess.model), "data": str(sess.data.path),
                               "device": sess.device, "world_size": sess.dist.world})
    update_meta(run_dir, **meta)


def _resume_state(sess: Session, run_dir: Path) -> tuple[int, float, dict[str, Any]]:
    """Load last.safetensors into the session; drop metric records after its step."""
    from llmcli.checkpoint import load_checkpoint, restore_model, restore_training

    path = run_dir / "checkpoints" / "last.safetensors"
    tensors, side = load_checkpoint(path)
    restore_model(sess.model, tensors, path)
    restore_training(sess.optimizer, sess.scheduler, tensors, side)
    sess.objective.load_state_dict(side.get("objective", {}))
    step = int(side["step"])
    metrics = run_dir / "metrics.jsonl"
    import json

    kept = [ln for ln in metrics.read_text(encoding="utf-8").splitlines()
            if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write_text(metrics, "".join(ln + "\n" for ln in kept))
    return step, float(side.get("best_score", float("inf"))), side


def _loop(sess: Session, run_dir: Path, resuming: bool, progress: bool, log: Any, stop_after: int | None) -> Path:
    import torch
    from tqdm import tqdm

    from llmcli.checkpoint import save_checkpoint

    cfg, model, tc = sess.cfg, sess.model, sess.cfg.train
    step, best, side = _resume_state(sess, run_dir) if resuming else (0, float("inf"), {})
    update_meta(run_dir, status="running", resumed_at_step=step if resuming else None)
    shared = model.shared_parameters()
    metrics = run_dir / "metrics.jsonl"
    # the partial logging window travels in the checkpoint, so a resumed run logs the same means
    window: dict[str, list[float]] = side.get("window") or {"lm_loss": [], "task_loss": [], "loss": []}
    last_cos: float | None = side.get("last_cos")
    tokens, t_window = 0, time.perf_counter()
    log(f"train: {run_dir} | {cfg.model.name} {meta_params(run_dir)} params | objective {cfg.objective.name} "
        f"| {len(sess.train_idx)} training records | step {step}/{tc.steps}")
    bar = tqdm(total=tc.steps, initial=step, disable=not progress, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    try:
        while step < tc.steps:
            sess.optimizer.zero_grad(set_to_none=True)
            lm, task, logs, n_tokens = _accumulate(sess, step, shared)
            if not (np.isfinite(lm) and np.isfinite(task)):
                raise UserError(f"train: the loss became NaN/Inf at step {step + 1}; lower optim.lr or check the data")
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            sess.optimizer.step()
            sess.scheduler.step()
            step += 1
            tokens += n_tokens
            window["lm_loss"].append(lm)
            window["task_loss"].append(task)
            for k, v in logs.items():  # loss, and objective-specific figures (lambda, log_var_*, ...)
                if k != "grad_cosine":
                    window.setdefault(k, []).append(v)
            last_cos = logs.get("grad_cosine", last_cos)
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                dt = time.perf_counter() - t_window
                rec = {"step": step, "split": "train", **{k: float(np.mean(v)) for k, v in window.items()},
                       "lr": sess.scheduler.get_last_lr()[0]}
                if last_cos is not None:
                    rec["grad_cosine"] = last_cos
                rec["tokens_per_s"] = tokens / dt if dt > 0 else 0.0
                append_jsonl(metrics, rec)
                bar.set_postfix(lm=f"{rec['lm_loss']:.3f}", task=f"{rec['task_loss']:.3f}")
                window = {k: [] for k in window}
                last_cos, tokens, t_window = None, 0, time.perf_counter()
            if step % tc.eval_every == 0 or step == tc.steps:
                records, value = sess.validate(step)
                for r in records:
                    append_jsonl(metrics, r)
                is_best = bool(value < best)
                append_jsonl(metrics, {"step": step, "split": "val", "domain": "in_domain", "objective": value,
                                       "best": is_best})
                best = min(best, value)
                side = {"step": step, "metrics": {r["domain"]: r for r in records}, "best_score": best,
                        "objective": sess.objective.state_dict(), "window": window, "last_cos": last_cos}
                ckpt = run_dir / "checkpoints"
                if is_best:
                    save_checkpoint(ckpt / "best.safetensors", model, sess.optimizer, sess.scheduler, side)
                save_checkpoint(ckpt / "last.safetensors", model, sess.optimizer, sess.scheduler, side)
                ind = [r for r in records if r["domain"] in sess.data.train_domains]
                if ind:
                    msg = f"step {step}: val " + " ".join(
                        f"{r['domain']} acc={r.get('acc', float('nan')):.3f} ppl={r['ppl']:.1f}" for r in ind)
                    tqdm.write(msg, file=sys.stderr) if progress else log(msg)
            elif stop_after is not None and step >= stop_after:
                side = {"step": step, "metrics": {}, "best_score": best, "objective": sess.objective.state_dict(),
                        "window": window, "last_cos": last_cos}
                save_checkpoint(run_dir / "checkpoints" / "last.safetensors", model, sess.optimizer, sess.scheduler,
                                side)
            if stop_after is not None and step >= stop_after and step < tc.steps:
                update_meta(run_dir, status="stopped", step=step)
                log(f"train: stopped after step {step}; continue with --resume {run_dir}")
                return run_dir
    except KeyboardInterrupt:
        update_meta(run_dir, status="interrupted", step=step, ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        raise
    except BaseException as exc:
        update_meta(run_dir, status="failed", step=step, error=str(exc).splitlines()[0] if str(exc) else repr(exc),
                    ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        raise
    finally:
        bar.close()
    update_meta(run_dir, status="completed", step=step, best_score=best,
                ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    log(f"train: done, {run_dir}")
    return run_dir


def _accumulate(sess: Session, step: int, shared: list) -> tuple[float, float, dict[str, float], int]:
    """Gradients of one optimiser step summed over train.grad_accum_steps micro-batches, then averaged.

    Objectives see unscaled losses (a constraint compares the real task loss); the mean is taken on .grad.
    Micro-batch j of step s reads stream position (s * k + j) * batch_size, so the data order stays a
    pure function of the step (exact resume). Returns mean lm_loss, task_loss, the objective's logs
    (means; grad_cosine from the first micro-batch) and the step's token count.
    """
    from llmcli.data.dataset import epoch_stream
    from llmcli.device import autocast
    from llmcli.distributed import shard

    cfg, tc = sess.cfg, sess.cfg.train
    k, lms, tasks, logs, n_tokens = tc.grad_accum_steps, [], [], {}, 0
    for j in range(k):
        start = (step * k + j) * tc.batch_size
        idx = sess.train_idx[epoch_stream(len(sess.train_idx), cfg.seed, start, tc.batch_size)]
        batch = sess.data.batch(shard(idx, sess.dist))  # the global batch; under torchrun, this rank's slice
        if cfg.data.augment:  # train split only; a pure function of (seed, micro-step): resume stays exact
            from llmcli.data.augment import augment_batch

            batch = augment_batch(batch, cfg.data.augment, cfg.seed, step * k + j, sess.data.pad_id)
        if hasattr(sess.objective, "prepare"):  # e.g. the conditioned objective draws this batch's alpha
            sess.objective.prepare(sess.model, step)
        with autocast(sess.device):  # bf16 on CUDA; a no-op on CPU
            out = sess.model.losses(_to(batch, sess.device), sess.task_loss)
        micro = sess.objective.backward(out["lm_loss"], out["task_loss"], shared, step)
        lms.append(float(out["lm_loss"].detach()))
        tasks.append(float(out["task_loss"].detach()))
        for key, v in micro.items():
            logs.setdefault(key, []).append(v)
        n_tokens += batch.n_tokens
    if k > 1:
        for group in sess.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(k)
    means = {key: (v[0] if key == "grad_cosine" else float(np.mean(v))) for key, v in logs.items()}
    return _reduce_ranks(sess, float(np.mean(lms)), float(np.mean(tasks)), means, n_tokens)


def _reduce_ranks(sess: Session, lm: float, task: float, logs: dict[str, float],
                  n_tokens: int) -> tuple[float, float, dict[str, float], int]:
    """Under torchrun: gradients and logged figures averaged across ranks, tokens summed (else unchanged)."""
    from llmcli.distributed import all_reduce_floats, average_gradients, broadcast_object

    if sess.dist.world == 1:
        return lm, task, logs, n_tokens
    average_gradients([p for g in sess.optimizer.param_groups for p in g["params"]], sess.dist)
    # state an objective updates from its own batch (the constrained multiplier) follows rank 0 on every rank
    sess.objective.load_state_dict(broadcast_object(sess.objective.state_dict(), sess.dist))
    mean = all_reduce_floats({"lm_loss": lm, "task_loss": task, **logs}, sess.dist)
    total = all_reduce_floats({"n_tokens": float(n_tokens)}, sess.dist, mean=False)["n_tokens"]
    return mean.pop("lm_loss"), mean.pop("task_loss"), mean, int(total)


def meta_params(run_dir: Path) -> str:
    """Parameter count from meta.json, human-readable."""
    n = read_json(run_dir / "meta.json", "run meta").get("n_params", 0)
    return f"{n / 1e6:.2f}M" if n >= 1e5 else str(n)


def _to(batch: Any, device: str) -> Any:
    if device == "cpu":
        return batch
    from llmcli.data.dataset import Batch

    return Batch(*(t.to(device) for t in (batch.tokens, batch.lengths, batch.labels, batch.domains)))
