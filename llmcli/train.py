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

    def __init__(self, cfg: Any, log: Any) -> None:
        import torch

        from llmcli.data.dataset import ProcessedData
        from llmcli.data.preprocess import preprocess
        from llmcli.models.model import build_model
        from llmcli.registry import registry

        self.cfg = cfg
        torch.set_num_threads(cfg.train.threads or os.cpu_count() or 1)
        self.device = "cuda" if cfg.train.device == "auto" and torch.cuda.is_available() else (
            "cpu" if cfg.train.device == "auto" else cfg.train.device)
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("train.device: 'cuda' requested but no CUDA device is available (use cpu or auto)")
        self.data = ProcessedData(preprocess(cfg.data, log=log))
        torch.manual_seed(cfg.seed)
        n_classes = len(self.data.label_names)
        self.model = build_model(cfg.model, vocab_size=self.data.manifest["vocab_size"], n_classes=n_classes,
                                 max_len=cfg.data.max_len).to(self.device)
        self.task_loss = registry("task_loss").build(cfg.task_loss, n_classes=n_classes)
        self.objective = registry("objective").build(cfg.objective)
        decay, no_decay = self.model.decay_groups()
        self.optimizer = registry("optimizer").build(cfg.optim, decay=decay, no_decay=no_decay)
        self.scheduler = registry("schedule").build(cfg.schedule, optimizer=self.optimizer,
                                                    total_steps=cfg.train.steps)
        self.train_idx = self.data.indices("train", self.data.train_domains)
        self.val_idx = {d: self._val_subset(d) for d in self.data.domains}

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
    sess = Session(cfg, log)
    if resume is None:
        run_dir = create_run_dir(Path(runs_dir), cfg.name) if run_dir is None else Path(run_dir)
        _start_run(run_dir, cfg, sess)
    return _loop(sess, Path(run_dir), resume is not None, progress, log, stop_after)


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
                               "device": sess.device})
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
    from llmcli.data.dataset import epoch_stream

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
            idx = sess.train_idx[epoch_stream(len(sess.train_idx), cfg.seed, step * tc.batch_size, tc.batch_size)]
            batch = sess.data.batch(idx)
            out = model.losses(_to(batch, sess.device), sess.task_loss)
            sess.optimizer.zero_grad(set_to_none=True)
            logs = sess.objective.backward(out["lm_loss"], out["task_loss"], shared, step)
            lm, task = float(out["lm_loss"].detach()), float(out["task_loss"].detach())
            if not (np.isfinite(lm) and np.isfinite(task)):
                raise UserError(f"train: the loss became NaN/Inf at step {step + 1}; lower optim.lr or check the data")
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            sess.optimizer.step()
            sess.scheduler.step()
            step += 1
            tokens += batch.n_tokens
            window["lm_loss"].append(lm)
            window["task_loss"].append(task)
            window["loss"].append(logs["loss"])
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
    from llmcli.plots import curves_png

    curves_png(run_dir)  # train/val L and T per domain, grad_cosine: RUN_DIR/curves.png
    log(f"train: done, {run_dir}")
    return run_dir


def meta_params(run_dir: Path) -> str:
    """Parameter count from meta.json, human-readable."""
    n = read_json(run_dir / "meta.json", "run meta").get("n_params", 0)
    return f"{n / 1e6:.2f}M" if n >= 1e5 else str(n)


def _to(batch: Any, device: str) -> Any:
    if device == "cpu":
        return batch
    from llmcli.data.dataset import Batch

    return Batch(*(t.to(device) for t in (batch.tokens, batch.lengths, batch.labels, batch.domains)))
