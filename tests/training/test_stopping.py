"""SIGINT / SIGTERM: the run stops after the current step with a resumable checkpoint."""

from __future__ import annotations

import json
import os
import signal

import pytest

from llmcli.errors import Interrupted
from llmcli.training.engine import train
from tests.training.test_train import QUIET, metric_values


def signal_on_batch(monkeypatch, call: int, sig: int):
    """Send `sig` to this process while the `call`-th training batch is being built."""
    from llmcli.data.dataset import ProcessedData

    real, calls = ProcessedData.batch, [0]

    def batch(self, idx):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), sig)
        return real(self, idx)

    monkeypatch.setattr(ProcessedData, "batch", batch)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_the_current_step_and_resume_is_exact(tiny, tiny_run, tmp_path, monkeypatch, sig):
    signal_on_batch(monkeypatch, 7, sig)
    with pytest.raises(Interrupted) as exc:
        train(tiny(), runs_dir=tmp_path, **QUIET)
    assert exc.value.signum == sig
    run = next(tmp_path.iterdir())
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "interrupted" and meta["step"] == 7 and meta["signal"] == signal.Signals(sig).name
    assert json.loads((run / "checkpoints" / "last.json").read_text())["step"] == 7
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back
    monkeypatch.undo()
    train(None, resume=run, **QUIET)
    assert metric_values(run) == metric_values(tiny_run)


def test_the_command_line_exits_128_plus_the_signal(processed_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from llmcli.cli import app
    from tests.conftest import TINY

    signal_on_batch(monkeypatch, 3, signal.SIGTERM)
    out = CliRunner().invoke(app, ["train", str(TINY), "--set", f"data.processed_dir={processed_dir}",
                                   "--runs-dir", str(tmp_path), "--no-progress"])
    assert out.exit_code == 128 + signal.SIGTERM and "Traceback" not in out.output
    assert "SIGTERM at step 3: checkpoint written; continue with --resume" in out.stderr


def test_a_second_signal_stops_at_once():
    from llmcli.training.stopping import StopRequest

    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
