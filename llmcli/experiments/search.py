"""`llmcli sweep`: a hyperparameter search over any config fields with Optuna, on sweep-alpha's runner.

search-<ts>-<name>-<hex>/
  search.json     the parameters, objectives, sampler, pruner, trial count, study name and base config: what
                  --resume needs
  study.db        the Optuna study (SQLite): optuna.load_study(study_name=..., storage="sqlite:///.../study.db")
                  and optuna-dashboard read it
  base.yaml       the resolved base config every trial starts from
  trial-0003/     one complete run folder per trial (config, metrics, checkpoints, eval/val.json, eval/test.json,
                  status.json), named by the Optuna trial number
  results.csv     one row per trial: number, state, parameters, objectives (val) and test beside, wall, folder
  summary.md      the best trial(s) and the command that re-trains each; best/trial-NNNN.yaml their configs
  pareto.png      several objectives: the trials and the Pareto front; importance.png the parameter importances

Every trial runs in its own spawned worker (`sweep_exec.run_local` / `run_ray`, the runner sweep-alpha uses),
asked from the study when a slot frees (`TrialSource`). The objectives are read from the trial's validation split
(eval/val.json, best checkpoint): choosing hyperparameters on test would leak it; test is reported beside.
The study's states mean: COMPLETE / PRUNED / FAIL a trial that ended (FAIL: it failed by itself), RUNNING a trial
cut off from outside (SIGINT / SIGTERM / SIGKILL): `--resume` continues it from its checkpoint under the same
trial number and parameters. Decisions: docs/search.md.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmcli.errors import UserError
from llmcli.experiments.search_space import (
    STUDY,
    build_pruner,
    build_sampler,
    check_objectives,
    check_params,
    check_sampler,
    config_with,
    domain_groups,
    objectives_of,
    parse_objective,
    parse_param,
    parse_pruner,
    pick,
    require_optuna,
    space_of,
    storage_url,
    suggest,
    trial_name,
    trial_values,
)
from llmcli.experiments.sweep_exec import (
    Job,
    JobsFailed,
    JobSource,
    SweepInterrupted,
    check_runner,
    job_threads,
    prepare_folder,
    record_outcome,
    run_local,
    run_ray,
)
from llmcli.experiments.sweep_grid import default_workers, point_status
from llmcli.experiments.sweep_report import fmt
from llmcli.files import atomic_write_json, atomic_write_text, read_json, read_json_object

STATE = "search.json"
PRUNED_MARK = "pruned.json"  # written before the pruned worker is stopped: a kill in between still ends it PRUNED


# ---------------------------------------------------------------- the search's state


def new_state(cfg: Any, params: list[str], objectives: list[str], sampler: str, pruner: str, trials: int | None,
              seed: int | None, workers: int | None, log: Any = print) -> dict[str, Any]:
    """search.json of a new search: every flag parsed and checked against the schema, before any folder exists."""
    from llmcli.config import SEED_MAX

    space = [parse_param(p) for p in params]
    check_params(cfg, space)
    goals = [parse_objective(o) for o in objectives]
    prune = parse_pruner(pruner, len(goals))
    n = check_sampler(sampler, space, trials)
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise UserError(f"--seed: must be an integer in [0, 2**63 - 1] (as the config's seed), got {seed}")
    groups = domain_groups(cfg, log)
    check_objectives(goals, groups)
    return {"kind": "search", "params": [p.as_json() for p in space],
            "objectives": [{"domain": o.domain, "metric": o.metric, "direction": o.direction} for o in goals],
            "sampler": sampler, "pruner": prune, "trials": n, "seed": cfg.seed if seed is None else seed,
            "workers": workers, "groups": groups, "config": cfg.model_dump(mode="json")}


def _create(cfg: Any, state: dict[str, Any], runs_dir: str | Path, workers: int) -> tuple[Path, Any]:
    """The new search folder with its state, base config and study."""
    import optuna

    from llmcli.config import dump_config
    from llmcli.runs import create_run_dir, timestamp

    folder = create_run_dir(Path(runs_dir), cfg.name, prefix="search-")
    state.update(study_name=folder.name, storage=STUDY, created=timestamp())
    atomic_write_json(folder / STATE, state)
    atomic_write_text(folder / "base.yaml", dump_config(cfg))
    study = optuna.create_study(study_name=state["study_name"], storage=storage_url(folder),
                                directions=[o.direction for o in objectives_of(state)],
                                sampler=_sampler(state, workers), pruner=build_pruner(state["pruner"]))
    study.set_user_attr("llmcli_search", {k: state[k] for k in ("params", "objectives", "sampler", "trials")})
    return folder, study


def _sampler(state: dict[str, Any], workers: int, asked: int = 0) -> Any:
    """The search's sampler. A resumed one is seeded with seed + the trials the study already holds: seeded as at
    the start, it would draw again the values it drew then. GridSampler keeps its seed (its walk through the grid
    is a seeded shuffle indexed by trial number: another shuffle would revisit points)."""
    seed = state["seed"] + (asked if state["sampler"] != "grid" else 0)
    return build_sampler(state["sampler"], seed % 2**63, space_of(state), state["trials"], workers)


def open_search(folder: Path, workers: int | None) -> tuple[dict[str, Any], Any]:
    """A search folder's state and study for --resume; anything else in the folder is a UserError, nothing written."""
    import optuna

    if (folder / "sweep.json").is_file() and not (folder / STATE).is_file():
        raise UserError(f"--resume: {folder} is a sweep-alpha folder (sweep.json); continue it with "
                        f"llmcli sweep-alpha --resume {folder}")
    state = read_json_object(folder / STATE, "search state (is this a search folder?)",
                             ("kind", "study_name", "params", "objectives", "trials", "config"))
    if state["kind"] != "search":
        raise UserError(f"--resume: {folder / STATE}: not a search state (kind {state['kind']!r})")
    names = _study_names(folder / STUDY)
    if state["study_name"] not in names:
        raise UserError(f"--resume: {folder / STUDY} holds the study {', '.join(names) or '(none)'}, not this search's "
                        f"{state['study_name']!r} (search.json): is it another search's study file?")
    asked = len(optuna.load_study(study_name=state["study_name"], storage=storage_url(folder)).trials)
    study = optuna.load_study(study_name=state["study_name"], storage=storage_url(folder),
                              sampler=_sampler(state, workers or state.get("workers") or 1, asked),
                              pruner=build_pruner(state["pruner"]))
    want = [o.direction for o in objectives_of(state)]
    if [d.name.lower() for d in study.directions] != want:
        raise UserError(f"--resume: {folder / STUDY}: the study's directions differ from search.json's objectives")
    return state, study


def _study_names(db: Path) -> list[str]:
    """The study names in an Optuna SQLite file, read-only (opening it with Optuna would create missing tables)."""
    import sqlite3

    if not db.is_file():
        raise UserError(f"--resume: {db}: the study file is missing")
    try:
        con = sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True)
        try:
            return [r[0] for r in con.execute("SELECT study_name FROM studies")]
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise UserError(f"--resume: {db}: not an Optuna study file ({exc})") from None


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One search process per folder: a second one (the same --resume twice) would run the same trials."""
    import fcntl

    with open(folder / "search.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"--resume: another llmcli sweep is running {folder}") from None
        yield


# ---------------------------------------------------------------- the trials


def _tell(study: Any, trial: Any, **kw: Any) -> None:
    """study.tell, minus GridSampler's `study.stop()` when the grid is used up: outside `optimize` it raises
    RuntimeError after the state was stored (Optuna's after_trial), and there is no loop to stop here."""
    try:
        study.tell(trial, **kw)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise


def _finished_run(pdir: Path) -> bool:
    return point_status(pdir).get("status") == "completed" and (pdir / "eval" / "val.json").is_file() \
        and (pdir / "eval" / "test.json").is_file()


def _cut(status: dict[str, Any]) -> bool:
    """A trial stopped from outside (a signal, a killed worker): it stays RUNNING in the study, --resume continues it."""
    return status.get("status") == "interrupted" or str(status.get("error", "")).startswith("worker killed")


def end_trial(study: Any, trial: Any, pdir: Path, state: dict[str, Any]) -> str:
    """Tell the study how a trial's run ended (from its folder); the state it got: COMPLETE, PRUNED, FAIL or
    RUNNING (cut from outside: left for --resume)."""
    status = point_status(pdir)
    if (pdir / PRUNED_MARK).is_file():
        mark = read_json(pdir / PRUNED_MARK, "prune record")
        if status.get("status") != "pruned":
            atomic_write_json(pdir / "status.json", {"status": "pruned", "step": mark.get("step"),
                                                     "value": mark.get("value"), "wall_s": status.get("wall_s")})
        _tell(study, trial, state=_states().PRUNED)
        return "PRUNED"
    if status.get("status") == "completed":
        values = trial_values(pdir, objectives_of(state), state["groups"])
        if all(v is not None for v in values):
            _tell(study, trial, values=values)
            return "COMPLETE"
        missing = [o.key for o, v in zip(objectives_of(state), values) if v is None]
        status = {"error": f"eval/val.json has no finite {', '.join(missing)}"}
    elif _cut(status):
        return "RUNNING"
    trial.set_user_attr("error", str(status.get("error", "failed")))
    _tell(study, trial, state=_states().FAIL)
    return "FAIL"


def _states() -> Any:
    from optuna.trial import TrialState

    return TrialState


def sync(study: Any, state: dict[str, Any], folder: Path, log: Any) -> list[Any]:
    """Bring a resumed study up to date with the trial folders; the RUNNING trials to continue.

    A RUNNING trial was cut off when the search stopped: if its run finished (or was being pruned) before that,
    the study is told so; one cut before its parameters were drawn is marked FAIL (a new trial takes its slot);
    the others continue. Each FAIL trial that failed by itself is queued once more with the same parameters.
    """
    import optuna

    states, fields = _states(), {p.field for p in space_of(state)}
    stale = []
    for t in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        pdir = folder / trial_name(t.number)
        if set(t.params) != fields:
            trial = optuna.trial.Trial(study, t._trial_id)
            trial.set_user_attr("error", "cut off before its parameters were drawn")
            trial.set_user_attr("invalid", True)
            _tell(study, trial, state=states.FAIL)
        elif (pdir / PRUNED_MARK).is_file() or _finished_run(pdir):
            told = end_trial(study, optuna.trial.Trial(study, t._trial_id), pdir, state)
            log(f"search: {pdir.name} ended before the search was stopped: {told}")
        else:
            stale.append(t)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.state == states.FAIL and t.number not in retried and not t.user_attrs.get("invalid"):
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            log(f"search: {trial_name(t.number)} failed ({t.user_attrs.get('error', '?')}); queued again with the same "
                "parameters")
    return stale


def finished(study: Any) -> int:
    """Trials that ended with a result (COMPLETE or PRUNED): what --trials counts."""
    states = _states()
    return len(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED)))


class TrialSource(JobSource):
    """The search's jobs: first the cut trials (same number, same parameters, from their checkpoint), then new
    trials asked from the study when a slot frees; running trials are polled for pruning, ended ones told."""

    label = "search"
    noun = "trial"

    def __init__(self, study: Any, state: dict[str, Any], folder: Path, stale: list[Any], n_new: int,
                 log: Any) -> None:
        super().__init__(folder, len(stale) + n_new, state["config"]["train"]["threads"])
        self.study, self.state, self.log = study, state, log
        self.stale, self.n_new = list(stale), n_new
        self.space, self.goals = space_of(state), objectives_of(state)
        self.pruning = state["pruner"]["name"] != "none"
        self.trials: dict[str, Any] = {}  # job name -> optuna Trial
        self.seen: dict[str, int] = {}  # job name -> metrics.jsonl size last read
        self.reported: dict[str, set[int]] = {}  # job name -> the steps the study has an intermediate value for
        self.outcomes: dict[int, str] = {}  # trial number -> state told this run

    def next_threads(self, planned: int) -> int | None:
        if self.stale:
            return job_threads(self.sweep_dir / trial_name(self.stale[0].number), planned)
        return planned if self.n_new > 0 else None

    def next_job(self, threads: int) -> Job | None:
        import optuna

        if self.stale:
            frozen = self.stale.pop(0)
            trial, values = optuna.trial.Trial(self.study, frozen._trial_id), dict(frozen.params)
            reported = set(frozen.intermediate_values)
        else:
            self.n_new -= 1
            trial = self.study.ask()
            values, reported = suggest(trial, self.space), set()
        name = trial_name(trial.number)
        try:
            cfg = config_with(self.state["config"], {**values, "train.threads": threads,
                                                     "name": f"{self.state['config']['name']}-{name}"}, name)
        except UserError as exc:  # this combination of values is not a valid config: the trial fails, unrun
            trial.set_user_attr("error", str(exc))
            trial.set_user_attr("invalid", True)
            _tell(self.study, trial, state=_states().FAIL)
            self.outcomes[trial.number] = "FAIL"
            self.log(f"search: {name}: not a valid config, not run: {exc}")
            return None
        trial.set_user_attr("run", name)
        resume = prepare_folder(self.sweep_dir, name, self.log, label="search")
        self.trials[name], self.reported[name] = trial, reported
        return Job(name, cfg.model_dump(mode="json"), threads, resume, ("val", "test"))

    def poll(self, job: Job) -> bool:
        """Report each new validation step's objective to the study; True (prune) when the pruner says so."""
        if not self.pruning:
            return False
        path = self.sweep_dir / job.name / "metrics.jsonl"
        try:
            size = path.stat().st_size
        except OSError:
            return False
        if size == self.seen.get(job.name):
            return False
        self.seen[job.name] = size
        trial = self.trials[job.name]
        # asked after each step, not once after the batch: a poll that comes late (several validation steps written
        # since the last) prunes at the first step the pruner refuses, as an in-process Optuna objective would
        for step, value in self._report(job.name, path):
            if trial.should_prune():
                atomic_write_json(self.sweep_dir / job.name / PRUNED_MARK, {"step": step, "value": value})
                self.log(f"search: {job.name}: pruned at step {step} "
                         f"({self.goals[0].key} = {fmt(self.goals[0].metric, value)})")
                return True
        return False

    def _report(self, name: str, path: Path) -> Iterator[tuple[int, float]]:
        """trial.report each validation step not reported yet, in step order; yields (step, value) after each."""
        from llmcli.runs import read_metrics

        try:
            records = read_metrics(path)
        except UserError:
            return
        trial, done = self.trials[name], self.reported[name]
        steps: dict[int, dict[str, Any]] = {}
        for r in records:
            if r.get("split") == "val" and r.get("domain") not in (None, "in_domain"):
                steps.setdefault(r["step"], {})[r["domain"]] = r
        for step in sorted(s for s in steps if s not in done):
            value = pick(steps[step], self.goals[0], self.state["groups"])
            if value is not None:
                trial.report(value, step)
                done.add(step)
                yield step, value

    def ended(self, job: Job, exitcode: int | None) -> str:
        phrase = record_outcome(self.sweep_dir / job.name, exitcode)
        if self.pruning:  # the validation steps written since the last poll: the study keeps every curve whole
            list(self._report(job.name, self.sweep_dir / job.name / "metrics.jsonl"))
        trial = self.trials.pop(job.name)
        told = end_trial(self.study, trial, self.sweep_dir / job.name, self.state)
        self.outcomes[trial.number] = told
        if told == "COMPLETE":
            values = trial_values(self.sweep_dir / job.name, self.goals, self.state["groups"])
            return phrase + ": " + ", ".join(f"{o.key} = {fmt(o.metric, v)}" for o, v in zip(self.goals, values))
        if told == "PRUNED":
            return f"pruned at step {point_status(self.sweep_dir / job.name).get('step')}"
        return phrase + ("; --resume continues it" if told == "RUNNING" else "")


# ---------------------------------------------------------------- the orchestrator


class SearchFailed(JobsFailed):
    """Some trials failed or were cut off; the others ended and the report is written."""

    def __init__(self, folder: Path, bad: dict[int, str]) -> None:
        fail = [trial_name(n) for n, s in bad.items() if s == "FAIL"]
        cut = [trial_name(n) for n, s in bad.items() if s == "RUNNING"]
        parts = ([f"{len(fail)} trial(s) failed ({', '.join(fail)}): --resume re-runs them with the same parameters"]
                 if fail else []) + ([f"{len(cut)} trial(s) cut off ({', '.join(cut)}): --resume continues them"]
                                    if cut else [])
        super().__init__(folder, f"search: {'; '.join(parts)}; llmcli sweep --resume {shlex.quote(str(folder))}")


def search(cfg: Any, params: list[str] | None = None, objectives: list[str] | None = None, *, sampler: str = "tpe",
           pruner: str = "none", trials: int | None = None, seed: int | None = None, workers: int | None = None,
           backend: str = "local", ray_address: str | None = None, resume: str | Path | None = None,
           runs_dir: str | Path = "runs", log: Any = print) -> Path:
    """Run (or finish) a search and write its report; returns the search folder.

    Raises UserError (exit 2) for bad input before any folder is created; SearchFailed (exit 1) when a trial
    failed or was cut off; SweepInterrupted (exit 128 + signal) on SIGINT / SIGTERM, every cut trial resumable.
    """
    import optuna

    require_optuna()
    check_runner(backend, workers)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the search logs each trial itself
    if resume is not None:
        folder = Path(resume)
        state, study = open_search(folder, workers)
    else:
        state = new_state(cfg, params or [], objectives or [], sampler, pruner, trials, seed, workers, log)
        folder, study = _create(cfg, state, runs_dir, workers or default_workers(state["trials"], cfg.train.threads))
    _tracking_parent(folder, state, log)
    with _locked(folder):
        signum, outcomes = _run(study, state, folder, workers, backend, ray_address, log)
    if signum is not None:
        raise _interrupted(folder, signum, log)
    from llmcli.experiments.search_report import write_report

    write_report(folder, state, study)
    bad = {n: s for n, s in outcomes.items() if s in ("FAIL", "RUNNING")}
    log(f"search: {finished(study)}/{state['trials']} trials finished: {folder}")
    if bad:
        raise SearchFailed(folder, bad)
    return folder


def _tracking_parent(folder: Path, state: dict[str, Any], log: Any) -> None:
    """With mlflow in the base config's train.loggers: the search's parent MLflow run, the trials nested under it."""
    from llmcli.config import validate_config
    from llmcli.tracking import sweep_parent

    sweep_parent(folder, validate_config(state["config"], str(folder / STATE)), log)


def _run(study: Any, state: dict[str, Any], folder: Path, workers: int | None, backend: str,
         ray_address: str | None, log: Any) -> tuple[int | None, dict[int, str]]:
    """Run the trials left; (the signal that stopped it or None, the state each trial of this run ended in)."""
    stale = sync(study, state, folder, log)
    done = finished(study)
    n_new = max(0, state["trials"] - done - len(stale))
    fields = ", ".join(p["field"] for p in state["params"])
    log(f"search: {folder}: {state['trials']} trial(s), {state['sampler']} sampler over {fields}; {done} finished, "
        f"{len(stale)} to continue, {n_new} new")
    source = TrialSource(study, state, folder, stale, n_new, log)
    if not source.total:
        return None, {}
    runner = run_ray if backend == "ray" else run_local
    signum = runner(source, workers or state.get("workers") or default_workers(source.total, source.threads), log,
                    ray_address)
    return signum, source.outcomes


def _interrupted(folder: Path, signum: int, log: Any) -> SweepInterrupted:
    msg = (f"search: stopped by {signal.Signals(signum).name}; finished trials are kept and cut ones continue from "
           f"their last checkpoint. Search folder: {folder}. Continue with: "
           f"llmcli sweep --resume {shlex.quote(str(folder))}")
    log(msg)
    return SweepInterrupted(signum, msg, folder)
