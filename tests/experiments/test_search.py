"""`llmcli sweep`: the Optuna search on sweep-alpha's runner: study, report, kill + exact resume, grid = train runs,
pruning, and the bad inputs refused before anything is created."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

optuna = pytest.importorskip("optuna", reason="llmcli sweep needs optuna: pip install 'llmcli[search]'")

from llmcli.cli import app  # noqa: E402
from llmcli.experiments.search import search  # noqa: E402
from llmcli.experiments.search_space import parse_param, scalar, yaml_text  # noqa: E402
from tests.conftest import TINY, checkpoint_at, wait_for  # noqa: E402

# a trial of a few seconds: 6 steps, validation every 3 (two pruning reports), small validation and eval sets
FAST = ("train.steps=6", "train.eval_every=3", "train.log_every=3", "train.val_max_examples=16",
        "eval.max_examples=16")
QUIET = {"log": lambda m: None}


def rows(folder):
    with open(folder / "results.csv") as f:
        return list(csv.DictReader(f))




def _completed(folder):
    out = []
    for s in folder.glob("trial-*/status.json"):
        try:
            if json.loads(s.read_text())["status"] == "completed":
                out.append(s.parent)
        except (OSError, ValueError, KeyError):
            pass
    return out


def _load(folder):
    state = json.loads((folder / "search.json").read_text())
    return optuna.load_study(study_name=state["study_name"], storage=f"sqlite:///{folder / 'study.db'}")


def test_a_killed_nsga2_search_resumes_with_exactly_the_missing_trials(tmp_path, processed_dir):
    cmd = [sys.executable, "-m", "llmcli", "sweep", str(TINY), "--set", f"data.processed_dir={processed_dir}",
           *[a for f in FAST for a in ("--set", f)], "--param", "objective.alpha=uniform:0:1",
           "--param", "optim.lr=loguniform:1e-3:1e-2", "--objective", "kjv.lm_loss:min", "--objective", "kjv.task_loss:min",
           "--sampler", "nsga2", "--trials", "6", "--workers", "2", "--runs-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        folder = wait_for(lambda: next(iter(tmp_path.glob("search-*")), None))
        first = wait_for(lambda: len(_completed(folder)) >= 2 and _completed(folder))
        os.killpg(proc.pid, signal.SIGKILL)  # the search and its whole process group, mid-trial
        cut = [p.name for p in folder.glob("trial-*") if p not in first and (p / "checkpoints" / "last.json").is_file()]
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    kept = {p.name: ((p / "metrics.jsonl").read_bytes(), (p / "metrics.jsonl").stat().st_mtime_ns) for p in first}
    said = []
    assert search(None, resume=folder, log=said.append) == folder
    for name, (text, stamp) in kept.items():  # finished trials were not trained again
        assert (folder / name / "metrics.jsonl").read_bytes() == text
        assert (folder / name / "metrics.jsonl").stat().st_mtime_ns == stamp
    study = _load(folder)
    assert [t.number for t in study.trials] == list(range(6))  # cut trials continued under their own numbers
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 6  # the resumed sampler drew new values
    assert sorted(p.name for p in folder.glob("trial-*")) == [f"trial-{n:04d}" for n in range(6)]
    table = rows(folder)
    assert [r["state"] for r in table] == ["COMPLETE"] * 6 and all(r["run"] for r in table)
    for t, r in zip(study.trials, table):  # each trial trained with the parameters the study holds
        cfg = yaml.safe_load((folder / r["run"] / "config.yaml").read_text())
        assert cfg["objective"]["alpha"] == t.params["objective.alpha"] == float(r["objective.alpha"])
        assert cfg["optim"]["lr"] == t.params["optim.lr"]
    best = {t.number for t in study.best_trials}
    assert {int(r["number"]) for r in table if r["best"] == "True"} == best
    assert sorted(p.name for p in (folder / "best").glob("*.yaml")) == [f"trial-{n:04d}.yaml" for n in sorted(best)]
    summary = (folder / "summary.md").read_text()
    assert "Pareto front" in summary and "Hypervolume" in summary and "llmcli train" in summary
    assert (folder / "pareto.png").stat().st_size > 1000 and (folder / "importance.png").stat().st_size > 1000
    for name in cut:  # a trial cut after its first checkpoint continued from it (exact resume)
        assert any(f"{name} was cut off mid-run; continuing it" in s for s in said), said
        assert json.loads((folder / name / "meta.json").read_text())["resumed_at_step"] >= 3


def test_ctrl_c_on_a_search_exits_130_with_the_resume_line_and_resume_continues_the_cut_trials(tmp_path, processed_dir):
    cmd = [sys.executable, "-m", "llmcli", "sweep", str(TINY), "--set", f"data.processed_dir={processed_dir}",
           *[a for f in ("train.steps=30", "train.eval_every=30", "train.checkpoint_every=3", "train.val_max_examples=16",
                         "eval.max_examples=16") for a in ("--set", f)],
           "--param", "optim.lr=grid:0.001,0.003", "--objective", "kjv.lm_loss:min", "--sampler", "grid",
           "--workers", "2", "--runs-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        folder = wait_for(lambda: next(iter(tmp_path.glob("search-*")), None))
        wait_for(lambda: checkpoint_at(folder, "trial-*/checkpoints/last.json", 3))
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the search's whole process group
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert f"llmcli sweep --resume {folder}" in err and out.strip() == str(folder)
    cut = [t.number for t in _load(folder).trials if t.state.name == "RUNNING"]
    assert cut  # stopped from outside: RUNNING in the study, never FAIL
    said = []
    search(None, resume=folder, log=said.append)
    assert [t.state.name for t in _load(folder).trials] == ["COMPLETE", "COMPLETE"]
    for n in cut:
        meta = json.loads((folder / f"trial-{n:04d}" / "meta.json").read_text())
        resumed = any(f"trial-{n:04d} was cut off mid-run; continuing it" in s for s in said)
        assert meta["status"] == "completed" and (not resumed or meta["resumed_at_step"] >= 1)  # its stop checkpoint
    assert any("was cut off mid-run; continuing it" in s for s in said), said


def _same_records(a, b):
    from llmcli.training.engine import TIMING_KEYS

    def strip(run):
        return [{k: v for k, v in json.loads(x).items() if k not in TIMING_KEYS}
                for x in (run / "metrics.jsonl").read_text().splitlines()]

    return strip(a) == strip(b)


def test_a_grid_search_equals_the_llmcli_train_runs_of_its_values(tiny, tmp_path, processed_dir, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # two workers x one thread, the tiny config's own thread count
    folder = search(tiny(*FAST), ["optim.lr=grid:0.001,0.003"], ["in_domain.acc:max"], sampler="grid",
                    runs_dir=tmp_path / "s", **QUIET)
    study = _load(folder)
    assert len(study.trials) == 2  # --trials defaults to the grid's size
    for t in study.trials:
        res = CliRunner().invoke(app, ["train", str(TINY), "--set", f"data.processed_dir={processed_dir}",
                                       *[a for f in FAST for a in ("--set", f)], "--set",
                                       f"optim.lr={yaml_text(t.params['optim.lr'])}", "--runs-dir",
                                       str(tmp_path / "t"), "--no-progress"])
        assert res.exit_code == 0, res.output
        run = Path(res.stdout.strip().splitlines()[-1])
        assert _same_records(folder / f"trial-{t.number:04d}", run)
    summary = (folder / "summary.md").read_text()
    best = study.best_trial
    assert f"--set optim.lr={yaml_text(best.params['optim.lr'])}" in summary
    assert "Not computed: parameter importances need at least 2 parameters" in summary


def _grid_order(values, seed=0):
    """The order in which a search's GridSampler (seeded as the search seeds it) asks these values."""
    study = optuna.create_study(sampler=optuna.samplers.GridSampler({"optim.lr": values}, seed=seed))
    return [study.ask().suggest_categorical("optim.lr", values) for _ in values]


def test_a_pruned_trial_is_recorded_pruned_not_failed_and_never_rerun(tiny, tmp_path):
    # lr 1e-6 barely moves the weights: worse than the first trial at the first validation step, so pruned there
    cfg = tiny("train.steps=9", "train.eval_every=3", "train.log_every=3", "train.val_max_examples=16",
               "eval.max_examples=16")
    values = [0.003, 1e-06]
    if _grid_order(values)[0] != 0.003:  # GridSampler walks a seeded shuffle: the good value must go first
        values.reverse()
    said = []
    folder = search(cfg, [f"optim.lr=grid:{','.join(map(yaml_text, values))}"], ["kjv.ppl:min"], sampler="grid",
                    workers=1, pruner="median:n_startup_trials=1", runs_dir=tmp_path, log=said.append)
    study = _load(folder)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED"]
    assert [r["state"] for r in rows(folder)] == ["COMPLETE", "PRUNED"] and rows(folder)[1]["error"] == ""
    status = json.loads((folder / "trial-0001" / "status.json").read_text())
    # the first validation step the pruner refuses, however late the poll read the metrics (several steps at once)
    assert status["status"] == "pruned" and status["step"] == 3
    assert study.trials[1].intermediate_values  # the pruner saw the validation records as they were written
    stamp = (folder / "trial-0001" / "status.json").stat().st_mtime_ns
    again = []
    search(None, resume=folder, log=again.append)  # nothing left: the pruned trial is not run again
    assert (folder / "trial-0001" / "status.json").stat().st_mtime_ns == stamp
    assert any("2 finished, 0 to continue, 0 new" in s for s in again) and len(_load(folder).trials) == 2


def test_the_ray_backend_runs_the_trials_and_resumes_like_local_workers(tiny, tmp_path):
    pytest.importorskip("ray", reason="the Ray backend needs ray: pip install 'llmcli[ray]'")
    import ray

    try:
        folder = search(tiny(*FAST), ["optim.lr=grid:0.001,0.003"], ["kjv.lm_loss:min"], sampler="grid",
                        backend="ray", workers=2, runs_dir=tmp_path, **QUIET)
        assert [r["state"] for r in rows(folder)] == ["COMPLETE", "COMPLETE"]
        assert all(t.state.name == "COMPLETE" for t in _load(folder).trials)
        stamp = (folder / "trial-0000" / "status.json").stat().st_mtime_ns
        said = []
        search(None, resume=folder, backend="ray", log=said.append)  # nothing left to run
        assert (folder / "trial-0000" / "status.json").stat().st_mtime_ns == stamp
        assert any("2 finished, 0 to continue, 0 new" in s for s in said)
    finally:
        ray.shutdown()


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing created


def _one_error_line(res):
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    return len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.stderr


GOOD = ["--param", "optim.lr=loguniform:1e-4:1e-2", "--objective", "kjv.acc:max"]
BAD = [  # (arguments after `sweep CONFIG`, what the one line must name)
    (["--param", "optim.lrr=uniform:0:1", "--objective", "kjv.acc"], "optim.lrr"),
    (["--param", "optim.lr=normal:0:1", "--objective", "kjv.acc"], "unknown distribution"),
    (["--param", "objective.alpha=uniform:0:1.5", "--objective", "kjv.acc"], "objective.alpha"),
    (["--param", "model.n_layer=uniform:1:4", "--objective", "kjv.acc"], "model.n_layer"),
    (["--param", "optim.lr=loguniform:0:1", "--objective", "kjv.acc"], "LOW > 0"),
    (["--param", "optim.lr=loguniform:1e-4:1e-2", "--objective", "kjv.accuracy:max"], "--objective"),
    (["--param", "optim.lr=loguniform:1e-4:1e-2", "--objective", "nope.acc"], "unknown domain"),
    ([*GOOD, "--objective", "kjv.ppl:min", "--pruner", "median"], "--pruner"),
    ([*GOOD, "--pruner", "median:reduction_factor=2"], "--pruner"),
    ([*GOOD, "--sampler", "grid"], "--sampler grid"),
    ([*GOOD, "--sampler", "cmaes"], "--sampler"),
    ([*GOOD, "--workers", "0"], "--workers"),
]


@pytest.mark.parametrize(("args", "named"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_search_input_is_one_line_exit_2_and_creates_nothing(args, named, tmp_path, processed_dir):
    runs = tmp_path / "runs"
    res = CliRunner().invoke(app, ["sweep", str(TINY), "--set", f"data.processed_dir={processed_dir}",
                                   "--runs-dir", str(runs), *args])
    assert res.exit_code == 2, (args, res.output)
    assert _one_error_line(res) and named in res.stderr, (args, res.stderr)
    assert not runs.exists(), "a search folder was left behind"


def _files(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_resume_refuses_a_sweep_alpha_folder_and_another_searchs_study(tiny, tmp_path):
    from llmcli.experiments.search import new_state

    alpha = tmp_path / "sweep-x"
    alpha.mkdir()
    (alpha / "sweep.json").write_text("{}")
    res = CliRunner().invoke(app, ["sweep", "--resume", str(alpha)])
    assert res.exit_code == 2 and _one_error_line(res) and "sweep-alpha --resume" in res.stderr, res.stderr
    assert _files(alpha) == {"sweep.json": hashlib.sha256(b"{}").hexdigest()}
    other = tmp_path / "search-x"  # this search's state beside the study file of another search
    other.mkdir()
    state = {**new_state(tiny(), ["optim.lr=uniform:0.001:0.01"], ["kjv.acc"], "tpe", "none", 2, None, None,
                         log=lambda m: None), "study_name": "search-x", "storage": "study.db"}
    (other / "search.json").write_text(json.dumps(state))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name="search-y", storage=f"sqlite:///{other / 'study.db'}")
    before = _files(other)
    res = CliRunner().invoke(app, ["sweep", "--resume", str(other)])
    assert res.exit_code == 2 and _one_error_line(res) and "another search's study" in res.stderr, res.stderr
    assert _files(other) == before  # nothing written, not even a lock file
    res = CliRunner().invoke(app, ["sweep", "--resume", str(other), "--trials", "3"])
    assert res.exit_code == 2 and _one_error_line(res) and "--trials" in res.stderr


def test_without_optuna_the_command_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed
    res = CliRunner().invoke(app, ["sweep", str(TINY), *GOOD, "--runs-dir", str(tmp_path / "runs")])
    assert res.exit_code == 2 and res.stderr.strip() == \
        "error: llmcli sweep needs optuna: pip install 'llmcli[search]'"
    assert not (tmp_path / "runs").exists()


def test_help_does_not_import_optuna():
    code = ("import sys; from llmcli.cli import app; from typer.testing import CliRunner; r = CliRunner(); "
            "assert r.invoke(app, ['--help']).exit_code == 0; assert r.invoke(app, ['sweep', '--help']).exit_code == 0; "
            "print('optuna' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_values_parse_as_written_and_print_as_set_reads_them():
    for v in (1e-05, 0.003, 1e20, 2.5, 4, True, "adamw", "null", None):
        assert yaml.safe_load(yaml_text(v)) == v
    assert scalar("1e-4") == 1e-4 and scalar("2") == 2 and scalar("adamw") == "adamw"
    assert parse_param("model.n_layer=choice:2,4").choices == (2, 4)
    assert parse_param("model.n_layer=int:1:4").grid() == [1, 2, 3, 4]
    assert parse_param("optim.lr=loguniform:1e-4:1e-2").grid() is None


def test_resume_tells_the_study_what_the_folders_say_and_queues_failed_trials_again(tiny, tmp_path):
    """No training: a study and trial folders as a killed search leaves them."""
    from llmcli.experiments.search import end_trial, new_state, sync

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    state = new_state(tiny(), ["optim.lr=uniform:0.001:0.01"], ["kjv.acc"], "random", "none", 4, None, None,
                      log=lambda m: None)
    study = optuna.create_study(directions=["maximize"], storage=f"sqlite:///{tmp_path / 'study.db'}")
    trials = [study.ask() for _ in range(4)]
    for t in trials[:3]:
        t.suggest_float("optim.lr", 0.001, 0.01)
    for n, status in ((0, {"status": "failed", "error": "FloatingPointError: NaN at step 2"}),
                      (1, {"status": "completed", "wall_s": 1.0}), (2, {"status": "interrupted", "signal": "SIGINT"})):
        (tmp_path / f"trial-{n:04d}" / "eval").mkdir(parents=True)
        (tmp_path / f"trial-{n:04d}" / "status.json").write_text(json.dumps(status))
    for split in ("val", "test"):  # trial 1 finished, but the search was killed before it told the study
        (tmp_path / "trial-0001" / "eval" / f"{split}.json").write_text(json.dumps({"domains": {"kjv": {"acc": 0.25}}}))
    assert end_trial(study, trials[0], tmp_path / "trial-0000", state) == "FAIL"  # failed by itself
    said = []
    stale = sync(study, state, tmp_path, said.append)
    assert [t.number for t in stale] == [2]  # cut by a signal: continues under its own number
    got = {t.number: t for t in study.get_trials()}
    assert got[1].state.name == "COMPLETE" and got[1].values == [0.25]
    assert got[3].state.name == "FAIL" and got[3].user_attrs["invalid"]  # cut before its parameters were drawn
    retry = study.ask()  # the failed trial's parameters, queued once (an unrun invalid one is not)
    assert retry.suggest_float("optim.lr", 0.001, 0.01) == got[0].params["optim.lr"]
    assert retry.user_attrs["retry_of"] == 0
    sync(study, state, tmp_path, said.append)
    assert not [t for t in study.get_trials() if t.state.name == "WAITING"]  # not queued twice


def test_a_search_whose_base_config_sets_train_threads_runs_every_trial_on_them(tiny, tmp_path, monkeypatch):
    """No training: the runner's plan for a search's trials (the base config's train.threads win over the plan)."""
    from llmcli.experiments.search import TrialSource, new_state
    from llmcli.experiments.sweep_exec import _Pool

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    plans = {}
    for threads in ("null", "2"):
        state = new_state(tiny(f"train.threads={threads}"), ["optim.lr=uniform:0.001:0.01"], ["kjv.acc"], "random",
                          "none", 3, None, None, log=lambda m: None)
        source = TrialSource(None, state, tmp_path, [], 3, lambda m: None)
        plans[threads] = _Pool(source, 2, lambda m: None).plan
    assert plans == {"null": [4, 2, 2], "2": [2, 2, 2]}


def test_a_late_poll_prunes_at_the_first_step_the_pruner_refuses(tiny, tmp_path):
    """No training: three validation steps read in one poll are reported one by one, and pruning stops at the first."""
    import optuna

    from llmcli.experiments.search import PRUNED_MARK, TrialSource, new_state
    from llmcli.experiments.sweep_exec import Job

    state = new_state(tiny(), ["optim.lr=uniform:0.001:0.01"], ["kjv.ppl:min"], "random", "median:n_startup_trials=1",
                      2, None, None, log=lambda m: None)
    study = optuna.create_study(direction="minimize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    first = study.ask()
    for step in (3, 6, 9):
        first.report(100.0, step)
    study.tell(first, 100.0)
    source = TrialSource(study, state, tmp_path, [], 1, lambda m: None)
    job = source.next_job(1)
    records = [{"step": s, "split": "val", "domain": "kjv", "ppl": 500.0 - s} for s in (3, 6, 9)]
    (tmp_path / job.name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert isinstance(job, Job) and source.poll(job) is True
    assert json.loads((tmp_path / job.name / PRUNED_MARK).read_text()) == {"step": 3, "value": 497.0}
    assert study.trials[1].intermediate_values == {3: 497.0}  # steps 6 and 9 wait for the trial's end
