"""The component contracts: what each registry kind's entry builds, and what the engine calls on it.

Every kind has an entry `(name, config class, "module:attr")` in its registry (`llmcli/registry.py`); `attr`
is a builder function or a class, called the same way: `attr(cfg, **runtime)`, with the component's own
sub-config and the kind's keyword runtime arguments (listed on each contract below). A builder that would
only forward its arguments is not written: the entry names the class.

Three kinds have hooks the engine calls on every component whether or not it needs them: backbones, objectives
and DG methods. Their base classes here give each optional hook a no-op (or the common) default, so the engine
calls it unconditionally, never `hasattr`. A built-in or plugin component of those kinds subclasses its base
class (`class MyBackbone(torch.nn.Module, Backbone)`; `class MyObjective(Objective)`; `class MyDG(DGMethod)`)
and overrides what it needs; the abstract methods are the ones it must write. The other kinds are plain
callables or objects, described by `Protocol`s here (a plugin implements the Protocol fully).

Torch-free: this module imports neither torch nor a component, so the config layer and `--help` may use it;
tensor types are named for readers and type checkers only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np
    import numpy.typing as npt
    from pydantic import BaseModel
    from torch import Tensor, nn
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LRScheduler

    from llmcli.data.dataset import Batch
    from llmcli.data.sources import Source

Probe = Callable[[int], "dict[str, float]"]  # step -> metrics ({"acc", "task_loss", ...}) on one held-out batch


# ---------------------------------------------------------------- source, tokenizer


class SourceBuilder(Protocol):
    """kind "source": `build(cfg) -> Source` (`llmcli.data.sources.Source`: a re-iterable `records()` of
    `Record`s, an `input_hash`, optionally declared `label_names` / `domains`, the `inputs` it reads)."""

    def __call__(self, cfg: BaseModel) -> Source: ...


@runtime_checkable
class Tokenizer(Protocol):
    """kind "tokenizer": what `build(cfg, texts=)` returns (`llmcli.data.tokenizers.TextTokenizer`).

    Records are `[bos_id] text [eos_id]`, right-padded with `pad_id`: 0/1/2 in the tokenizers llmcli trains, the
    model's own ids in `pretrained` (e.g. BERT's [CLS]/[SEP], GPT-2's <|endoftext|> as both, pad = eos where a
    model has no pad token). `save` writes the `tokenizer.json` that generation and evaluation load back with
    `TextTokenizer.load`, so it is a Hugging Face `tokenizers` file, and it records ids other than 0/1/2.
    """

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no specials."""

    def decode(self, ids: list[int]) -> str:
        """Text of a token sequence, specials dropped."""

    def stream(self) -> Callable[[int], str | None]:
        """An incremental decoder: one id at a time -> the text it adds (None while a character is unfinished)."""

    def token_bytes(self) -> np.ndarray:
        """(V,) UTF-8 bytes each token stands for (0 for specials): the denominator of bits-per-byte."""

    def fallback_mask(self) -> np.ndarray:
        """(V,) True for tokens that are not a whole text piece (<unk>, part of a character's bytes)."""

    def save(self, path: Path) -> None:
        """Write tokenizer.json."""


class TokenizerBuilder(Protocol):
    """kind "tokenizer": `build(cfg, texts)`, trained on the train split's texts (streamed once; a tokenizer that
    learns nothing, as `byte` and `pretrained`, need not read them)."""

    def __call__(self, cfg: BaseModel, texts: Iterable[str]) -> Tokenizer: ...


# ---------------------------------------------------------------- backbone


class Backbone:
    """kind "model": `build(cfg, vocab_size=, max_len=)` returns a backbone, a `torch.nn.Module` that also
    subclasses this (`class GPT(nn.Module, Backbone)`); `TwoHeadModel` puts the LM and classification heads on it.

    It must set `embed` (the token embedding, an `nn.Embedding`-like module with a (V, D) `weight`; the LM head
    is tied to it when the shapes match, and `train.freeze: [embedding]` freezes it), `d_model` (D) and
    `block_size` (the longest sequence it takes), and define `forward(idx (B, T), cache=None) -> (h (B, T, D),
    cache)`: with a cache, `idx` continues the cached sequence (generation). The hooks below have defaults.
    No default lives here as a class attribute: torch keeps submodules apart from the instance's attributes,
    so a class-level `embed = None` would hide the module a subclass assigns.
    """

    embed: nn.Module
    d_model: int
    block_size: int

    def pool(self, h: Tensor, lengths: Tensor) -> Tensor:
        """(B, D) features for the task head from states h (B, T, D): by default the state at each row's last
        real token (its EOS), which has seen the whole record. A backbone whose last state has not (the
        fixed-window MLP) overrides this."""
        import torch

        return h[torch.arange(h.shape[0], device=h.device), lengths - 1]  # (B, D)

    def residual_blocks(self) -> Sequence[nn.Module]:
        """The blocks, in order, whose outputs (B, T, D) a conditioning layer (the conditioned objective's FiLM)
        may modulate between the embedding and the output; none by default (then only the ends are)."""
        return []

    def hf_module(self) -> nn.Module | None:
        """The Hugging Face `transformers` model inside a pretrained backbone (what LoRA wraps and the
        pretrained tooling reads); None for llmcli's own from-scratch backbones."""
        return None

    def pretrained_record(self) -> dict[str, Any] | None:
        """Names the pretrained weights a backbone started from (`llmcli.models.pretrained.Pretrained.record()`:
        path, weight file, sha256, built-in name); None for a backbone trained from scratch."""
        return None

    def lm_head(self) -> nn.Module | None:
        """The backbone's own LM head, (..., D) states -> (..., V') logits with V' >= the run's vocabulary: a
        pretrained model's (tied to its embeddings or not, as the model is), an `nn.Linear` or an
        `llmcli.models.model.LMHead` (a transform, then a linear decoder). None (default): `TwoHeadModel` makes a
        bias-free linear head, tied to `embed` when the shapes match."""
        return None

    def causal(self) -> bool:
        """Whether L is next-token prediction (default) or, for a bidirectional encoder, a masked-LM loss over
        the positions `mask_tokens` picks (and `generate` refuses it)."""
        return True

    def mask_tokens(self, tokens: Tensor, lengths: Tensor, step: int | None = None) -> tuple[Tensor, Tensor]:
        """A masked-LM backbone (`causal()` False): the input with some tokens masked (B, T) and which positions
        are L's targets (B, T) bool (their original tokens), a pure function of the records and the training
        `step` (None: evaluation), so runs and resumes are exact. A causal backbone never gets this call."""
        raise NotImplementedError(f"{type(self).__name__} is not causal but defines no mask_tokens")

    def task_reads_masked(self) -> bool:
        """A masked-LM backbone: whether in training the task head reads the states of `mask_tokens`' input (one
        forward for L and T) rather than a forward of its own of the unmasked input (default). Evaluation always
        reads the unmasked input."""
        return False

    def states(self, idx: Tensor, lengths: Tensor) -> Tensor:
        """(B, T, D) states of right-padded records (`lengths` real tokens each): by default `forward(idx)`,
        as causal attention lets no real position see a pad; a bidirectional encoder masks the pads out."""
        return self(idx)[0]  # type: ignore[operator]

    def prefix_blocks(self) -> nn.ModuleList | None:
        """The blocks, bottom first, of which a frozen prefix cache (`llmcli.models.prefix_cache`) computes the
        bottom k once and then skips: each is called with the hidden states (B, T, D) as its first argument and
        returns them as one tensor, and `states` runs them in order, so that an entry can stand in for a block
        while the top blocks run. None (default): no prefix cache for this backbone."""
        return None


class BackboneBuilder(Protocol):
    """kind "model": the builder (or backbone class) the registry calls."""

    def __call__(self, cfg: BaseModel, *, vocab_size: int, max_len: int) -> Backbone: ...


# ---------------------------------------------------------------- task loss


class TaskLoss(Protocol):
    """kind "task_loss": what `build(cfg, n_classes=, class_counts=None)` returns: `loss(logits (B, C), labels
    (B,)) -> scalar`, the mean over rows with a label (label -1 = unlabeled, left out; none labeled: a zero
    that keeps the graph). `class_counts` (training labels per class) serves `class_weights: balanced`."""

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor: ...


class TaskLossBuilder(Protocol):
    """kind "task_loss": the builder the registry calls."""

    def __call__(self, cfg: BaseModel, *, n_classes: int, class_counts: npt.ArrayLike | None = None) -> TaskLoss: ...


# ---------------------------------------------------------------- objective


class Objective(ABC):
    """kind "objective": `build(cfg)` returns one; it turns the LM loss L and task loss T into one update.

    `backward` and `score` are the objective; the rest are hooks with no-op defaults, called by the engine
    (train.py), evaluation and the model loader on every objective. State kept across steps goes in
    `state_dict()` (JSON-able), or a resume is not exact. Built-ins derive from `llmcli.training.objectives.Objective`
    (which adds the `log_grad_every` schedule); see docs/objectives.md.
    """

    @abstractmethod
    def backward(self, lm_loss: Tensor, task_loss: Tensor, shared: list[nn.Parameter], step: int) -> dict[str, float]:
        """Leave the update's gradients in `.grad` of every parameter (shared weights and both heads); the logs
        of this micro-batch (`loss`, and `grad_cosine` on the steps it is measured)."""

    @abstractmethod
    def score(self, lm_loss: float, task_loss: float) -> float:
        """The objective's value on held-out losses (lower is better): picks the `best` checkpoint."""

    def grads_needed(self, step: int) -> tuple[bool, bool]:
        """Whether this micro-batch's update needs the gradient of L and of T (both by default). An objective that
        gives one of them zero weight at this step says so: the engine then computes that loss without a graph
        (logged, never backpropagated), so a weight nothing reaches gets no gradient (None, not zeros)."""
        return True, True

    def parameters(self) -> list[nn.Parameter]:
        """The objective's own trainable tensors, added to the optimiser's no-decay group (none by default)."""
        return []

    def wrap_model(self, model: nn.Module) -> None:  # noqa: B027 (a no-op default)
        """Add the objective's layers to the model, before the optimiser is built and before a checkpoint is
        loaded into it (nothing by default; the conditioned objective attaches its FiLM)."""

    def prepare(self, model: nn.Module, step: int | None) -> None:  # noqa: B027 (a no-op default)
        """Set the model up before each training micro-batch (`step`) or an evaluation (None); nothing by default."""

    def set_probe(self, probe: Probe) -> None:  # noqa: B027 (a no-op default)
        """Receive the engine's held-out measurement (`probe(step)`); unused by default."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint, JSON-able (none by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (a no-op default)
        """Restore `state_dict()`'s state (nothing by default)."""


# ---------------------------------------------------------------- domain generalisation


class DGMethod(ABC):
    """kind "dg": how the task loss T is formed from a batch drawn over several train domains.

    Built as `cls(cfg, domains=, names=, stream_domains=, d_model=, grad_accum_steps=)`: `domains` are the
    data indices of the labeled train domains, `names` their names, `stream_domains` the indices of every
    domain in the training stream (lm_only ones included), `d_model` the backbone's width and
    `grad_accum_steps` the micro-batches per optimiser step. A method takes the ones it needs by keyword.
    The T that `task_loss` returns is what the objective receives, so any DG method combines with any
    objective (docs/generalisation.md).
    """

    def __init__(self, cfg: BaseModel, *, domains: Sequence[int] = (), names: Sequence[str] = (), **_: Any) -> None:
        self.cfg, self.domains, self.names = cfg, list(domains), list(names)

    @abstractmethod
    def task_loss(self, model: nn.Module, batch: Batch, out: dict[str, Tensor], loss_fn: TaskLoss,
                  step: int) -> tuple[Tensor, dict[str, float]]:
        """(T, logs) for one micro-batch; `out` is `TwoHeadModel.losses(...)` (`task_loss`, `logits` (B, C),
        `features` (B, D); with data.lm_only_domains also `lm_only_features` (B', D) and `lm_only_domains` (B',),
        the unlabeled LM-only rows, which are not in `batch`) and `loss_fn` the run's task loss."""

    def end_step(self) -> None:  # noqa: B027 (a no-op default)
        """Called once per optimiser step, after all its micro-batches (nothing by default)."""

    def parameters(self) -> list[nn.Parameter]:
        """The method's own trainable tensors, added to the optimiser's no-decay group (none by default)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint, JSON-able (none by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (a no-op default)
        """Restore `state_dict()`'s state (nothing by default)."""


# ---------------------------------------------------------------- optimiser, schedule


class OptimizerBuilder(Protocol):
    """kind "optimizer": `build(cfg, decay=, no_decay=)`; weight decay applies to the `decay` group only."""

    def __call__(self, cfg: BaseModel, *, decay: list[nn.Parameter], no_decay: list[nn.Parameter]) -> Optimizer: ...


class ScheduleBuilder(Protocol):
    """kind "schedule": `build(cfg, optimizer=, total_steps=)`, stepped once per optimiser step."""

    def __call__(self, cfg: BaseModel, *, optimizer: Optimizer, total_steps: int) -> LRScheduler: ...
