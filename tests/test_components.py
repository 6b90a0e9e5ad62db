"""Every registered component trains on the tiny config, and a third-party one does through `llmcli.plugins`.

The names come from the registries at collection time; each needs a line in OVERRIDES (the `--set`s that
pick it on the tiny config), so a new component without one fails here. `$fixture` in a `--set` is replaced
by that fixture's value (a data file, a model folder). Identical resolved configs train once: the tiny
config's own components (gpt, weighted, erm, ...) share one run.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from llmcli.config import load_config
from llmcli.registry import REGISTRIES, registry
from tests.conftest import TINY

QUIET = {"progress": False, "log": lambda m: None}
FEW_STEPS = ("train.steps=3", "train.log_every=1", "train.eval_every=1000", "train.val_max_examples=8")


class Case(NamedTuple):
    """How to train one component on the tiny config."""

    sets: tuple[str, ...] = ()
    needs: str | None = None  # a module it cannot train without: skipped, with the reason, when absent
    logs: tuple[str, ...] = ()  # keys its own code adds to every train record


def case(*sets: str, needs: str | None = None, logs: tuple[str, ...] = ()) -> Case:
    """A Case from its `--set`s."""
    return Case(sets, needs, logs)


TWO = ("data.train_domains=[kjv,web]", "train.sampler=balanced")  # what the DG methods need (as in test_dg)
JSONL = ("data.source={name: jsonl, path: '$corpus/records.jsonl'}", "data.train_domains=[a]")

OVERRIDES: dict[str, dict[str, Case]] = {
    "source": {
        "bible": case(),  # the tiny config's own
        "jsonl": case(*JSONL),
        "csv": case("data.source={name: csv, path: '$corpus/records.csv'}", "data.train_domains=[a]"),
        "parquet": case("data.source={name: parquet, path: '$corpus/records.parquet'}", "data.train_domains=[a]"),
        "text": case("data.source={name: bible}",  # back to the default, which `sources` replaces
                     "data.sources=[{name: text, glob: '$corpus/text/x/*.txt', label: x},"
                     " {name: text, glob: '$corpus/text/y/*.txt', label: y}]", "data.train_domains=[a]"),
    },
    "tokenizer": {
        "bpe": case(),
        "char": case(*JSONL, "data.tokenizer={name: char}"),  # a small corpus: the bible preprocess costs seconds
        "byte": case(*JSONL, "data.tokenizer={name: byte}"),
        # the model's own tokenizer (tiny.yaml names bpe, which a pretrained model refuses); as the hf_causal line
        "pretrained": case("model={name: hf_causal, path: '$tiny_gpt2'}", "data.tokenizer={name: pretrained}",
                           needs="transformers"),
    },
    "model": {
        "gpt": case(),
        "lstm": case("model={name: lstm, n_layer: 1, d_model: 16}"),
        "gru": case("model={name: gru, n_layer: 1, d_model: 16}"),
        "rnn": case("model={name: rnn, n_layer: 1, d_model: 16}"),
        "mlp": case("model={name: mlp, context: 3, d_model: 16, hidden: 32}"),
        "hf_causal": case("model={name: hf_causal, path: '$tiny_gpt2'}", "data.tokenizer={name: pretrained}",
                          needs="transformers"),
        "hf_encoder": case("model={name: hf_encoder, path: '$tiny_bert'}", "data.tokenizer={name: pretrained}",
                           needs="transformers"),
    },
    "task_loss": {
        "cross_entropy": case(),
        "mse": case("task_loss={name: mse}"),
    },
    "objective": {
        "weighted": case(),
        "constrained": case("objective={name: constrained, beta: 0.5, log_grad_every: 1}", logs=("lambda",)),
        "pcgrad": case("objective={name: pcgrad, log_grad_every: 1}", logs=("grad_cosine",)),
        "mgda": case("objective={name: mgda, log_grad_every: 1}", logs=("grad_cosine",)),
        "uncertainty": case("objective={name: uncertainty, log_grad_every: 1}", logs=("grad_cosine",)),
        "conditioned": case("objective={name: conditioned, log_grad_every: 1}", logs=("grad_cosine",)),
    },
    "dg": {
        "erm": case(),
        "group_dro": case(*TWO, "dg.name=group_dro", logs=("dro_q_web",)),
        "irm": case(*TWO, "dg.name=irm", "dg.anneal_steps=1", logs=("irm_penalty",)),
        "coral": case(*TWO, "dg.name=coral", logs=("coral",)),
        "mldg": case(*TWO, "dg.name=mldg", logs=("dg_task_loss",)),
        "dann": case(*TWO, "dg.name=dann", logs=("domain_loss",)),
    },
    "optimizer": {
        "adamw": case(),
        "adam": case("optim={name: adam}"),
        "sgd": case("optim={name: sgd, lr: 0.05}"),
    },
    "schedule": {
        "cosine": case(),
        "linear": case("schedule={name: linear, warmup_steps: 1}"),
        "constant": case("schedule={name: constant}"),
    },
}

# Where each kind's component sits in a resolved config.
FIELD = {"source": "data.source", "tokenizer": "data.tokenizer", "model": "model", "task_loss": "task_loss",
         "objective": "objective", "dg": "dg", "optimizer": "optim", "schedule": "schedule"}

COMPONENTS = [(kind, name) for kind in sorted(REGISTRIES) for name in registry(kind).names()]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small two-domain, two-class corpus in every file format a source reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = {"x": ["lamb", "shepherd", "field", "grass"], "y": ["king", "sword", "city", "gate"]}
    style = {"a": "the {} and the {} by the {} number {}", "b": "a {} with a {} near a {} count {}"}  # two Englishes
    rows = [{"text": style[dom].format(w[i % 4], w[(i + 1) % 4], w[(i + 2) % 4], i), "label": label, "domain": dom,
             "group": f"{dom}{label}{i}"}  # every text distinct, so no duplicate is dropped from any split
            for dom in ("a", "b") for label, w in words.items() for i in range(30)]
    root = tmp_path_factory.mktemp("corpus")
    (root / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "records.csv").write_text("text,label,domain,group\n" + "".join(
        f"{r['text']},{r['label']},{r['domain']},{r['group']}\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), root / "records.parquet")
    for label in words:  # text files carry no labels: one folder (one source) per class, one file per domain
        (root / "text" / label).mkdir(parents=True)
        for dom in ("a", "b"):
            mine = [r["text"] + "\n" for r in rows if r["domain"] == dom and r["label"] == label]
            (root / "text" / label / f"{dom}.txt").write_text("".join(mine))
    return root


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 saved as a local Hugging Face model folder, with its own tokenizer (tests/hf_models.py)."""
    pytest.importorskip("transformers")
    from tests.hf_models import tiny_gpt2 as build

    return build(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random bare BERT encoder (no MLM head, as sentence encoders ship) with its own tokenizer."""
    pytest.importorskip("transformers")
    from tests.hf_models import tiny_bert as build

    return build(tmp_path_factory.mktemp("tiny-bert"), mlm_head=False)


@pytest.fixture(scope="session")
def trained(processed_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Train a config once per distinct resolved config; later calls with the same config get the same run."""
    from llmcli.training.engine import train

    runs: dict[str, Path] = {}
    runs_dir = tmp_path_factory.mktemp("component-runs")

    def get(cfg: Any) -> Path:
        key = cfg.model_dump_json()
        if key not in runs:
            runs[key] = train(cfg, runs_dir=runs_dir, **QUIET)
        return runs[key]

    return get


def _resolve(sets: tuple[str, ...], request: pytest.FixtureRequest) -> list[str]:
    """Each `$name` in a `--set` replaced by the value of the fixture of that name."""
    return [re.sub(r"\$(\w+)", lambda m: str(request.getfixturevalue(m.group(1))), s) for s in sets]


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _field(cfg: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


# ---------------------------------------------------------------- every registered component


def test_every_registered_component_has_an_override_line_and_no_line_is_stale():
    assert set(OVERRIDES) == set(REGISTRIES) == set(FIELD), "one OVERRIDES table and one FIELD per registry kind"
    missing = [f"{k}/{n}" for k, n in COMPONENTS if n not in OVERRIDES[k]]
    stale = [f"{k}/{n}" for k, names in OVERRIDES.items() for n in names if n not in registry(k).names()]
    assert not missing, f"registered but no line in tests/test_components.py OVERRIDES: {', '.join(missing)}"
    assert not stale, f"OVERRIDES lines for names no longer registered: {', '.join(stale)}"


@pytest.mark.parametrize(("kind", "name"), COMPONENTS, ids=[f"{k}-{n}" for k, n in COMPONENTS])
def test_every_registered_component_trains_on_the_tiny_config(kind, name, tiny, trained, request):
    spec = OVERRIDES[kind].get(name)
    assert spec is not None, f"{kind} {name!r} has no line in OVERRIDES (tests/test_components.py): add one"
    if spec.needs:
        pytest.importorskip(spec.needs, reason=f"{kind} {name!r} needs {spec.needs} (not installed)")
    run = trained(tiny(*_resolve(spec.sets, request), *FEW_STEPS))
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    used = resolved["data"]["sources"] or [resolved["data"]["source"]] if kind == "source" else [
        _field(resolved, FIELD[kind])]
    assert {c["name"] for c in used} == {name}  # the run really used this component
    assert json.loads((run / "meta.json").read_text())["status"] == "completed"
    recs = _records(run)
    steps = [r for r in recs if r["split"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r[k]) for r in steps for k in ("loss", "lm_loss", "task_loss", *spec.logs))
    in_domain = resolved["data"]["train_domains"]
    val = {r["domain"] for r in recs if r["split"] == "val" and math.isfinite(r.get("lm_loss", math.nan))}
    assert set(in_domain) <= val


# ---------------------------------------------------------------- a third-party component through the entry point


@pytest.fixture
def focal_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The focal loss of tests/plugin_pkg installed as an `llmcli.plugins` entry point (a dist-info on sys.path)."""
    import llmcli.config
    import llmcli.registry

    dist = tmp_path / "llmcli_focal-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: llmcli-focal\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[llmcli.plugins]\nfocal = tests.plugin_pkg.focal:register\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for reg in REGISTRIES.values():  # the plugin's entries leave with the test
        monkeypatch.setattr(reg, "entries", dict(reg.entries))
    monkeypatch.setattr(llmcli.registry, "_plugins_loaded", False)
    llmcli.config.experiment_model.cache_clear()  # the config unions are built from the registries once
    yield importlib.import_module("tests.plugin_pkg.focal")
    monkeypatch.undo()
    llmcli.config.experiment_model.cache_clear()


def test_a_plugin_task_loss_trains_through_the_config(focal_plugin, processed_dir, tmp_path, monkeypatch):
    from llmcli.training.engine import train

    seen = []
    real = focal_plugin.focal_loss

    def spy(logits, labels, gamma):
        seen.append((tuple(logits.shape), gamma))
        return real(logits, labels, gamma)

    monkeypatch.setattr(focal_plugin, "focal_loss", spy)
    assert "focal" in registry("task_loss").names()
    cfg = load_config(TINY, [f"data.processed_dir={processed_dir}", "task_loss={name: focal, gamma: 1.5}", *FEW_STEPS])
    run = train(cfg, runs_dir=tmp_path, **QUIET)
    assert json.loads((run / "meta.json").read_text())["status"] == "completed"
    assert yaml.safe_load((run / "config.yaml").read_text())["task_loss"] == {"name": "focal", "gamma": 1.5}
    # (rows, 10 genres) at gamma 1.5: three training steps of 16 rows, then validation of 8 rows in each of 3 domains
    assert seen == [((16, 10), 1.5)] * 3 + [((8, 10), 1.5)] * 3
    assert all(math.isfinite(r["task_loss"]) for r in _records(run) if r["split"] == "train")


def test_the_plugin_is_gone_after_its_test(processed_dir):
    """Runs after the plugin test (file order): neither its registry entry nor its config union may leak."""
    from llmcli.errors import UserError

    assert [(k, n) for k in sorted(REGISTRIES) for n in registry(k).names()] == COMPONENTS  # as collected
    with pytest.raises(UserError, match=r"task_loss.name: unknown task_loss 'focal'"):
        load_config(TINY, [f"data.processed_dir={processed_dir}", "task_loss={name: focal}"])


def test_focal_loss_at_gamma_zero_is_cross_entropy():
    import torch

    from tests.plugin_pkg.focal import FocalLoss, build_focal

    logits, labels = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 2, -1, 1, 1])
    focal = build_focal(FocalLoss(gamma=0.0), n_classes=3)(logits, labels)
    ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-1)
    assert focal.item() == pytest.approx(ce.item(), rel=1e-6)
    easy_down = build_focal(FocalLoss(gamma=2.0), n_classes=3)(logits, labels)
    assert 0 < easy_down.item() < focal.item()


def test_the_worked_example_in_docs_extending_is_the_plugin_that_trains_here():
    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "extending.md").read_text()
    first_python_block = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    assert first_python_block == (root / "tests" / "plugin_pkg" / "focal.py").read_text()
