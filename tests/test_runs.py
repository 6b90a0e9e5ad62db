"""Run folders: unique names under races, and one clear error when they cannot be written."""

from __future__ import annotations

import errno
import os

import pytest
from typer.testing import CliRunner

from llmcli.cli import app
from llmcli.errors import UserError
from llmcli.runs import create_run_dir, load_run_config
from tests.conftest import TINY


def test_two_runs_in_the_same_second_get_distinct_folders(tmp_path, monkeypatch):
    import llmcli.runs as runs

    monkeypatch.setattr(runs.time, "strftime", lambda fmt: "20260101-000000")
    names = iter(["beef", "beef", "cafe"])  # the second run draws the first one's suffix, then a fresh one
    monkeypatch.setattr(runs.secrets, "token_hex", lambda n: next(names))
    a, b = create_run_dir(tmp_path, "x"), create_run_dir(tmp_path, "x")
    assert (a.name, b.name) == ("20260101-000000-x-beef", "20260101-000000-x-cafe")


def test_many_runs_started_at_once_never_share_a_folder(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        dirs = list(pool.map(lambda _: create_run_dir(tmp_path, "x"), range(64)))
    assert len(set(dirs)) == 64


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions, so chmod cannot make runs/ read-only")
def test_a_read_only_runs_folder_is_one_clear_error(tmp_path, processed_dir):
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o555)
    try:
        out = CliRunner().invoke(app, ["train", str(TINY), "--set", f"data.processed_dir={processed_dir}",
                                       "--runs-dir", str(runs), "--no-progress"])
    finally:
        runs.chmod(0o755)
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: {runs}: cannot create a run folder here")
    assert list(runs.iterdir()) == []


def test_a_permission_error_on_the_runs_folder_is_one_clear_error(tmp_path, processed_dir, monkeypatch):
    """What a read-only runs/ does, simulated so that it also runs as root (where chmod has no effect)."""
    import llmcli.runs as runs_module

    runs = tmp_path / "runs"
    runs.mkdir()
    real = runs_module.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.parent == runs:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(runs_module.Path, "mkdir", mkdir)
    out = CliRunner().invoke(app, ["train", str(TINY), "--set", f"data.processed_dir={processed_dir}",
                                   "--runs-dir", str(runs), "--no-progress"])
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert out.stderr.strip().splitlines()[-1] == f"error: {runs}: cannot create a run folder here (Permission denied)"
    assert list(runs.iterdir()) == []


def test_a_runs_folder_that_is_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "runs").write_text("")
    with pytest.raises(UserError, match="cannot create the runs folder"):
        create_run_dir(tmp_path / "runs" / "sub", "x")


@pytest.mark.parametrize("fail_after", [0, 12])  # at the first write (config.yaml), and in mid-training
def test_a_full_disk_is_one_clear_error(tmp_path, tiny, processed_dir, monkeypatch, fail_after):
    import llmcli.files as io
    from llmcli.data.preprocess import preprocess

    preprocess(tiny().data, log=lambda m: None)  # the data cache is ready; the disk fills up afterwards

    real, calls = io.os.fsync, [0]

    def fsync(fd):
        calls[0] += 1
        if calls[0] > fail_after:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(io.os, "fsync", fsync)
    runs = tmp_path / "runs"
    out = CliRunner().invoke(app, ["train", str(TINY), "--set", f"data.processed_dir={processed_dir}",
                                   "--runs-dir", str(runs), "--no-progress"])
    assert out.exit_code == 2 and "Traceback" not in out.output
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "write failed (No space left on device)" in errors[0]
    if fail_after == 0:
        assert list(runs.iterdir()) == []  # a run that could not start leaves no folder


def test_a_run_path_that_is_a_file_says_so(tmp_path):
    f = tmp_path / "run.txt"
    f.write_text("")
    with pytest.raises(UserError, match=r"run\.txt: is a file, not a run folder$"):
        load_run_config(f)
    with pytest.raises(UserError, match=r"nope: run folder not found$"):
        load_run_config(tmp_path / "nope")


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_run_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    """Colleagues on a shared machine read runs/ as the umask allows (mkstemp alone would make files 0600)."""
    import stat

    from llmcli.files import atomic_write_bytes, atomic_write_json
    from llmcli.runs import update_meta

    old = os.umask(umask)
    try:
        run = create_run_dir(tmp_path / "runs", "x")
        atomic_write_bytes(run / "tokenizer.json", b"{}")
        atomic_write_json(run / "meta.json", {"status": "running"})
        update_meta(run, status="completed")  # replaces an existing file
    finally:
        os.umask(old)
    assert stat.S_IMODE(run.stat().st_mode) == dir_mode
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in run.iterdir()} == {"tokenizer.json": file_mode,
                                                                              "meta.json": file_mode}


def test_a_trained_run_folder_is_readable_by_others_under_umask_022(tmp_path, tiny):
    import stat

    from llmcli.training.engine import train

    old = os.umask(0o022)
    try:
        run = train(tiny("train.steps=2", "train.eval_every=2"), runs_dir=tmp_path / "runs", progress=False,
                    log=lambda m: None)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(run)): stat.S_IMODE(p.stat().st_mode) for p in [run, *run.rglob("*")]}
    want = {k: 0o755 if (run / k).is_dir() else 0o644 for k in modes}
    assert "checkpoints/last.safetensors" in modes and modes == want


# ---------------------------------------------------------------- one helper per repeated thing (issue 16)


def _run_with(tmp_path, *checkpoints):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in checkpoints:
        (run / "checkpoints" / f"{name}.safetensors").write_bytes(b"")
    return run


def test_the_default_checkpoint_is_best_when_present_else_last(tmp_path):
    from llmcli.runs import choose_checkpoint

    assert choose_checkpoint(_run_with(tmp_path, "best", "last"), None) == "best"
    assert choose_checkpoint(_run_with(tmp_path / "b", "last", "last.prev"), None) == "last"
    assert choose_checkpoint(_run_with(tmp_path / "c", "best", "last"), "last") == "last"


def test_an_asked_checkpoint_the_run_lacks_is_one_error_naming_what_it_has(tmp_path):
    from llmcli.runs import choose_checkpoint

    run = _run_with(tmp_path, "last", "last.prev")
    with pytest.raises(UserError) as e:
        choose_checkpoint(run, "best")
    assert str(e.value) == f"{run}: no best checkpoint (checkpoints/best.safetensors); the run has only: last"
    with pytest.raises(UserError, match="no last checkpoint .*has it trained"):
        choose_checkpoint(_run_with(tmp_path / "empty"), None)


GOOD_RECORDS = ('{"step": 1, "split": "train", "lm_loss": 2.0, "task_loss": 1.0, "grad_cosine": 0.5}\n'
                '{"step": 2, "split": "val", "domain": "kjv", "lm_loss": 1.5, "task_loss": 0.5}\n')


def _readers():
    """Every reader of metrics.jsonl in the package, each as run folder -> what it read."""
    from llmcli.evaluation.plots import curves_figure
    from llmcli.experiments.lodo_selection import held_out_scores
    from llmcli.experiments.sweep_report import _mean_grad_cosine
    from llmcli.runs import kept_metrics, read_metrics

    class Sum:  # an objective's score: what LODO selection averages
        def score(self, lm, task):
            return lm + task

    def plot(run):
        import matplotlib.pyplot as plt

        fig = curves_figure(run)
        plt.close(fig)
        return len(fig.axes)

    return {"read_metrics": lambda run: [r["step"] for r in read_metrics(run / "metrics.jsonl")],
            "kept_metrics": lambda run: kept_metrics(run / "metrics.jsonl", 10),
            "selection": lambda run: held_out_scores(run, "kjv", Sum()),
            "sweep grad_cosine": _mean_grad_cosine, "curves.png": plot}


@pytest.mark.parametrize("reader", ["read_metrics", "kept_metrics", "selection", "sweep grad_cosine", "curves.png"])
def test_every_metrics_reader_drops_a_cut_last_line_and_names_a_damaged_one(tmp_path, reader):
    read = _readers()[reader]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(GOOD_RECORDS)
    whole = read(run)
    (run / "metrics.jsonl").write_text(GOOD_RECORDS + '{"step": 3, "split": "tr')  # a crash mid-append
    assert read(run) == whole
    (run / "metrics.jsonl").write_text('{"step": 1}\n{oops\n' + GOOD_RECORDS)
    with pytest.raises(UserError) as e:
        read(run)
    assert str(e.value).startswith(f"{run / 'metrics.jsonl'}:2: invalid JSON")


def test_metrics_up_to_a_step_keep_each_line_as_written(tmp_path):
    from llmcli.runs import kept_metrics, metric_lines, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1,  "x": 1.10}\n\n{"step": 2}\n{"step": 3}\n')
    assert [r["step"] for r in read_metrics(path, upto_step=2)] == [1, 2]
    assert [n for n, _, _ in metric_lines(path)] == [1, 3, 4]  # numbered as in the file, blank line skipped
    assert kept_metrics(path, 2) == '{"step": 1,  "x": 1.10}\n{"step": 2}\n'
    path.write_text('{"step": 1}\n["not", "a record"]\n')
    with pytest.raises(UserError, match=r"metrics\.jsonl:2: a metrics record must be an object with an integer"):
        read_metrics(path)


def test_the_timestamp_format_is_written_once_and_meta_times_parse_with_it(tiny_run):
    import json
    from datetime import datetime
    from pathlib import Path

    import llmcli
    from llmcli.runs import TIMESTAMP, timestamp

    sources = [p for p in Path(llmcli.__file__).parent.rglob("*.py") if TIMESTAMP in p.read_text()]
    assert [p.name for p in sources] == ["runs.py"]
    meta = json.loads((tiny_run / "meta.json").read_text())
    for stamp in (meta["started"], meta["ended"], timestamp()):
        assert datetime.strptime(stamp, TIMESTAMP).tzinfo is not None
