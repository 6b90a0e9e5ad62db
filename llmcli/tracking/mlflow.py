"""The MLflow tracker: one MLflow run per run folder (its id in RUN/tracking.json), a sweep's points nested under
one parent run (its id in SWEEP/tracking.json).

Store: MLFLOW_TRACKING_URI when set; else a local SQLite store in the runs folder, sqlite:///<runs>/mlflow.db,
its artifacts in <runs>/mlartifacts. A sweep point or a leave-one-domain-out auxiliary run belongs to the runs
folder above its sweep / run folder, so one store holds everything (`runs_root`). Experiment = the config's name.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from llmcli.tracking.base import TRACKING_FILE, Tracker, read_tracking, write_tracking

# The longest param value every MLflow version and store accepts (recent servers take 6000): longer config values
# are cut (marked "..."); the whole config is the run's config.yaml artifact.
MAX_VALUE = 500
BATCH_PARAMS = 100  # MLflow's log_batch limits: 100 params / tags, 1000 metrics per call
BATCH_METRICS = 1000
# meta.json status -> MLflow run status
STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED", "stopped": "KILLED"}
LINK_KEYS = ("tracking_uri", "experiment_id", "run_id")


def store(root: Path) -> tuple[str, str | None]:
    """The tracking URI, and the artifact location of a new experiment (None: the server's own default)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    root = Path(root).resolve()
    return f"sqlite:///{root / 'mlflow.db'}", (root / "mlartifacts").as_uri()


def runs_root(run_dir: Path) -> Path:
    """The runs folder a run belongs to: its parent, or the folder above the sweep folder (sweep.json) or run
    folder (meta.json; a leave-one-domain-out auxiliary run sits in <run>/lodo/<domain>) that holds it."""
    p = Path(run_dir).resolve().parent
    for _ in range(4):  # bounded: never walks far up a user's tree
        if (p / "sweep.json").is_file() or (p / "search.json").is_file() or (p / "meta.json").is_file():
            p = p.parent
        elif p.name == "lodo" and (p.parent / "meta.json").is_file():
            p = p.parent.parent
        else:
            break
    return p


def parent_link(run_dir: Path) -> dict[str, Any] | None:
    """The MLflow run this run nests under: the one recorded in the tracking.json of its sweep folder (or, for a
    leave-one-domain-out auxiliary run, of the run it selects for); None for a top-level run."""
    run_dir = Path(run_dir)
    folders = [run_dir.parent] + ([run_dir.parent.parent] if run_dir.parent.name == "lodo" else [])
    for folder in folders:
        entry = read_tracking(folder).get("mlflow")
        if isinstance(entry, dict) and all(k in entry for k in LINK_KEYS):
            return entry
    return None


def client(uri: str) -> Any:
    """An MlflowClient on `uri` (no global active-run state: several runs in one process stay apart)."""
    import logging

    import mlflow  # noqa: F401 - first: a missing package fails here, whatever submodules an earlier run imported
    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic"):  # the store's INFO lines (schema migrations) are not the run's business
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def experiment_id(mc: Any, name: str, artifacts: str | None) -> str:
    """The id of experiment `name`, created when missing (another process creating it meanwhile is fine)."""
    from mlflow.exceptions import MlflowException

    exp = mc.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return mc.create_experiment(name, artifact_location=artifacts)
    except MlflowException:  # a parallel sweep point won the race
        exp = mc.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The resolved config as dotted keys -> text (JSON for non-strings), each value cut to MAX_VALUE."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(flat_params(v, f"{prefix}{k}."))
            continue
        text = v if isinstance(v, str) else json.dumps(v)
        out[f"{prefix}{k}"] = text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 3] + "..."
    return out


def new_run(mc: Any, experiment: str, folder: Path, config: dict[str, Any], parent: str | None) -> str:
    """Create the MLflow run of a run or sweep folder: tags (folder, seed, git commit, parent), params; its id."""
    from mlflow.entities import Param

    from llmcli.runs import _git_commit  # meta.json's git_commit: `git rev-parse HEAD` of llmcli's tree, or None

    tags = {"run_dir": str(Path(folder).resolve()), "seed": str(config.get("seed"))}
    commit = _git_commit()
    if commit:
        tags |= {"git_commit": commit, "mlflow.source.git.commit": commit}
    if parent:
        tags["mlflow.parentRunId"] = parent  # what mlflow.start_run(nested=True) sets: the UI nests the run
    run_id = mc.create_run(experiment, run_name=Path(folder).name, tags=tags).info.run_id
    params = [Param(k, v) for k, v in flat_params(config).items()]
    for i in range(0, len(params), BATCH_PARAMS):
        mc.log_batch(run_id, params=params[i: i + BATCH_PARAMS])
    return run_id


def log_files(mc: Any, run_id: str, folder: Path, paths: list[Path]) -> None:
    """Files of a run folder as artifacts, at their path inside it (eval/test.json -> eval/test.json)."""
    for p in paths:
        rel = Path(p).resolve().relative_to(Path(folder).resolve())
        mc.log_artifact(run_id, str(p), rel.parent.as_posix() if rel.parent != Path(".") else None)


class MLflowTracker(Tracker):
    """One MLflow run per run folder; a resumed run continues it (its id from RUN/tracking.json)."""

    name = "mlflow"

    def __init__(self, run_dir: Path, cfg: Any) -> None:
        super().__init__(run_dir, cfg)
        self.pending: list[Any] = []  # metrics of the last step seen, not sent yet (see log_metrics)

    def start(self, config: dict[str, Any], resumed_at: int | None) -> int:
        """Reopen the recorded run (resuming) or create one, nested under the sweep's parent run if any."""
        entry = read_tracking(self.run_dir).get("mlflow") if resumed_at is not None else None
        if isinstance(entry, dict) and all(k in entry for k in LINK_KEYS):
            self.mc, self.run_id = client(entry["tracking_uri"]), entry["run_id"]
            self.mc.update_run(self.run_id, status="RUNNING")
            return self._held()
        link = parent_link(self.run_dir)
        if link:
            uri, experiment = link["tracking_uri"], link["experiment_id"]
            self.mc = client(uri)
        else:
            uri, artifacts = store(runs_root(self.run_dir))
            self.mc = client(uri)
            experiment = experiment_id(self.mc, config.get("name") or "llmcli", artifacts)
        self.run_id = new_run(self.mc, experiment, self.run_dir, config, link and link["run_id"])
        write_tracking(self.run_dir, "mlflow", {"tracking_uri": uri, "experiment_id": experiment,
                                                "run_id": self.run_id, "parent_run_id": link and link["run_id"]})
        if (self.run_dir / "config.yaml").is_file():  # the whole config, no value cut
            log_files(self.mc, self.run_id, self.run_dir, [self.run_dir / "config.yaml"])
        return -1

    def _held(self) -> int:
        """The last step the MLflow run holds a metric at (an earlier attempt may have logged past its checkpoint)."""
        keys = self.mc.get_run(self.run_id).data.metrics
        return max((m.step for k in keys for m in self.mc.get_metric_history(self.run_id, k)), default=-1)

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        """One record's metrics at its step; sent when a later step's record comes (or at close): the train record
        and the validation records of one step go in one log_batch (a store round trip costs tens of ms)."""
        from mlflow.entities import Metric

        if self.pending and self.pending[0].step != step:
            self.flush()
        now = int(time.time() * 1000)
        self.pending += [Metric(k, v, now, step) for k, v in values.items()]

    def flush(self) -> None:
        """Send the held metrics (a crash loses at most them: a resume sends them again from metrics.jsonl)."""
        held, self.pending = self.pending, []
        for i in range(0, len(held), BATCH_METRICS):
            self.mc.log_batch(self.run_id, metrics=held[i: i + BATCH_METRICS])

    def log_artifacts(self, paths: list[Path]) -> None:
        """Files of the run folder (curves.png at the end of training) as artifacts."""
        log_files(self.mc, self.run_id, self.run_dir, paths)

    def close(self, status: str) -> None:
        """Send what is held, then end the MLflow run with the run's status (completed -> FINISHED, failed ->
        FAILED, else KILLED)."""
        self.flush()
        self.mc.set_terminated(self.run_id, STATUS.get(status, "FAILED"))


def open_parent(sweep_dir: Path, cfg: Any) -> str:
    """The sweep's parent run: the one SWEEP/tracking.json records (a resumed sweep), else a new one; its id.

    It is a container (params = the sweep's base config, artifact sweep.json), marked FINISHED at once: each
    point's nested run carries its own status.
    """
    entry = read_tracking(sweep_dir).get("mlflow")
    if isinstance(entry, dict) and all(k in entry for k in LINK_KEYS):
        return entry["run_id"]
    uri, artifacts = store(runs_root(Path(sweep_dir) / "point"))
    mc = client(uri)
    config = cfg.model_dump(mode="json")
    experiment = experiment_id(mc, config.get("name") or "llmcli", artifacts)
    run_id = new_run(mc, experiment, sweep_dir, config, None)
    states = [Path(sweep_dir) / f for f in ("sweep.json", "search.json") if (Path(sweep_dir) / f).is_file()]
    if states:
        log_files(mc, run_id, sweep_dir, states)
    mc.set_terminated(run_id, "FINISHED")
    write_tracking(sweep_dir, "mlflow", {"tracking_uri": uri, "experiment_id": experiment, "run_id": run_id})
    return run_id


def log_to_recorded_run(run_dir: Path, paths: list[Path]) -> None:
    """Files of a run folder (eval/*.json, PNGs) to the MLflow run its tracking.json records."""
    entry = read_tracking(run_dir).get("mlflow")
    if not (isinstance(entry, dict) and all(k in entry for k in LINK_KEYS)):
        raise RuntimeError(f"{Path(run_dir) / TRACKING_FILE} records no MLflow run (its tracker never started)")
    log_files(client(entry["tracking_uri"]), entry["run_id"], run_dir, paths)
