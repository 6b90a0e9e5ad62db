"""The top-level config model, assembled from the registries: each component field a discriminated union.

The unions are built at first use (`experiment_model()`, cached), after the plugins have registered, so a
plugin's component is validated like a built-in one.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, Field, create_model

from llmcli.config import builtins as _builtins  # noqa: F401 - registers the built-in components
from llmcli.config.schema import DataBase, EvalConfig, ExperimentBase, GenerateConfig, SweepConfig, TrainConfig
from llmcli.registry import _load_plugins, registry

# Config field -> registry kind, for the components that sit at the top level or under data.
COMPONENT_FIELDS = {
    "data.source": "source",
    "data.tokenizer": "tokenizer",
    "model": "model",
    "task_loss": "task_loss",
    "objective": "objective",
    "dg": "dg",
    "optim": "optimizer",
    "schedule": "schedule",
}


def _union(kind: str) -> Any:
    classes = tuple(registry(kind).entries[n].config for n in registry(kind).names())
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[classes], Field(discriminator="name")]  # noqa: UP007 - runtime union


def _default(kind: str, name: str) -> Any:
    return Field(default_factory=registry(kind).entries[name].config)


@functools.cache
def experiment_model() -> type[BaseModel]:
    """The top-level config model, its unions built from the registries (plugins included)."""
    _load_plugins()
    data = create_model(
        "DataConfig",
        __base__=DataBase,
        source=(_union("source"), _default("source", "bible")),
        sources=(Optional[list[_union("source")]], Field(  # noqa: UP045 - runtime type
            None, min_length=1, description="several sources, each tagged with its domain(s); replaces `source`")),
        tokenizer=(_union("tokenizer"), _default("tokenizer", "bpe")),
    )
    return create_model(
        "ExperimentConfig",
        __base__=ExperimentBase,
        data=(data, Field(default_factory=data)),
        model=(_union("model"), _default("model", "gpt")),
        task_loss=(_union("task_loss"), _default("task_loss", "cross_entropy")),
        objective=(_union("objective"), _default("objective", "weighted")),
        dg=(_union("dg"), _default("dg", "erm")),
        optim=(_union("optimizer"), _default("optimizer", "adamw")),
        schedule=(_union("schedule"), _default("schedule", "cosine")),
        train=(TrainConfig, Field(default_factory=TrainConfig)),
        eval=(EvalConfig, Field(default_factory=EvalConfig)),
        generate=(GenerateConfig, Field(default_factory=GenerateConfig)),
        sweep=(SweepConfig, Field(default_factory=SweepConfig)),
    )
