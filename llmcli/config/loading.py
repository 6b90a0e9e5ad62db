"""Reading a config: YAML (duplicate keys refused), `--set` overrides, defaults for unnamed components, validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llmcli.config.assemble import COMPONENT_FIELDS, experiment_model
from llmcli.config.messages import format_error, swap_hint
from llmcli.config.schema import PRETRAINED_MODELS
from llmcli.errors import UserError


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_KINDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "a boolean", "list": "a list",
          "NoneType": "null", "dict": "a mapping"}


def kind_of(value: Any) -> str:
    """What a YAML value is, in words: 'an integer', 'a list', 'null'."""
    name = type(value).__name__
    return _KINDS.get(name, f"a value of type {name}")


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, bad syntax or a non-mapping is a UserError."""
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a config file (give the YAML file itself)")
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}: {where}YAML syntax error: {problem}") from None
    if data is None:
        raise UserError(f"{path}: the file is empty; expected a mapping of sections (data, model, train, ...)")
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections, got {kind_of(data)}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.split(".")):
            raise UserError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=3e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: the value {raw!r} is not valid YAML") from None
        node = data
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                where = ".".join(parts[: i + 1])
                raise UserError(f"--set {item!r}: {where} is {kind_of(nxt)} ({nxt!r}), not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def _fill_default_names(data: dict[str, Any]) -> None:
    """A component section without `name` means the default component (so `--set optim.lr=...` works)."""
    model = experiment_model()
    for dotted in COMPONENT_FIELDS:
        parent, key = data, dotted.split(".")
        for part in key[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        section = parent.get(key[-1]) if isinstance(parent, dict) else None
        if isinstance(section, dict) and "name" not in section:
            owner = model if len(key) == 1 else model.model_fields[key[0]].annotation
            section["name"] = owner.model_fields[key[-1]].default_factory().name


def _name_pretrained_tokenizer(data: dict[str, Any]) -> None:
    """A `data.tokenizer` section without `name` beside a pretrained model is the model's own tokenizer."""
    model, section = data.get("model"), data.get("data")
    section = section.get("tokenizer") if isinstance(section, dict) else None
    if isinstance(model, dict) and model.get("name") in PRETRAINED_MODELS and isinstance(section, dict):
        section.setdefault("name", "pretrained")


def validate_config(data: dict[str, Any], source: str = "<config>") -> BaseModel:
    """Validate a config dict; a bad one is a UserError with one readable line."""
    _name_pretrained_tokenizer(data)
    _fill_default_names(data)
    try:
        return experiment_model().model_validate(data)
    except ValidationError as err:
        raise UserError(format_error(source, data, err)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> BaseModel:
    """Read, override and validate an experiment config."""
    path = Path(path)
    data = apply_overrides(read_yaml(path), overrides or [])
    try:
        return validate_config(data, str(path) + (" (with --set)" if overrides else ""))
    except UserError as exc:
        raise UserError(swap_hint(str(exc), overrides or [])) from None


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (every default filled in)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
