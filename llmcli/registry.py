"""Closed registries of components, keyed by name.

Each entry pairs a pydantic config class (validated at load time, torch-free) with what builds the
component, given as "module:attr": a builder function or the component's class itself (called the same way,
`attr(cfg, **runtime)`), imported only when a component is built, so `llmcli --help` stays light. What each
kind builds and gets is its contract in `llmcli/contracts.py`. Third parties add entries through the
`llmcli.plugins` entry-point group: each entry point is a function called with the dict of registries.
"""

from __future__ import annotations

import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmcli.errors import UserError

if TYPE_CHECKING:
    from pydantic import BaseModel

PLUGIN_GROUP = "llmcli.plugins"


@dataclass
class Entry:
    """One registered component."""

    name: str
    config: type
    builder: str  # "module:function" or "module:Class", called as builder(cfg, **runtime)


@dataclass
class Registry:
    """Components of one kind (models, objectives, ...) by name."""

    kind: str
    entries: dict[str, Entry] = field(default_factory=dict)

    def register(self, name: str, config: type, builder: str) -> None:
        """Add a component; a name may be registered once."""
        if name in self.entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self.entries[name] = Entry(name, config, builder)

    def names(self) -> list[str]:
        """The valid names, sorted."""
        _load_plugins()
        return sorted(self.entries)

    def get(self, name: str) -> Entry:
        """The entry for a name; an unknown name is a UserError listing the valid ones."""
        _load_plugins()
        if name not in self.entries:
            raise UserError(f"unknown {self.kind} {name!r} (valid: {', '.join(self.names())})")
        return self.entries[name]

    def build(self, cfg: BaseModel, **runtime: Any) -> Any:
        """Build the component named by `cfg.name` from its own sub-config plus runtime arguments."""
        return pkgutil.resolve_name(self.get(cfg.name).builder)(cfg, **runtime)


REGISTRIES: dict[str, Registry] = {
    kind: Registry(kind)
    for kind in ("source", "tokenizer", "model", "task_loss", "objective", "dg", "optimizer", "schedule")
}
_plugins_loaded = False


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=PLUGIN_GROUP):
        ep.load()(REGISTRIES)


def registry(kind: str) -> Registry:
    """The registry of one kind."""
    return REGISTRIES[kind]
