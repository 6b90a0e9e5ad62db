"""What `llmcli sweep` searches and for what: `--param FIELD=DIST`, `--objective DOMAIN.METRIC[:max|min]`,
`--sampler`, `--pruner`, each parsed and checked against the config schema before anything is created.

A parameter is any config field (dotted, as `--set` takes it); its distribution is one of
  uniform:LO:HI  loguniform:LO:HI  int:LO:HI  logint:LO:HI  choice:A,B,...  grid:A,B,...
(`choice` and `grid` are the same categorical list; `--sampler grid` needs every parameter to be a list or an int
range). Both bounds (and a point between them) or every choice are validated in the base config, so a value the
field refuses (objective.alpha=uniform:0:1.5) is refused here, once, in one line. Optuna is imported only inside
the functions that build its objects.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmcli.errors import UserError
from llmcli.experiments.sweep_grid import MAX_POINTS

KINDS = ("uniform", "loguniform", "int", "logint", "choice", "grid")
# eval/<split>.json's per-domain metrics (llmcli.evaluation.metrics.score) and the direction each improves in
METRICS = {"acc": "max", "macro_f1": "max", "macro_recall": "max", "ece": "min", "lm_loss": "min", "ppl": "min",
           "bpb": "min", "task_loss": "min"}
SAMPLERS = ("grid", "random", "tpe", "nsga2")
# each pruner's keyword arguments a user may set (`--pruner median:n_startup_trials=2`), all integers
PRUNERS = {"none": (), "median": ("n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"),
           "halving": ("min_resource", "reduction_factor", "min_early_stopping_rate", "bootstrap_count")}
RUNNER_FIELDS = ("train.threads",)  # set per trial by the thread plan
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def require_optuna() -> None:
    """`llmcli sweep` needs the search extra."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UserError("llmcli sweep needs optuna: pip install 'llmcli[search]'") from None


# ---------------------------------------------------------------- --param


@dataclass(frozen=True)
class Param:
    """One searched config field and its distribution."""

    field: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()

    @property
    def text(self) -> str:
        """The spec as a user writes it."""
        if self.kind in ("choice", "grid"):
            return f"{self.field}={self.kind}:" + ",".join(yaml_text(c) for c in self.choices)
        return f"{self.field}={self.kind}:{self.low:g}:{self.high:g}"

    def distribution(self) -> Any:
        """The Optuna distribution of this parameter."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind in ("choice", "grid"):
            return CategoricalDistribution(list(self.choices))
        if self.kind in ("int", "logint"):
            return IntDistribution(int(self.low), int(self.high), log=self.kind == "logint")
        return FloatDistribution(self.low, self.high, log=self.kind == "loguniform")

    def grid(self) -> list[Any] | None:
        """Every value GridSampler walks (lists and int ranges), None for a continuous range."""
        if self.kind in ("choice", "grid"):
            return list(self.choices)
        if self.kind in ("int", "logint"):
            return list(range(int(self.low), int(self.high) + 1))
        return None

    def probes(self) -> list[Any]:
        """The values validated up front: every choice, or both bounds and a point between them (a fractional
        one for a float range, so an integer field refuses `uniform:` here rather than in a trial)."""
        if self.kind in ("choice", "grid"):
            return list(self.choices)
        if self.kind in ("int", "logint"):
            return [int(self.low), int(self.high)]
        mid = math.sqrt(self.low * self.high) if self.kind == "loguniform" else (self.low + self.high) / 2
        return [self.low, self.high, mid if mid != round(mid) else mid + 0.5 * (self.high - self.low) / 7]

    def as_json(self) -> dict[str, Any]:
        return {"field": self.field, "kind": self.kind, "low": self.low, "high": self.high,
                "choices": list(self.choices)}

    @staticmethod
    def from_json(d: dict[str, Any]) -> Param:
        return Param(d["field"], d["kind"], d["low"], d["high"], tuple(d["choices"]))


def scalar(text: str) -> Any:
    """A value as a user writes it: numbers as numbers (1e-4 too, which YAML 1.1 reads as a string), else YAML."""
    import yaml

    text = text.strip()
    if _NUMBER.match(text):
        return int(text) if re.fullmatch(r"[-+]?\d+", text) else float(text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def yaml_text(value: Any) -> str:
    """A value as `--set` and YAML read it back exactly (1e-05 -> 1.0e-05: YAML 1.1 needs the dot)."""
    if isinstance(value, float) and math.isfinite(value):
        text = repr(value)
        mantissa, e, exp = text.partition("e")
        if e and "." not in mantissa:
            text = f"{mantissa}.0e{exp if exp[0] in '+-' else '+' + exp}"
        return text
    if isinstance(value, str) and scalar(value) == value and value.strip() == value and value:
        return value
    return json.dumps(value)


def parse_param(text: str) -> Param:
    """`optim.lr=loguniform:1e-4:1e-2` -> a Param (the field is checked against the schema by `check_params`)."""
    field, sep, dist = (x.strip() for x in text.partition("="))
    kind, _, rest = dist.partition(":")
    if not sep or not field or any(not p for p in field.split(".")):
        raise UserError(f"--param {text!r}: expected FIELD=DIST with a dotted config field, "
                        "e.g. optim.lr=loguniform:1e-4:1e-2")
    if kind not in KINDS:
        raise UserError(f"--param {text!r}: unknown distribution {kind!r} (allowed: {', '.join(KINDS)}; "
                        "e.g. uniform:0:1, int:1:4, choice:2,4)")
    if field in RUNNER_FIELDS:
        raise UserError(f"--param {text!r}: {field} is set per trial by the thread plan (--workers), not searched")
    if kind in ("choice", "grid"):
        return Param(field, kind, choices=_choices(text, rest))
    return _range(text, field, kind, rest)


def _choices(text: str, rest: str) -> tuple[Any, ...]:
    items = [x.strip() for x in rest.split(",")]
    if not rest.strip() or any(not x for x in items):
        raise UserError(f"--param {text!r}: expected a comma-separated list of values, e.g. choice:2,4")
    values = tuple(scalar(x) for x in items)
    if len(values) > MAX_POINTS:
        raise UserError(f"--param {text!r}: {len(values)} values; a search lists at most {MAX_POINTS}")
    if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
        raise UserError(f"--param {text!r}: repeats a value")
    return values


def _range(text: str, field: str, kind: str, rest: str) -> Param:
    parts = rest.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        low, high = (int(p) if kind.endswith("int") else float(p) for p in parts)
    except ValueError:
        what = "integers" if kind.endswith("int") else "numbers"
        raise UserError(f"--param {text!r}: expected {kind}:LOW:HIGH with {what}, e.g. {kind}:"
                        + ("1:4" if kind.endswith("int") else "1e-4:1e-2")) from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise UserError(f"--param {text!r}: LOW must be below HIGH (both finite), got {low:g} and {high:g}")
    if kind.startswith("log") and low <= 0:
        raise UserError(f"--param {text!r}: a log range needs LOW > 0, got {low:g}")
    return Param(field, kind, float(low), float(high))


def set_field(data: dict[str, Any], field: str, value: Any) -> None:
    """Set a dotted field in a config dict (sections created as `--set` creates them)."""
    from llmcli.config import kind_of

    parts = field.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        nxt = node[part]
        if not isinstance(nxt, dict):
            raise UserError(f"--param {field}: {'.'.join(parts[:i + 1])} is {kind_of(nxt)}, not a section")
        node = nxt
    node[parts[-1]] = value


def config_with(base: dict[str, Any], values: dict[str, Any], source: str) -> Any:
    """The base config (its JSON dump) with these field values, validated by the schema (UserError naming `source`)."""
    import copy

    from llmcli.config import validate_config

    data = copy.deepcopy(base)
    for field, value in values.items():
        set_field(data, field, value)
    return validate_config(data, source)


def check_params(cfg: Any, params: list[Param]) -> None:
    """Each parameter once, and each of its probe values accepted by the schema in the base config."""
    if not params:
        raise UserError("--param: give at least one, e.g. --param optim.lr=loguniform:1e-4:1e-2")
    seen = [p.field for p in params]
    dup = sorted({f for f in seen if seen.count(f) > 1})
    if dup:
        raise UserError(f"--param: {', '.join(dup)} given twice (one distribution per field)")
    base = cfg.model_dump(mode="json")
    for p in params:
        for value in p.probes():
            config_with(base, {p.field: value}, f"--param {p.text} ({p.field}={yaml_text(value)})")


def grid_size(params: list[Param]) -> int | None:
    """How many points the full grid has (None when a parameter is a continuous range)."""
    sizes = [p.grid() for p in params]
    if any(s is None for s in sizes):
        return None
    return math.prod(len(s) for s in sizes if s is not None)


# ---------------------------------------------------------------- --objective


@dataclass(frozen=True)
class Objective:
    """A metric of eval/<split>.json on a domain, `in_domain` (the mean over the trained-on domains) or `ood` (the
    mean over the others), maximised or minimised."""

    domain: str
    metric: str
    direction: str  # "maximize" | "minimize"

    @property
    def key(self) -> str:
        return f"{self.domain}.{self.metric}"

    @property
    def text(self) -> str:
        return f"{self.key}:{self.direction[:3]}"


def parse_objective(text: str) -> Objective:
    """`kjv.acc:max`, `ood.ppl:min`, `in_domain.macro_f1` (the metric's natural direction when none is given)."""
    key, _, direction = text.strip().partition(":")
    domain, _, metric = key.rpartition(".")
    if not domain or metric not in METRICS:
        raise UserError(f"--objective {text!r}: expected DOMAIN.METRIC[:max|min] with a metric eval writes "
                        f"({', '.join(METRICS)}), e.g. in_domain.acc:max or ood.ppl:min")
    direction = direction or METRICS[metric]
    if direction not in ("max", "min"):
        raise UserError(f"--objective {text!r}: the direction must be max or min, got {direction!r}")
    return Objective(domain, metric, "maximize" if direction == "max" else "minimize")


def domain_groups(cfg: Any, log: Any = print) -> dict[str, list[str]]:
    """The domains an objective may name: in-domain (trained on), OOD (validated on, not trained on) and held
    out (test only: no validation split to select on)."""
    from llmcli.experiments.loo_table import data_domains

    domains = data_domains(cfg, log)
    trained = [d for d in (cfg.data.train_domains or domains[:1]) if d not in cfg.train.exclude_domains]
    held = list(cfg.data.split.holdout_domains)
    return {"in": trained, "ood": [d for d in domains if d not in trained and d not in held], "held_out": held}


def check_objectives(objectives: list[Objective], groups: dict[str, list[str]]) -> None:
    """Every objective names a domain with a validation split, once."""
    if not objectives:
        raise UserError("--objective: give at least one, e.g. --objective in_domain.acc:max")
    keys = [o.key for o in objectives]
    if len(set(keys)) != len(keys):
        raise UserError(f"--objective: {', '.join(sorted({k for k in keys if keys.count(k) > 1}))} given twice")
    known = [*groups["in"], *groups["ood"]]
    for o in objectives:
        if o.domain in groups["held_out"]:
            raise UserError(f"--objective {o.text}: {o.domain} is held out (test only): it has no validation split "
                            "to select on, and selecting on test is leakage")
        if o.domain == "ood" and not groups["ood"]:
            raise UserError(f"--objective {o.text}: the data has no out-of-domain domain with a validation split")
        if o.domain not in ("in_domain", "ood", *known):
            raise UserError(f"--objective {o.text}: unknown domain {o.domain!r} (allowed: in_domain, ood, "
                            f"{', '.join(known)})")


def pick(per_domain: dict[str, dict[str, Any]], o: Objective, groups: dict[str, list[str]]) -> float | None:
    """An objective's value from per-domain metrics (an eval JSON's `domains`, or one validation step's records)."""
    names = groups["in"] if o.domain == "in_domain" else groups["ood"] if o.domain == "ood" else [o.domain]
    vals = [per_domain[d][o.metric] for d in names if o.metric in per_domain.get(d, {})]
    if not vals or len(vals) < len([d for d in names if d in per_domain]):
        return None
    value = sum(vals) / len(vals)
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------- --sampler, --pruner


def check_sampler(name: str, params: list[Param], trials: int | None) -> int:
    """The sampler is known (grid: every parameter a list or int range, at most the grid's size); the trial count."""
    if name not in SAMPLERS:
        raise UserError(f"--sampler: {name!r} is not allowed ({', '.join(SAMPLERS)})")
    size = grid_size(params)
    if name == "grid":
        if size is None:
            cont = [p.field for p in params if p.grid() is None]
            raise UserError(f"--sampler grid: {', '.join(cont)} is a continuous range; give grid:, choice: or int:")
        if trials is not None and trials > size:
            raise UserError(f"--trials: {trials} is more than the grid's {size} point(s)")
    n = trials if trials is not None else (size if name == "grid" else 20)
    if not 1 <= n <= MAX_POINTS:
        raise UserError(f"--trials: must be between 1 and {MAX_POINTS}, got {n}")
    return n


def parse_pruner(text: str, n_objectives: int) -> dict[str, Any]:
    """`median`, `halving:reduction_factor=2`, `none` -> {"name", "kwargs"}; pruning needs a single objective."""
    name, _, rest = text.partition(":")
    if name not in PRUNERS:
        raise UserError(f"--pruner: {name!r} is not allowed ({', '.join(PRUNERS)}; options as "
                        "median:n_startup_trials=2)")
    if name != "none" and n_objectives > 1:
        raise UserError(f"--pruner {text}: pruning needs a single --objective (Optuna does not prune "
                        f"multi-objective studies; {n_objectives} given): drop --pruner or keep one objective")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, _, value = item.partition("=")
        if key not in PRUNERS[name]:
            raise UserError(f"--pruner {text}: {key!r} is not an option of {name} "
                            f"(allowed: {', '.join(PRUNERS[name]) or 'none'})")
        kwargs[key] = value if key == "min_resource" and value == "auto" else _int_option(text, key, value)
    spec = {"name": name, "kwargs": kwargs}
    build_pruner(spec, text)  # Optuna checks the values (e.g. reduction_factor >= 2)
    return spec


def _int_option(text: str, key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UserError(f"--pruner {text}: {key} must be an integer, got {value!r}") from None


def build_pruner(spec: dict[str, Any], text: str = "") -> Any:
    """Optuna's pruner for a parsed --pruner."""
    import optuna

    cls = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
           "halving": optuna.pruners.SuccessiveHalvingPruner}[spec["name"]]
    try:
        return cls(**spec["kwargs"])
    except (ValueError, TypeError) as exc:
        raise UserError(f"--pruner {text or spec['name']}: {exc}") from None


def build_sampler(name: str, seed: int, params: list[Param], trials: int, workers: int) -> Any:
    """Optuna's sampler, seeded. NSGA-II's population is a quarter of the trials (4 to 50): its default of 50
    would make any search under 50 trials pure random sampling."""
    import optuna

    if name == "grid":
        return optuna.samplers.GridSampler({p.field: p.grid() for p in params}, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=min(50, max(4, trials // 4)))
    # constant liar: trials running in parallel count as bad guesses, so parallel workers do not all ask one point
    return optuna.samplers.TPESampler(seed=seed, constant_liar=workers > 1)


def suggest(trial: Any, params: list[Param]) -> dict[str, Any]:
    """Draw each parameter's value for a trial (stored in the study at once)."""
    out = {}
    for p in params:
        if p.kind in ("choice", "grid"):
            out[p.field] = trial.suggest_categorical(p.field, list(p.choices))
        elif p.kind in ("int", "logint"):
            out[p.field] = trial.suggest_int(p.field, int(p.low), int(p.high), log=p.kind == "logint")
        else:
            out[p.field] = trial.suggest_float(p.field, p.low, p.high, log=p.kind == "loguniform")
    return out


# ---------------------------------------------------------------- a search folder's names and values

STUDY = "study.db"


def trial_name(number: int) -> str:
    """A trial's folder name."""
    return f"trial-{number:04d}"


def storage_url(folder: Path) -> str:
    """The study's SQLite URL (absolute, so it works from any working directory)."""
    return f"sqlite:///{(Path(folder) / STUDY).resolve()}"


def space_of(state: dict[str, Any]) -> list[Param]:
    """The parameters of a search state (search.json)."""
    return [Param.from_json(p) for p in state["params"]]


def objectives_of(state: dict[str, Any]) -> list[Objective]:
    """The objectives of a search state (search.json)."""
    return [Objective(**o) for o in state["objectives"]]


def trial_values(pdir: Path, objectives: list[Objective], groups: dict[str, list[str]],
                 split: str = "val") -> list[float | None]:
    """A trial's objective values on a split (eval/<split>.json; None where it has no such metric)."""
    from llmcli.files import read_json

    path = pdir / "eval" / f"{split}.json"
    if not path.is_file():
        return [None] * len(objectives)
    domains = read_json(path, f"{split} scores")["domains"]
    return [pick(domains, o, groups) for o in objectives]
