"""The whole front from one run ("You Only Train Once", Dosovitskiy & Djolonga, ICLR 2020).

One network is trained with alpha drawn per batch and fed to the model through FiLM layers (a
per-channel scale and shift computed from alpha) on the token embeddings, after every block and on the
backbone's output, all shared by the LM and classification heads. The loss of each batch is
alpha * L + (1 - alpha) * T with that batch's alpha. After training, setting alpha picks a point on
the trade-off, so one run is scored at every value of a grid.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmcli.io import atomic_write_json
from llmcli.objectives import grad_cosine


class AlphaFiLM(nn.Module):
    """alpha -> a per-channel (scale, shift) at each of `sites` places in the network; identity at initialisation."""

    def __init__(self, d_model: int, hidden: int, sites: int) -> None:
        super().__init__()
        self.sites = sites
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, 2 * sites * d_model))
        nn.init.zeros_(self.net[2].weight)  # start as the unconditioned model
        nn.init.zeros_(self.net[2].bias)
        self.register_buffer("alpha", torch.tensor(0.5), persistent=False)  # set per batch, not a weight

    def params(self) -> torch.Tensor:
        """(sites, 2, D): the scale and shift of every site."""
        a = self.alpha.reshape(1)
        feats = torch.cat([a, a.sqrt()])  # sqrt spreads the small-alpha end, where T dominates
        return self.net(feats).view(self.sites, 2, -1)

    def modulate(self, x: torch.Tensor, site: int) -> torch.Tensor:
        """x * (1 + scale) + shift with this site's parameters; x (B, T, D)."""
        g, b = self.params()[site]  # (D,), (D,)
        return x * (1 + g) + b  # (B, T, D)


def attach_film(model: nn.Module, hidden: int) -> AlphaFiLM:
    """Add an AlphaFiLM to a TwoHeadModel, hooked onto the embedding, every block (backbones that have
    `blocks`) and the backbone's output: alpha reaches every layer, as in YOTO, not just the ends."""
    backbone = model.backbone
    blocks = list(getattr(backbone, "blocks", []))
    film = AlphaFiLM(backbone.d_model, hidden, sites=len(blocks) + 2)
    model.alpha_film = film
    backbone.embed.register_forward_hook(lambda m, inp, out: film.modulate(out, 0))
    for i, block in enumerate(blocks, start=1):
        block.register_forward_hook(lambda m, inp, out, i=i: film.modulate(out, i))
    backbone.register_forward_hook(lambda m, inp, out: (film.modulate(out[0], film.sites - 1), *out[1:]))
    return film


class Conditioned:
    """Weighted objective whose alpha is drawn per batch (Beta(a, b) on [alpha_min, alpha_max]) and fed to the model."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.alpha = cfg.alpha
        self.film: AlphaFiLM | None = None

    def wrap_model(self, model: nn.Module) -> None:
        """Give the model its FiLM layers (before the optimiser is built, so they are trained)."""
        self.film = attach_film(model, self.cfg.film_hidden)

    def prepare(self, model: nn.Module, step: int | None) -> None:
        """Draw this step's alpha (torch's seeded RNG: exact resume holds); step None = evaluation alpha."""
        if step is None:
            self.alpha = self.cfg.alpha
        else:
            lo, hi = self.cfg.alpha_min, self.cfg.alpha_max
            self.alpha = lo + (hi - lo) * self._unit_draw()
        model.alpha_film.alpha.fill_(self.alpha)

    def _unit_draw(self) -> float:
        """One draw in [0, 1] from Beta(a, b), through torch's seeded generator (uniform when a = b = 1)."""
        a, b = self.cfg.alpha_beta
        if a == b == 1.0:
            return float(torch.rand(()))
        return float(torch.distributions.Beta(torch.tensor(a), torch.tensor(b)).sample())

    def backward(self, lm_loss: torch.Tensor, task_loss: torch.Tensor, shared: list, step: int) -> dict[str, float]:
        """alpha * L + (1 - alpha) * T with this batch's alpha."""
        logs: dict[str, float] = {"alpha": self.alpha}
        if self.cfg.log_grad_every and step % self.cfg.log_grad_every == 0:
            logs["grad_cosine"] = grad_cosine(lm_loss, task_loss, shared)
        loss = self.alpha * lm_loss + (1 - self.alpha) * task_loss
        loss.backward()
        logs["loss"] = float(loss.detach())
        return logs

    def score(self, lm_loss: float, task_loss: float) -> float:
        """Held-out objective at the evaluation alpha."""
        return self.cfg.alpha * lm_loss + (1 - self.cfg.alpha) * task_loss

    def parameters(self) -> list[nn.Parameter]:
        """None of its own: the FiLM layers belong to the model."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Nothing beyond the model's own FiLM weights."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""


def build_conditioned(cfg: Any) -> Conditioned:
    """The alpha-conditioned objective."""
    return Conditioned(cfg)


def conditioned_config(cfg: Any) -> Any:
    """The sweep's base config with its objective replaced by the conditioned one."""
    from llmcli.config import validate_config

    data = cfg.model_dump(mode="json")
    if cfg.objective.name != "conditioned":  # a conditioned objective given in the config is kept as it is
        data["objective"] = {"name": "conditioned", "alpha": 0.5,
                             "log_grad_every": getattr(cfg.objective, "log_grad_every", 50)}
    data["name"] = f"{cfg.name}-conditioned"
    return validate_config(data, "sweep (conditioned)")


def run_conditioned(cfg: Any, state: dict[str, Any], sweep_dir: Path, *, progress: bool, log: Any) -> None:
    """Train the conditioned run (unless trained) and score it at every alpha of the grid not yet scored.

    A run cut by SIGINT / SIGTERM / SIGKILL continues from its last checkpoint; one cut while being scored only
    scores the values left. Interrupted (or KeyboardInterrupt) propagates once status.json records the cut.
    """
    run = sweep_dir / "conditioned"
    info = _read_status(run)
    if info.get("status") not in ("trained", "completed"):
        info = _train(cfg, run, info, progress, log)
    t0 = time.perf_counter()
    for alpha in state["grid"]:
        out = run / "eval" / f"test-alpha-{alpha:g}.json"
        if not out.is_file():
            evaluate_at(run, alpha, out)  # an atomic write: a cut evaluation leaves no file, it is redone
            log(f"sweep: conditioned run scored at alpha={alpha:g}")
    atomic_write_json(run / "status.json", {**info, "status": "completed",
                                            "eval_wall_s": round(time.perf_counter() - t0, 2)})


def _read_status(run: Path) -> dict[str, Any]:
    try:
        info = json.loads((run / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _train(cfg: Any, run: Path, info: dict[str, Any], progress: bool, log: Any) -> dict[str, Any]:
    """Train (or continue) the conditioned run; status.json says `trained` after, `interrupted` if cut."""
    from llmcli.runs import move_aside, resumable_run
    from llmcli.selection import train_and_select as train  # the engine, then LODO selection if select_by asks

    how = resumable_run(run) if run.exists() else None
    before = float(info.get("wall_s") or 0) if how else 0.0  # the cut attempt's training time counts
    if how is None:
        if run.exists():  # it failed by itself (or never checkpointed): kept aside, trained afresh
            move_aside(run)
        run.mkdir()
    elif how == "resume":
        log(f"sweep: {run} was cut off mid-run; continuing it from its last checkpoint")
    t0 = time.perf_counter()
    try:
        if how is None:
            train(conditioned_config(cfg), run_dir=run, progress=progress, log=log)
        elif how == "resume":
            train(None, resume=run, progress=progress, log=log)
    except KeyboardInterrupt:
        atomic_write_json(run / "status.json", {"status": "interrupted",
                                                "wall_s": round(before + time.perf_counter() - t0, 2)})
        raise
    info = {"status": "trained", "wall_s": round(before + time.perf_counter() - t0, 2)}
    atomic_write_json(run / "status.json", info)
    return info


def evaluate_at(run: Path, alpha: float, out: Path) -> dict[str, Any]:
    """Per-domain test metrics and gaps of a conditioned run at one alpha (the eval/test.json format)."""
    from llmcli.data.dataset import ProcessedData
    from llmcli.data.preprocess import preprocess
    from llmcli.metrics import gaps, score
    from llmcli.models.load import load_trained
    from llmcli.registry import registry

    t = load_trained(run, "last")
    t.model.alpha_film.alpha.fill_(alpha)
    data = ProcessedData(preprocess(t.cfg.data, log=lambda m: None))
    task_loss = registry("task_loss").build(t.cfg.task_loss, n_classes=len(data.label_names))
    per_domain = {d: score(t.model, data, data.indices("test", [d]), t.cfg.eval.batch_size, task_loss)
                  for d in data.domains if len(data.indices("test", [d]))}
    result = {"run": str(run), "split": "test", "checkpoint": "last", "alpha": alpha, "step": t.checkpoint["step"],
              "in_domain": data.train_domains,
              "out_of_domain": [d for d in per_domain if d not in data.train_domains],
              "domains": per_domain, "gap": gaps(per_domain, data.train_domains)}
    out.parent.mkdir(exist_ok=True)
    atomic_write_json(out, result)
    return result
