"""`llmcli soup`: the weight average of runs fine-tuned from one start, optionally pulled toward the pretrained
base, as a new self-describing run folder that eval, classify and generate read like any run.

Why: runs fine-tuned from the same pretrained weights stay in one basin of the loss, so the mean of their weights
can itself be a good model, at the inference cost of one (Wortsman et al. 2022, "Model soups"; not so for the two
MiniLM seeds measured in docs/pretrained.md, which ended too far apart). Mixing the fine-tuned pretrained weights
back toward the base (`--base-weight`) trades a little in-domain accuracy for out-of-domain accuracy (Wortsman et al. 2022,
"Robust fine-tuning of zero-shot models", WiSE-FT). The heads and every weight the base does not have stay the runs'
mean. The soup is written with run 0's config, tokenizer and data manifest; the runs must agree on the model,
tokenizer, labels and every weight's name and shape.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmcli.errors import UserError
from llmcli.files import sha256_file
from llmcli.runs import publish_run, staging_dir, write_derived_run

RECORD = "soup"  # the key of the soup's record in its checkpoint sidecar and meta.json


def check_options(run_dirs: list[str], base_weight: float) -> None:
    """Two runs or more (or one with --base-weight), and a base weight in [0, 1)."""
    if not 0.0 <= base_weight < 1.0:
        raise UserError(f"--base-weight: must be in [0, 1) (0: the runs' mean alone), got {base_weight}")
    if len(run_dirs) < 2 and base_weight == 0.0:
        raise UserError("soup: give two or more runs to average, or one run with --base-weight (WiSE-FT)")
    if len({str(Path(r).resolve()) for r in run_dirs}) < len(run_dirs):
        raise UserError("soup: a run is named twice; each run counts once in the mean")


def soup(run_dirs: list[str | Path], *, base_weight: float = 0.0, checkpoint: str | None = None,
         runs_dir: str | Path | None = None, log: Any = print) -> Path:
    """Average the runs' weights (mix the pretrained ones toward the base by `base_weight`) into a new run folder."""
    from llmcli.models.load import load_trained

    check_options([str(r) for r in run_dirs], base_weight)
    runs = [Path(r) for r in run_dirs]
    loaded = [load_trained(r, checkpoint) for r in runs]
    _check_soupable(runs, loaded, base_weight)
    model = loaded[0].model  # becomes the soup, in place
    mean_weights(model, [t.model for t in loaded[1:]])
    if base_weight:
        mixed = mix_toward_base(model, loaded[0].cfg, loaded[0].manifest, base_weight)
        log(f"soup: {mixed} pretrained tensors mixed {base_weight:g} toward {loaded[0].cfg.model.path}")
    record = {"runs": [str(r) for r in runs], "checkpoints": [t.which for t in loaded], "base_weight": base_weight,
              "base_model": loaded[0].cfg.model.path if base_weight else None}
    root = Path(runs_dir) if runs_dir else runs[0].parent
    staging = staging_dir(root, "soup")
    try:
        _write_soup(staging, runs[0], loaded[0], model, record)
        tag = f"soup{len(runs)}" + (f"-base{round(base_weight * 100)}" if base_weight else "")
        out = publish_run(staging, root, f"{loaded[0].cfg.name}-{tag}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-written
        raise
    log(f"soup: wrote {out} (the mean of {len(runs)} run(s)); score it with `llmcli eval {out}`")
    return out


def _check_soupable(runs: list[Path], loaded: list[Any], base_weight: float) -> None:
    """One line naming the first run that cannot go into this soup, and why."""
    from llmcli.config.schema import PRETRAINED_MODELS
    from llmcli.models.formats import RECORD as COMPRESSED

    first = loaded[0]
    for run, t in zip(runs, loaded):
        if t.checkpoint.get(COMPRESSED) or t.checkpoint.get(RECORD):
            kind = "compressed" if t.checkpoint.get(COMPRESSED) else "soup"
            raise UserError(f"{run}: is a {kind} run; put the runs it was made from into the soup")
        if t.cfg.train.lora is not None:
            raise UserError(f"{run}: is a LoRA run (its checkpoint holds adapters, whose mean is not the mean of "
                            "the weights they give); soup full fine-tunes")
        if t.cfg.model != first.cfg.model:
            raise UserError(f"{run}: its model section differs from {runs[0]}'s; a soup averages runs of one model")
        if sha256_file(run / "tokenizer.json") != sha256_file(runs[0] / "tokenizer.json"):
            raise UserError(f"{run}: its tokenizer differs from {runs[0]}'s")
        if t.manifest["label_names"] != first.manifest["label_names"]:
            raise UserError(f"{run}: its labels {t.manifest['label_names']} differ from {runs[0]}'s")
        _check_same_weights(run, t.model, runs[0], first.model)
    if base_weight and first.cfg.model.name not in PRETRAINED_MODELS:
        raise UserError(f"--base-weight: {runs[0]} trains model {first.cfg.model.name!r} from scratch; there is no "
                        f"pretrained base to mix toward (models with one: {', '.join(PRETRAINED_MODELS)})")


def _check_same_weights(run: Path, model: nn.Module, ref_run: Path, ref: nn.Module) -> None:
    """The same weight names and shapes as the reference run's (e.g. both with or without FiLM layers)."""
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    if mine != theirs:
        diff = sorted(set(mine.items()) ^ set(theirs.items()))[:2]
        raise UserError(f"{run}: its weights differ from {ref_run}'s in name or shape ({diff})")


@torch.no_grad()
def mean_weights(model: nn.Module, others: list[nn.Module]) -> None:
    """Set every float parameter and buffer of `model` to its mean with `others`' (same names); a non-float buffer
    (e.g. position ids) must be equal in all of them."""
    if not others:
        return
    states = [dict(model.named_parameters()), *(dict(m.named_parameters()) for m in others)]
    for name, p in states[0].items():  # named_parameters gives a tied matrix once: it is averaged once
        p.copy_(torch.stack([s[name] for s in states]).mean(0))
    buffers = [dict(model.named_buffers()), *(dict(m.named_buffers()) for m in others)]
    for name, b in buffers[0].items():
        if b.is_floating_point():
            b.copy_(torch.stack([s[name] for s in buffers]).mean(0))
        elif not all(torch.equal(b, s[name]) for s in buffers[1:]):
            raise UserError(f"soup: the runs' buffer {name!r} differs (not a weight that can be averaged)")


@torch.no_grad()
def mix_toward_base(model: nn.Module, cfg: Any, manifest: dict[str, Any], base_weight: float) -> int:
    """theta = (1 - w) * theta + w * theta_base for the weights the pretrained model itself has (those inside the
    backbone's `hf` module, a tied LM head with them); the count of tensors mixed."""
    from llmcli.models.model import build_model

    base = build_model(cfg.model, vocab_size=manifest["vocab_size"], n_classes=len(manifest["label_names"]),
                       max_len=cfg.data.max_len)  # the pretrained weights; its new heads are not used
    pretrained = {id(p) for p in base.backbone.hf.parameters()}
    base_params = dict(base.named_parameters())
    n = 0
    for name, p in model.named_parameters():
        q = base_params.get(name)
        if q is not None and id(q) in pretrained:
            p.mul_(1.0 - base_weight).add_(q.to(p.dtype), alpha=base_weight)
            n += 1
    return n


def _write_soup(out: Path, first: Path, t: Any, model: nn.Module, record: dict[str, Any]) -> None:
    """The soup's files: run 0's config, tokenizer and data manifest, the checkpoint `best`, meta.json."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    write_derived_run(out, first, tensors, RECORD, record, step=t.checkpoint["step"], seed=t.cfg.seed, name=t.cfg.name)
