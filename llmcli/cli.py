"""The `llmcli` command line. Each command parses its arguments and calls one plain function.

Heavy modules (torch, the data pipeline) are imported inside the commands, so `llmcli --help`
stays fast. A `UserError` anywhere becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperGroup


class OneLineErrors(TyperGroup):
    """Usage errors (a missing argument, `-n abc`) become one line on stderr and exit 2, like all bad input."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        except Exception as exc:
            # click's exceptions (typer vendors its own copy of click), told apart by what they carry
            if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
                raise
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `llmcli`: the help text, as click shows it
                exc.show()
                sys.exit(exc.exit_code)
            ctx = getattr(exc, "ctx", None)
            where = f"{ctx.command_path}: " if ctx is not None else ""
            msg = " ".join(exc.format_message().split())
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            typer.echo(f"error: {where}{msg}{hint}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="llmcli",
    cls=OneLineErrors,
    help="A command-line lab for conflicting objectives (L vs T) and mismatched generalisation (in- vs out-of-domain).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

SET_HELP = "Dotted override, repeatable: --set train.steps=100 --set model.n_layer=2"


def _log(msg: str) -> None:
    typer.echo(msg, err=True)


def _guard(fn: Callable[[], Any], config: str | None = None) -> Any:
    """Run a command body: bad input -> one line on stderr, exit 2; a failed run -> exit 1;
    a stop on SIGINT/SIGTERM -> exit 128 + signal (130 for Ctrl-C).

    An error about a config field found after loading (e.g. data.train_domains) gets the config's file name.
    """
    from llmcli.errors import Interrupted, RunFailed, UserError

    try:
        return fn()
    except UserError as exc:
        typer.echo(f"error: {_with_file(str(exc), config)}", err=True)
        raise typer.Exit(2) from None
    except RunFailed as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except Interrupted as exc:
        raise typer.Exit(128 + exc.signum) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


def _with_file(msg: str, config: str | None) -> str:
    from llmcli.config import is_field_message

    return f"{config}: {msg}" if config and is_field_message(msg) else msg


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

        typer.echo(run(_config(config, set_).data, log=_log))

    _guard(body, config)


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
        typer.echo(run(cfg, runs_dir=runs_dir, resume=resume, progress=progress, log=_log))

    _guard(body, config or (resume and str(Path(resume) / "config.yaml")))


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
    alphas: Optional[str] = typer.Option(None, "--alphas", help="Comma-separated grid in [0, 1]; default: sweep.alphas."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: Optional[str] = typer.Option(None, "--resume", help="Finish this sweep folder, skipping finished points."),
    runs_dir: str = typer.Option("runs", "--runs-dir", help="Where the sweep folder is created."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Train one run per alpha of L' = alpha*L + (1-alpha)*T; write results.csv, pareto.png, summary.md."""

    def body() -> None:
        from llmcli.errors import UserError
        from llmcli.sweep import parse_alphas
        from llmcli.sweep import sweep_alpha as run

        if resume is None and config is None:
            raise UserError("sweep-alpha: give a CONFIG, or --resume SWEEP_DIR")
        grid = parse_alphas(alphas) if alphas is not None else None
        if resume is not None and (config is not None or set_ or grid is not None):
            raise UserError("sweep-alpha: --resume finishes a sweep with its own grid and config; drop the others")
        cfg = _config(config, set_) if config else None
        typer.echo(run(cfg, grid, runs_dir=runs_dir, resume=resume, progress=progress, log=_log))

    _guard(body, config)


@app.command()
def reproduce(
    run_dir: str = typer.Argument(..., help="A run folder."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Compare only the first K steps (default: all it ran)."),
    atol: float = typer.Option(0.0, "--atol", help="Allowed absolute difference per metric value."),
) -> None:
    """Re-run a run's config in a temporary folder; exit 0 if its metrics match the recorded ones, else 1."""

    def body() -> None:
        from llmcli.reproduce import reproduce as run

        result = run(run_dir, steps=steps, atol=atol, log=_log)
        if not result.ok:
            typer.echo(f"reproduce: DIFFERENT at {result.difference}")
            raise typer.Exit(1)
        same = "identical" if atol == 0 else f"equal within {atol:g}"
        typer.echo(f"reproduce: OK, {result.n_records} records over {result.steps} steps {same} (timing keys ignored)")

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
