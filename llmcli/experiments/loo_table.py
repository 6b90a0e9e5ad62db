"""The domain-generalisation protocol: hold test domains out entirely; the leave-one-domain-out table.

`hold_out(cfg, ["wyc"])` (`--test-domains wyc`) puts a domain in `data.split.holdout_domains`: all its records
are test records, it never reaches training, validation or the tokenizer. `leave_one_out` trains one run per
(method, held-out domain) on every other domain and writes `loo.csv` and `loo.md`: rows = DG method, columns
= held-out domain, cells = test accuracy on it (best checkpoint, chosen by `train.select_by`), plus the average.
"""

from __future__ import annotations

import csv
import io
import signal
import tempfile
from pathlib import Path
from typing import Any

from llmcli.errors import UserError
from llmcli.files import atomic_write_json, atomic_write_text, read_json


def parse_list(text: str, flag: str) -> list[str]:
    """`a,b,c` -> ["a", "b", "c"]; an empty item is a UserError naming the flag."""
    items = [x.strip() for x in text.split(",")]
    if not items or any(not x for x in items):
        raise UserError(f"{flag}: expected a comma-separated list like kjv,web (given: {text!r})")
    return items


def hold_out(cfg: Any, domains: list[str]) -> Any:
    """The config with `domains` held out entirely (test only); one of them trained on is a UserError."""
    both = [d for d in domains if d in (cfg.data.train_domains or [])]
    if both:
        raise UserError(f"--test-domains: {both} are also in data.train_domains ({', '.join(cfg.data.train_domains)}); "
                        "a test domain is never trained on")
    if cfg.data.source.name == "bible" and not getattr(cfg.data, "sources", None):
        unknown = [d for d in domains if d not in cfg.data.source.versions]
        if unknown:
            raise UserError(f"--test-domains: {unknown} not in the data (domains: {', '.join(cfg.data.source.versions)})")
    data = cfg.model_dump(mode="json")
    data["data"]["split"]["holdout_domains"] = sorted(set(cfg.data.split.holdout_domains) | set(domains))
    return _revalidate(cfg, data, "--test-domains")


def _revalidate(cfg: Any, data: dict[str, Any], flag: str) -> Any:
    from pydantic import ValidationError

    from llmcli.config import format_error

    try:
        return type(cfg).model_validate(data)
    except ValidationError as err:
        raise UserError(format_error(flag, data, err)) from None


def data_domains(cfg: Any, log: Any = print) -> list[str]:
    """Every domain of a config's data (the bible versions, or the preprocessed manifest's domains)."""
    if cfg.data.source.name == "bible" and not getattr(cfg.data, "sources", None):
        return list(cfg.data.source.versions)
    from llmcli.data.preprocess import preprocess

    return read_json(preprocess(cfg.data, log=log) / "manifest.json", "data manifest")["domains"]


def fold_config(cfg: Any, method: str, held: str, domains: list[str]) -> Any:
    """One cell's config: train on every domain but `held` (lm_only ones aside), hold `held` out, DG `method`."""
    data = cfg.model_dump(mode="json")
    data["data"]["train_domains"] = [d for d in domains if d != held and d not in cfg.data.lm_only_domains]
    data["data"]["split"]["holdout_domains"] = [held]
    if cfg.dg.name != method:
        data["dg"] = {"name": method}
    data["name"] = f"{cfg.name}-{method}-{held}"
    return _revalidate(cfg, data, f"--loo ({method}, held-out {held})")


def leave_one_out(cfg: Any, methods: list[str], *, runs_dir: str | Path = "runs", out_dir: Path | None = None,
                  progress: bool = False, log: Any = print) -> Path:
    """Train and evaluate every (method, held-out domain) cell; finished cells are kept on a re-run of OUT_DIR.

    A cell cut by SIGINT / SIGTERM (or SIGKILL) continues from its last checkpoint on the re-run; one cut
    while being evaluated is only evaluated. On a signal this raises SweepInterrupted naming the folder.
    """
    from llmcli.experiments.sweep_exec import SweepInterrupted, raise_interrupted, signals_to
    from llmcli.registry import registry
    from llmcli.runs import create_run_dir

    if out_dir is not None:
        check_out_dir(Path(out_dir), "--loo-dir")
    unknown = [m for m in methods if m not in registry("dg").names()]
    if unknown:
        raise UserError(f"--methods: unknown dg {unknown} (valid: {', '.join(registry('dg').names())})")
    domains = data_domains(cfg, log)
    candidates = [d for d in domains if d not in cfg.data.lm_only_domains]
    if len(candidates) < 3:
        raise UserError(f"--loo: needs at least three labeled domains in the data (given: {candidates})")
    folds = {(m, d): fold_config(cfg, m, d, domains) for m in methods for d in candidates}  # all checked first
    out = Path(out_dir) if out_dir else create_run_dir(Path(runs_dir), f"{cfg.name}-loo")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--loo-dir: {out}: cannot create it ({exc.strerror})") from None
    log(f"loo: {out}: {len(methods)} method(s) x {len(candidates)} held-out domain(s) = {len(folds)} cell(s)")
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for (m, d), fcfg in folds.items():
        log(f"loo: {m}, held-out {d}")
        try:
            with signals_to(raise_interrupted):  # training has its own handler; this covers the evaluation
                cells.setdefault(m, {})[d] = _cell(fcfg, out / m / d, d, progress, log)
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            msg = (f"loo: stopped by {signal.Signals(signum).name} at ({m}, held-out {d}); finished cells are kept "
                   f"and the cut one continues from its last checkpoint when the same command is run with "
                   f"--loo-dir {out}")
            log(msg)
            raise SweepInterrupted(signum, msg, out) from None
    write_table(out, cfg, methods, candidates, cells)
    return out


def check_out_dir(path: Path, flag: str) -> None:
    """A folder that exists or can be created, and is writable; else a UserError naming `flag` (nothing created)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag}: {path} is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag}: {path}: {existing} is a file, not a folder")
    try:  # a real write, not os.access: root passes access checks a read-only mount still refuses
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UserError(f"{flag}: {path}: cannot write in {existing} ({exc.strerror})") from None


def _cell(cfg: Any, run: Path, held: str, progress: bool, log: Any = print) -> dict[str, Any]:
    """Train (unless done), continue (if cut) and evaluate one cell; its held-out accuracy and the in-domain one."""
    from llmcli.evaluation.evaluate import evaluate
    from llmcli.experiments.lodo_selection import (
        train_and_select as train,  # the engine, then LODO selection if select_by asks
    )
    from llmcli.runs import move_aside, resumable_run

    result_file = run / "cell.json"
    if result_file.is_file():
        return read_json(result_file, "loo cell")
    how = resumable_run(run) if run.exists() else None
    if how == "resume":
        log(f"loo: {run} was cut off mid-run; continuing it from its last checkpoint")
        train(None, resume=run, progress=progress, log=lambda m: None)
    elif how is None:
        if run.exists():  # failed by itself or cut before its first checkpoint: kept aside, trained afresh
            move_aside(run)
        run.mkdir(parents=True)
        train(cfg, run_dir=run, progress=progress, log=lambda m: None)
    res = evaluate(run, log=lambda m: None)
    ind = [res["domains"][d]["acc"] for d in res["in_domain"] if "acc" in res["domains"].get(d, {})]
    cell = {"acc": res["domains"][held]["acc"], "acc_in": sum(ind) / len(ind) if ind else None,
            "select_by": res["select_by"], "step": res["step"]}
    atomic_write_json(result_file, cell)
    return cell


def write_table(out: Path, cfg: Any, methods: list[str], held: list[str], cells: dict[str, Any]) -> None:
    """loo.csv (wide: method, one column per held-out domain, avg) and loo.md (the same, plus how it was chosen)."""
    rows = []
    for m in methods:
        accs = [cells[m][d]["acc"] for d in held]
        rows.append({"method": m, **{d: round(a, 4) for d, a in zip(held, accs)}, "avg": round(sum(accs) / len(accs), 4)})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["method", *held, "avg"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "loo.csv", buf.getvalue())
    select_by = cfg.train.select_by
    note = " (oracle: an upper bound, not a headline)" if select_by == "oracle" else ""
    lines = [f"# Leave-one-domain-out: {cfg.name}", "",
             f"Test accuracy on the held-out domain (column), trained on all the others; `best` checkpoint "
             f"selected by `{select_by}`{note}; {cfg.train.steps} steps, seed {cfg.seed}.", "",
             "| method | " + " | ".join(held) + " | avg |", "|---" * (len(held) + 2) + "|"]
    lines += ["| " + " | ".join([r["method"], *(f"{r[d]:.3f}" for d in held), f"{r['avg']:.3f}"]) + " |" for r in rows]
    lines += ["", *_gap_table(methods, held, cells)]
    atomic_write_text(out / "loo.md", "\n".join(lines) + "\n")
    atomic_write_json(out / "loo.json", {"select_by": select_by, "held_out": held, "cells": cells})


def _gap_table(methods: list[str], held: list[str], cells: dict[str, Any]) -> list[str]:
    """loo.md's second table: in-domain minus held-out accuracy per cell, with what its sign means."""
    def gap(c: dict[str, Any]) -> float | None:
        return c["acc_in"] - c["acc"] if c.get("acc_in") is not None else None

    lines = ["Accuracy gap, in-domain − held-out (the in-domain accuracy is the test accuracy on the domains the "
             "cell trained on):", "", "| method | " + " | ".join(held) + " | avg |", "|---" * (len(held) + 2) + "|"]
    for m in methods:
        gaps = [gap(cells[m][d]) for d in held]
        known = [g for g in gaps if g is not None]
        avg = sum(known) / len(known) if known else None
        lines.append("| " + " | ".join([m, *("-" if g is None else f"{g:+.3f}" for g in [*gaps, avg])]) + " |")
    return lines + ["", "A positive gap means the held-out domain is less accurate than the trained-on ones (worse out "
                    "of domain); a negative one that it is more accurate. (For a lower-is-better metric such as "
                    "perplexity the same in − OOD difference reads the other way: positive = OOD better.)"]


def read_table(out: Path) -> list[dict[str, str]]:
    """The rows of loo.csv."""
    return list(csv.DictReader(io.StringIO((Path(out) / "loo.csv").read_text(encoding="utf-8"))))

