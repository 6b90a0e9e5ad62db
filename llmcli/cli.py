"""The `llmcli` command line. Each command parses its arguments and calls one plain function.

Heavy modules (torch, the data pipeline) are imported inside the commands, so `llmcli --help`
stays fast. A `UserError` anywhere becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

app = typer.Typer(
    name="llmcli",
    help="A command-line lab for conflicting objectives (L vs T) and mismatched generalisation (in- vs out-of-domain).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

SET_HELP = "Dotted override, repeatable: --set train.steps=100 --set model.n_layer=2"


def _log(msg: str) -> None:
    typer.echo(msg, err=True)


def _quiet(msg: str) -> None:
    """Log sink of non-zero torchrun ranks."""


def _guard(fn: Callable[[], Any]) -> Any:
    """Run a command body: bad input -> one line on stderr, exit 2; Ctrl-C -> exit 130."""
    from llmcli.errors import UserError

    try:
        return fn()
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


def _config(path: str, overrides: list[str]) -> Any:
    from llmcli.config import load_config

    return load_config(Path(path), overrides)


@app.command()
def preprocess(
    config: str = typer.Argument(..., help="Experiment config (YAML)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Build the tokenizer and memory-mapped arrays for a config's data (a no-op when up to date)."""

    def body() -> None:
        from llmcli.data.preprocess import preprocess as run
        from llmcli.data.report import print_report

        out = run(_config(config, set_).data, log=_log)
        print_report(out)
        typer.echo(out)

    _guard(body)


@app.command()
def train(
    config: Optional[str] = typer.Argument(None, help="Experiment config (YAML); omit with --resume."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue this run folder from its last checkpoint."),
    runs_dir: str = typer.Option("runs", "--runs-dir", help="Where run folders are created."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train a model; writes runs/<YYYYmmdd-HHMMSS>-<name>-<hex>/ and prints its path."""

    def body() -> None:
        from llmcli.errors import UserError
        from llmcli.train import train as run

        if resume is None and config is None:
            raise UserError("train: give a CONFIG, or --resume RUN_DIR")
        if resume is not None and (config is not None or set_):
            raise UserError("train: --resume continues a run with its own saved config; drop CONFIG and --set")
        cfg = _config(config, set_) if config else None
        main = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone talks to the user
        out = run(cfg, runs_dir=runs_dir, resume=resume, progress=progress and main, log=_log if main else _quiet)
        if main:
            typer.echo(out)

    _guard(body)


@app.command("eval")
def eval_(
    run_dir: str = typer.Argument(..., help="A run folder."),
    split: str = typer.Option("test", "--split", help="test or val."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="best (default when present) or last."),
) -> None:
    """Score a run on every domain of its data: per-domain metrics and the in-domain vs OOD gap."""

    def body() -> None:
        from rich.console import Console

        from llmcli.errors import UserError
        from llmcli.evaluate import evaluate, render_table

        if checkpoint not in (None, "best", "last"):
            raise UserError(f"--checkpoint: {checkpoint!r} is not allowed (best or last)")
        result = evaluate(run_dir, split=split, checkpoint=checkpoint, log=_log)
        Console(width=140).print(render_table(result))
        _log(f"eval: wrote {Path(run_dir) / 'eval' / (split + '.json')}")

    _guard(body)


@app.command()
def generate(
    run_dir: str = typer.Argument(..., help="A run folder."),
    prompt: str = typer.Option("", "--prompt", "-p", help="Text to continue."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", help="Default: the run's config."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", help="0 = greedy."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Keep the k most probable tokens."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass, in (0, 1]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best or last."),
) -> None:
    """Continue a prompt with a trained model, streamed to stdout."""

    def body() -> None:
        from llmcli.generate import generate as run

        typer.echo(prompt, nl=False)
        for piece in run(run_dir, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k if top_k is not None else -1, top_p=top_p, seed=seed, checkpoint=checkpoint):
            sys.stdout.write(piece)
            sys.stdout.flush()
        typer.echo("")

    _guard(body)


@app.command("sweep-alpha")
def sweep_alpha(
    config: Optional[str] = typer.Argument(None, help="Experiment config (YAML); omit with --resume."),
    alphas: Optional[str] = typer.Option(None, "--alphas", help="Grid in [0, 1]: 0,0.25,1 or linspace:0:1:9 "
                                         "(default: sweep.alphas)."),
    betas: Optional[str] = typer.Option(None, "--betas", help="Sweep the constrained objective's bound instead."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Run every point per seed: 0,1,2 (mean ± std)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Points trained in parallel (default: one per core)."),
    mode: str = typer.Option("exact", "--mode", help="exact (one run per point) or conditioned (one run, YOTO)."),
    compare: Optional[str] = typer.Option(None, "--compare", help="Another sweep folder whose front is overlaid."),
    backend: str = typer.Option("local", "--backend", help="local processes, or ray (pip install 'llmcli[ray]')."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster address (default: local)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: Optional[str] = typer.Option(None, "--resume", help="Finish this sweep: re-run missing or failed points."),
    runs_dir: str = typer.Option("runs", "--runs-dir", help="Where the sweep folder is created."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Map the L-vs-T trade-off: one run per alpha (or one conditioned run); results.csv, pareto.png, summary.md."""

    def body() -> None:
        from llmcli.errors import UserError
        from llmcli.sweep import SweepFailed, parse_grid, parse_seeds
        from llmcli.sweep import sweep_alpha as run

        if resume is None and config is None:
            raise UserError("sweep-alpha: give a CONFIG, or --resume SWEEP_DIR")
        grid = parse_grid(alphas, "--alphas") if alphas is not None else None
        bgrid = parse_grid(betas, "--betas", 0.0, float("inf")) if betas is not None else None
        seed_list = parse_seeds(seeds) if seeds is not None else None
        if workers is not None and workers < 1:
            raise UserError(f"--workers: must be >= 1, got {workers}")
        if resume is not None and (config is not None or set_ or grid or bgrid or seed_list or mode != "exact"):
            raise UserError("sweep-alpha: --resume finishes a sweep with its own grid and config; drop the others")
        cfg = _config(config, set_) if config else None
        try:
            out = run(cfg, grid, betas=bgrid, seeds=seed_list, workers=workers, mode=mode, backend=backend,
                      ray_address=ray_address, compare=compare, runs_dir=runs_dir, resume=resume,
                      progress=progress, log=_log)
        except SweepFailed as exc:
            typer.echo(f"error: {exc}", err=True)
            typer.echo(exc.sweep_dir)
            raise typer.Exit(1) from None
        typer.echo(out)

    _guard(body)


@app.command()
def validate(
    config: str = typer.Argument(..., help="Experiment config (YAML)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Check a config (no torch import); print the resolved config."""

    def body() -> None:
        from llmcli.config import dump_config

        typer.echo(dump_config(_config(config, set_)), nl=False)

    _guard(body)


@app.command()
def schema() -> None:
    """Print the JSON Schema of experiment configs (for editors and CI)."""
    import json

    from llmcli.config import experiment_model

    typer.echo(json.dumps(experiment_model().model_json_schema(), indent=2))


def main() -> None:
    """Console-script entry point."""
    app()
