"""The `llmcli` command line. Each command parses its arguments and calls one plain function
(the longer ones, `train` and `sweep-alpha`, in llmcli/commands.py, with their flag cross-checks).

Heavy modules (torch, the data pipeline) are imported inside the commands, so `llmcli --help`
stays fast. A `UserError` anywhere becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from llmcli import commands

_METAVARS = {"int": "INTEGER", "float": "NUMBER", "str": "TEXT", "list[str]": "TEXT", "list[int]": "INTEGER"}
# options whose value is a path or a pair: the same placeholder in every command that has them
_NAMED_METAVARS = {"--set": "KEY=VALUE", "--resume": "DIR", "--runs-dir": "DIR", "--loo-dir": "DIR",
                   "--compare": "DIR", "--prompts-file": "FILE", "--file": "FILE", "--data": "CONFIG"}


class PlainArgument(TyperArgument):
    """An argument shown as click shows it: `RUN_DIR` in the usage line, no `<str>` beside it."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def _usage_display_name(self) -> str:  # typer's own wraps a required one in braces: {run_dir}
        name = self.display_name_raw + ("..." if self.nargs != 1 else "")
        return name if self.required else f"[{name}]"


class PlainOption(TyperOption):
    """An option shown as click shows it: `--seed INTEGER`; a flag (`--json`) with no placeholder at all."""

    def display_type_rich(self, ctx: Any) -> str | None:
        if self.is_flag or self.count:
            return None
        named = next((_NAMED_METAVARS[o] for o in self.opts if o in _NAMED_METAVARS), None)
        return self.metavar or named or _METAVARS.get(self.bare_type(), "VALUE")


def _plain_param(param: Any) -> None:
    """Click-style placeholders instead of typer's `<str>` / `<bool>` / `{config}`, and help text taken literally
    (`llmcli[ray]` is no rich markup tag)."""
    from rich.markup import escape

    if isinstance(param, (PlainArgument, PlainOption)):
        return
    if param.help:
        param.help = escape(param.help)
    if isinstance(param, TyperArgument):
        param.__class__ = PlainArgument
        param.metavar = param.metavar or param.name.upper()
    elif isinstance(param, TyperOption):
        param.__class__ = PlainOption


class PlainHelp(TyperCommand):
    """A command whose --help shows click-style placeholders (see `_plain_param`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _plain_param(param)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            _plain_param(option)
        return option


def _extra_argument_hint(msg: str, args: Any) -> str:
    """`llmcli train CONFIG train.steps=5` (Hydra style) -> point at --set."""
    given = sys.argv[1:] if args is None else list(args)
    dotted = [a for a in given if "=" in a and not a.startswith("-") and "." in a.split("=", 1)[0]]
    if "unexpected extra argument" not in msg or not dotted:
        return ""
    return f"; to change a config value, use --set: {' '.join(f'--set {a}' for a in dotted)}"


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
            hint = _extra_argument_hint(msg, args) or (f" (see {ctx.command_path} --help)" if ctx is not None else "")
            typer.echo(f"error: {where}{msg}{hint}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            _plain_param(option)
        return option

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:  # --version, --install-completion, --show-completion
            _plain_param(param)
        return params


app = typer.Typer(
    name="llmcli",
    cls=OneLineErrors,
    help="A command-line lab for conflicting objectives (L vs T) and mismatched generalisation (in- vs out-of-domain).",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

SET_HELP = "Dotted override, repeatable: --set train.steps=100 --set model.n_layer=2"


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"llmcli {version('llmcli')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the package version and exit."),
) -> None:
    """A command-line lab for conflicting objectives (L vs T) and mismatched generalisation (in- vs out-of-domain)."""


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


def _check_checkpoint(name: str | None) -> None:
    """--checkpoint takes best or last (None: the command's default); one check for every command."""
    from llmcli.errors import UserError

    if name not in (None, "best", "last"):
        raise UserError(f"--checkpoint: {name!r} is not allowed (best or last)")


def _with_file(msg: str, config: str | None) -> str:
    from llmcli.config import is_field_message

    return f"{config}: {msg}" if config and is_field_message(msg) else msg


TEST_DOMAINS_HELP = "Hold these domains out entirely (test only, never trained or validated on): wyc,ylt"


@app.command()
def preprocess(
    config: str = typer.Argument(..., help="Experiment config (YAML)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Build the tokenizer and memory-mapped arrays for a config's data (a no-op when up to date)."""

    def body() -> None:
        from llmcli.data.preprocess import preprocess as run
        from llmcli.data.report import print_report

        out = run(commands.config_from_flags(config, set_).data, log=commands.log)
        print_report(out)
        typer.echo(out)

    _guard(body, config)


@app.command()
def train(
    config: Optional[str] = typer.Argument(None, help="Experiment config (YAML); omit with --resume."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue this run folder from its last checkpoint."),
    runs_dir: str = typer.Option("runs", "--runs-dir", help="Where run folders are created."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    test_domains: Optional[str] = typer.Option(None, "--test-domains", help=TEST_DOMAINS_HELP),
    loo: bool = typer.Option(False, "--loo", help="Leave-one-domain-out: one run per (method, held-out domain); "
                             "writes loo.csv and loo.md."),
    methods: Optional[str] = typer.Option(None, "--methods", help="With --loo: DG methods compared, e.g. "
                                          "erm,group_dro,coral (default: the config's dg)."),
    loo_dir: Optional[str] = typer.Option(None, "--loo-dir", help="With --loo: write here (finished cells are kept)."),
) -> None:
    """Train a model; writes runs/<YYYYmmdd-HHMMSS>-<name>-<hex>/ and prints its path."""
    _guard(lambda: commands.train(config, set_, resume=resume, runs_dir=runs_dir, progress=progress,
                                  test_domains=test_domains, loo=loo, methods=methods, loo_dir=loo_dir),
           config or (resume and str(Path(resume) / "config.yaml")))


@app.command("eval")
def eval_(
    run_dirs: list[str] = typer.Argument(..., help="One run folder, or several for a comparison table."),
    split: str = typer.Option("test", "--split", help="test or val."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="best (default when present) or last."),
    data: Optional[str] = typer.Option(None, "--data", help="Score on this config's data (the run's tokenizer)."),
    text: list[str] = typer.Option([], "--text", help="Classify this text (repeatable): label + top-3."),
    file: Optional[str] = typer.Option(None, "--file", help="Classify each line of this file."),
    no_write: bool = typer.Option(False, "--no-write", help="Print the scores only: write no eval/*.json or "
                                  "pictures (e.g. for a read-only run folder)."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="tfidf: also fit word 1-2-gram TF-IDF + "
                                           "logistic regression on the run's training split and score it beside "
                                           "the run (the eval JSON's `baseline`)."),
    no_base: bool = typer.Option(False, "--no-base", help="For a run from pretrained weights: skip scoring its "
                                 "base model (the eval JSON's `forgetting`: ppl before / after per domain)."),
) -> None:
    """Score runs on every domain of their data: per-domain metrics and the in-domain vs OOD gap."""

    def body() -> None:
        from rich.console import Console

        _check_checkpoint(checkpoint)
        commands.check_eval_baseline(baseline, classifying=bool(text or file), no_base=no_base)
        if text or file:
            from llmcli.evaluation.classify import classify, read_texts

            texts = [*text, *(read_texts(file) if file else [])]
            for run_dir in run_dirs:
                prefix = f"{run_dir}\t" if len(run_dirs) > 1 else ""  # several runs: say whose answer each line is
                for r in classify(run_dir, texts, checkpoint=checkpoint):
                    top = "  ".join(f"{name} {p:.3f}" for name, p in r["top"])
                    typer.echo(f"{prefix}{r['label']}\t{top}\t{r['text']}")
            return
        from llmcli.evaluation.evaluate import eval_stem, render_comparison, render_table, score_run, write_result

        console = Console(width=200)
        results = []
        for run_dir in run_dirs:
            result = score_run(run_dir, split=split, checkpoint=checkpoint, data_config=data, log=commands.log,
                               baseline=baseline, base=not no_base)
            written = [] if no_write else write_result(Path(run_dir), result, eval_stem(split, data))
            results.append(result)
            console.print(render_table(result))
            for w in result["warnings"]:
                commands.log(f"warning: {run_dir}: {w}")
            commands.log(f"eval: wrote {', '.join(map(str, written))}" if written
                 else f"eval: {run_dir}: nothing written (--no-write)")
        if len(results) > 1:
            console.print(render_comparison(results))

    _guard(body)


SEED_HELP = ("Sampling seed [default: the run's generate.seed, 0 unless its config sets it]. The same seed, prompts "
             "and --num-samples give the same text every time, streamed or --json; in a larger batch (more prompts "
             "or samples) the same prompt and seed may draw other text.")


@app.command()
def generate(
    run_dir: str = typer.Argument(..., help="A run folder."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Text to continue; repeatable (one batch)."),
    prompts_file: Optional[str] = typer.Option(None, "--prompts-file", help="One prompt per line, batched."),
    num_samples: int = typer.Option(1, "--num-samples", help="Continuations per prompt."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n",
                                                 help="Tokens to add at most [default: the run's generate.max_new_tokens]."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t",
                                                help="0 = greedy [default: the run's generate.temperature]."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Keep the k most probable tokens [default: the run's "
                                        "generate.top_k]."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass, in (0, 1] [default: the "
                                          "run's generate.top_p]."),
    stop: list[str] = typer.Option([], "--stop", help="Stop a continuation at this string (repeatable)."),
    seed: Optional[int] = typer.Option(None, "--seed", help=SEED_HELP),
    show_probs: Optional[int] = typer.Option(None, "--show-probs", help="Print the K most probable next tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text (samples counted "
                                 "from 1, as in the text)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="best (default when present) or last."),
) -> None:
    """Continue prompts with a trained model; one prompt is streamed to stdout."""

    def body() -> None:
        from llmcli.evaluation.generate import check_options, read_prompts

        _check_checkpoint(checkpoint)
        check_options(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, show_probs=show_probs, seed=seed)
        prompts = [*prompt, *(read_prompts(prompts_file) if prompts_file else [])] or [""]
        kw = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "stop": stop,
              "top_k": top_k if top_k is not None else -1, "seed": seed, "checkpoint": checkpoint, "log": commands.log}
        _generate(run_dir, prompts, num_samples, show_probs, as_json, kw)

    _guard(body)


def _generate(run_dir: str, prompts: list[str], num_samples: int, show_probs: int | None, as_json: bool,
              kw: dict[str, Any]) -> None:
    """`llmcli generate` once its options are checked: everything is loaded before the first character printed."""
    import json

    from llmcli.evaluation.generate import generate as stream
    from llmcli.evaluation.generate import generate_all, top_next

    checkpoint = kw["checkpoint"]
    probs = top_next(run_dir, prompts, show_probs, checkpoint=checkpoint) if show_probs is not None else {}
    if len(prompts) == 1 and num_samples == 1 and not as_json:
        pieces = stream(run_dir, prompts[0], **kw)  # loads the run and checks the settings before printing
        _print_probs(probs)
        typer.echo(prompts[0], nl=False)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        typer.echo("")
        return
    done = generate_all(run_dir, prompts, num_samples=num_samples, **kw)
    if as_json:
        typer.echo(json.dumps({"completions": [c.as_json() for c in done],
                               "next_token_probs": {p: [[t, q] for t, q in top] for p, top in probs.items()}},
                              ensure_ascii=False))
        return
    _print_probs(probs)
    for i, c in enumerate(done):  # prompt-major order: num_samples rows per prompt
        typer.echo(f"--- prompt {i // num_samples + 1}, sample {c.sample + 1} ({c.finish})")
        typer.echo(c.prompt + c.text)


def _print_probs(probs: dict[str, list[tuple[str, float]]]) -> None:
    for p, top in probs.items():
        typer.echo(f"next-token probabilities after {p!r}: " + "  ".join(f"{t!r} {q:.4f}" for t, q in top))


@app.command()
def compress(
    run_dir: str = typer.Argument(..., help="A run folder."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: dynamic int8 Linear layers (CPU)."),
    prune: Optional[float] = typer.Option(None, "--prune", help="Zero this fraction of each Linear weight (L1)."),
    split: str = typer.Option("test", "--split", help="Split for the side-by-side eval (test or val)."),
    runs_dir: Optional[str] = typer.Option(None, "--runs-dir", help="Where the new run goes (default: beside RUN_DIR)."),
) -> None:
    """Write a pruned and/or int8 copy of a run as a new run folder; compare size, latency, metrics."""

    def body() -> None:
        from rich.console import Console

        from llmcli.experiments.compress import compress as run
        from llmcli.experiments.compress import render_report
        from llmcli.files import read_json_object

        out = run(run_dir, quantize=quantize, prune=prune, runs_dir=runs_dir, split=split, log=commands.log)
        Console(width=140, stderr=True).print(render_report(read_json_object(out / "compress.json", "compress report")))
        typer.echo(out)

    _guard(body)


@app.command()
def soup(
    run_dirs: list[str] = typer.Argument(..., help="Runs fine-tuned from one start (same model, tokenizer, labels)."),
    base_weight: float = typer.Option(0.0, "--base-weight", help="Mix the pretrained weights this far back toward "
                                      "the base model (WiSE-FT, 0-1); the heads stay the runs' mean."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="best or last (default: best if present)."),
    runs_dir: Optional[str] = typer.Option(None, "--runs-dir", help="Where the new run goes (default: beside run 1)."),
) -> None:
    """Write the weight average of runs (a model soup), optionally mixed toward the base, as a new run folder."""

    def body() -> None:
        from llmcli.experiments.soup import soup as run

        _check_checkpoint(checkpoint)
        typer.echo(run(run_dirs, base_weight=base_weight, checkpoint=checkpoint, runs_dir=runs_dir, log=commands.log))

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
    test_domains: Optional[str] = typer.Option(None, "--test-domains", help=TEST_DOMAINS_HELP),
) -> None:
    """Map the L-vs-T trade-off: one run per alpha (or one conditioned run); results.csv, pareto.png, summary.md."""
    _guard(lambda: commands.sweep_alpha(config, set_, alphas=alphas, betas=betas, seeds=seeds, workers=workers,
                                        mode=mode, compare=compare, backend=backend, ray_address=ray_address,
                                        resume=resume, runs_dir=runs_dir, progress=progress,
                                        test_domains=test_domains), config)


PARAM_HELP = ("Searched config field and its distribution, repeatable: optim.lr=loguniform:1e-4:1e-2, "
              "objective.alpha=uniform:0:1, model.n_layer=int:1:4 (or logint:), model.d_model=choice:32,64, "
              "data.tokenizer.vocab_size=grid:1024,2048.")
OBJECTIVE_HELP = ("DOMAIN.METRIC[:max|min] on the validation split, repeatable (several: a Pareto front): "
                  "kjv.acc:max, in_domain.macro_f1, ood.ppl:min. Metrics: acc, macro_f1, macro_recall, ece, "
                  "lm_loss, ppl, bpb, task_loss.")


@app.command("sweep")
def sweep(
    config: Optional[str] = typer.Argument(None, help="Experiment config (YAML); omit with --resume."),
    param: list[str] = typer.Option([], "--param", help=PARAM_HELP, metavar="FIELD=DIST"),
    objective: list[str] = typer.Option([], "--objective", help=OBJECTIVE_HELP, metavar="DOMAIN.METRIC[:DIR]"),
    sampler: str = typer.Option("tpe", "--sampler", help="grid, random, tpe or nsga2 (Optuna's samplers)."),
    pruner: str = typer.Option("none", "--pruner", help="none, median or halving, options as "
                               "median:n_startup_trials=2 (one objective only)."),
    trials: Optional[int] = typer.Option(None, "--trials", help="Trials to finish [default: the grid's size with "
                                         "--sampler grid, else 20]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampler seed [default: the config's seed]."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Trials trained in parallel (default: one per core)."),
    backend: str = typer.Option("local", "--backend", help="local processes, or ray (pip install 'llmcli[ray]')."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster address (default: local)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: Optional[str] = typer.Option(None, "--resume", help="Finish this search: continue cut trials, run the "
                                         "missing ones."),
    runs_dir: str = typer.Option("runs", "--runs-dir", help="Where the search folder is created."),
    test_domains: Optional[str] = typer.Option(None, "--test-domains", help=TEST_DOMAINS_HELP),
) -> None:
    """Search hyperparameters (any config fields) with Optuna: one run per trial; results.csv, summary.md."""
    _guard(lambda: commands.sweep(config, set_, params=param, objectives=objective, sampler=sampler, pruner=pruner,
                                  trials=trials, seed=seed, workers=workers, backend=backend, ray_address=ray_address,
                                  resume=resume, runs_dir=runs_dir, test_domains=test_domains), config)


@app.command()
def reproduce(
    run_dir: str = typer.Argument(..., help="A run folder."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Compare only the first K steps (default: all it ran)."),
    atol: float = typer.Option(0.0, "--atol", help="Allowed absolute difference per metric value."),
) -> None:
    """Re-run a run's config in a temporary folder; exit 0 if its metrics match the recorded ones, else 1."""

    def body() -> None:
        from llmcli.experiments.reproduce import reproduce as run

        result = run(run_dir, steps=steps, atol=atol, log=commands.log)
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

        typer.echo(dump_config(commands.config_from_flags(config, set_)), nl=False)

    _guard(body)


@app.command()
def schema() -> None:
    """Print the JSON Schema of experiment configs (for editors and CI)."""
    import json

    from llmcli.config import experiment_model

    typer.echo(json.dumps(experiment_model().model_json_schema(), indent=2))


for _info in app.registered_commands:  # every command gets click-style placeholders in its --help
    _info.cls = PlainHelp if _info.cls in (None, TyperCommand) else _info.cls


def main() -> None:
    """Console-script entry point."""
    app()
