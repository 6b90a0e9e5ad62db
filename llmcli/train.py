"""`llmcli train`: one run folder from one config, or the continuation of one (--resume)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmcli.errors import Interrupted, RunFailed, UserError
from llmcli.io import append_jsonl, atomic_write_bytes, atomic_write_text, read_json, read_json_object
from llmcli.runs import create_run_dir, kept_metrics, load_run_config, new_meta, truncate_metrics, update_meta

# metrics.jsonl keys that measure the machine, not the model: excluded from reproducibility checks.
TIMING_KEYS = ("tokens_per_s", "time_s")


class Session:
    """Everything a training run holds: data, model, objective, optimiser, schedule."""

    def __init__(self, cfg: Any, log: Any, resuming: bool = False) -> None:
        import torch

        from llmcli.data.dataset import ProcessedData
        from llmcli.data.preprocess import preprocess
        from llmcli.device import keep_freed_memory, resolve_device
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
        keep_freed_memory()  # no page faults on every step's activations (glibc)
        self.dist = setup(self.device)
        with main_first(self.dist):  # rank 0 preprocesses (or validates the cache); the others then read it
            self.data = ProcessedData(preprocess(cfg.data, log=log))
        torch.manual_seed(cfg.seed)
        n_classes = len(self.data.label_names)
        self.model = build_model(cfg.model, vocab_size=self.data.manifest["vocab_size"], n_classes=n_classes,
                                 max_len=cfg.data.max_len).to(self.device)
        self.train_domains = _trained_domains(cfg, self.data)
        stream = self.train_domains + self.data.lm_only_domains
        self.train_idx = self.data.indices("train", stream)
        # per-domain slices of train_idx, for the balanced sampler
        self.domain_idx = [self.train_idx[self.data.domain_ids[self.train_idx] == self.data.domains.index(d)]
                           for d in stream]
        counts = class_counts(self.data.labels[self.train_idx], n_classes)
        self.task_loss = registry("task_loss").build(cfg.task_loss, n_classes=n_classes, class_counts=counts)
        self.objective = registry("objective").build(cfg.objective)
        self.dg = registry("dg").build(cfg.dg, domains=[self.data.domains.index(d) for d in self.train_domains],
                                       names=self.train_domains, d_model=self.model.cls_head.in_features,
                                       stream_domains=[self.data.domains.index(d) for d in stream])
        if hasattr(self.objective, "wrap_model"):  # objectives that add layers (conditioned) do it before the optimiser
            self.objective.wrap_model(self.model)
        apply_transfer(self.model, cfg.train, self.data, load=not resuming)  # a resume loads its own checkpoint
        if cfg.train.compile:  # in place: parameter names and checkpoints stay those of the eager model
            self.model.backbone.compile(dynamic=True)  # dynamic: batch lengths vary (T = longest record)
        own = list(self.objective.parameters()) + list(self.dg.parameters())  # e.g. learned log-variances
        for p in own:
            p.data = p.data.to(self.device)
        broadcast_parameters(list(self.model.parameters()) + own, self.dist)  # every rank starts from rank 0's
        decay, no_decay = self.model.decay_groups()
        self.optimizer = registry("optimizer").build(cfg.optim, decay=decay, no_decay=no_decay + own)
        self.scheduler = registry("schedule").build(cfg.schedule, optimizer=self.optimizer,
                                                    total_steps=cfg.train.steps)
        self.val_idx = {d: self._val_subset(d) for d in self.data.domains}
        self.select_domains = self._select_domains()
        if hasattr(self.objective, "set_probe"):
            self.objective.set_probe(self.probe)

    def probe(self, step: int) -> dict[str, float]:
        """Metrics on one held-out batch (in-domain validation records, rotating with the step)."""
        from llmcli.data.dataset import epoch_stream
        from llmcli.metrics import score

        pool = np.concatenate([self.val_idx[d] for d in self.train_domains])
        pool = pool[self.data.labels[pool] >= 0]
        if not len(pool):
            raise UserError("objective: the held-out probe needs labeled in-domain validation records (data.split.val)")
        n = min(self.cfg.train.batch_size, len(pool))
        idx = pool[epoch_stream(len(pool), self.cfg.seed, step * n, n)]
        return score(self.model, self.data, idx, n, self.task_loss, self.device)

    def _select_domains(self) -> list[str]:
        """Domains whose validation score picks `best`: the train domains, or for `oracle` the test domains."""
        if self.cfg.train.select_by != "oracle":
            return self.train_domains
        unseen = [d for d in self.data.domains if d not in self.train_domains + self.data.lm_only_domains]
        held = [d for d in unseen if d in self.data.manifest.get("holdout_domains", [])]
        unseen = held or unseen  # the test domains when some are held out, else every domain not trained on
        if not unseen:
            raise UserError("train.select_by: 'oracle' needs a domain that is not trained on (set --test-domains)")
        for d in unseen:  # a held-out domain has no val split: the oracle peeks at (a subset of) its test split
            if not len(self.val_idx[d]):
                self.val_idx[d] = self._val_subset(d, "test")
        return unseen

    def _val_subset(self, domain: str, split: str = "val") -> np.ndarray:
        idx = self.data.indices(split, [domain])
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
        ind = [r for r in records if r["domain"] in self.select_domains]
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
        _check_world(run_dir, int(os.environ.get("WORLD_SIZE", "1")))  # before anything else about the run
        cfg = _check_resumable(run_dir)
    sess = Session(cfg, log, resuming=resume is not None)
    if cfg.train.select_by == "leave_one_domain_out":
        from llmcli.selection import check_domains

        check_domains(cfg, sess.train_domains)
    if resume is None and sess.dist.main:
        created = run_dir is None
        run_dir = create_run_dir(Path(runs_dir), cfg.name) if created else Path(run_dir)
        try:
            _start_run(run_dir, cfg, sess)
        except BaseException as exc:
            if created:  # a run that could not start leaves nothing behind
                import shutil

                shutil.rmtree(run_dir, ignore_errors=True)
            if isinstance(exc, OSError):
                raise UserError(f"{run_dir}: cannot write the run folder ({exc.strerror or exc})") from None
            raise
    if sess.dist.world == 1:
        out = _loop(sess, Path(run_dir), resume is not None, progress, log, stop_after)
    else:
        out = _loop_distributed(sess, run_dir, resume is not None, progress, log, stop_after)
    done = read_json(out / "meta.json", "run meta")["status"] == "completed"
    if cfg.train.select_by == "leave_one_domain_out" and done and sess.dist.main:
        from llmcli.selection import select_leave_one_domain_out

        select_leave_one_domain_out(out, cfg, sess.train_domains, sess.objective, log=log)
    return out


def _trained_domains(cfg: Any, data: Any) -> list[str]:
    """The labeled train domains of this run: data.train_domains less train.exclude_domains."""
    bad = [d for d in cfg.train.exclude_domains if d not in data.train_domains]
    if bad:
        raise UserError(f"train.exclude_domains: {bad} are not data.train_domains ({', '.join(data.train_domains)})")
    kept = [d for d in data.train_domains if d not in cfg.train.exclude_domains]
    if not kept:
        raise UserError("train.exclude_domains: every train domain is excluded; nothing left to train on")
    return kept


def _check_resumable(run_dir: Path) -> Any:
    """The run's config, once its last checkpoint is known to fit its model: a bad run folder fails before
    any data is loaded or anything is written."""
    from llmcli.models.load import load_trained

    cfg = load_run_config(run_dir)
    if not (run_dir / "checkpoints" / "last.safetensors").is_file():
        raise UserError(f"{run_dir}: nothing to resume (no checkpoints/last.safetensors)")
    step = load_trained(run_dir, "last").checkpoint["step"]
    kept_metrics(run_dir / "metrics.jsonl", step)
    if step >= cfg.train.steps and read_json_object(run_dir / "meta.json", "run meta").get("status") == "completed":
        raise UserError(f"{run_dir}: the run already completed all {cfg.train.steps} steps; nothing to resume")
    return cfg


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
    from llmcli.config import dump_config
    from llmcli.models.model import n_params

    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    atomic_write_bytes(run_dir / "tokenizer.json", (sess.data.path / "tokenizer.json").read_bytes())
    atomic_write_bytes(run_dir / "data_manifest.json", (sess.data.path / "manifest.json").read_bytes())
    atomic_write_text(run_dir / "metrics.jsonl", "")
    meta = new_meta(cfg.seed, {"name": cfg.name, "n_params": n_params(sess.model), "data": str(sess.data.path),
                               "device": sess.device, "world_size": sess.dist.world})
    update_meta(run_dir, **meta)


def _resume_state(sess: Session, run_dir: Path) -> tuple[int, float, dict[str, Any]]:
    """Load last.safetensors into the session; drop metric records after its step."""
    from llmcli.checkpoint import load_checkpoint, restore_model, restore_training

    ckpt = run_dir / "checkpoints"
    for stale in ckpt.glob(".*.tmp"):  # temporary files of a write that a crash cut short
        stale.unlink(missing_ok=True)
    path = ckpt / "last.safetensors"
    tensors, side = load_checkpoint(path, repair=True)
    restore_model(sess.model, tensors, path)
    restore_training(sess.optimizer, sess.scheduler, tensors, side, path)
    sess.objective.load_state_dict(side.get("objective", {}))
    sess.dg.load_state_dict(side.get("dg", {}))
    step = int(side["step"])
    truncate_metrics(run_dir / "metrics.jsonl", step)
    return step, float(side.get("best_score", float("inf"))), side


# A run that keeps producing NaN with train.on_nan=skip_batch is broken, not unlucky.
MAX_CONSECUTIVE_SKIPS = 20


def _loop(sess: Session, run_dir: Path, resuming: bool, progress: bool, log: Any, stop_after: int | None) -> Path:
    import torch
    from tqdm import tqdm

    from llmcli.checkpoint import save_checkpoint
    from llmcli.stopping import StopRequest

    cfg, model, tc = sess.cfg, sess.model, sess.cfg.train
    step, best, side = _resume_state(sess, run_dir) if resuming else (0, float("inf"), {})
    update_meta(run_dir, status="running", resumed_at_step=step if resuming else None)
    shared = model.shared_parameters()
    metrics = run_dir / "metrics.jsonl"
    # the partial logging window travels in the checkpoint, so a resumed run logs the same means
    window: dict[str, list[float]] = side.get("window") or {"lm_loss": [], "task_loss": [], "loss": []}
    last_cos: float | None = side.get("last_cos")
    last_ckpt, skipped, consecutive_nan = step, [], 0
    tokens, t_window = 0, time.perf_counter()

    def checkpoint(records: list[dict[str, Any]], is_best: bool, keep_step: bool = False) -> None:
        nonlocal last_ckpt
        side = {"step": step, "metrics": {r["domain"]: r for r in records}, "best_score": best,
                "objective": sess.objective.state_dict(), "dg": sess.dg.state_dict(), "window": window,
                "last_cos": last_cos, "select_by": tc.select_by}
        ckpt = run_dir / "checkpoints"
        if is_best:
            save_checkpoint(ckpt / "best.safetensors", model, sess.optimizer, sess.scheduler, side)
        if keep_step:  # leave_one_domain_out selection picks among these after the extra runs
            save_checkpoint(ckpt / f"step-{step}.safetensors", model, sess.optimizer, sess.scheduler, side)
        save_checkpoint(ckpt / "last.safetensors", model, sess.optimizer, sess.scheduler, side)
        last_ckpt = step

    log(f"train: {run_dir} | {cfg.model.name} {meta_params(run_dir)} params | objective {cfg.objective.name} "
        f"| {len(sess.train_idx)} training records | step {step}/{tc.steps}")
    bar = tqdm(total=tc.steps, initial=step, disable=not progress, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    try:
        with StopRequest() as stop:
            if not resuming:
                checkpoint([], False)  # step 0: a run killed at any later step can resume
            while step < tc.steps:
                sess.optimizer.zero_grad(set_to_none=True)
                lm, task, logs, n_tokens = _accumulate(sess, step, shared)
                bad = None if np.isfinite(lm) and np.isfinite(task) else f"lm_loss={lm}, task_loss={task}"
                if bad is None and tc.grad_clip:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                    bad = None if torch.isfinite(norm) else f"gradient norm={float(norm)}"
                if bad is None:
                    sess.optimizer.step()
                    consecutive_nan = 0
                else:
                    consecutive_nan += 1
                    _on_nan(tc.on_nan, step + 1, bad, last_ckpt, consecutive_nan)
                    sess.optimizer.zero_grad(set_to_none=True)
                    skipped.append(step + 1)
                    update_meta(run_dir, skipped_batches=skipped)
                    log(f"train: NaN/Inf at step {step + 1} ({bad}); batch skipped (train.on_nan=skip_batch)")
                _schedule_step(sess.scheduler)
                step += 1
                tokens += n_tokens
                if bad is None:
                    window["lm_loss"].append(lm)
                    window["task_loss"].append(task)
                    for k, v in logs.items():  # loss, and objective-specific figures (lambda, log_var_*, ...)
                        if k != "grad_cosine":
                            window.setdefault(k, []).append(v)
                    last_cos = logs.get("grad_cosine", last_cos)
                bar.update(1)
                if step % tc.log_every == 0 or step == tc.steps:
                    dt = time.perf_counter() - t_window
                    rec = {"step": step, "split": "train", **{k: float(np.mean(v)) for k, v in window.items() if v},
                           "lr": sess.scheduler.get_last_lr()[0]}
                    if last_cos is not None:
                        rec["grad_cosine"] = last_cos
                    rec["tokens_per_s"] = tokens / dt if dt > 0 else 0.0
                    append_jsonl(metrics, rec)
                    if "lm_loss" in rec:
                        bar.set_postfix(lm=f"{rec['lm_loss']:.3f}", task=f"{rec['task_loss']:.3f}")
                    window = {k: [] for k in window}
                    last_cos, tokens, t_window = None, 0, time.perf_counter()
                saved = False
                if step % tc.eval_every == 0 or step == tc.steps:
                    records, value = sess.validate(step)
                    for r in records:
                        append_jsonl(metrics, r)
                    lodo = tc.select_by == "leave_one_domain_out"  # best is chosen after the held-out-domain runs
                    is_best = bool(value < best) and not lodo
                    append_jsonl(metrics, {"step": step, "split": "val", "domain": "in_domain", "objective": value,
                                           "best": is_best, "select_by": tc.select_by})
                    best = min(best, value)
                    checkpoint(records, is_best, keep_step=lodo)
                    saved = True
                    ind = [r for r in records if r["domain"] in sess.train_domains]
                    if ind:
                        msg = f"step {step}: val " + " ".join(
                            f"{r['domain']} acc={r.get('acc', float('nan')):.3f} ppl={r['ppl']:.1f}" for r in ind)
                        tqdm.write(msg, file=sys.stderr) if progress else log(msg)
                stopping = stop.signum is not None or (stop_after is not None and step >= stop_after)
                if not saved and step < tc.steps and (stopping or (tc.checkpoint_every
                                                                   and step % tc.checkpoint_every == 0)):
                    checkpoint([], False)
                if stop.signum is not None and step < tc.steps:
                    update_meta(run_dir, status="interrupted", step=step, signal=stop.name,
                                ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
                    msg = f"train: {stop.name} at step {step}: checkpoint written; continue with --resume {run_dir}"
                    log(msg)
                    raise Interrupted(stop.signum, msg)
                if stop_after is not None and step >= stop_after and step < tc.steps:
                    update_meta(run_dir, status="stopped", step=step)
                    log(f"train: stopped after step {step}; continue with --resume {run_dir}")
                    return run_dir
    except Interrupted:
        raise
    except KeyboardInterrupt:
        _mark(run_dir, status="interrupted", step=step)
        raise
    except BaseException as exc:
        _mark(run_dir, status="failed", step=step, error=str(exc).splitlines()[0] if str(exc) else repr(exc))
        raise
    finally:
        bar.close()
    update_meta(run_dir, status="completed", step=step, best_score=best,
                ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    from llmcli.plots import curves_png

    curves_png(run_dir)  # train/val L and T per domain, grad_cosine: RUN_DIR/curves.png
    log(f"train: done, {run_dir}")
    return run_dir


def _accumulate(sess: Session, step: int, shared: list) -> tuple[float, float, dict[str, float], int]:
    """Gradients of one optimiser step summed over train.grad_accum_steps micro-batches, then averaged.

    Objectives see unscaled losses (a constraint compares the real task loss); the mean is taken on .grad.
    Micro-batch j of step s reads stream position (s * k + j) * batch_size, so the data order stays a
    pure function of the step (exact resume). Returns mean lm_loss, task_loss, the objective's logs
    (means; grad_cosine from the first micro-batch) and the step's token count.
    """
    from llmcli.device import autocast
    from llmcli.distributed import shard

    cfg, tc = sess.cfg, sess.cfg.train
    k, lms, tasks, logs, n_tokens = tc.grad_accum_steps, [], [], {}, 0
    for j in range(k):
        # the global batch; under torchrun, this rank's slice of it
        batch = sess.data.batch(shard(_batch_indices(sess, step * k + j), sess.dist))
        if cfg.data.augment:  # train split only; a pure function of (seed, micro-step): resume stays exact
            from llmcli.data.augment import augment_batch

            batch = augment_batch(batch, cfg.data.augment, cfg.seed, step * k + j, sess.data.pad_id)
        if hasattr(sess.objective, "prepare"):  # e.g. the conditioned objective draws this batch's alpha
            sess.objective.prepare(sess.model, step)
        batch = _to(batch, sess.device)
        with autocast(sess.device):  # bf16 on CUDA; a no-op on CPU
            out = sess.model.losses(batch, sess.task_loss)
        # the DG method forms T from per-domain losses and features; metrics keep the plain pooled task_loss
        dg_task, dg_logs = sess.dg.task_loss(sess.model, batch, out, sess.task_loss, step)
        micro = {**sess.objective.backward(out["lm_loss"], dg_task, shared, step), **dg_logs}
        if cfg.dg.name != "erm":
            micro["dg_task_loss"] = float(dg_task.detach())
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


def _mark(run_dir: Path, **changes: Any) -> None:
    """Record how a run ended, best effort: on a full disk this write fails too, and the first error matters."""
    try:
        update_meta(run_dir, **changes, ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    except (UserError, OSError):
        pass


def _on_nan(policy: str, step: int, what: str, last_ckpt: int, consecutive: int) -> None:
    """Stop the run (policy stop, or too many NaN batches in a row); otherwise let the loop skip the batch."""
    keep = f"the last good checkpoint (step {last_ckpt}) is kept in checkpoints/last.safetensors"
    if policy == "stop":
        raise RunFailed(f"train: the loss became NaN/Inf at step {step} ({what}); {keep}; "
                        "lower optim.lr, or set train.on_nan=skip_batch")
    if consecutive > MAX_CONSECUTIVE_SKIPS:
        raise RunFailed(f"train: NaN/Inf in {consecutive} batches in a row (last at step {step}, {what}); {keep}")


def _schedule_step(scheduler: Any) -> None:
    """Advance the schedule; after a skipped first batch torch warns that no optimiser step came first."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        scheduler.step()


def _batch_indices(sess: Session, micro_step: int) -> np.ndarray:
    """Record indices of one micro-batch: a pure function of (seed, micro_step), so a resume continues exactly."""
    from llmcli.data.dataset import balanced_stream, epoch_stream

    cfg, bs = sess.cfg, sess.cfg.train.batch_size
    if cfg.train.sampler == "balanced":  # equal shares per domain of the training stream
        parts = [d for d in sess.domain_idx if len(d)]
        pos = balanced_stream([len(d) for d in parts], cfg.seed, micro_step, bs)
        return np.concatenate([d[p] for d, p in zip(parts, pos)])
    return sess.train_idx[epoch_stream(len(sess.train_idx), cfg.seed, micro_step * bs, bs)]


def meta_params(run_dir: Path) -> str:
    """Parameter count from meta.json, human-readable."""
    n = read_json_object(run_dir / "meta.json", "run meta").get("n_params", 0)
    return f"{n / 1e6:.2f}M" if n >= 1e5 else str(n)


def _to(batch: Any, device: str) -> Any:
    if device == "cpu":
        return batch
    from llmcli.data.dataset import Batch

    return Batch(*(t.to(device) for t in (batch.tokens, batch.lengths, batch.labels, batch.domains)))
