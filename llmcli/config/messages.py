"""A bad config in one line: the file, the dotted field, what was given and what is allowed."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ValidationError

from llmcli.config.assemble import COMPONENT_FIELDS, experiment_model
from llmcli.registry import registry


def _key(part: Any) -> str:
    """A path component as written: plain names as they are, anything odd (spaces, newlines, '') quoted."""
    text = str(part)
    return text if re.fullmatch(r"[\w-]+", text) else repr(part)


def _is_union_tag(node: Any, part: Any) -> bool:
    """Whether a location part is a discriminated union's tag (the component's name), not a key the user wrote."""
    return isinstance(node, dict) and part not in node and node.get("name") == part


def _child(node: Any, part: Any) -> Any:
    """The user's value one step down an error location: an item of a list or a key of a mapping; None if absent."""
    if isinstance(node, list) and isinstance(part, int):  # an item of a list section (data.sources)
        return node[part] if part < len(node) else None
    return node.get(part) if isinstance(node, dict) else None


def _dotted(data: Any, loc: tuple[Any, ...]) -> str:
    """Dotted path of an error location, with discriminated-union tags dropped."""
    path: list[str] = []
    node = data
    for part in loc:
        if _is_union_tag(node, part):
            continue
        path.append(_key(part))
        node = _child(node, part)
    return ".".join(path)


def _is_model(cls: Any) -> bool:
    """Whether a field's type is a config model (not a list, a union or a plain type)."""
    return isinstance(cls, type) and issubclass(cls, BaseModel)


def _registered_class(kind: str, section: Any) -> type[BaseModel] | None:
    """The config class registered under a section's `name`; None for a missing or unknown name."""
    name = section.get("name") if isinstance(section, dict) else None
    entries = registry(kind).entries
    return entries[name].config if isinstance(name, str) and name in entries else None


def _field_class(cls: Any, dotted: str, part: Any, section: Any) -> Any:
    """The type of field `part` of `cls` (at `dotted`): a component's registered class, else the annotation."""
    field = cls.model_fields.get(part) if _is_model(cls) else None
    if field is None:
        return None
    kind = COMPONENT_FIELDS.get(dotted)
    return _registered_class(kind, section) if kind else field.annotation


def _parent_class(data: Any, loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config class holding the field an error points at (an unknown-key message lists its keys)."""
    cls: Any = experiment_model()
    node, path = data, []
    for part in loc[:-1]:
        if _is_union_tag(node, part):
            continue
        in_sources = isinstance(part, int) and ".".join(path) == "data.sources"  # an item: a source component
        path.append(str(part))
        node = _child(node, part)
        cls = _registered_class("source", node) if in_sources else _field_class(cls, ".".join(path), part, node)
        if cls is None:  # a key no model has, or a component of unknown name: nothing to list
            return None
    return cls if _is_model(cls) else None


def format_error(source: str, data: dict[str, Any], err: ValidationError) -> str:
    """One line: file, dotted field, what was wrong, what is allowed."""
    e = err.errors()[0]
    path, parent = _dotted(data, e["loc"]), _parent_class(data, e["loc"])
    kind = COMPONENT_FIELDS.get(re.sub(r"^data\.sources\.\d+", "data.source", path.removesuffix(".name")))
    given = e.get("input")
    if e["type"] == "extra_forbidden":
        allowed = ", ".join(parent.model_fields) if parent else "see `llmcli schema`"
        msg = f"{path}: unknown key (allowed here: {allowed})"
    elif kind and e["type"] in ("union_tag_invalid", "literal_error", "union_tag_not_found"):
        # a literal error carries the name itself; a union-tag error carries the whole section
        name = given.get("name") if isinstance(given, dict) and e["type"] != "literal_error" else given
        msg = f"{path.removesuffix('.name')}.name: unknown {kind} {name!r} (valid: {', '.join(registry(kind).names())})"
    else:
        text = e["msg"].removeprefix("Value error, ")
        msg = f"{path}: {text} (given: {given!r})" if not isinstance(given, dict) else f"{path}: {text}"
        msg = msg if path else text  # a whole-config check names its fields itself
    more = len(err.errors()) - 1
    msg = msg.replace("\n", "\\n")  # one line, whatever the input held
    return f"{source}: {msg}" + (f" [and {more} more error{'s' * (more > 1)}]" if more else "")


def swap_hint(msg: str, overrides: list[str]) -> str:
    """A hint when `--set SECTION.name=X` kept keys of the old component that X does not have."""
    for item in overrides:
        key, _, value = (x.strip() for x in item.partition("="))
        section = key.removesuffix(".name")
        if key.endswith(".name") and section in COMPONENT_FIELDS and f": {section}." in msg and ": unknown key" in msg:
            return (f"{msg}; --set {key}={value} keeps the other keys of the file's {section} section: replace the "
                    f"whole section instead, e.g. --set '{section}={{name: {value}}}' (its other keys are optional)")
    return msg


def is_field_message(msg: str) -> bool:
    """Whether an error message starts with a config field path (`data.train_domains: ...`)."""
    head = msg.split(":", 1)[0]
    return "." in head and " " not in head and head.split(".")[0] in experiment_model().model_fields
