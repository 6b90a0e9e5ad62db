"""Experiment configuration: pydantic models per concern, YAML loading, dotted overrides.

Everything a run does is decided here, once, at load time. Components (model, objective, ...) are
chosen by `name` and validated as a discriminated union over the registry, so each component's
own fields are checked. A bad config is a `UserError` whose message names the file, the dotted
field, what was given and what is allowed.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from llmcli.errors import UserError
from llmcli.registry import _load_plugins, registry


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors, and so are inf / nan numbers."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


# ---------------------------------------------------------------- data sources and tokenizers


class BibleSource(Strict):
    """The built-in corpus: verse-aligned translations, domain = version, group = chapter."""

    name: Literal["bible"] = "bible"
    versions: list[str] = Field(default_factory=lambda: ["kjv", "web", "bbe", "ylt", "wyc"], min_length=1)
    label: Literal["genre", "testament"] = "genre"
    books: list[int] | None = Field(None, description="keep only these book numbers (1-66); all if null")
    max_chapters_per_book: int | None = Field(None, ge=1, description="keep only the first N chapters of each book")

    @field_validator("versions")
    @classmethod
    def _lower_unique(cls, v: list[str]) -> list[str]:
        v = [x.lower() for x in v]
        if len(set(v)) != len(v):
            raise ValueError(f"versions must be unique, got {v}")
        return v


class JsonlSource(Strict):
    """Records `{text, label?, domain?, group?}`, one JSON object per line."""

    name: Literal["jsonl"] = "jsonl"
    path: str
    domain: str = Field("default", description="domain of records that do not name one")


class BPETokenizer(Strict):
    """Byte-level BPE trained with the `tokenizers` library on the training split only."""

    name: Literal["bpe"] = "bpe"
    vocab_size: int = Field(4096, ge=300, le=65000)
    min_frequency: int = Field(2, ge=1)


class SplitConfig(Strict):
    """Split by group (e.g. chapter): no group crosses train/val/test."""

    val: float = Field(0.1, ge=0.0, lt=1.0)
    test: float = Field(0.1, gt=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _room_for_training(self) -> SplitConfig:
        if self.val + self.test >= 1.0:
            raise ValueError(f"val + test must be below 1 (given {self.val} + {self.test}), or nothing is left to train on")
        return self


# ---------------------------------------------------------------- model, losses, objectives


class GPTConfig(Strict):
    """Decoder-only pre-norm Transformer backbone."""

    name: Literal["gpt"] = "gpt"
    n_layer: int = Field(2, ge=1, le=64)
    n_head: int = Field(4, ge=1)
    d_model: int = Field(128, ge=8)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = False
    block_size: int = Field(256, ge=8, description="longest sequence (positions) the model can see")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GPTConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        return self


class CrossEntropyLoss(Strict):
    """Cross-entropy task loss over labeled records."""

    name: Literal["cross_entropy"] = "cross_entropy"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class WeightedObjective(Strict):
    """L' = alpha * L + (1 - alpha) * T."""

    name: Literal["weighted"] = "weighted"
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    log_grad_every: int = Field(50, ge=0, description="log grad_cosine every N steps; 0 = never")


# ---------------------------------------------------------------- optimisers and schedules


class AdamWConfig(Strict):
    """AdamW; weight decay only on matrices (not on norms, biases or embeddings)."""

    name: Literal["adamw"] = "adamw"
    lr: float = Field(3e-3, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)


class SGDConfig(Strict):
    """SGD with momentum."""

    name: Literal["sgd"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> SGDConfig:
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        return self


class CosineSchedule(Strict):
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""

    name: Literal["cosine"] = "cosine"
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)


class LinearSchedule(Strict):
    """Linear warm-up, then linear decay to min_lr_ratio * lr."""

    name: Literal["linear"] = "linear"
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)


class ConstantSchedule(Strict):
    """Linear warm-up, then a constant rate."""

    name: Literal["constant"] = "constant"
    warmup_steps: int = Field(0, ge=0)


# ---------------------------------------------------------------- run-level concerns


class TrainConfig(Strict):
    """The training loop."""

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_every: int = Field(200, ge=1, description="validate every N steps (and at the end)")
    checkpoint_every: int | None = Field(
        None, ge=1, description="also write a resumable checkpoints/last every N steps; null = at eval steps only"
    )
    on_nan: Literal["stop", "skip_batch"] = Field(
        "stop", description="a NaN/Inf loss: stop the run (status failed) or skip that batch's update"
    )
    val_max_examples: int | None = Field(512, ge=1, description="per-domain cap on validation records")
    log_every: int = Field(10, ge=1)
    grad_clip: float | None = Field(1.0, gt=0.0)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    threads: int | None = Field(None, ge=1, description="torch CPU threads; null = all cores")


class EvalConfig(Strict):
    """`llmcli eval`."""

    batch_size: int = Field(128, ge=1)
    checkpoint: Literal["best", "last"] = "best"
    max_examples: int | None = Field(None, ge=1, description="per-domain cap; null = the whole split")


class GenerateConfig(Strict):
    """`llmcli generate` defaults (each overridable on the command line)."""

    max_new_tokens: int = Field(100, ge=1)
    temperature: float = Field(0.8, ge=0.0)
    top_k: int | None = Field(50, ge=1)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0


class SweepConfig(Strict):
    """`llmcli sweep-alpha` defaults."""

    alphas: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min_length=1)

    @field_validator("alphas")
    @classmethod
    def _in_unit_interval(cls, v: list[float]) -> list[float]:
        bad = [a for a in v if not 0.0 <= a <= 1.0]
        if bad:
            raise ValueError(f"every alpha must be in [0, 1], got {bad}")
        return v


class DataBase(Strict):
    """Fields of `data:` besides the source and tokenizer components."""

    split: SplitConfig = Field(default_factory=SplitConfig)
    train_domains: list[str] | None = Field(
        None, min_length=1, description="domains trained on (in-domain); null = the first domain"
    )
    max_len: int = Field(64, ge=4, le=4096, description="tokens per record (BOS included); longer ones are cut")
    processed_dir: str = Field("data/processed", description="where preprocessed data is cached")


class ExperimentBase(Strict):
    """Top-level fields besides the concerns."""

    name: str = Field("experiment", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0

    @model_validator(mode="after")
    def _records_fit_the_model(self) -> ExperimentBase:
        # any backbone with a positional limit (`block_size`) must hold a whole record
        block, max_len = getattr(getattr(self, "model", None), "block_size", None), self.data.max_len
        if block is not None and max_len > block:
            raise ValueError(f"model.block_size: {block} is shorter than data.max_len ({max_len})")
        return self


# ---------------------------------------------------------------- built-in components

_BUILTINS: dict[str, list[tuple[type, str]]] = {
    "source": [(BibleSource, "llmcli.data.sources:bible_records"), (JsonlSource, "llmcli.data.sources:jsonl_records")],
    "tokenizer": [(BPETokenizer, "llmcli.data.tokenizers:build_bpe")],
    "model": [(GPTConfig, "llmcli.models.gpt:build_gpt")],
    "task_loss": [(CrossEntropyLoss, "llmcli.losses:build_cross_entropy")],
    "objective": [(WeightedObjective, "llmcli.objectives:build_weighted")],
    "optimizer": [(AdamWConfig, "llmcli.optim:build_adamw"), (SGDConfig, "llmcli.optim:build_sgd")],
    "schedule": [
        (CosineSchedule, "llmcli.optim:build_cosine"),
        (LinearSchedule, "llmcli.optim:build_linear"),
        (ConstantSchedule, "llmcli.optim:build_constant"),
    ],
}
for _kind, _items in _BUILTINS.items():
    for _cls, _builder in _items:
        registry(_kind).register(_cls.model_fields["name"].default, _cls, _builder)

# Config field -> registry kind, for the components that sit at the top level or under data.
COMPONENT_FIELDS = {
    "data.source": "source",
    "data.tokenizer": "tokenizer",
    "model": "model",
    "task_loss": "task_loss",
    "objective": "objective",
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
        tokenizer=(_union("tokenizer"), _default("tokenizer", "bpe")),
    )
    return create_model(
        "ExperimentConfig",
        __base__=ExperimentBase,
        data=(data, Field(default_factory=data)),
        model=(_union("model"), _default("model", "gpt")),
        task_loss=(_union("task_loss"), _default("task_loss", "cross_entropy")),
        objective=(_union("objective"), _default("objective", "weighted")),
        optim=(_union("optimizer"), _default("optimizer", "adamw")),
        schedule=(_union("schedule"), _default("schedule", "cosine")),
        train=(TrainConfig, Field(default_factory=TrainConfig)),
        eval=(EvalConfig, Field(default_factory=EvalConfig)),
        generate=(GenerateConfig, Field(default_factory=GenerateConfig)),
        sweep=(SweepConfig, Field(default_factory=SweepConfig)),
    )


# ---------------------------------------------------------------- loading and overrides


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


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, bad syntax or a non-mapping is a UserError."""
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
        raise UserError(f"{path}: the top level must be a mapping of sections, got a {type(data).__name__}")
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
                raise UserError(f"--set {item!r}: {where} is a {type(nxt).__name__}, not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def _key(part: Any) -> str:
    """A path component as written: plain names as they are, anything odd (spaces, newlines, '') quoted."""
    text = str(part)
    return text if re.fullmatch(r"[\w-]+", text) else repr(part)


def _dotted(data: Any, loc: tuple[Any, ...]) -> str:
    """Dotted path of an error location, with discriminated-union tags dropped."""
    path: list[str] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("name") == part:
            continue  # a union tag, not a key the user wrote
        path.append(_key(part))
        node = node.get(part) if isinstance(node, dict) else None
    return ".".join(path)


def _parent_class(data: Any, loc: tuple[Any, ...]) -> type[BaseModel] | None:
    cls: Any = experiment_model()
    node = data
    path: list[str] = []
    for part in loc[:-1]:
        if isinstance(node, dict) and part not in node and node.get("name") == part:
            continue
        path.append(str(part))
        node = node.get(part) if isinstance(node, dict) else None
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return None
        kind = COMPONENT_FIELDS.get(".".join(path))
        if kind:
            name = node.get("name") if isinstance(node, dict) else None
            entries = registry(kind).entries
            cls = entries[name].config if isinstance(name, str) and name in entries else None
        else:
            cls = field.annotation
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def format_error(source: str, data: dict[str, Any], err: ValidationError) -> str:
    """One line: file, dotted field, what was wrong, what is allowed."""
    e = err.errors()[0]
    path, parent = _dotted(data, e["loc"]), _parent_class(data, e["loc"])
    kind = COMPONENT_FIELDS.get(path.removesuffix(".name"))
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
        if not path:  # a check across sections names its fields itself
            msg = text
    more = len(err.errors()) - 1
    msg = msg.replace("\n", "\\n")  # one line, whatever the input held
    return f"{source}: {msg}" + (f" [and {more} more error{'s' * (more > 1)}]" if more else "")


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


def validate_config(data: dict[str, Any], source: str = "<config>") -> BaseModel:
    """Validate a config dict; a bad one is a UserError with one readable line."""
    _fill_default_names(data)
    try:
        return experiment_model().model_validate(data)
    except ValidationError as err:
        raise UserError(format_error(source, data, err)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> BaseModel:
    """Read, override and validate an experiment config."""
    path = Path(path)
    data = apply_overrides(read_yaml(path), overrides or [])
    return validate_config(data, str(path) + (" (with --set)" if overrides else ""))


def is_field_message(msg: str) -> bool:
    """Whether an error message starts with a config field path (`data.train_domains: ...`)."""
    head = msg.split(":", 1)[0]
    return "." in head and " " not in head and head.split(".")[0] in experiment_model().model_fields


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (every default filled in)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
