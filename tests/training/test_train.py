"""Training: the run folder, metrics, checkpoints, reproducibility and resume."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from llmcli.errors import UserError
from llmcli.training.engine import TIMING_KEYS, train

QUIET = {"progress": False, "log": lambda m: None}


def metric_values(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in recs]


def test_run_folder_is_self_describing(tiny_run):
    assert re.fullmatch(r"\d{8}-\d{6}-tiny-[0-9a-f]{4}", tiny_run.name)
    for name in ("config.yaml", "meta.json", "metrics.jsonl", "train.log", "tokenizer.json", "data_manifest.json",
                 "checkpoints/last.safetensors", "checkpoints/last.json", "checkpoints/best.safetensors"):
        assert (tiny_run / name).is_file(), name
    meta = json.loads((tiny_run / "meta.json").read_text())
    assert meta["status"] == "completed" and meta["step"] == 20 and meta["n_params"] > 0
    assert {"torch", "python", "llmcli", "host", "seed", "command", "started", "ended"} <= set(meta)


def test_metrics_hold_train_and_per_domain_val_records(tiny_run):
    recs = metric_values(tiny_run)
    train_recs = [r for r in recs if r["split"] == "train"]
    assert [r["step"] for r in train_recs] == [5, 10, 15, 20]
    assert all({"lm_loss", "task_loss", "loss", "lr"} <= set(r) for r in train_recs)
    assert any("grad_cosine" in r for r in train_recs)
    val = [r for r in recs if r["split"] == "val" and r["domain"] in ("kjv", "web", "wyc")]
    assert {(r["step"], r["domain"]) for r in val} == {(s, d) for s in (10, 20) for d in ("kjv", "web", "wyc")}
    assert all({"lm_loss", "ppl", "bpb", "task_loss", "acc", "macro_f1"} <= set(r) for r in val)


def test_training_lowers_the_lm_loss(tiny, tmp_path):
    run = train(tiny("train.steps=60", "train.eval_every=60", "train.log_every=20"), runs_dir=tmp_path, **QUIET)
    train_recs = [r for r in metric_values(run) if r["split"] == "train"]
    assert train_recs[-1]["lm_loss"] < train_recs[0]["lm_loss"] - 0.5


def test_same_config_and_seed_give_identical_metrics(tiny, tmp_path):
    a = train(tiny("seed=3"), runs_dir=tmp_path / "a", **QUIET)
    b = train(tiny("seed=3"), runs_dir=tmp_path / "b", **QUIET)
    assert metric_values(a) == metric_values(b)
    c = train(tiny("seed=4"), runs_dir=tmp_path / "c", **QUIET)
    assert metric_values(c) != metric_values(a)


@pytest.mark.parametrize("stop", [7, 10])  # between checkpoints, and right on one
def test_resume_ends_exactly_like_an_uninterrupted_run(tiny, tmp_path, stop):
    from safetensors.torch import load_file

    full = train(tiny(), runs_dir=tmp_path / "full", **QUIET)
    part = train(tiny(), runs_dir=tmp_path / "part", stop_after=stop, **QUIET)
    assert json.loads((part / "meta.json").read_text())["status"] == "stopped"
    resumed = train(None, resume=part, **QUIET)
    assert resumed == part and json.loads((part / "meta.json").read_text())["status"] == "completed"
    assert metric_values(resumed) == metric_values(full)
    a = load_file(full / "checkpoints" / "last.safetensors")
    b = load_file(part / "checkpoints" / "last.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_resume_needs_a_checkpoint(tmp_path, tiny_run):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    (run / "checkpoints" / "last.safetensors").unlink()
    with pytest.raises(UserError, match="nothing to resume"):
        train(None, resume=run, **QUIET)


def test_gradient_accumulation_equals_one_big_batch(tiny):
    """alpha = 0 (T is a row mean): two micro-batches of 16 give the gradient of the same 32 records at once."""
    import torch

    from llmcli.training.engine import Session, _accumulate

    grads = []
    for sets in (["train.batch_size=32"], ["train.batch_size=16", "train.grad_accum_steps=2"]):
        sess = Session(tiny("objective.alpha=0.0", *sets), log=lambda m: None)
        sess.optimizer.zero_grad(set_to_none=True)
        lm, task, logs, n_tokens = _accumulate(sess, 3, sess.model.shared_parameters())
        grads.append((torch.cat([p.grad.flatten() for p in sess.model.parameters() if p.grad is not None]),
                      task, n_tokens))
    (a, task_a, tok_a), (b, task_b, tok_b) = grads
    assert tok_a == tok_b and task_a == pytest.approx(task_b, rel=1e-5)
    assert torch.allclose(a, b, atol=1e-6)


def test_accumulated_run_trains(tiny, tmp_path):
    run = train(tiny("train.grad_accum_steps=2", "optim.name=adam"), runs_dir=tmp_path, **QUIET)
    assert [r["step"] for r in metric_values(run) if r["split"] == "train"] == [5, 10, 15, 20]


BACKBONES = {
    "gpt": "{name: gpt, n_layer: 1, n_head: 2, d_model: 16, block_size: 64}",
    "lstm": "{name: lstm, n_layer: 1, d_model: 16}",
    "gru": "{name: gru, n_layer: 2, d_model: 16, dropout: 0.1}",
    "rnn": "{name: rnn, n_layer: 1, d_model: 16}",
    "mlp": "{name: mlp, context: 3, d_model: 16, hidden: 32}",
}
OBJECTIVES = {
    "weighted": "{name: weighted, alpha: 0.3, log_grad_every: 2}",
    "constrained": "{name: constrained, beta: 0.5, log_grad_every: 2}",
    "pcgrad": "{name: pcgrad, log_grad_every: 2}",
    "mgda": "{name: mgda, log_grad_every: 2}",
    "uncertainty": "{name: uncertainty, log_grad_every: 2}",
}


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_trains_with_every_objective(tiny, tmp_path, backbone, objective):
    sets = [f"model={BACKBONES[backbone]}", f"objective={OBJECTIVES[objective]}", "train.steps=4",
            "train.eval_every=4", "train.log_every=2", "train.val_max_examples=16"]
    run = train(tiny(*sets), runs_dir=tmp_path, **QUIET)
    recs = metric_values(run)
    train_recs = [r for r in recs if r["split"] == "train"]
    assert all(np.isfinite(r["lm_loss"]) and np.isfinite(r["task_loss"]) for r in train_recs)
    assert all("grad_cosine" in r for r in train_recs)
    assert {r["domain"] for r in recs if r["split"] == "val"} >= {"kjv", "web", "wyc"}
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "completed" and meta["n_params"] > 0
    if objective == "weighted":  # generate runs unchanged on every backbone (one objective is enough)
        from llmcli.evaluation.generate import generate

        texts = ["".join(generate(run, "In the beginning", max_new_tokens=8, temperature=0.0)) for _ in range(2)]
        assert texts[0] == texts[1]  # greedy through the backbone's own cache: same text every time


def saved_checkpoints(monkeypatch):
    """Record (file name, step) of every checkpoint the loop writes."""
    import llmcli.models.checkpoint as ck

    seen, real = [], ck.save_checkpoint

    def spy(path, model, optimizer, scheduler, meta):
        seen.append((path.name, meta["step"]))
        real(path, model, optimizer, scheduler, meta)

    monkeypatch.setattr(ck, "save_checkpoint", spy)
    return seen


def test_checkpoint_every_sets_the_cadence_apart_from_eval(tiny, tmp_path, monkeypatch):
    seen = saved_checkpoints(monkeypatch)
    train(tiny("train.checkpoint_every=3"), runs_dir=tmp_path, **QUIET)
    last = [s for name, s in seen if name == "last.safetensors"]
    assert last == [0, 3, 6, 9, 10, 12, 15, 18, 20]  # step 0, every 3rd, and the eval steps 10 and 20


def nan_at(monkeypatch, call: int):
    """Make the training loss NaN on the `call`-th forward pass (1-based)."""
    from llmcli.models.model import TwoHeadModel

    real, calls = TwoHeadModel.losses, [0]

    def losses(self, batch, task_loss, **kw):
        out = real(self, batch, task_loss, **kw)
        calls[0] += 1
        if calls[0] == call:
            out["lm_loss"] = out["lm_loss"] * float("nan")
        return out

    monkeypatch.setattr(TwoHeadModel, "losses", losses)


def test_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    from llmcli.errors import RunFailed

    nan_at(monkeypatch, 7)
    with pytest.raises(RunFailed, match=r"NaN/Inf at step 7 .*last good checkpoint \(step 5\)"):
        train(tiny("train.checkpoint_every=5"), runs_dir=tmp_path, **QUIET)
    run = next(tmp_path.iterdir())
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "failed" and "step 7" in meta["error"]
    assert json.loads((run / "checkpoints" / "last.json").read_text())["step"] == 5


def test_a_real_divergence_is_caught(tiny, tmp_path):
    from llmcli.errors import RunFailed

    with pytest.raises(RunFailed, match=r"at step \d+ \(lm_loss=nan"):
        train(tiny("optim.lr=1e8", "train.grad_clip=null"), runs_dir=tmp_path, **QUIET)
    assert json.loads((next(tmp_path.iterdir()) / "meta.json").read_text())["status"] == "failed"


def test_skip_batch_drops_the_nan_update_and_finishes(tiny, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    nan_at(monkeypatch, 7)
    run = train(tiny("train.on_nan=skip_batch"), runs_dir=tmp_path, **QUIET)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "completed" and meta["skipped_batches"] == [7]
    weights = load_file(run / "checkpoints" / "last.safetensors")
    assert all(t.isfinite().all() for k, t in weights.items() if k.startswith("model."))
    recs = [r for r in metric_values(run) if r["split"] == "train"]
    assert [r["step"] for r in recs] == [5, 10, 15, 20] and all(r["lm_loss"] == r["lm_loss"] for r in recs)


def test_resuming_a_completed_run_is_refused(tiny_run):
    with pytest.raises(UserError, match="already completed all 20 steps"):
        train(None, resume=tiny_run, **QUIET)


def test_skipped_batches_before_a_resume_stay_in_meta(tiny, tmp_path, monkeypatch):
    nan_at(monkeypatch, 3)
    run = train(tiny("train.on_nan=skip_batch"), runs_dir=tmp_path, stop_after=8, **QUIET)
    monkeypatch.undo()
    nan_at(monkeypatch, 1)  # the resumed run's first step, 9
    train(None, resume=run, **QUIET)
    assert json.loads((run / "meta.json").read_text())["skipped_batches"] == [3, 9]


def test_a_blown_up_skip_batch_run_does_not_call_its_last_checkpoint_good(tiny, tmp_path):
    """lr 1e8 without clipping: after one update every batch is NaN; the checkpoints of steps 10 and 20 hold
    those weights (NaN on validation), so resuming them cannot help and the message says so."""
    from llmcli.errors import RunFailed

    cfg = tiny("optim.lr=1e8", "train.grad_clip=null", "train.on_nan=skip_batch", "train.steps=40")
    with pytest.raises(RunFailed) as caught:
        train(cfg, runs_dir=tmp_path, **QUIET)
    msg = str(caught.value)
    assert "in a row" in msg and "last good" not in msg, msg
    assert "the last checkpoint (step 20) gives NaN/Inf losses on the validation records" in msg, msg
    assert "resuming it will not help; lower optim.lr" in msg, msg
    run = next(tmp_path.iterdir())
    assert json.loads((run / "checkpoints" / "last.json").read_text())["flaw"].startswith("gives NaN/Inf")
    assert "train: failed after step" in (run / "train.log").read_text()


def test_a_checkpoint_is_good_only_with_finite_weights_and_validation(tiny):
    import torch

    from llmcli.training.engine import Session, _weights_flaw

    sess = Session(tiny(), log=lambda m: None)
    assert _weights_flaw(sess.model, [{"domain": "kjv", "lm_loss": 5.0, "task_loss": 2.0}]) is None
    assert "kjv" in _weights_flaw(sess.model, [{"domain": "kjv", "lm_loss": float("nan"), "task_loss": 2.0}])
    with torch.no_grad():
        next(sess.model.parameters())[0] = float("inf")
    assert _weights_flaw(sess.model, []) == "has non-finite weights"


def test_nan_right_after_a_checkpoint_names_that_checkpoint_bad_after_many_in_a_row(tiny, tmp_path, monkeypatch):
    """NaN from step 7 on: no update since, so the checkpoint of step 24 holds the weights that gave them all."""
    from llmcli.errors import RunFailed
    from llmcli.models.model import TwoHeadModel

    real, calls = TwoHeadModel.losses, [0]

    def losses(self, batch, task_loss, **kw):
        out = real(self, batch, task_loss, **kw)
        calls[0] += 1
        if calls[0] > 6:  # every batch from step 7 on
            out["lm_loss"] = out["lm_loss"] * float("nan")
        return out

    monkeypatch.setattr(TwoHeadModel, "losses", losses)
    with pytest.raises(RunFailed, match=r"the last checkpoint \(step 24\) holds the weights that gave these 21 NaN/Inf"):
        train(tiny("train.on_nan=skip_batch", "train.checkpoint_every=6", "train.steps=40", "train.eval_every=40"),
              runs_dir=tmp_path, **QUIET)


def cli_train(processed_dir, tmp_path, *args):
    from typer.testing import CliRunner

    from llmcli.cli import app
    from tests.conftest import TINY

    return CliRunner().invoke(app, ["train", str(TINY), "--set", f"data.processed_dir={processed_dir}",
                                    "--runs-dir", str(tmp_path), *args])


STEP_LINE = re.compile(r"^step (\d+)/20: train lm_loss=\S+ task_loss=\S+ loss=\S+ lr=\S+ \| \d+ tok/s", re.M)


@pytest.mark.parametrize("flag", [[], ["--no-progress"]])
def test_progress_in_a_pipe_is_plain_periodic_lines_also_in_train_log(processed_dir, tmp_path, flag):
    res = cli_train(processed_dir, tmp_path, *flag)
    assert res.exit_code == 0, res.output
    assert "\r" not in res.stderr  # no bar frames in a file or pipe
    assert [int(s) for s in STEP_LINE.findall(res.stderr)] == [5, 10, 15, 20]  # train.log_every = 5
    log = (next(tmp_path.iterdir()) / "train.log").read_text()
    body = [line.split(" ", 1)[1] for line in log.splitlines()]  # each line: a timestamp, then the message
    assert [int(s) for s in STEP_LINE.findall("\n".join(body))] == [5, 10, 15, 20]
    assert "step 10: val kjv acc=" in log and body[-1].startswith("train: done")


class FakeTerminal:
    """stderr as a terminal: a bar is drawn into `text`."""

    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return True


def test_on_a_terminal_messages_are_never_glued_onto_the_bar(tiny, tmp_path, monkeypatch):
    import sys

    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    nan_at(monkeypatch, 7)
    messages = []

    def log(m):
        messages.append(m)
        print(m, file=sys.stderr)

    train(tiny("train.on_nan=skip_batch"), runs_dir=tmp_path, progress=True, log=log)
    assert "train:" in term.text and "step/s" in term.text  # the bar was drawn
    assert any("NaN/Inf at step 7" in m for m in messages) and not any(STEP_LINE.match(m) for m in messages)
    for m in messages:  # each message starts a line: after a newline, or after the bar's line was blanked
        segments = term.text[:term.text.index(m)].rsplit("\n", 1)[-1].split("\r")
        assert segments[-1] == "" and (len(segments) == 1 or segments[-2].strip() == ""), (m, segments[-3:])


def test_a_model_far_beyond_memory_is_one_line_naming_its_size(processed_dir, tmp_path):
    """A 2**20 x 16384 position table (64 GiB) under a 16 GiB address-space limit: allocation fails at once."""
    import resource
    import subprocess
    import sys

    from tests.conftest import ROOT, TINY

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))

    sets = [f"data.processed_dir={processed_dir}", "model.block_size=1048576", "model.d_model=16384", "model.n_head=2"]
    res = subprocess.run([sys.executable, "-m", "llmcli", "train", str(TINY), *(a for s in sets for a in ("--set", s)),
                          "--runs-dir", str(tmp_path / "runs"), "--no-progress"], cwd=ROOT, capture_output=True,
                         text=True, preexec_fn=limit, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "model.d_model=16384" in errors[0] and "model.block_size=1048576" in errors[0] and "64.0 GiB" in errors[0]
    assert not (tmp_path / "runs").exists()  # nothing written: the model is built before the run folder


def test_a_batch_beyond_memory_names_the_batch_fields(tiny, tmp_path, monkeypatch):
    import llmcli.training.engine as engine

    def accumulate(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 6442450944 bytes.")

    monkeypatch.setattr(engine, "_accumulate", accumulate)
    with pytest.raises(UserError, match=r"^train.batch_size=16, data.max_len=48: out of memory .*6.0 GiB"):
        train(tiny(), runs_dir=tmp_path, **QUIET)
    assert json.loads((next(tmp_path.iterdir()) / "meta.json").read_text())["status"] == "failed"
