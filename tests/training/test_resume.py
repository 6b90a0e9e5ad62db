"""Exact resume after a crash: SIGKILL at a random step, a metrics line cut mid-write, a save cut between
the tensor file and its sidecar. Each resumed run must end bit for bit like an uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmcli.training.engine import train
from tests.conftest import ROOT, TINY
from tests.training.test_train import QUIET, metric_values

SETTINGS = ["train.steps=24", "train.log_every=1", "train.checkpoint_every=4", "train.eval_every=12"]


def same_weights(a: Path, b: Path) -> bool:
    """Every tensor of the two last checkpoints (weights, optimiser state, RNG) equal, bit for bit."""
    from safetensors.torch import load_file

    x, y = load_file(a / "checkpoints" / "last.safetensors"), load_file(b / "checkpoints" / "last.safetensors")
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and x[k].equal(y[k]) for k in x)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The uninterrupted run."""
    return train(tiny(*SETTINGS), runs_dir=tmp_path_factory.mktemp("reference"), **QUIET)


def last_step(metrics: Path) -> int:
    """The step of the last complete line of metrics.jsonl (0 before any)."""
    lines = metrics.read_text().split("\n")[:-1] if metrics.is_file() else []
    return json.loads(lines[-1])["step"] if lines else 0


def test_sigkill_at_a_random_step_then_resume_equals_the_uninterrupted_run(processed_dir, reference, tmp_path):
    seed = random.randrange(1 << 30)
    kill_at = random.Random(seed).randint(1, 23)
    sets = [a for s in [f"data.processed_dir={processed_dir}", *SETTINGS] for a in ("--set", s)]
    proc = subprocess.Popen([sys.executable, "-m", "llmcli", "train", str(TINY), *sets, "--runs-dir", str(tmp_path),
                             "--no-progress"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        runs = list(tmp_path.iterdir())
        if runs and last_step(runs[0] / "metrics.jsonl") >= kill_at:
            break
        time.sleep(0.002)
    assert proc.poll() is None, f"the run ended before step {kill_at}: {proc.stderr.read().decode()[-500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = next(tmp_path.iterdir())
    killed_at = last_step(run / "metrics.jsonl")
    assert json.loads((run / "meta.json").read_text())["status"] == "running"  # nothing got to say otherwise

    train(None, resume=run, **QUIET)
    msg = f"seed {seed}: killed at step {kill_at} (log reached {killed_at})"
    assert json.loads((run / "meta.json").read_text())["status"] == "completed", msg
    assert metric_values(run) == metric_values(reference), msg
    assert same_weights(run, reference), msg


def test_a_metrics_line_cut_mid_write_is_dropped(tiny, reference, tmp_path):
    run = train(tiny(*SETTINGS), runs_dir=tmp_path, stop_after=9, **QUIET)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "split": "train", "lm_lo')  # the append a SIGKILL cut short
    train(None, resume=run, **QUIET)
    assert metric_values(run) == metric_values(reference)
    assert same_weights(run, reference)


class Killed(BaseException):
    """Stands in for SIGKILL at one exact instant."""


def test_a_save_cut_between_tensors_and_sidecar_resumes_from_the_previous_pair(tiny, reference, tmp_path,
                                                                                monkeypatch):
    import llmcli.models.checkpoint as ck

    real = ck.atomic_write_json

    def write_json(path, obj):
        if Path(path).name == "last.json" and obj["step"] == 8:
            raise Killed  # last.safetensors already holds step 8; last.json still describes step 4
        real(path, obj)

    monkeypatch.setattr(ck, "atomic_write_json", write_json)
    with pytest.raises(Killed):
        train(tiny(*SETTINGS), runs_dir=tmp_path, **QUIET)
    monkeypatch.undo()
    run = next(tmp_path.iterdir())
    assert (run / "checkpoints" / "last.prev.safetensors").is_file()
    train(None, resume=run, **QUIET)
    assert json.loads((run / "meta.json").read_text())["resumed_at_step"] == 4
    assert not (run / "checkpoints" / "last.prev.safetensors").exists()
    assert metric_values(run) == metric_values(reference)
    assert same_weights(run, reference)
