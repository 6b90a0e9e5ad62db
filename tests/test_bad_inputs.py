"""Hostile input, end to end through the command line: every case exits 2 with ONE line on stderr that
names the file (or option) and the field (or line), prints no traceback and writes nothing."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from llmcli.cli import app
from tests.conftest import TINY

runner = CliRunner()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def assert_rejected(tmp_path: Path, args: list[str], *fragments: str) -> None:
    """Run the CLI in tmp_path; exit 2, one stderr line holding every fragment, no traceback, nothing written."""
    before = snapshot(tmp_path)
    result = runner.invoke(app, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1, lines
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a clean exit, not a crash
    # paths are checked as given; other words must appear outside them (the tmp folder is named after the test)
    bare = lines[0].replace(str(tmp_path), "<tmp>")
    for fragment in fragments:
        assert fragment in (lines[0] if fragment.startswith(str(tmp_path)) else bare), (fragment, lines[0])
    assert snapshot(tmp_path) == before, "something was written"


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Every case runs in its own empty folder (so a stray runs/ or data/ would show)."""
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------- configs

CONFIGS = {
    "unknown key": ("model: {name: gpt, n_layr: 2}\n", ["model.n_layr", "unknown key", "n_layer"]),
    "unknown section": ("modle: {n_layer: 2}\n", ["modle", "unknown key"]),
    "wrong type int": ("train: {steps: ten}\n", ["train.steps", "integer", "'ten'"]),
    "wrong type bool": ("model: {bias: maybe}\n", ["model.bias", "boolean"]),
    "out of range alpha": ("objective: {name: weighted, alpha: 1.5}\n", ["objective.alpha", "1.5"]),
    "out of range zero": ("train: {batch_size: 0}\n", ["train.batch_size", "greater than or equal to 1"]),
    "infinite lr": ("optim: {lr: .inf}\n", ["optim.lr", "finite"]),
    "nan lr": ("optim: {lr: .nan}\n", ["optim.lr", "finite"]),
    "unknown model": ("model: {name: transformerXL}\n", ["model.name", "unknown model 'transformerXL'", "gpt"]),
    "unknown optimizer": ("optim: {name: lion}\n", ["optim.name", "adamw, sgd"]),
    "unknown schedule": ("schedule: {name: step}\n", ["schedule.name", "cosine"]),
    "empty file": ("", ["empty"]),
    "only comments": ("# nothing here\n", ["empty"]),
    "yaml syntax error": ("model: {name: gpt\n", ["YAML syntax error", "line 2"]),
    "tab indentation": ("train:\n\tsteps: 3\n", ["YAML syntax error", "line 2"]),
    "duplicate key": ("train: {steps: 1}\ntrain: {steps: 2}\n", ["duplicate key 'train'", "line 2"]),
    "list at top level": ("- model\n- train\n", ["top level must be a mapping", "list"]),
    "list where a mapping belongs": ("train: [1, 2]\n", ["train", "dictionary"]),
    "scalar where a mapping belongs": ("model: gpt\n", ["model"]),
    "heads do not divide width": ("model: {n_head: 3, d_model: 32}\n", ["model", "n_head 3"]),
    "record longer than the model": ("model: {block_size: 16}\ndata: {max_len: 32}\n", ["model.block_size", "data.max_len"]),
    "nesterov without momentum": ("optim: {name: sgd, nesterov: true, momentum: 0}\n", ["optim", "nesterov"]),
    "bad run name": ("name: my run/1\n", ["name", "pattern"]),
    "splits leave nothing to train on": ("data: {split: {val: 0.6, test: 0.5}}\n", ["data.split", "below 1"]),
    "component name not a string": ("model: {name: {a: 1}}\n", ["model.name", "unknown model {'a': 1}"]),
    "odd key in the message stays one line": ('"a\\nb": 1\n', ["'a\\nb': unknown key"]),
    "negative seed": ("seed: -1\n", ["seed", "greater than or equal to 0"]),
    "seed beyond 64 bits": ("seed: 18446744073709551616\n", ["seed", "less than or equal to 9223372036854775807"]),
    "negative split seed": ("data: {split: {seed: -7}}\n", ["data.split.seed", "greater than or equal to 0"]),
    "absurd step count": ("train: {steps: 1000000000000}\n", ["train.steps", "less than or equal to 100000000"]),
    "absurd batch size": ("train: {batch_size: 100000000}\n", ["train.batch_size", "less than or equal to 65536"]),
    "absurd width": ("model: {d_model: 10000000}\n", ["model.d_model", "less than or equal to 16384"]),
    "absurd thread count": ("train: {threads: 1000000}\n", ["train.threads", "less than or equal to 4096"]),
    "adam beta of one": ("optim: {betas: [0.9, 1.0]}\n", ["optim.betas.1", "less than 1"]),
    "absurd generate temperature": ("generate: {temperature: 1e9}\n", ["generate.temperature", "less than or equal"]),
    "bible book out of range": ("data: {source: {name: bible, books: [67]}}\n", ["data.source.books.0", "66"]),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_bad_config(tmp_path, case):
    text, fragments = CONFIGS[case]
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    assert_rejected(tmp_path, ["train", str(cfg), "--no-progress"], str(cfg), *fragments)


def test_config_that_is_not_utf8(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_bytes(b"name: \xff\xfe\n")
    assert_rejected(tmp_path, ["validate", str(cfg)], str(cfg), "not UTF-8", "byte 6")


def test_config_file_missing(tmp_path):
    assert_rejected(tmp_path, ["preprocess", str(tmp_path / "nope.yaml")], "nope.yaml", "not found")


SETS = {
    "no equals sign": ("train.steps", ["--set 'train.steps'", "KEY=VALUE"]),
    "empty path part": ("train..steps=3", ["--set", "dotted key"]),
    "empty key": ("=3", ["--set", "KEY=VALUE"]),
    "path through a value": ("train.steps.x=1", ["--set", "train.steps is an integer (20), not a section"]),
    "component swapped by name": ("model.name=lstm", ["model.n_head: unknown key", "--set 'model={name: lstm}'"]),
    "negative seed": ("seed=-1", ["seed", "greater than or equal to 0"]),
    "unknown key": ("train.stepz=3", ["train.stepz", "unknown key", "(with --set)"]),
    "unknown section": ("trian.steps=3", ["trian", "unknown key"]),
    "bad yaml value": ("train.steps=[1", ["--set", "not valid YAML"]),
    "wrong value type": ("train.steps=abc", ["train.steps", "'abc'"]),
    "value out of range": ("objective.alpha=2", ["objective.alpha", "less than or equal to 1"]),
    "unknown component": ("model.name=rnn9", ["model.name", "unknown model 'rnn9'"]),
    "malformed freeze range": ("train.freeze=[blocks:3]", ["train.freeze.0", "not a layer range", "blocks:A-B"]),
    "lora rank zero": ("train.lora={r: 0}", ["train.lora.r", "greater than or equal to 1"]),
    "lora with init_from": ("train={lora: {r: 4}, init_from: runs/x}", ["train", "lora and init_from exclude each other"]),
}


@pytest.mark.parametrize("case", list(SETS))
def test_bad_set(tmp_path, case):
    override, fragments = SETS[case]
    assert_rejected(tmp_path, ["train", str(TINY), "--set", override, "--no-progress"], *fragments)


# ---------------------------------------------------------------- data files


def jsonl_config(tmp_path: Path, data: bytes | None, **extra: str) -> Path:
    path = tmp_path / "data.jsonl"
    if data is not None:
        path.write_bytes(data)
    cfg = tmp_path / "exp.yaml"
    source = {"name": "jsonl", "path": str(path)}
    cfg.write_text(json.dumps({"data": {"source": source, "processed_dir": str(tmp_path / "processed"), **extra}}))
    return cfg


GOOD = b'{"text": "a fine record", "label": "x"}\n'
DATA = {
    "invalid json on line 3": (GOOD * 2 + b'{"text": "oops",\n', [":3:", "invalid JSON"]),
    "missing text": (GOOD + b'{"label": "x"}\n', [":2:", "'text'"]),
    "text not a string": (GOOD + b'{"text": 7}\n', [":2:", "'text'"]),
    "not an object": (GOOD + b'["a", "b"]\n', [":2:", "object"]),
    "wrong label type": (GOOD + b'{"text": "t", "label": [1]}\n', [":2:", "'label'", "list"]),
    "float label": (GOOD + b'{"text": "t", "label": 1.5}\n', [":2:", "'label'", "float"]),
    "labels mix strings and integers": (GOOD + b'{"text": "t", "label": 3}\n',
                                        [":2:", "labels must be all strings or all integers"]),
    "negative class id": (b'{"text": "t", "label": 1}\n{"text": "u", "label": -5}\n', [":2:", "class id", "-5"]),
    "huge class id": (b'{"text": "t", "label": 10000000000}\n', [":1:", "class id"]),
    "empty file": (b"", ["no records", "empty"]),
    "only blank lines": (b"\n\n  \n", ["no records"]),
    "invalid utf-8 on line 2": (GOOD + b'{"text": "caf\xe9"}\n', [":2:", "invalid UTF-8"]),
}


@pytest.mark.parametrize("case", list(DATA))
def test_bad_data_file(tmp_path, case):
    data, fragments = DATA[case]
    cfg = jsonl_config(tmp_path, data)
    assert_rejected(tmp_path, ["preprocess", str(cfg)], str(tmp_path / "data.jsonl"), *fragments)


def test_data_file_missing(tmp_path):
    cfg = jsonl_config(tmp_path, None)
    assert_rejected(tmp_path, ["preprocess", str(cfg)], str(cfg), "data.source.path", "not found")


def test_train_domain_not_in_the_data(tmp_path):
    cfg = jsonl_config(tmp_path, GOOD * 3, train_domains=["nope"])
    assert_rejected(tmp_path, ["train", str(cfg), "--no-progress"], str(cfg), "data.train_domains", "'nope'")


# ---------------------------------------------------------------- run folders


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A private copy of a finished tiny run."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _pickle(p: Path) -> None:
    import torch

    torch.save({"weights": torch.zeros(3)}, p)


def _other_shape(run: Path) -> None:
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text().replace("d_model: 32", "d_model: 48"))


RUNS: dict[str, tuple[Callable[[Path], None], list[str], list[str]]] = {
    "missing config": (lambda r: (r / "config.yaml").unlink(), ["eval"], ["no config.yaml"]),
    "invalid saved config": (lambda r: (r / "config.yaml").write_text("train: {steps: -1}\n"), ["eval"],
                             ["config.yaml", "train.steps"]),
    "missing checkpoints": (lambda r: shutil.rmtree(r / "checkpoints"), ["eval"], ["no last checkpoint"]),
    "truncated checkpoint": (lambda r: _truncate(r / "checkpoints" / "best.safetensors"), ["eval"],
                             ["best.safetensors", "corrupt or truncated"]),
    "checkpoint of another model shape": (_other_shape, ["eval"], ["best.safetensors", "has shape", "(512, 48)"]),
    "pickle file as checkpoint": (lambda r: _pickle(r / "checkpoints" / "best.safetensors"), ["generate"],
                                  ["best.safetensors", "pickle / torch.save file"]),
    "missing sidecar": (lambda r: (r / "checkpoints" / "best.json").unlink(), ["generate"],
                        ["best.json", "sidecar not found"]),
    "sidecar not json": (lambda r: (r / "checkpoints" / "last.json").write_text("{"), ["train", "--resume"],
                         ["last.json", "not valid JSON"]),
    "resume with no last checkpoint": (lambda r: (r / "checkpoints" / "last.safetensors").unlink(),
                                       ["train", "--resume"], ["nothing to resume"]),
    "resume from a truncated checkpoint": (lambda r: _truncate(r / "checkpoints" / "last.safetensors"),
                                           ["train", "--resume"], ["last.safetensors", "corrupt or truncated"]),
    "resume from another model shape": (_other_shape, ["train", "--resume"], ["last.safetensors", "has shape"]),
    "resume a completed run": (lambda r: None, ["train", "--resume"], ["already completed all 20 steps"]),
    "missing tokenizer": (lambda r: (r / "tokenizer.json").unlink(), ["generate"], ["no tokenizer.json"]),
    "data manifest not json": (lambda r: (r / "data_manifest.json").write_text("{"), ["eval"],
                               ["data_manifest.json", "not valid JSON"]),
    "data manifest without vocab_size": (lambda r: (r / "data_manifest.json").write_text("{}"), ["eval"],
                                         ["data_manifest.json", "lacks 'vocab_size'"]),
    "garbage tokenizer": (lambda r: (r / "tokenizer.json").write_text("garbage"), ["generate"],
                          ["tokenizer.json", "not a readable tokenizer"]),
    "meta.json not an object": (lambda r: (r / "meta.json").write_text("[]"), ["reproduce"],
                                ["meta.json", "must be a JSON object, got list"]),
    "not a sweep folder": (lambda r: None, ["sweep-alpha", "--resume"], ["sweep.json", "not found"]),
    "sweep state without config": (lambda r: (r / "sweep.json").write_text('{"alphas": [0.5]}'),
                                   ["sweep-alpha", "--resume"], ["sweep.json", "lacks 'config'"]),
    "damaged metrics line": (lambda r: (r / "metrics.jsonl").write_text('{"step": 5}\n{oops\n{"step": 10}\n'),
                             ["reproduce"], ["metrics.jsonl:2", "invalid JSON"]),
}


@pytest.mark.parametrize("case", list(RUNS))
def test_bad_run_folder(tmp_path, run, case):
    damage, command, fragments = RUNS[case]
    damage(run)
    if command == ["train", "--resume"] and case != "resume a completed run":
        meta = json.loads((run / "meta.json").read_text())
        (run / "meta.json").write_text(json.dumps({**meta, "status": "stopped"}))
    assert_rejected(tmp_path, [*command, str(run)], str(run), *fragments)


# ---------------------------------------------------------------- LoRA and layer ranges (llmcli/models/lora.py, transfer.py)


def _train_args(processed_dir: Path, runs: Path, *sets: str) -> list[str]:
    """`llmcli train` on the tiny config with its data already processed (outside tmp_path), runs under `runs`."""
    args = ["train", str(TINY), "--runs-dir", str(runs), "--no-progress", "--set", f"data.processed_dir={processed_dir}"]
    return args + [a for s in sets for a in ("--set", s)]


def assert_refused_at_setup(tmp_path: Path, args: list[str], *fragments: str) -> None:
    """A train refused once its model is built: exit 2, one error line (after preprocess's own progress line),
    no traceback, no run folder."""
    result = runner.invoke(app, args)
    errors = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.exit_code, result.output)
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert all(f in errors[0] for f in fragments), (fragments, errors[0])
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), "a run folder was created"


def test_lora_on_a_from_scratch_model_is_one_line_before_any_run_folder(tmp_path, tiny_run, processed_dir):
    assert_refused_at_setup(tmp_path, _train_args(processed_dir, tmp_path / "runs", "train.lora={r: 4}"),
                            "train.lora", "pretrained backbone", "trained from scratch")


def test_a_freeze_range_beyond_the_blocks_is_one_line(tmp_path, tiny_run, processed_dir):
    assert_refused_at_setup(tmp_path, _train_args(processed_dir, tmp_path / "runs", "train.freeze=[blocks:0-3]"),
                            "train.freeze", "'blocks:0-3' goes beyond the model's blocks: it has 1")


def test_a_lora_run_whose_base_model_changed_is_one_line(tmp_path, tiny, processed_dir):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from llmcli.training.engine import train
    from tests.hf_models import tiny_gpt2

    base = tiny_gpt2(tmp_path / "base")
    run = train(tiny(f"model={{name: hf_causal, path: '{base}'}}", "data.tokenizer={name: pretrained}",
                     "train.lora={r: 2}", "train.steps=2", "train.eval_every=2"),
                runs_dir=tmp_path / "runs", progress=False, log=lambda m: None)
    shutil.rmtree(base)
    tiny_gpt2(base, seed=1)  # the same architecture and tokenizer, other weights
    for command in (["eval"], ["generate", "--prompt", "In"]):
        assert_rejected(tmp_path, [*command, str(run)], str(run), "changed since this LoRA run was trained", "sha256")


def test_run_folder_missing(tmp_path):
    assert_rejected(tmp_path, ["eval", str(tmp_path / "nope")], "nope", "run folder not found")


# ---------------------------------------------------------------- command-line arguments

ARGS = {
    "alpha out of [0, 1]": (["sweep-alpha", str(TINY), "--alphas", "0,2"], ["--alphas", "[0, 1]"]),
    "alpha not a number": (["sweep-alpha", str(TINY), "--alphas", "0,a"], ["--alphas", "not a number"]),
    "empty alpha list": (["sweep-alpha", str(TINY), "--alphas", ""], ["--alphas", "comma-separated"]),
    "alpha list with a hole": (["sweep-alpha", str(TINY), "--alphas", "0,,1"], ["--alphas", "comma-separated"]),
    "repeated alpha": (["sweep-alpha", str(TINY), "--alphas", "0.5,0.5"], ["--alphas", "repeats"]),
    "unknown split": (["eval", "{run}", "--split", "dev"], ["--split", "'dev'"]),
    "unknown checkpoint": (["eval", "{run}", "--checkpoint", "middle"], ["--checkpoint", "'middle'"]),
    "unknown baseline": (["eval", "{run}", "--baseline", "bow"], ["--baseline", "'bow'", "(allowed: tfidf)"]),
    "baseline with --text": (["eval", "{run}", "--baseline", "tfidf", "--text", "In the beginning"],
                             ["--baseline", "--text / --file"]),
    "negative token count": (["generate", "{run}", "-n", "-3"], ["--max-new-tokens", "[1, 1000000]"]),
    "non-integer token count": (["generate", "{run}", "-n", "ten"], ["--max-new-tokens", "integer"]),
    "top-k zero": (["generate", "{run}", "--top-k", "0"], ["--top-k", "[1, 1000000]"]),
    "top-k negative": (["generate", "{run}", "--top-k", "-1"], ["--top-k", "got -1"]),
    "temperature nan": (["generate", "{run}", "-t", "nan"], ["--temperature", "got nan"]),
    "temperature inf": (["generate", "{run}", "-t", "inf"], ["--temperature", "got inf"]),
    "seed beyond 64 bits": (["generate", "{run}", "--seed", str(2**64)], ["--seed", "[0, 9223372036854775807]"]),
    "negative seed": (["generate", "{run}", "--seed", "-2"], ["--seed", "got -2"]),
    "too many samples": (["generate", "{run}", "--num-samples", "10000000"], ["--num-samples", "[1, 65536]"]),
    "show-probs zero": (["generate", "{run}", "--show-probs", "0"], ["--show-probs", "got 0"]),
    "unknown generate checkpoint": (["generate", "{run}", "--checkpoint", "middle"], ["--checkpoint", "'middle'"]),
    "nan atol": (["reproduce", "{run}", "--atol", "nan"], ["--atol", "finite"]),
    "hydra-style override": (["train", str(TINY), "train.steps=5"], ["unexpected extra argument", "--set train.steps=5"]),
    "a folder as the config": (["validate", "{run}"], ["is a directory, not a config file"]),
    "top-p zero": (["generate", "{run}", "--top-p", "0"], ["--top-p", "(0, 1]"]),
    "top-p above one": (["generate", "{run}", "--top-p", "1.5"], ["--top-p", "(0, 1]"]),
    "negative temperature": (["generate", "{run}", "--temperature", "-1"], ["--temperature", "[0, 100]"]),
    "negative reproduce steps": (["reproduce", "{run}", "--steps", "-1"], ["--steps", "-1"]),
    "negative atol": (["reproduce", "{run}", "--atol", "-0.1"], ["--atol", ">= 0"]),
    "resume with a config": (["train", str(TINY), "--resume", "{run}"], ["--resume", "drop CONFIG"]),
    "no config": (["train"], ["give a CONFIG"]),
    "resume with --loo": (["train", "--resume", "{run}", "--loo"], ["train: --resume", "drop CONFIG, --set"]),
    "loo options without --loo": (["train", str(TINY), "--loo-dir", "{run}"], ["--methods and --loo-dir go with --loo"]),
    "loo with held-out domains": (["train", str(TINY), "--loo", "--test-domains", "kjv"],
                                  ["--loo holds out each domain in turn", "drop --test-domains"]),
    "sweep without config": (["sweep-alpha"], ["sweep-alpha: give a CONFIG, or --resume SWEEP_DIR"]),
    "sweep resume with a grid": (["sweep-alpha", "--resume", "{run}", "--seeds", "1"],
                                 ["--resume finishes a sweep with its own grid and config"]),
    "a bad grid before the resume conflict": (["sweep-alpha", "--resume", "{run}", "--alphas", "x"],
                                              ["--alphas: 'x'", "not a number"]),
    "unknown option": (["train", str(TINY), "--stepz", "3"], ["No such option: --stepz"]),
}


@pytest.mark.parametrize("case", list(ARGS))
def test_bad_argument(tmp_path, run, case):
    args, fragments = ARGS[case]
    assert_rejected(tmp_path, [a.replace("{run}", str(run)) for a in args], *fragments)



# ---------------------------------------------------------------- property: any jsonl content

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                           lambda kids: st.lists(kids, max_size=2) | st.dictionaries(st.text(max_size=5), kids, max_size=2),
                           max_leaves=6)
RECORDS = st.fixed_dictionaries({"text": st.text(max_size=10)}, optional={
    "label": st.integers(-3, 3) | st.sampled_from(["a", "b"]) | st.integers() | JSON_VALUES,
    "domain": st.sampled_from(["x", "y"]) | JSON_VALUES, "group": JSON_VALUES}) | st.dictionaries(st.text(max_size=5),
                                                                                             JSON_VALUES, max_size=3)
LINES = st.lists(RECORDS.map(json.dumps) | st.text(max_size=12) | JSON_VALUES.map(json.dumps), max_size=5)


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(LINES, st.binary(max_size=4))
def test_any_jsonl_content_reads_or_fails_naming_the_file(tmp_path, lines, tail):
    from llmcli.config import JsonlSource
    from llmcli.data.sources import jsonl_source
    from llmcli.errors import UserError

    path = tmp_path / "data.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + tail)
    try:
        records = list(jsonl_source(JsonlSource(path=str(path))).records())
    except UserError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg.startswith(str(path)), msg
        return
    assert records and all(isinstance(r.text, str) and isinstance(r.domain, str) for r in records)
    assert all(r.label is None or (isinstance(r.label, (str, int)) and not isinstance(r.label, bool)) for r in records)


# ---------------------------------------------------------------- resources: memory running out

def _torch_oom() -> BaseException:
    import torch

    try:
        torch.empty(2**45)  # 128 TiB of float32: the CPU allocator refuses at once
    except RuntimeError as exc:
        return exc
    raise AssertionError("a 128 TiB tensor was allocated")


OOM = {
    "cpu allocator": (_torch_oom, ["model.d_model=16384", "out of memory", "128.0 TiB", "make it smaller"]),
    "cuda out of memory": (lambda: RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 8 GiB)"),
                           ["out of memory", "20.00 GiB"]),
    "torch OutOfMemoryError": (lambda: __import__("torch").OutOfMemoryError("CUDA error: out of memory"),
                               ["out of memory"]),
    "python MemoryError": (MemoryError, ["model.d_model=16384", "out of memory"]),
}


@pytest.mark.parametrize("case", list(OOM))
def test_out_of_memory_becomes_one_line_naming_the_field(case):
    from llmcli.errors import UserError, too_big

    make, fragments = OOM[case]
    with pytest.raises(UserError) as caught:
        with too_big("model.d_model=16384"):
            raise make()
    msg = str(caught.value)
    assert "\n" not in msg and msg.startswith("model.d_model=16384: "), msg
    assert all(f in msg for f in fragments), msg


def test_too_big_lets_other_errors_through():
    from llmcli.errors import is_out_of_memory, too_big

    with pytest.raises(RuntimeError, match="shape mismatch"):
        with too_big("model"):
            raise RuntimeError("shape mismatch")
    assert not is_out_of_memory(ValueError("out of memory"))  # only memory errors, whatever the text
