"""`llmcli train`: one run folder from one config, or the continuation of one (--resume).

The engine: `Session` sets a run up in named stages, `Loop` runs it as a short sequence of named steps. Model
selection that needs runs of its own (leave-one-domain-out) is not done here but above, in
`llmcli.experiments.lodo_selection.train_and_select`: the engine only keeps the step checkpoints such a rule picks from.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmcli.errors import Interrupted, RunFailed, UserError, too_big
from llmcli.files import append_jsonl, atomic_write_bytes, atomic_write_text, read_json, read_json_object
from llmcli.runs import (
    create_run_dir,
    kept_metrics,
    load_run_config,
    meta_status,
    new_meta,
    timestamp,
    truncate_metrics,
    update_meta,
)

if TYPE_CHECKING:
    from torch import Tensor, nn
    from torch.optim.lr_scheduler import LRScheduler

    from llmcli.data.dataset import Batch, ProcessedData
    from llmcli.training.stopping import StopRequest

Log = Callable[[str], None]  # where progress lines go (print, or a quiet lambda)

# metrics.jsonl keys that measure the machine, not the model: excluded from reproducibility checks.
TIMING_KEYS = ("tokens_per_s", "time_s")

# train.select_by rules the engine applies itself, from the validation records it computes. Any other rule
# (leave_one_domain_out) is applied after training by the caller: the engine then marks no step `best` and
# keeps each validated step's checkpoint as checkpoints/step-N for it to choose from.
SELECTED_HERE = ("train_domain_val", "oracle")


class Session:
    """Everything a training run holds: data, model, objective, optimiser, schedule (set up in this order)."""

    def __init__(self, cfg: Any, log: Log, resuming: bool = False) -> None:
        self.cfg = cfg
        self._setup_device()
        self._setup_data(log)
        self._setup_model()
        self._setup_objective()
        self._setup_weights(resuming, log)
        self._setup_optimizer()
        self._setup_validation()
        self._setup_prefix()

    def _setup_device(self) -> None:
        """CPU threads, the device, and (under torchrun) the process group."""
        import torch

        from llmcli.device import keep_freed_memory, resolve_device
        from llmcli.training.distributed import setup

        # ranks on one machine share its cores: threads = cores / local ranks (torchrun sets LOCAL_WORLD_SIZE)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(self.cfg.train.threads or max(1, (os.cpu_count() or 1) // local))
        self.device = resolve_device(self.cfg.train)
        keep_freed_memory()  # no page faults on every step's activations (glibc)
        self.dist = setup(self.device)

    def _setup_data(self, log: Log) -> None:
        """The processed data (rank 0 preprocesses or validates the cache first) and the training stream."""
        from llmcli.data.dataset import ProcessedData
        from llmcli.data.preprocess import preprocess
        from llmcli.training.distributed import main_first

        with main_first(self.dist):  # the other ranks then read what rank 0 wrote
            self.data = ProcessedData(preprocess(self.cfg.data, log=log))
        self.train_domains = _trained_domains(self.cfg, self.data)
        self.stream_domains = self.train_domains + self.data.lm_only_domains
        # the labeled stream: the train domains only, so its batches are the ones drawn without lm_only_domains
        self.train_idx = self.data.indices("train", self.train_domains)
        # per-domain slices of train_idx, for the balanced sampler
        self.domain_idx = [self.train_idx[self.data.domain_ids[self.train_idx] == self.data.domains.index(d)]
                           for d in self.train_domains]
        self._setup_lm_only()

    def _setup_lm_only(self) -> None:
        """The LM-only stream (data.lm_only_domains): its records, pooled and per domain, and its rows per micro-batch."""
        lm_only = self.data.lm_only_domains
        self.lm_only_idx = self.data.indices("train", lm_only)
        self.lm_only_parts = [self.data.indices("train", [d]) for d in lm_only]
        self.lm_only_rows = round(self.cfg.data.lm_only_ratio * self.cfg.train.batch_size) if lm_only else 0
        empty = [d for d, part in zip(lm_only, self.lm_only_parts) if not len(part)]
        if self.lm_only_rows and empty:
            raise UserError(f"data.lm_only_domains: {empty} have no training-split records (data.split)")

    def _setup_model(self) -> None:
        """The model at its seeded initial weights, on the device; memory running out names the model's sizes."""
        import torch

        from llmcli.models.model import build_model

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        with too_big(_model_sizes(cfg)):
            self.model = build_model(cfg.model, vocab_size=self.data.manifest["vocab_size"],
                                     n_classes=len(self.data.label_names), max_len=cfg.data.max_len).to(self.device)

    def _setup_objective(self) -> None:
        """Task loss (weighted by the training class counts), objective and DG method, in the seed's RNG order."""
        from llmcli.registry import registry
        from llmcli.training.losses import class_counts

        cfg, data = self.cfg, self.data
        n_classes = len(data.label_names)
        counts = class_counts(data.labels[self.train_idx], n_classes)
        self.task_loss = registry("task_loss").build(cfg.task_loss, n_classes=n_classes, class_counts=counts)
        self.objective = registry("objective").build(cfg.objective)
        self.dg = registry("dg").build(cfg.dg, domains=[data.domains.index(d) for d in self.train_domains],
                                       names=self.train_domains, d_model=self.model.cls_head.in_features,
                                       stream_domains=[data.domains.index(d) for d in self.stream_domains],
                                       grad_accum_steps=cfg.train.grad_accum_steps)
        self.objective.wrap_model(self.model)  # objectives that add layers (conditioned) do it before the optimiser

    def _setup_weights(self, resuming: bool, log: Log) -> None:
        """Transferred weights (init_from, LoRA, freeze), compilation, and rank 0's starting point on every rank."""
        from llmcli.models.transfer import apply_transfer
        from llmcli.training.distributed import broadcast_parameters

        note = apply_transfer(self.model, self.cfg.train, self.data, load=not resuming)  # a resume loads its own
        if note and self.dist.main:
            log(note)  # which modules LoRA adapts and how many parameters train
        if self.cfg.train.compile:  # in place: parameter names and checkpoints stay those of the eager model
            self.model.backbone.compile(dynamic=True)  # dynamic: batch lengths vary (T = longest record)
        self.own = list(self.objective.parameters()) + list(self.dg.parameters())  # e.g. learned log-variances
        for p in self.own:
            p.data = p.data.to(self.device)
        broadcast_parameters(list(self.model.parameters()) + self.own, self.dist)  # every rank starts from rank 0's

    def _setup_optimizer(self) -> None:
        """Optimiser (weight decay on the model's decay group only) and learning-rate schedule."""
        from llmcli.registry import registry

        decay, no_decay = self.model.decay_groups()
        self.optimizer = registry("optimizer").build(self.cfg.optim, decay=decay, no_decay=no_decay + self.own)
        self.scheduler = registry("schedule").build(self.cfg.schedule, optimizer=self.optimizer,
                                                    total_steps=self.cfg.train.steps)

    def _setup_validation(self) -> None:
        """Validation subsets per domain, the domains that pick `best`, and the objective's held-out probe."""
        self.val_idx = {d: self._val_subset(d) for d in self.data.domains}
        self.select_domains = self._select_domains()
        self.objective.set_probe(self.probe)

    def _setup_prefix(self) -> None:
        """The frozen prefix cache (train.prefix_cache): opened here (no RNG drawn), filled when the loop starts
        (its progress in train.log); None where it does not apply, `prefix_notes` saying why or what it means."""
        from llmcli.models.prefix_cache import for_training

        self.prefix, self.prefix_notes = for_training(self.model, self.cfg, self.data, self.device)

    def prefix_states(self, idx: np.ndarray) -> Any:
        """The cached prefix states of a training micro-batch's records, or None (no cache, or augmented batches)."""
        return self.prefix.states(idx, self.device) if self.prefix is not None and self.prefix.batches else None

    def probe(self, step: int) -> dict[str, float]:
        """Metrics on one held-out batch (in-domain validation records, rotating with the step)."""
        from llmcli.data.dataset import epoch_stream
        from llmcli.evaluation.metrics import score

        pool = np.concatenate([self.val_idx[d] for d in self.train_domains])
        pool = pool[self.data.labels[pool] >= 0]
        if not len(pool):
            raise UserError("objective: the held-out probe needs labeled in-domain validation records (data.split.val)")
        n = min(self.cfg.train.batch_size, len(pool))
        idx = pool[epoch_stream(len(pool), self.cfg.seed, step * n, n)]
        return score(self.model, self.data, idx, n, self.task_loss, self.device, prefix=self.prefix)

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
        from llmcli.data.dataset import capped

        return capped(self.data.indices(split, [domain]), self.cfg.train.val_max_examples, self.cfg.seed)

    def validate(self, step: int) -> tuple[list[dict[str, Any]], float]:
        """Per-domain validation records and the in-domain objective score (lower is better)."""
        from llmcli.evaluation.metrics import score

        records = []
        self.objective.prepare(self.model, None)
        for d, idx in self.val_idx.items():
            if len(idx):
                m = score(self.model, self.data, idx, self.cfg.eval.batch_size, self.task_loss, self.device,
                          prefix=self.prefix)
                records.append({"step": step, "split": "val", "domain": d, **m})
        ind = [r for r in records if r["domain"] in self.select_domains]
        if not ind:
            return records, float("nan")
        value = float(np.mean([self.objective.score(r["lm_loss"], r.get("task_loss", 0.0)) for r in ind]))
        return records, value


def train(cfg: Any, *, runs_dir: str | Path = "runs", resume: str | Path | None = None,
          progress: bool = True, log: Log = print, run_dir: Path | None = None, stop_after: int | None = None,
          on_setup: Callable[[Session], None] | None = None) -> Path:
    """Train a run (or continue `resume`) and return its folder.

    progress: a bar when stderr is a terminal (else, and when off, plain lines every train.log_every steps).
    stop_after: leave the run after this many steps with a resumable checkpoint (status `stopped`).
    on_setup: called with the set-up session before the run folder is written (a caller's checks go here).
    """
    if resume is not None:
        run_dir = Path(resume)
        _check_world(run_dir, int(os.environ.get("WORLD_SIZE", "1")))  # before anything else about the run
        cfg = _check_resumable(run_dir)
    sess = Session(cfg, log, resuming=resume is not None)
    if on_setup is not None:
        on_setup(sess)
    if resume is None and sess.dist.main:
        run_dir = _new_run_dir(Path(runs_dir), run_dir, cfg, sess)
    if sess.dist.world == 1:
        return Loop(sess, Path(run_dir), resume is not None, progress, log, stop_after).run()
    return _loop_distributed(sess, run_dir, resume is not None, progress, log, stop_after)


def _new_run_dir(runs_dir: Path, run_dir: Path | None, cfg: Any, sess: Session) -> Path:
    """Create and fill the run folder (RUNS/<stamp>-<name>-<hex>, or the given one); a failed start leaves nothing."""
    created = run_dir is None
    run_dir = create_run_dir(runs_dir, cfg.name) if created else Path(run_dir)
    try:
        _start_run(run_dir, cfg, sess)
    except BaseException as exc:
        if created:  # a run that could not start leaves nothing behind
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
        if isinstance(exc, OSError):
            raise UserError(f"{run_dir}: cannot write the run folder ({exc.strerror or exc})") from None
        raise
    return run_dir


def _model_sizes(cfg: Any) -> str:
    """The model's size fields as the user sets them (model.d_model=128, ...), for an out-of-memory message."""
    sizes = [f"model.{k}={v}" for k, v in cfg.model.model_dump().items() if type(v) is int]
    return ", ".join(sizes) or f"model.name={cfg.model.name}"


def _batch_sizes(cfg: Any) -> str:
    """What sets one training step's memory, for an out-of-memory message."""
    accum = f", train.grad_accum_steps={cfg.train.grad_accum_steps}" if cfg.train.grad_accum_steps > 1 else ""
    return f"train.batch_size={cfg.train.batch_size}, data.max_len={cfg.data.max_len}{accum}"


# A run that keeps producing NaN with train.on_nan=skip_batch is broken, not unlucky.
MAX_CONSECUTIVE_SKIPS = 20


@dataclass
class LoopState:
    """What the loop carries from step to step; `window` and `last_cos` travel in checkpoints (exact resume)."""

    step: int = 0
    best: float = float("inf")
    # the partial logging window: per-figure values of the steps since the last train record
    window: dict[str, list[float]] = field(default_factory=lambda: {"lm_loss": [], "task_loss": [], "loss": []})
    last_cos: float | None = None
    last_ckpt: int = 0
    flaw: str | None = None  # what is wrong with the last checkpoint's weights; None: nothing known
    updated: bool = False  # an optimiser update since the last checkpoint (else the weights are its weights)
    skipped: list[int] = field(default_factory=list)
    consecutive_nan: int = 0
    tokens: int = 0
    t_window: float = field(default_factory=time.perf_counter)


class Loop:
    """One run from its state's step to train.steps; `run` reads as the sequence of steps it takes."""

    def __init__(self, sess: Session, run_dir: Path, resuming: bool, progress: bool, log: Log,
                 stop_after: int | None) -> None:
        self.sess, self.run_dir, self.resuming, self.stop_after = sess, run_dir, resuming, stop_after
        self.tc = sess.cfg.train
        self.progress, self.log = progress, log
        self.metrics = run_dir / "metrics.jsonl"
        self.shared = sess.model.shared_parameters()
        self.state = _resume_state(sess, run_dir) if resuming else LoopState()

    def run(self) -> Path:
        """Train to train.steps (or a stop), checkpointing as configured; the run's folder."""
        from llmcli.training.progress import Progress
        from llmcli.training.stopping import StopRequest

        st, tc, cfg = self.state, self.tc, self.sess.cfg
        update_meta(self.run_dir, status="running", resumed_at_step=st.step if self.resuming else None)
        self.out = Progress(self.run_dir, tc.steps, st.step, self.log, self.progress)
        self.out.message(f"train: {self.run_dir} | {cfg.model.name} {meta_params(self.run_dir)} params | objective "
                         f"{cfg.objective.name} | {len(self.sess.train_idx)} training records | step {st.step}/{tc.steps}")
        self.open_trackers()
        self.sess.model.train()
        try:
            with StopRequest() as stop:
                self.fill_prefix()
                if not self.resuming:
                    self.checkpoint([], False)  # step 0: a run killed at any later step can resume
                while st.step < tc.steps:
                    self.optimizer_step()
                    self.log_window()
                    saved = self.validate_and_checkpoint()
                    if self.stop_check(stop, saved):
                        return self.run_dir
        except Interrupted:
            raise
        except KeyboardInterrupt:
            _mark(self.run_dir, status="interrupted", step=st.step)
            self.out.note(f"train: stopped at once after step {st.step} (a second signal)")
            raise
        except BaseException as exc:
            error = str(exc).splitlines()[0] if str(exc) else repr(exc)
            _mark(self.run_dir, status="failed", step=st.step, error=error)
            self.out.note(f"train: failed after step {st.step}: {error}")
            raise
        finally:
            self.out.close()
            ended = meta_status(self.run_dir)
            if ended != "running":  # stopped, interrupted or failed; finish() closes the trackers of a completed run
                self.trackers.close(ended or "failed")
        return self.finish()

    def open_trackers(self) -> None:
        """train.loggers (TensorBoard, MLflow: llmcli/tracking), rank 0 only; one that fails is a warning line."""
        from llmcli.tracking import open_trackers

        names = self.tc.loggers if self.sess.dist.main else []
        self.trackers = open_trackers(names, self.run_dir, self.sess.cfg, self.out.message,
                                      resumed_at=self.state.step if self.resuming else None)
        self.state.t_window = time.perf_counter()  # the first window's tokens/s measures training, not tracker start

    def record(self, rec: dict[str, Any]) -> None:
        """One metrics.jsonl record, appended, then sent to every tracker."""
        append_jsonl(self.metrics, rec)
        self.trackers.log_metrics(rec)

    def fill_prefix(self) -> None:
        """Compute the frozen prefix of every record the run reads that is not cached yet (train.log shows it)."""
        sess = self.sess
        for note in sess.prefix_notes:
            self.out.message(note)
        if sess.prefix is not None:
            sess.prefix.log = self.out.message
            sess.prefix.ensure(_records_read(sess))
            self.state.t_window = time.perf_counter()  # the first window's tokens/s measures training only

    def optimizer_step(self) -> None:
        """One optimiser step over train.grad_accum_steps micro-batches; a NaN/Inf follows train.on_nan."""
        sess, st = self.sess, self.state
        sess.optimizer.zero_grad(set_to_none=True)
        with too_big(_batch_sizes(sess.cfg)):  # the first step is where a batch too big for memory shows
            lm, task, logs, n_tokens = _accumulate(sess, st.step, self.shared)
        bad = _non_finite(sess.model, self.tc.grad_clip, lm, task)
        if bad is None:
            with too_big(f"the optimiser state of {_model_sizes(sess.cfg)}"):  # allocated on the first step
                sess.optimizer.step()
            st.consecutive_nan, st.updated = 0, True
        else:
            self.nan_policy(bad)
        _schedule_step(sess.scheduler)
        st.step += 1
        st.tokens += n_tokens
        if bad is None:
            self._add_to_window(lm, task, logs)
        self.out.step()

    def nan_policy(self, bad: str) -> None:
        """The NaN policy: stop the run (on_nan=stop, or too many in a row), else drop this batch's gradients."""
        st = self.state
        st.consecutive_nan += 1
        if not st.updated and st.consecutive_nan > MAX_CONSECUTIVE_SKIPS:  # the checkpoint's own weights did this
            st.flaw = st.flaw or f"holds the weights that gave these {st.consecutive_nan} NaN/Inf batches"
        _on_nan(self.tc.on_nan, st.step + 1, bad, st.last_ckpt, st.flaw, st.consecutive_nan)
        self.sess.optimizer.zero_grad(set_to_none=True)
        st.skipped.append(st.step + 1)
        update_meta(self.run_dir, skipped_batches=st.skipped)
        self.out.message(f"train: NaN/Inf at step {st.step + 1} ({bad}); batch skipped (train.on_nan=skip_batch)")

    def _add_to_window(self, lm: float, task: float, logs: dict[str, float]) -> None:
        window = self.state.window
        window["lm_loss"].append(lm)
        window["task_loss"].append(task)
        for k, v in logs.items():  # loss, and objective-specific figures (lambda, log_var_*, ...)
            if k != "grad_cosine":
                window.setdefault(k, []).append(v)
        self.state.last_cos = logs.get("grad_cosine", self.state.last_cos)

    def log_window(self) -> None:
        """Every train.log_every steps (and at the end): the window's means as a train record, then a new window."""
        st, tc = self.state, self.tc
        if not (st.step % tc.log_every == 0 or st.step == tc.steps):
            return
        dt = time.perf_counter() - st.t_window
        rec = {"step": st.step, "split": "train", **{k: float(np.mean(v)) for k, v in st.window.items() if v},
               "lr": self.sess.scheduler.get_last_lr()[0]}
        if st.last_cos is not None:
            rec["grad_cosine"] = st.last_cos
        rec["tokens_per_s"] = st.tokens / dt if dt > 0 else 0.0
        self.record(rec)
        self.out.train_record(rec)
        st.window = {k: [] for k in st.window}
        st.last_cos, st.tokens, st.t_window = None, 0, time.perf_counter()

    def validate_and_checkpoint(self) -> bool:
        """Every train.eval_every steps (and at the end): validate, mark `best`, checkpoint. Whether it ran."""
        st, tc = self.state, self.tc
        if not (st.step % tc.eval_every == 0 or st.step == tc.steps):
            return False
        records, value = self.sess.validate(st.step)
        for r in records:
            self.record(r)
        here = tc.select_by in SELECTED_HERE  # else `best` is chosen after training, among the step checkpoints
        is_best = bool(value < st.best) and here
        self.record({"step": st.step, "split": "val", "domain": "in_domain", "objective": value,
                     "best": is_best, "select_by": tc.select_by})
        st.best = min(st.best, value)
        self.checkpoint(records, is_best, keep_step=not here)
        ind = [r for r in records if r["domain"] in self.sess.train_domains]
        if ind:
            self.out.message(f"step {st.step}: val " + " ".join(
                f"{r['domain']} acc={r.get('acc', float('nan')):.3f} ppl={r['ppl']:.1f}" for r in ind))
        return True

    def checkpoint(self, records: list[dict[str, Any]], is_best: bool, keep_step: bool = False) -> None:
        """last (and best / step-N) checkpoints of the current step, with the loop state an exact resume needs."""
        from llmcli.models.checkpoint import save_checkpoint

        sess, st = self.sess, self.state
        flaw = _weights_flaw(sess.model, records)
        st.flaw = flaw if flaw or st.updated else st.flaw  # weights unchanged since the last checkpoint: same verdict
        side = {"step": st.step, "metrics": {r["domain"]: r for r in records}, "best_score": st.best,
                "objective": sess.objective.state_dict(), "dg": sess.dg.state_dict(), "window": st.window,
                "last_cos": st.last_cos, "select_by": self.tc.select_by, "flaw": st.flaw}
        ckpt = self.run_dir / "checkpoints"
        if is_best:
            save_checkpoint(ckpt / "best.safetensors", sess.model, sess.optimizer, sess.scheduler, side)
        if keep_step:  # a selection rule applied after training picks among these
            save_checkpoint(ckpt / f"step-{st.step}.safetensors", sess.model, sess.optimizer, sess.scheduler, side)
        save_checkpoint(ckpt / "last.safetensors", sess.model, sess.optimizer, sess.scheduler, side)
        st.last_ckpt, st.updated = st.step, False

    def stop_check(self, stop: StopRequest, saved: bool) -> bool:
        """A signal or stop_after: checkpoint (unless just done) and leave; else the checkpoint_every cadence."""
        st, tc = self.state, self.tc
        if st.step >= tc.steps:
            return False
        stopping = stop.signum is not None or (self.stop_after is not None and st.step >= self.stop_after)
        if not saved and (stopping or (tc.checkpoint_every and st.step % tc.checkpoint_every == 0)):
            self.checkpoint([], False)
        if stop.signum is not None:
            update_meta(self.run_dir, status="interrupted", step=st.step, signal=stop.name,
                        ended=timestamp())
            msg = f"train: {stop.name} at step {st.step}: checkpoint written; continue with --resume {self.run_dir}"
            self.out.message(msg)
            raise Interrupted(stop.signum, msg)
        if stopping:
            update_meta(self.run_dir, status="stopped", step=st.step)
            self.out.message(f"train: stopped after step {st.step}; continue with --resume {self.run_dir}")
        return stopping

    def finish(self) -> Path:
        """Mark the run completed and draw its curves."""
        from llmcli.evaluation.plots import curves_png

        st = self.state
        update_meta(self.run_dir, status="completed", step=st.step, best_score=st.best,
                    ended=timestamp())
        if st.flaw:  # completed, but on weights that are no use
            self.out.message(f"train: warning: checkpoints/last.safetensors (step {st.last_ckpt}) {st.flaw}; "
                             "lower optim.lr")
        curves = curves_png(self.run_dir)  # train/val L and T per domain, grad_cosine: RUN_DIR/curves.png
        self.trackers.log_artifacts([curves] if curves else [])
        self.trackers.close("completed")
        self.out.message(f"train: done, {self.run_dir}")
        return self.run_dir


def _trained_domains(cfg: Any, data: ProcessedData) -> list[str]:
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


def _loop_distributed(sess: Session, run_dir: str | Path, resuming: bool, progress: bool, log: Log,
                      stop_after: int | None) -> Path:
    """The same loop on every rank; only rank 0 writes the run folder, the others a scratch mirror of it."""
    import shutil

    from llmcli.training.distributed import broadcast_object, mirror

    run_dir = Path(broadcast_object(str(run_dir), sess.dist))  # after rank 0 has created it
    if sess.dist.main:
        return Loop(sess, run_dir, resuming, progress, log, stop_after).run()
    scratch = mirror(run_dir)
    try:
        Loop(sess, scratch, resuming, False, lambda m: None, stop_after).run()
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


def _resume_state(sess: Session, run_dir: Path) -> LoopState:
    """Load last.safetensors into the session; drop metric records after its step; the loop state it saved."""
    from llmcli.files import sha256_file
    from llmcli.models.checkpoint import load_checkpoint, restore_model, restore_training

    # preprocess rebuilds the cache when an input file changed: the same ids must still mean the same text
    if sha256_file(run_dir / "tokenizer.json") != sess.data.manifest["tokenizer_sha256"]:
        raise UserError(f"{run_dir}: the processed data at {sess.data.path} was tokenized differently from this run "
                        "(its input files changed since the run started?); resume needs the data it trained on")
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
    before = read_json_object(run_dir / "meta.json", "run meta").get("skipped_batches") or []
    state = LoopState(step=step, best=float(side.get("best_score", float("inf"))), last_cos=side.get("last_cos"),
                      last_ckpt=step, flaw=side.get("flaw"), skipped=[s for s in before if s <= step])
    if side.get("window"):
        state.window = side["window"]
    return state


def _accumulate(sess: Session, step: int, shared: list) -> tuple[float, float, dict[str, float], int]:
    """Gradients of one optimiser step summed over train.grad_accum_steps micro-batches, then averaged.

    Objectives see unscaled losses (a constraint compares the real task loss); the mean is taken on .grad.
    Micro-batch j of step s reads stream position (s * k + j) * batch_size, so the data order stays a
    pure function of the step (exact resume). Returns mean lm_loss, task_loss, the objective's logs
    (means; grad_cosine from the first micro-batch) and the step's token count.
    """
    from llmcli.device import autocast
    from llmcli.training.distributed import shard

    cfg, tc = sess.cfg, sess.cfg.train
    k, lms, tasks, logs, n_tokens = tc.grad_accum_steps, [], [], {}, 0
    for j in range(k):
        # the global batch; under torchrun, this rank's slice of it
        idx = shard(_batch_indices(sess, step * k + j), sess.dist)
        batch, prefix = sess.data.batch(idx), sess.prefix_states(idx)
        if cfg.data.augment:  # train split only; a pure function of (seed, micro-step): resume stays exact
            from llmcli.data.augment import augment_batch

            batch = augment_batch(batch, cfg.data.augment, cfg.seed, step * k + j, sess.data.pad_id)
        sess.objective.prepare(sess.model, step)  # e.g. the conditioned objective draws this batch's alpha
        # a loss the update gives zero weight runs without a graph (a DG method reads features and losses itself)
        grads = sess.objective.grads_needed(step) if cfg.dg.name == "erm" else (True, True)
        batch = _to(batch, sess.device)
        with autocast(sess.device):  # bf16 on CUDA; a no-op on CPU
            # step: an encoder's masks; prefix: the records' cached frozen-prefix states (None: the whole model runs)
            out = sess.model.losses(batch, sess.task_loss, step=step * k + j, prefix=prefix, grads=grads)
        lm_loss, lm_logs, lm_tokens = _lm_only_loss(sess, step * k + j, batch, out, grads)  # L over both streams
        # the DG method forms T from per-domain losses and features; metrics keep the plain pooled task_loss
        dg_task, dg_logs = sess.dg.task_loss(sess.model, batch, out, sess.task_loss, step)
        micro = {**sess.objective.backward(lm_loss, dg_task, shared, step), **dg_logs, **lm_logs}
        if cfg.dg.name != "erm":
            micro["dg_task_loss"] = float(dg_task.detach())
        lms.append(float(lm_loss.detach()))
        tasks.append(float(out["task_loss"].detach()))
        for key, v in micro.items():
            logs.setdefault(key, []).append(v)
        n_tokens += batch.n_tokens + lm_tokens
    sess.dg.end_step()  # once per optimiser step, skipped batch or not (GroupDRO moves its weights here)
    if k > 1:
        for group in sess.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(k)
    means = {key: (v[0] if key == "grad_cosine" else float(np.mean(v))) for key, v in logs.items()}
    return _reduce_ranks(sess, float(np.mean(lms)), float(np.mean(tasks)), means, n_tokens)


def _lm_only_loss(sess: Session, micro_step: int, batch: Batch, out: dict[str, Tensor],
                  grads: tuple[bool, bool] = (True, True)) -> tuple[Tensor, dict[str, float], int]:
    """L of one micro-batch over its labeled rows and its LM-only rows; its logs; the LM-only tokens.

    L is the two streams' mean losses weighted by their real target tokens (for a causal LM: the mean over every
    real target token of both, as one batch would give). The LM-only rows run a forward of their own, on a torch
    RNG seeded from (seed, micro_step) and restored after, so the labeled rows' dropout, and so T, are exactly
    those of a run without them. Their pooled states go to the DG method as `out["lm_only_features"]` (B', D)
    with `out["lm_only_domains"]` (B',): a domain for DANN's classifier, never labeled rows.
    """
    import torch

    from llmcli.data.dataset import stream_seed
    from llmcli.device import autocast
    from llmcli.training.distributed import shard

    idx = shard(_lm_only_indices(sess, micro_step), sess.dist) if sess.lm_only_rows else np.empty(0, np.int64)
    if not len(idx):
        return out["lm_loss"], {}, 0
    extra = _to(sess.data.batch(idx), sess.device)
    with _forked_rng(sess.device):
        torch.manual_seed(stream_seed(sess.cfg.seed, "lm_only", micro_step))
        with autocast(sess.device):
            # its labels are all -1: T is a graph-keeping zero; the step draws an encoder's masks
            lm_out = sess.model.losses(extra, sess.task_loss, step=micro_step, prefix=sess.prefix_states(idx),
                                       grads=grads)
    out["lm_only_features"], out["lm_only_domains"] = lm_out["features"], extra.domains
    n_lab, n_lm = (batch.lengths - 1).clamp(min=0).sum(), (extra.lengths - 1).clamp(min=0).sum()
    w = n_lm / (n_lab + n_lm).clamp(min=1)  # the LM-only rows' share of the real target tokens
    lm_loss = (1 - w) * out["lm_loss"] + w * lm_out["lm_loss"]
    return lm_loss, {"lm_only_loss": float(lm_out["lm_loss"].detach())}, extra.n_tokens


def _reduce_ranks(sess: Session, lm: float, task: float, logs: dict[str, float],
                  n_tokens: int) -> tuple[float, float, dict[str, float], int]:
    """Under torchrun: gradients and logged figures averaged across ranks, tokens summed (else unchanged)."""
    from llmcli.training.distributed import all_reduce_floats, average_gradients, broadcast_object

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
        update_meta(run_dir, **changes, ended=timestamp())
    except (UserError, OSError):
        pass


def _non_finite(model: nn.Module, grad_clip: float | None, lm: float, task: float) -> str | None:
    """What is NaN/Inf in this step (the losses, else the clipped gradient's norm), or None; clips the gradients."""
    import torch

    if not (np.isfinite(lm) and np.isfinite(task)):
        return f"lm_loss={lm}, task_loss={task}"
    if grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if not torch.isfinite(norm):
            return f"gradient norm={float(norm)}"
    return None


def _weights_flaw(model: nn.Module, records: list[dict[str, Any]]) -> str | None:
    """Why the model's current weights are no good to resume from (non-finite, or NaN/Inf on validation), or None."""
    import torch

    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return "has non-finite weights"
    bad = [r["domain"] for r in records
           if not (np.isfinite(r.get("lm_loss", 0.0)) and np.isfinite(r.get("task_loss", 0.0)))]
    return f"gives NaN/Inf losses on the validation records of {', '.join(bad)}" if bad else None


def _on_nan(policy: str, step: int, what: str, last_ckpt: int, flaw: str | None, consecutive: int) -> None:
    """Stop the run (policy stop, or too many NaN batches in a row); otherwise let the loop skip the batch.

    The last checkpoint is called good only when nothing says otherwise (`flaw`: its weights are non-finite,
    give NaN/Inf on validation, or gave the NaN batches themselves); a bad one is named as such.
    """
    if flaw is None:
        keep, advice = f"the last good checkpoint (step {last_ckpt}) is kept in checkpoints/last.safetensors", ""
    else:
        keep, advice = f"the last checkpoint (step {last_ckpt}) {flaw}: resuming it will not help", "; lower optim.lr"
    if policy == "stop":
        raise RunFailed(f"train: the loss became NaN/Inf at step {step} ({what}); {keep}; "
                        "lower optim.lr, or set train.on_nan=skip_batch")
    if consecutive > MAX_CONSECUTIVE_SKIPS:
        raise RunFailed(f"train: NaN/Inf in {consecutive} batches in a row (last at step {step}, {what}); {keep}{advice}")


def _schedule_step(scheduler: LRScheduler) -> None:
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


def _forked_rng(device: str) -> Any:
    """A fork of the torch RNG of the CPU and of the run's device: what runs inside leaves both as they were."""
    import torch

    dev = torch.device(device)
    if dev.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = dev.index if dev.index is not None else torch.get_device_module(dev.type).current_device()
    return torch.random.fork_rng(devices=[index], device_type=dev.type)


def _records_read(sess: Session) -> np.ndarray:
    """Every record a run reads: its validation subsets and, unless augmented, both training streams to the last
    step (pure functions of (seed, micro-step); each walked until it covers its pool, which takes about an epoch)."""
    parts = [*sess.val_idx.values()]
    if sess.prefix.batches:
        micro = sess.cfg.train.steps * sess.cfg.train.grad_accum_steps
        parts.append(_drawn(sess.train_idx, micro, lambda m: _batch_indices(sess, m)))
        if sess.lm_only_rows:
            parts.append(_drawn(sess.lm_only_idx, micro, lambda m: _lm_only_indices(sess, m)))
    return np.unique(np.concatenate(parts)).astype(np.int64)


def _drawn(pool: np.ndarray, micro_steps: int, draw: Callable[[int], np.ndarray]) -> np.ndarray:
    """The records `draw(m)` gives over micro-steps 0..micro_steps-1, stopping once all of `pool` is seen."""
    seen: set[int] = set()
    for m in range(micro_steps):
        seen.update(draw(m).tolist())
        if len(seen) == len(pool):
            break
    return np.fromiter(seen, dtype=np.int64, count=len(seen))


def _lm_only_indices(sess: Session, micro_step: int) -> np.ndarray:
    """Record indices of one micro-batch's LM-only rows (data.lm_only_ratio per labeled row): a stream of their
    own (`stream_seed`), a pure function of (seed, micro_step) like the labeled one, which it never moves."""
    from llmcli.data.dataset import balanced_stream, epoch_stream, stream_seed

    n, seed = sess.lm_only_rows, stream_seed(sess.cfg.seed, "lm_only")
    if sess.cfg.train.sampler == "balanced":  # equal shares per LM-only domain too
        parts = sess.lm_only_parts
        pos = balanced_stream([len(d) for d in parts], seed, micro_step, n)
        return np.concatenate([d[p] for d, p in zip(parts, pos)])
    return sess.lm_only_idx[epoch_stream(len(sess.lm_only_idx), seed, micro_step * n, n)]


def meta_params(run_dir: Path) -> str:
    """Parameter count from meta.json, human-readable."""
    n = read_json_object(run_dir / "meta.json", "run meta").get("n_params", 0)
    return f"{n / 1e6:.2f}M" if n >= 1e5 else str(n)


def _to(batch: Batch, device: str) -> Batch:
    if device == "cpu":
        return batch
    from llmcli.data.dataset import Batch

    return Batch(*(t.to(device) for t in (batch.tokens, batch.lengths, batch.labels, batch.domains)))
