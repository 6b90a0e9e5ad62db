"""Leave-one-domain-out model selection (Gulrajani & Lopez-Paz 2021), for one run's `best` checkpoint.

With train domains D1..DK, K auxiliary runs each train on all but Di (`train.exclude_domains: [Di]`, same
config and seed) and are validated on Di, a domain they never saw. At each evaluation step the K held-out
scores (the run's objective score on Di's validation records) are averaged; the main run's checkpoint at
the step with the lowest average becomes `best`. No domain the run is tested on is ever looked at.

This sits above the engine (`llmcli.training.engine`): `train_and_select` checks the domains, trains the main run (the
engine keeps a checkpoint per validated step, since select_by is not a rule it applies itself), then selects.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from llmcli.errors import UserError
from llmcli.files import append_jsonl, read_json
from llmcli.runs import read_metrics
from llmcli.training.engine import train


def aux_config(cfg: Any, left_out: str) -> Any:
    """The auxiliary run's config: the same run without one train domain, selected the plain way."""
    data = cfg.model_dump(mode="json")
    data["train"]["exclude_domains"] = [*cfg.train.exclude_domains, left_out]
    data["train"]["select_by"] = "train_domain_val"
    data["name"] = f"{cfg.name}-without-{left_out}"
    return type(cfg).model_validate(data)


def held_out_scores(run_dir: Path, domain: str, objective: Any) -> dict[int, float]:
    """step -> the objective's score on `domain`'s validation records, from a run's metrics.jsonl."""
    out = {}
    for r in read_metrics(run_dir / "metrics.jsonl"):
        if r.get("split") == "val" and r.get("domain") == domain and "lm_loss" in r:
            out[int(r["step"])] = float(objective.score(r["lm_loss"], r.get("task_loss", 0.0)))
    return out


def check_domains(cfg: Any, train_domains: list[str]) -> None:
    """Enough train domains for the auxiliary runs (checked before the main run trains)."""
    if len(train_domains) < 2:
        raise UserError("train.select_by: 'leave_one_domain_out' needs at least two data.train_domains")
    if cfg.dg.name != "erm" and len(train_domains) < 3:
        raise UserError(f"train.select_by: 'leave_one_domain_out' with dg {cfg.dg.name!r} needs at least three "
                        "data.train_domains (each auxiliary run keeps two)")


def train_and_select(cfg: Any, **kw: Any) -> Path:
    """`llmcli train`: `llmcli.training.engine.train(cfg, **kw)`, then leave-one-domain-out selection when
    train.select_by asks for it (and the run completed); the run's folder."""
    seen: dict[str, Any] = {}

    def setup(sess: Any) -> None:  # the resumed run's own config, once its session is set up
        if sess.cfg.train.select_by == "leave_one_domain_out":
            check_domains(sess.cfg, sess.train_domains)  # before the run folder is written
        seen["sess"] = sess

    out = train(cfg, on_setup=setup, **kw)
    sess = seen["sess"]
    done = read_json(out / "meta.json", "run meta")["status"] == "completed"
    if sess.cfg.train.select_by == "leave_one_domain_out" and done and sess.dist.main:
        select_leave_one_domain_out(out, sess.cfg, sess.train_domains, sess.objective, log=kw.get("log", print))
    return out


def select_leave_one_domain_out(run_dir: Path, cfg: Any, train_domains: list[str], objective: Any,
                                log: Any = print) -> int:
    """Train the K leave-one-out runs under RUN/lodo/, copy the chosen step's checkpoint to best; return the step."""
    check_domains(cfg, train_domains)
    per_domain = []
    for d in train_domains:
        aux_dir = run_dir / "lodo" / d
        if aux_dir.exists():  # an interrupted earlier attempt: start that auxiliary run again
            shutil.rmtree(aux_dir)
        aux_dir.mkdir(parents=True)
        log(f"select: leave-one-domain-out run without {d}")
        train(aux_config(cfg, d), run_dir=aux_dir, progress=False, log=lambda m: None)
        per_domain.append(held_out_scores(aux_dir, d, objective))
    steps = sorted(set.intersection(*(set(p) for p in per_domain)))
    mean = {s: float(np.mean([p[s] for p in per_domain])) for s in steps}
    chosen = min(steps, key=lambda s: (mean[s], s))
    ckpt = run_dir / "checkpoints"
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(ckpt / f"step-{chosen}{suffix}", ckpt / f"best{suffix}")
    for f in ckpt.glob("step-*"):
        f.unlink()
    append_jsonl(run_dir / "metrics.jsonl", {"step": chosen, "split": "val", "domain": "leave_one_domain_out",
                                             "objective": mean[chosen], "best": True,
                                             "select_by": "leave_one_domain_out",
                                             "per_step": {str(s): mean[s] for s in steps}})
    log(f"select: best = step {chosen} (mean held-out-train-domain score {mean[chosen]:.4f})")
    return chosen
