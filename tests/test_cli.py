"""The command line as a user types it: exit codes, one-line errors, stdout contents."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmcli.cli import app
from tests.conftest import TINY

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def test_help_does_not_import_torch():
    code = "import sys; from llmcli.cli import app; from typer.testing import CliRunner; " \
           "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "llmcli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "sweep-alpha" in out.stdout


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("model: {name: gpt, n_layr: 2}\n", "model.n_layr: unknown key"),
        ("train: {steps: ten}\n", "train.steps: Input should be a valid integer"),
        ("objective: {name: weighted, alpha: 1.5}\n", "objective.alpha: Input should be less than or equal to 1"),
        ("model: {name: transformerXL}\n", "model.name: unknown model 'transformerXL' (valid: gpt, gru, "),
    ],
)
@pytest.mark.parametrize("command", ["train", "preprocess", "validate", "sweep-alpha"])
def test_bad_config_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch, text, fragment, command):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    result = run(command, str(cfg))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(cfg) in lines[0] and fragment in lines[0]
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_bad_set_and_bad_flags_exit_2(tmp_path):
    assert run("validate", str(TINY), "--set", "train.steps").exit_code == 2
    assert run("sweep-alpha", str(TINY), "--alphas", "0,2").exit_code == 2
    assert run("train").exit_code == 2
    assert "give a CONFIG" in run("train").stderr


def test_validate_prints_the_resolved_config_and_schema_is_json():
    out = run("validate", str(TINY), "--set", "objective.alpha=0.25")
    assert out.exit_code == 0 and "alpha: 0.25" in out.stdout and "log_grad_every" in out.stdout
    schema = json.loads(run("schema").stdout)
    assert "objective" in schema["properties"]


def test_train_eval_generate_from_the_command_line(tmp_path, processed_dir):
    s = ["--set", f"data.processed_dir={processed_dir}", "--set", "train.steps=10"]
    trained = run("train", str(TINY), *s, "--runs-dir", str(tmp_path), "--no-progress")
    assert trained.exit_code == 0, trained.output
    run_dir = Path(trained.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path and (run_dir / "checkpoints" / "last.safetensors").is_file()

    ev = run("eval", str(run_dir))
    assert ev.exit_code == 0 and "kjv (in-domain)" in ev.stdout and "wyc" in ev.stdout
    assert (run_dir / "eval" / "test.json").is_file()

    gen = run("generate", str(run_dir), "--prompt", "In the beginning", "-n", "8", "--seed", "1")
    assert gen.exit_code == 0 and gen.stdout.startswith("In the beginning") and len(gen.stdout) > 17
    assert run("generate", str(run_dir), "--top-p", "0").exit_code == 2
    assert run("eval", str(tmp_path / "nope")).exit_code == 2


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (["objective={name: constrained, epsilon: 0}"], "objective.epsilon: Input should be greater than 0"),
        (["objective={name: constrained, beta: 1.2}"], "objective.beta: Input should be less than 1"),
        (["train.freeze=[decoder]"], "train.freeze: this model has no part 'decoder'"),
        (["model.d_model=64"], "train.init_from: weight 'backbone.embed.weight' has shape"),
    ],
)
def test_bad_objective_bound_init_from_and_freeze_exit_2_with_one_line(tmp_path, processed_dir, tiny_run, sets,
                                                                        fragment):
    s = ["--set", f"data.processed_dir={processed_dir}"]
    if "init_from" in fragment:
        s += ["--set", f"train.init_from={tiny_run}"]
    for item in sets:
        s += ["--set", item]
    result = run("train", str(TINY), *s, "--runs-dir", str(tmp_path / "runs"), "--no-progress")
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_diverging_run_exits_1_with_one_line(tmp_path, processed_dir):
    s = ["--set", f"data.processed_dir={processed_dir}", "--set", "optim.lr=1e8", "--set", "train.grad_clip=null"]
    out = run("train", str(TINY), *s, "--runs-dir", str(tmp_path), "--no-progress")
    assert out.exit_code == 1 and "Traceback" not in out.output
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "NaN/Inf at step" in errors[0]


def test_validate_and_schema_do_not_import_torch():
    code = ("import sys; from llmcli.cli import app; from typer.testing import CliRunner; r = CliRunner(); "
            f"assert r.invoke(app, ['validate', {str(TINY)!r}, '--set', 'train.steps=3']).exit_code == 0; "
            "assert r.invoke(app, ['schema']).exit_code == 0; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


COMMANDS = ["preprocess", "train", "eval", "generate", "compress", "soup", "sweep-alpha", "reproduce", "validate", "schema"]


def test_version_prints_the_package_version():
    from importlib.metadata import version

    out = run("--version")
    assert out.exit_code == 0 and out.stdout.strip() == f"llmcli {version('llmcli')}"


def test_shell_completion_is_offered():
    out = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert "--install-completion" in out.stdout and "--show-completion" in out.stdout


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_shows_click_style_placeholders(command):
    import re

    out = runner.invoke(app, [*([command] if command else []), "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert not re.search(r"<(bool|str|int|float|list\[\w+\])>", out.stdout), out.stdout  # typer's type names
    usage = next(ln for ln in out.stdout.splitlines() if "Usage:" in ln)
    assert "{" not in usage, usage  # RUN_DIR, not {run_dir}
    help_line = next(ln for ln in out.stdout.splitlines() if "--help" in ln).split()
    assert help_line[help_line.index("-h") + 1] == "Show", help_line  # a flag takes no value: no placeholder


def test_placeholders_say_what_each_option_takes():
    gen = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "200"}).stdout
    assert "Usage: llmcli generate [OPTIONS] RUN_DIR" in gen
    line = {ln.split()[1]: ln for ln in gen.splitlines() if ln.startswith("│ --")}
    assert "INTEGER" in line["--seed"] and "NUMBER" in line["--temperature"] and "FILE" in line["--prompts-file"]
    assert line["--json"].split()[2] == "Print"  # no placeholder between the flag and its help
    assert "the run's generate.seed, 0 unless" in gen  # the seed's default is said
    train_help = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).stdout
    assert "Usage: llmcli train [OPTIONS] [CONFIG]" in train_help and "KEY=VALUE" in train_help


def test_square_brackets_in_help_text_survive():
    out = runner.invoke(app, ["sweep-alpha", "--help"], env={"COLUMNS": "200"})
    assert "pip install 'llmcli[ray]'" in out.stdout, out.stdout


def test_every_bracket_written_in_an_option_help_is_shown():
    """No help text loses a `[word]` to rich markup, whichever command it is in."""
    import re

    import typer.main

    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        shown = " ".join(runner.invoke(app, [name, "--help"], env={"COLUMNS": "400"}).stdout.split())
        for param in cmd.params:
            for tag in re.findall(r"\[\w+\]", param.help or ""):
                assert tag in shown, (name, param.name, tag)


def test_a_hydra_style_override_gets_a_hint_to_use_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run("train", str(TINY), "train.steps=5", "model.n_layer=1")
    assert out.exit_code == 2 and not any(tmp_path.iterdir())
    line = out.stderr.strip()
    assert "\n" not in line and "unexpected extra argument" in line
    assert "use --set: --set train.steps=5 --set model.n_layer=1" in line, line


def test_bash_completion_completes_commands_and_options():
    env = {"_LLMCLI_COMPLETE": "complete_bash", "COMP_WORDS": "llmcli generate --to", "COMP_CWORD": "2"}
    out = runner.invoke(app, [], env=env, prog_name="llmcli")
    assert out.stdout.split() == ["--top-k", "--top-p"], out.output


def test_an_interrupted_loo_table_names_the_command_that_continues_it():
    from llmcli.commands import loo_again

    again = loo_again("my cfg.yaml", ["train.steps=5", "name=a b"], ["erm", "irm"], Path("/tmp/loo x"))
    assert again == ("llmcli train 'my cfg.yaml' --set train.steps=5 --set 'name=a b' --loo --methods erm,irm "
                     "--loo-dir '/tmp/loo x'")
