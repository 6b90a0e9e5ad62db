"""Config loading, validation messages and --set overrides."""

from __future__ import annotations

import ast
import types
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmcli.config import apply_overrides, dump_config, load_config, validate_config
from llmcli.errors import UserError
from tests.conftest import ROOT, TINY


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_fill_every_section():
    cfg = validate_config({})
    assert cfg.model.name == "gpt" and cfg.objective.alpha == 0.5 and cfg.optim.name == "adamw"
    assert cfg.data.source.versions == ["kjv", "web", "bbe", "ylt", "wyc"]


def test_resolved_config_round_trips():
    cfg = load_config(TINY)
    again = validate_config(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_typo_key_names_file_field_and_allowed_keys(tmp_path):
    p = write(tmp_path, "model: {name: gpt, n_layr: 2}\n")
    with pytest.raises(UserError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(str(p)) and "model.n_layr" in msg and "n_layer" in msg and "\n" not in msg


def test_wrong_type_names_field_and_value(tmp_path):
    with pytest.raises(UserError, match=r"train\.steps: .*integer.*'many'"):
        load_config(write(tmp_path, "train: {steps: many}\n"))


def test_alpha_out_of_range_is_rejected(tmp_path):
    with pytest.raises(UserError, match=r"objective\.alpha: .*less than or equal to 1.*1\.5"):
        load_config(write(tmp_path, "objective: {name: weighted, alpha: 1.5}\n"))


def test_unknown_component_lists_valid_names():
    with pytest.raises(UserError, match=r"optim\.name: unknown optimizer 'lion' \(valid: adam, adamw, sgd\)"):
        validate_config({"optim": {"name": "lion"}})


def test_component_fields_are_checked_against_the_chosen_component():
    # momentum belongs to sgd, not adamw
    with pytest.raises(UserError, match=r"optim\.momentum: unknown key"):
        validate_config({"optim": {"name": "adamw", "momentum": 0.9}})
    assert validate_config({"optim": {"name": "sgd", "momentum": 0.8}}).optim.momentum == 0.8


def test_set_overrides_nested_values_and_parse_yaml_scalars():
    cfg = load_config(TINY, ["train.steps=7", "optim.lr=3e-4", "model.bias=true", "sweep.alphas=[0, 0.5]"])
    assert cfg.train.steps == 7 and cfg.optim.lr == pytest.approx(3e-4) and cfg.model.bias is True
    assert cfg.sweep.alphas == [0.0, 0.5]


def test_set_on_a_section_without_name_keeps_the_default_component():
    assert validate_config(apply_overrides({}, ["optim.lr=0.01"])).optim.name == "adamw"


@pytest.mark.parametrize("bad", ["train.steps", "=3", "a..b=1", "train.steps.x=1"])
def test_malformed_set_is_a_user_error(bad):
    with pytest.raises(UserError, match="--set"):
        load_config(TINY, [bad])


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("", "empty"), ("- a\n- b\n", "mapping"), ("model: {name: gpt\n", "YAML syntax error")],
)
def test_unreadable_config_files(tmp_path, text, fragment):
    with pytest.raises(UserError, match=fragment):
        load_config(write(tmp_path, text))


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["steps", "batch_size", "eval_every", "bogus"]),
                       st.one_of(st.integers(-5, 5), st.text(max_size=3), st.none()), max_size=3))
def test_validation_either_succeeds_or_raises_one_line_user_error(train_section):
    try:
        validate_config({"train": train_section})
    except UserError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("<config>: train")


@settings(deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["train.steps", "model.d_model", "seed"]), st.integers(1, 64)), max_size=4))
def test_last_override_wins(pairs):
    data = apply_overrides({}, [f"{k}={v}" for k, v in pairs])
    for key in {k for k, _ in pairs}:
        last = [v for k, v in pairs if k == key][-1]
        node = data
        for part in key.split("."):
            node = node[part]
        assert node == last


# ---------------------------------------------------------------- property-based: hostile configs and --set

KEYS = st.sampled_from(["data", "model", "train", "optim", "objective", "schedule", "source", "tokenizer", "name",
                        "steps", "alpha", "lr", "n_layer", "versions", "split", "max_len", "gpt", "weighted",
                        "sgd", "bible", "jsonl"]) | st.text(max_size=6)
SCALARS = (st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=8)
           | st.sampled_from(["gpt", "sgd", "adamw", "bible", "jsonl", "cosine", "weighted", "kjv"]))
VALUES = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(KEYS, kids, max_size=3),
                      max_leaves=10)
HYPO = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])


def loads_or_one_line_error(path: Path, overrides: list[str] | None = None) -> None:
    """The property: a config either loads, or fails with one UserError line that starts with its file."""
    try:
        load_config(path, overrides)
    except UserError as exc:
        msg = str(exc)
        assert "\n" not in msg, msg
        assert msg.startswith(str(path)) or msg.startswith("--set"), msg


@HYPO
@given(st.dictionaries(KEYS, VALUES, max_size=5))
def test_any_yaml_mapping_loads_or_fails_with_one_line(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "hypo-mapping.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    loads_or_one_line_error(path)


@HYPO
@given(st.text(max_size=120) | st.binary(max_size=60))
def test_any_file_content_loads_or_fails_with_one_line(tmp_path_factory, content):
    path = tmp_path_factory.getbasetemp() / "hypo-text.yaml"
    path.write_bytes(content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content)
    loads_or_one_line_error(path)


DOTTED = st.lists(KEYS, min_size=1, max_size=4).map(".".join) | st.sampled_from(
    ["train.steps", "optim.lr", "model.n_layer", "objective.alpha", "data.source.versions", "optim.name"])
RAW_VALUES = SCALARS.map(lambda v: yaml.safe_dump(v, default_flow_style=True).removesuffix("\n...\n").strip())


@HYPO
@given(st.lists(st.builds(lambda k, v: f"{k}={v}", DOTTED, RAW_VALUES) | st.text(max_size=20), max_size=3))
def test_any_set_overrides_load_or_fail_with_one_line(overrides):
    loads_or_one_line_error(TINY, overrides)


@settings(deadline=None, max_examples=40)
@given(st.builds(lambda k, v: f"{k}={v}", DOTTED, RAW_VALUES) | st.text(max_size=20))
def test_validate_with_any_set_exits_0_or_2_with_one_line(override):
    from typer.testing import CliRunner

    from llmcli.cli import app

    result = CliRunner().invoke(app, ["validate", str(TINY), "--set", override])
    assert result.exit_code in (0, 2) and "Traceback" not in result.output
    assert isinstance(result.exception, (SystemExit, type(None))), result.exception
    if result.exit_code == 2:
        assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- every number has a range, checked at load time


def _numeric_leaves(annotation, where, meta=()):
    """(where, bounds) of every int/float inside an annotation: Optional/union members carry the field's own
    bounds, tuple and list items only their own (Annotated) ones."""
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        base, *extra = args
        flat = [x for m in extra for x in getattr(m, "metadata", [m])]  # a nested pydantic Field keeps them inside
        yield from _numeric_leaves(base, where, (*meta, *flat))
    elif annotation in (int, float):
        yield where, list(meta)
    elif origin in (typing.Union, types.UnionType):
        for arg in args:
            yield from _numeric_leaves(arg, where, meta)
    else:
        for i, arg in enumerate(args):
            yield from _numeric_leaves(arg, f"{where}[{i}]")


def _config_classes():
    from pydantic import BaseModel

    from llmcli.config import experiment_model
    from llmcli.registry import registry

    seen, todo = [], [experiment_model(), *(registry(k).entries[n].config for k in
                                            ("source", "tokenizer", "model", "task_loss", "objective", "dg",
                                             "optimizer", "schedule") for n in registry(k).names())]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for f in cls.model_fields.values():
            todo += [a for a in _walk(f.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return seen


def _walk(annotation):
    import typing

    yield annotation
    for arg in typing.get_args(annotation):
        yield from _walk(arg)


def test_every_numeric_config_field_has_a_lower_and_an_upper_bound():
    import annotated_types as at

    unbounded = []
    for cls in _config_classes():
        for name, f in cls.model_fields.items():
            for where, meta in _numeric_leaves(f.annotation, f"{cls.__name__}.{name}", f.metadata):
                low = any(isinstance(m, (at.Ge, at.Gt)) for m in meta)
                high = any(isinstance(m, (at.Le, at.Lt)) for m in meta)
                if not (low and high):
                    unbounded.append(where)
    assert not unbounded, unbounded


@pytest.mark.parametrize(("override", "fragment"), [
    ("seed=-1", "seed: Input should be greater than or equal to 0"),
    ("seed=18446744073709551616", "seed: Input should be less than or equal to 9223372036854775807"),
    ("data.split.seed=-5", "data.split.seed: Input should be greater than or equal to 0"),
    ("generate.seed=9223372036854775808", "generate.seed: Input should be less than or equal to"),
    ("train.steps=1e15", "train.steps"),
    ("train.batch_size=10000000", "train.batch_size: Input should be less than or equal to 65536"),
    ("model.d_model=1000000", "model.d_model: Input should be less than or equal to 16384"),
    ("optim.betas=[1.5, 0.9]", "optim.betas.0: Input should be less than 1"),
    ("optim.lr=1e40", "optim.lr: Input should be less than or equal to"),
    ("train.threads=100000", "train.threads"),
    ("generate.temperature=1e9", "generate.temperature"),
    ("objective={name: uncertainty, init_log_var_lm: 1000}", "objective.init_log_var_lm"),
    ("data.source.books=[0, 3]", "data.source.books.0: Input should be greater than or equal to 1"),
])
def test_absurd_numbers_fail_at_load_time(override, fragment):
    with pytest.raises(UserError) as e:
        load_config(TINY, [override])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_the_largest_seed_is_accepted_and_seeds_numpy_and_torch():
    import numpy as np
    import torch

    from llmcli.config import SEED_MAX

    assert load_config(TINY, [f"seed={SEED_MAX}"]).seed == SEED_MAX
    torch.Generator().manual_seed(SEED_MAX)  # what generate and train do with it
    np.random.default_rng([SEED_MAX * 1_000_003 + 1, 0])  # the data streams' seed arithmetic


def test_a_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(UserError, match="is a directory, not a config file"):
        load_config(tmp_path)


def test_set_through_a_value_names_its_kind_in_words():
    with pytest.raises(UserError, match=r"train\.steps is an integer \(20\), not a section"):
        load_config(TINY, ["train.steps.x=1"])


def test_swapping_a_component_by_name_hints_to_replace_the_whole_section():
    with pytest.raises(UserError) as e:
        load_config(TINY, ["model.name=lstm"])
    msg = str(e.value)
    assert "model.n_head: unknown key" in msg and "--set 'model={name: lstm}'" in msg, msg
    assert load_config(TINY, ["model={name: lstm}"]).model.name == "lstm"  # what the hint says works


# ---------------------------------------------------------------- unknown keys: the allowed keys of the right section


@pytest.mark.parametrize(("data", "expected"), [
    ({"trian": {}}, "trian: unknown key (allowed here: name, seed, data, model, task_loss, objective, dg, optim, "
                    "schedule, train, eval, generate, sweep)"),
    ({"data": {"split": {"vall": 0.1}}}, "data.split.vall: unknown key (allowed here: val, test, seed, field, "
                                         "holdout_domains, duplicates)"),
    ({"data": {"tokenizer": {"name": "char", "merges": 3}}},  # a component under data: the chosen one's keys
     "data.tokenizer.merges: unknown key (allowed here: name, vocab_size, min_frequency)"),
    ({"model": {"name": "lstm", "n_head": 2}}, "model.n_head: unknown key (allowed here: n_layer, d_model, dropout, "
                                               "block_size, name)"),
    ({"optim": {"momentum": 0.9}}, "optim.momentum: unknown key (allowed here: name, lr, betas, eps, weight_decay)"),
    ({"data": {"sources": [{"name": "jsonl", "path": "a"}, {"name": "text", "glob": "*", "paht": 1}]}},
     "data.sources.1.paht: unknown key (allowed here: name, glob, unit, domain, domain_from, group_by, label)"),
    ({"data": {"augment": [{"name": "token_dropout", "q": 1}]}},  # an item of a list of unions: no one class to list
     "data.augment.0.q: unknown key (allowed here: see `llmcli schema`)"),
    ({"eval": {"checkpoint": "best", "foo": {"bar": 1}}},
     "eval.foo: unknown key (allowed here: batch_size, checkpoint, max_examples, base_head_steps, base_head_lr)"),
])
def test_an_unknown_key_lists_the_keys_of_the_section_it_sits_in(data, expected):
    with pytest.raises(UserError) as e:
        validate_config(data)
    assert str(e.value) == f"<config>: {expected}"


# ---------------------------------------------------------------- the package: one job per module, one import path


def test_every_config_model_and_bound_is_importable_from_llmcli_config():
    import llmcli.config
    from llmcli.config import assemble, loading, messages, schema

    tree = ast.parse(Path(schema.__file__).read_text(encoding="utf-8"))
    defined = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
               for t in (node.targets if isinstance(node, ast.Assign) else [node.target])}  # bounds, Seed, Augment
    defined |= {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    public = {n for n in defined if not n.startswith("_")}
    missing = sorted(public - set(llmcli.config.__all__))
    assert not missing, f"add to llmcli/config/__init__.py: {missing}"
    for module in (schema, assemble, messages, loading):
        for name in set(llmcli.config.__all__) & set(vars(module)):
            assert getattr(llmcli.config, name) is getattr(module, name), name  # one object, whichever path
    assert llmcli.config.experiment_model is assemble.experiment_model  # so cache_clear() reaches the cache in use


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    if path.name in {"minilm.yaml", "smollm2.yaml"}:  # the pretrained scenarios: the model's own tokenizer, LoRA
        assert cfg.data.tokenizer.name == "pretrained" and cfg.data.tokenizer.path == cfg.model.path
        assert (cfg.train.lora is not None) == (path.name == "smollm2.yaml")
