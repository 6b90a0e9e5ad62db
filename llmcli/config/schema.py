"""The config's pydantic models, one per concern, and the bounds every number is checked against.

Each component (source, tokenizer, model, task loss, objective, DG method, optimiser, schedule) has a model
of its own whose `name` literal is its registry name; `builtins.py` registers them and `assemble.py` joins
them into discriminated unions. Nothing here imports torch or the registry.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from llmcli.data.sources import MAX_CLASS_ID

# Bounds every run-level number is checked against at load time (so `llmcli validate` catches absurd values).
# Seeds go to torch.manual_seed (which takes up to 2**64 - 1) and numpy's SeedSequence (no negatives): 63 bits
# keep every consumer happy, and a seed written to JSON stays an exact integer for any reader with int64.
SEED_MAX = 2**63 - 1
MAX_STEPS = 100_000_000  # optimiser steps (and step counts: warm-up, eval/log/checkpoint intervals)
MAX_BATCH = 65_536  # records per (micro-)batch
MAX_WIDTH = 16_384  # d_model and hidden widths
MAX_POSITIONS = 1_048_576  # block sizes (positions a backbone may see)
MAX_EXAMPLES = 1_000_000_000  # caps on records
MAX_WEIGHT = 1e6  # loss weights, penalties, multipliers and bounds on a loss
MAX_LR = 10.0  # step sizes of the methods' own updates (dual ascent, GroupDRO weights, MLDG's inner step)
# Optimiser rates: a diverging rate is train.on_nan's business (the tests provoke one with lr 1e8..1e12), so the
# bound only stops typos such as 3e40 that would overflow float32 outright.
MAX_OPTIM_LR = 1e12

Seed = Annotated[int, Field(ge=0, le=SEED_MAX, description=f"an integer in [0, 2**63 - 1] ({SEED_MAX})")]


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors, and so are inf / nan numbers."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


# ---------------------------------------------------------------- data sources and tokenizers


class BibleSource(Strict):
    """The built-in corpus: verse-aligned translations, domain = version, group = chapter."""

    name: Literal["bible"] = "bible"
    versions: list[str] = Field(default_factory=lambda: ["kjv", "web", "bbe", "ylt", "wyc"], min_length=1)
    label: Literal["genre", "testament"] = "genre"
    books: list[Annotated[int, Field(ge=1, le=66)]] | None = Field(
        None, description="keep only these book numbers (1-66); all if null")
    max_chapters_per_book: int | None = Field(None, ge=1, le=150, description="keep only the first N chapters of each book")

    @field_validator("versions")
    @classmethod
    def _lower_unique(cls, v: list[str]) -> list[str]:
        v = [x.lower() for x in v]
        if len(set(v)) != len(v):
            raise ValueError(f"versions must be unique, got {v}")
        return v


class TableFields(Strict):
    """Column names shared by the table-like sources (jsonl, csv, parquet)."""

    path: str
    text_field: str = "text"
    label_field: str | None = Field("label", description="column with the class (string or integer); null = unlabeled")
    domain_field: str | None = Field("domain", description="column naming each record's domain (if `domain` is null)")
    group_field: str | None = Field("group", description="column naming each record's split group; else one per record")
    domain: str | None = Field(None, description="tag every record with this domain (wins over domain_field)")


class JsonlSource(TableFields):
    """Records `{text, label?, domain?, group?}`, one JSON object per line."""

    name: Literal["jsonl"] = "jsonl"


class CsvSource(TableFields):
    """A CSV file with a header row; labels are strings unless label_type is int."""

    name: Literal["csv"] = "csv"
    delimiter: str = Field(",", min_length=1, max_length=1)
    label_type: Literal["str", "int"] = "str"


class ParquetSource(TableFields):
    """A Parquet file (read in row batches with pyarrow); labels are strings or integers."""

    name: Literal["parquet"] = "parquet"


class TextSource(Strict):
    """Plain-text files matched by a glob: one record per file, per line or per blank-line paragraph."""

    name: Literal["text"] = "text"
    glob: str = Field(..., description="files to read, e.g. corpus/**/*.txt (** recurses)")
    unit: Literal["file", "line", "paragraph"] = "line"
    domain: str | None = Field(None, description="domain of every record; null = from the file or folder name")
    domain_from: Literal["file", "folder"] = Field("file", description="file stem or parent folder name as domain")
    group_by: Literal["record", "file"] = Field("record", description="split unit: each record, or each whole file")
    label: str | Annotated[int, Field(ge=0, lt=MAX_CLASS_ID)] | None = Field(
        None, description="class of every record; null = unlabeled (LM only)")


class BPETokenizer(Strict):
    """Byte-level BPE trained with the `tokenizers` library on the training split only."""

    name: Literal["bpe"] = "bpe"
    vocab_size: int = Field(4096, ge=300, le=65000)
    min_frequency: int = Field(2, ge=1, le=MAX_EXAMPLES)


class CharTokenizer(Strict):
    """One token per character seen in training (the most frequent vocab_size of them), plus <unk>."""

    name: Literal["char"] = "char"
    vocab_size: int = Field(1024, ge=5, le=65000, description="specials and <unk> included")
    min_frequency: int = Field(1, ge=1, le=MAX_EXAMPLES)


class ByteTokenizer(Strict):
    """One token per UTF-8 byte: 256 + the specials; nothing to train."""

    name: Literal["byte"] = "byte"


class PretrainedTokenizer(Strict):
    """A pretrained model's own tokenizer (its tokenizer.json), never trained; the default for a pretrained model."""

    name: Literal["pretrained"] = "pretrained"
    path: str | None = Field(None, description="the model whose tokenizer to use (a folder, a .gguf or builtin:NAME); "
                             "null = model.path (filled in when the config is read)")


class SplitConfig(Strict):
    """Split by group (e.g. chapter) from ratios and a seed, or take a fixed split from a field."""

    val: float = Field(0.1, ge=0.0, lt=1.0)
    test: float = Field(0.1, gt=0.0, lt=1.0)
    seed: Seed = 0
    field: str | None = Field(None, description="take each record's split (train/val/test) from this field")
    holdout_domains: list[str] = Field(default_factory=list, description="domains used for test only")
    duplicates: Literal["drop", "error", "keep"] | None = Field(
        None, description="exact duplicate texts across splits: drop the later-split copies, fail, or keep; "
        "null = drop for ratio splits, error for a fixed split")

    @model_validator(mode="after")
    def _room_for_training(self) -> SplitConfig:
        if self.val + self.test >= 1.0:
            raise ValueError(f"val + test must be below 1 (given {self.val} + {self.test}), or nothing is left to train on")
        return self


class TokenDropout(Strict):
    """Delete each body token with probability p."""

    name: Literal["token_dropout"] = "token_dropout"
    p: float = Field(0.1, ge=0.0, lt=1.0)


class SpanDelete(Strict):
    """With probability p delete one span of 1..max_span body tokens."""

    name: Literal["span_delete"] = "span_delete"
    p: float = Field(0.5, ge=0.0, le=1.0)
    max_span: int = Field(3, ge=1, le=4096)


class SwapAdjacent(Strict):
    """Swap each pair of neighbouring body tokens with probability p."""

    name: Literal["swap_adjacent"] = "swap_adjacent"
    p: float = Field(0.1, ge=0.0, le=1.0)


Augment = Annotated[Union[TokenDropout, SpanDelete, SwapAdjacent], Field(discriminator="name")]  # noqa: UP007


# ---------------------------------------------------------------- model, losses, objectives


class GPTConfig(Strict):
    """Decoder-only pre-norm Transformer backbone."""

    name: Literal["gpt"] = "gpt"
    n_layer: int = Field(2, ge=1, le=64)
    n_head: int = Field(4, ge=1, le=1024)
    d_model: int = Field(128, ge=8, le=MAX_WIDTH)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = False
    block_size: int = Field(256, ge=8, le=MAX_POSITIONS, description="longest sequence (positions) the model can see")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GPTConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        return self


class _RecurrentBase(Strict):
    """Fields shared by the recurrent backbones."""

    n_layer: int = Field(2, ge=1, le=16)
    d_model: int = Field(128, ge=8, le=MAX_WIDTH)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    block_size: int = Field(256, ge=8, le=MAX_POSITIONS,
                            description="context kept when generating (the state itself is unbounded)")


class LSTMConfig(_RecurrentBase):
    """LSTM backbone (torch.nn.LSTM); tied LM head."""

    name: Literal["lstm"] = "lstm"


class GRUConfig(_RecurrentBase):
    """GRU backbone (torch.nn.GRU); tied LM head."""

    name: Literal["gru"] = "gru"


class RNNConfig(_RecurrentBase):
    """Elman RNN backbone (torch.nn.RNN, tanh); tied LM head."""

    name: Literal["rnn"] = "rnn"


class MLPConfig(Strict):
    """Fixed-window neural LM (Bengio et al. 2003); the task head mean-pools its states."""

    name: Literal["mlp"] = "mlp"
    context: int = Field(4, ge=1, le=64, description="tokens each prediction sees (the current one included)")
    d_model: int = Field(128, ge=8, le=MAX_WIDTH)
    hidden: int = Field(256, ge=8, le=MAX_WIDTH)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    block_size: int = Field(256, ge=8, le=MAX_POSITIONS, description="longest sequence generate keeps")


class HFCausalConfig(Strict):
    """A pretrained causal LM (AutoModelForCausalLM) with its own LM head; L is next-token prediction."""

    name: Literal["hf_causal"] = "hf_causal"
    path: str = Field(..., description="a local Hugging Face model folder (config.json + weights), a .gguf file or "
                      "builtin:NAME; never downloaded")
    block_size: int | None = Field(None, ge=8, le=MAX_POSITIONS,
                                   description="cap on positions; null = the model's own limit")


class HFEncoderConfig(Strict):
    """A pretrained BERT-style encoder (AutoModelForMaskedLM); L is the masked-LM loss (BERT's 80/10/10 masking)."""

    name: Literal["hf_encoder"] = "hf_encoder"
    path: str = Field(..., description="a local Hugging Face model folder (config.json + weights) or builtin:NAME; "
                      "never downloaded")
    block_size: int | None = Field(None, ge=8, le=MAX_POSITIONS,
                                   description="cap on positions; null = the model's own limit")
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0, description="share of the real (non-special) tokens L "
                                   "predicts; of those 80 % become the mask token, 10 % a random token, 10 % stay")
    pool: Literal["mean", "cls"] = Field("mean", description="the task head's features: the mean state over the "
                                         "record's tokens, or the state of its first token ([CLS])")
    task_input: Literal["unmasked", "masked"] = Field(
        "unmasked", description="what the task head reads in training: the unmasked record (a forward of its own "
        "beside L's masked one) or L's masked input (one forward serves L and T: faster, T trains on 15 %-masked "
        "text); evaluation always reads the unmasked record")


class CrossEntropyLoss(Strict):
    """Cross-entropy task loss over labeled records."""

    name: Literal["cross_entropy"] = "cross_entropy"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="balanced: weight class c by n / (k * n_c) over the training labels (k = classes present)")


class MSELoss(Strict):
    """Brier score: squared error between the softmax and the one-hot label, summed over classes."""

    name: Literal["mse"] = "mse"
    class_weights: Literal["none", "balanced"] = "none"


class ObjectiveBase(Strict):
    """What every objective shares: the grad_cosine probe, so runs are comparable whatever their objective."""

    log_grad_every: int = Field(50, ge=0, le=MAX_STEPS, description="log grad_cosine every N steps; 0 = never")


class WeightedObjective(ObjectiveBase):
    """L' = alpha * L + (1 - alpha) * T."""

    name: Literal["weighted"] = "weighted"
    alpha: float = Field(0.5, ge=0.0, le=1.0)


BetaParam = Annotated[float, Field(gt=0.0, le=1000.0)]


class ConditionedObjective(ObjectiveBase):
    """YOTO: alpha drawn per batch from a Beta on [alpha_min, alpha_max] and fed to the model; `alpha` is used at eval."""

    name: Literal["conditioned"] = "conditioned"
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="alpha the model is evaluated and generates at")
    alpha_min: float = Field(0.0, ge=0.0, le=1.0)
    alpha_max: float = Field(1.0, ge=0.0, le=1.0)
    alpha_beta: tuple[BetaParam, BetaParam] = Field(
        (3.0, 1.0), description="training alpha = alpha_min + (alpha_max - alpha_min) * Beta(a, b); (1, 1) is "
        "uniform; the default (3, 1) draws most alphas high, where L (the slower loss) still improves")
    film_hidden: int = Field(64, ge=1, le=MAX_WIDTH, description="width of the FiLM network that reads alpha")

    @model_validator(mode="after")
    def _range_in_order(self) -> ConditionedObjective:
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"alpha_min {self.alpha_min} is above alpha_max {self.alpha_max}")
        return self


class ConstrainedObjective(ObjectiveBase):
    """min L subject to task_loss <= epsilon, or held-out acc >= beta; Lagrangian dual ascent on lambda >= 0."""

    name: Literal["constrained"] = "constrained"
    epsilon: float | None = Field(None, gt=0.0, le=MAX_WEIGHT, description="bound on the task loss (set this or beta)")
    beta: float | None = Field(None, gt=0.0, lt=1.0, description="bound on held-out accuracy (set this or epsilon)")
    dual_lr: float = Field(0.05, gt=0.0, le=MAX_LR, description="step size of the multiplier's dual ascent")
    lambda_init: float = Field(0.0, ge=0.0, le=MAX_WEIGHT)

    @model_validator(mode="after")
    def _one_bound(self) -> ConstrainedObjective:
        if (self.epsilon is None) == (self.beta is None):
            raise ValueError("set exactly one of epsilon (task_loss <= epsilon) or beta (acc >= beta)")
        return self


class PCGradObjective(ObjectiveBase):
    """PCGrad (Yu et al. 2020): conflicting gradients are projected onto each other's normal plane."""

    name: Literal["pcgrad"] = "pcgrad"


class MGDAObjective(ObjectiveBase):
    """MGDA (Sener & Koltun 2018): the min-norm convex combination of the two gradients."""

    name: Literal["mgda"] = "mgda"


class UncertaintyObjective(ObjectiveBase):
    """Kendall et al. 2018: exp(-s_lm) L + exp(-s_task) T + (s_lm + s_task) / 2, s learned."""

    name: Literal["uncertainty"] = "uncertainty"
    # the loss weights are exp(-s): beyond +-30 they under/overflow float32 arithmetic in any useful sense
    init_log_var_lm: float = Field(0.0, ge=-30.0, le=30.0)
    init_log_var_task: float = Field(0.0, ge=-30.0, le=30.0)


# ---------------------------------------------------------------- domain generalisation (the `dg:` section)


class ERMConfig(Strict):
    """Empirical risk minimisation: the task loss pooled over every labeled row (the default)."""

    name: Literal["erm"] = "erm"


class GroupDROConfig(Strict):
    """GroupDRO (Sagawa et al. 2020): per-domain weights q <- q * exp(eta * loss_d), renormalised."""

    name: Literal["group_dro"] = "group_dro"
    eta: float = Field(0.01, gt=0.0, le=MAX_LR, description="step size of the exponentiated-gradient update of the weights")


class IRMConfig(Strict):
    """IRMv1 (Arjovsky et al. 2019): mean per-domain loss + lambda * penalty (DomainBed's even/odd gradient product)."""

    name: Literal["irm"] = "irm"
    penalty_weight: float = Field(100.0, ge=0.0, le=MAX_WEIGHT, description="lambda once the warm-up is over")
    anneal_steps: int = Field(100, ge=0, le=MAX_STEPS, description="steps with lambda = 1 before penalty_weight applies")


class CORALConfig(Strict):
    """Deep CORAL (Sun & Saenko 2016): pooled-feature mean and covariance aligned between domain pairs."""

    name: Literal["coral"] = "coral"
    weight: float = Field(1.0, ge=0.0, le=MAX_WEIGHT, description="weight of the alignment penalty")


class MLDGConfig(Strict):
    """MLDG (Li et al. 2018): meta-train on all but one train domain, meta-test on it after one inner step."""

    name: Literal["mldg"] = "mldg"
    inner_lr: float = Field(0.01, gt=0.0, le=MAX_LR, description="step size of the virtual meta-train update")
    beta: float = Field(1.0, ge=0.0, le=MAX_WEIGHT, description="weight of the meta-test loss")


class DANNConfig(Strict):
    """DANN (Ganin et al. 2016): a domain classifier on pooled features through a gradient-reversal layer.

    It classifies every domain in the training stream: the train domains and the unlabeled target text of
    data.lm_only_domains.
    """

    name: Literal["dann"] = "dann"
    weight: float = Field(0.1, ge=0.0, le=MAX_WEIGHT, description="weight of the domain-confusion term on the features "
                          "(DomainBed's lambda); the classifier itself always learns from the whole domain loss")
    reversal: float = Field(1.0, ge=0.0, le=MAX_WEIGHT, description="a further scale of the reversed gradient reaching "
                            "the features (they receive -weight * reversal times the domain loss's gradient)")
    hidden: int = Field(64, ge=1, le=MAX_WIDTH, description="width of the domain classifier's hidden layer")


# ---------------------------------------------------------------- optimisers and schedules


AdamBeta = Annotated[float, Field(ge=0.0, lt=1.0)]  # torch.optim.Adam's own range for each moment's decay


class AdamWConfig(Strict):
    """AdamW; weight decay only on matrices (not on norms, biases or embeddings)."""

    name: Literal["adamw"] = "adamw"
    lr: float = Field(3e-3, gt=0.0, le=MAX_OPTIM_LR)
    betas: tuple[AdamBeta, AdamBeta] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0.0, le=1.0)
    weight_decay: float = Field(0.01, ge=0.0, le=MAX_WEIGHT)


class AdamConfig(Strict):
    """Adam (L2 weight decay through the gradient, on matrices only)."""

    name: Literal["adam"] = "adam"
    lr: float = Field(3e-3, gt=0.0, le=MAX_OPTIM_LR)
    betas: tuple[AdamBeta, AdamBeta] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=MAX_WEIGHT)


class SGDConfig(Strict):
    """SGD with momentum."""

    name: Literal["sgd"] = "sgd"
    lr: float = Field(0.1, gt=0.0, le=MAX_OPTIM_LR)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0.0, le=MAX_WEIGHT)

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> SGDConfig:
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        return self


class CosineSchedule(Strict):
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""

    name: Literal["cosine"] = "cosine"
    warmup_steps: int = Field(50, ge=0, le=MAX_STEPS)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)


class LinearSchedule(Strict):
    """Linear warm-up, then linear decay to min_lr_ratio * lr."""

    name: Literal["linear"] = "linear"
    warmup_steps: int = Field(50, ge=0, le=MAX_STEPS)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)


class ConstantSchedule(Strict):
    """Linear warm-up, then a constant rate."""

    name: Literal["constant"] = "constant"
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)


# ---------------------------------------------------------------- run-level concerns


class LoRAConfig(Strict):
    """`train.lora`: low-rank adapters (peft) on a pretrained backbone; its base weights stay frozen."""

    r: int = Field(8, ge=1, le=MAX_WIDTH, description="rank of each adapter")
    alpha: float = Field(16.0, gt=0.0, le=MAX_WEIGHT, description="scaling: the update is (alpha / r) * B @ A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on each adapter's input")
    target_modules: Literal["auto"] | list[str] = Field(
        "auto", description="module names to adapt (peft matches a name or a dotted suffix); auto = peft's default "
        "for the architecture where peft has one, else every Linear layer inside the blocks")

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, v: str | list[str]) -> str | list[str]:
        if not v:
            raise ValueError("name at least one module, or give auto")
        return v


def _check_freeze_item(item: str) -> str:
    """A freeze name, or a well-formed layer range: blocks:A-B (0-based, inclusive, A <= B) or bottom:K."""
    kind, sep, rest = item.partition(":")
    if not sep:
        return item  # a part name (embedding, backbone, lm_head, cls_head): checked against the model
    m = re.fullmatch({"blocks": r"(\d+)-(\d+)", "bottom": r"\d+"}.get(kind, r"(?!)"), rest)
    if m is None or (kind == "blocks" and int(m.group(1)) > int(m.group(2))):
        raise ValueError(f"{item!r} is not a layer range (allowed: blocks:A-B, 0-based and inclusive with A <= B, "
                         "or bottom:K = the embeddings and the bottom K blocks)")
    return item


class TrainConfig(Strict):
    """The training loop."""

    steps: int = Field(1000, ge=1, le=MAX_STEPS)
    batch_size: int = Field(32, ge=1, le=MAX_BATCH)
    eval_every: int = Field(200, ge=1, le=MAX_STEPS, description="validate every N steps (and at the end)")
    checkpoint_every: int | None = Field(
        None, ge=1, le=MAX_STEPS,
        description="also write a resumable checkpoints/last every N steps; null = at eval steps only"
    )
    on_nan: Literal["stop", "skip_batch"] = Field(
        "stop", description="a NaN/Inf loss: stop the run (status failed) or skip that batch's update"
    )
    val_max_examples: int | None = Field(512, ge=1, le=MAX_EXAMPLES, description="per-domain cap on validation records")
    log_every: int = Field(10, ge=1, le=MAX_STEPS)
    grad_clip: float | None = Field(1.0, gt=0.0, le=MAX_WEIGHT)
    grad_accum_steps: int = Field(1, ge=1, le=MAX_BATCH,
                                  description="micro-batches of batch_size summed into one optimiser step")
    init_from: str | None = Field(None, description="run folder whose backbone + LM head weights start this run")
    freeze: list[Annotated[str, AfterValidator(_check_freeze_item)]] = Field(
        default_factory=list, description="parts not trained: embedding, backbone, lm_head, cls_head, or layer ranges "
        "of the backbone's blocks: blocks:A-B (0-based, inclusive), bottom:K (the embeddings + the bottom K blocks)")
    lora: LoRAConfig | None = Field(None, description="LoRA adapters on a pretrained backbone (peft); null = off")
    sampler: Literal["proportional", "balanced"] = Field(
        "proportional", description="batches drawn from the pooled train domains, or in equal shares per domain")
    select_by: Literal["train_domain_val", "leave_one_domain_out", "oracle"] = Field(
        "train_domain_val", description="what picks the `best` checkpoint: train domains' val, leave-one-domain-out "
        "runs, or the out-of-domain data itself (oracle: an upper bound, never the headline)")
    exclude_domains: list[str] = Field(
        default_factory=list, description="train domains left out of training (set by leave-one-domain-out selection)")
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    threads: int | None = Field(None, ge=1, le=4096,
                                description="torch CPU threads; null = all cores (shared among torchrun ranks)")
    compile: bool = Field(False, description="torch.compile the backbone (pays a compile at start; see docs/performance.md)")
    prefix_cache: Literal["auto", "off"] = Field(
        "auto", description="auto: when the embeddings and the bottom k blocks are frozen, their states are computed "
        "once (eval mode) into <processed>/prefix-<key>/ and read by every run and eval with that prefix; off: the "
        "whole model runs every step (docs/pretrained.md)")
    prefix_cache_dtype: Literal["fp32", "fp16"] = Field(
        "fp32", description="how the prefix cache stores states: fp32 (exact to float rounding) or fp16 (half the disk)")
    loggers: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list, description="trackers that also receive every metrics.jsonl record (docs/tracking.md): "
        "tensorboard (RUN/tb/), mlflow (MLFLOW_TRACKING_URI, else sqlite at the runs folder); none by default. "
        "They never change the metrics, and one that fails is disabled with a warning, never stopping the run")

    @field_validator("loggers")
    @classmethod
    def _unique_loggers(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("name each logger at most once (allowed: tensorboard, mlflow)")
        return v

    @field_validator("prefix_cache", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false (`--set train.prefix_cache=off`, `prefix_cache: off`)
        return "off" if v is False else v

    @model_validator(mode="after")
    def _lora_starts_from_its_base(self) -> TrainConfig:
        if self.lora is not None and self.init_from:
            raise ValueError("lora and init_from exclude each other: a LoRA run saves adapters over the unchanged "
                             "base model at model.path (set one of them to null)")
        return self


class EvalConfig(Strict):
    """`llmcli eval`."""

    batch_size: int = Field(128, ge=1, le=MAX_BATCH)
    checkpoint: Literal["best", "last"] = "best"
    max_examples: int | None = Field(None, ge=1, le=MAX_EXAMPLES, description="per-domain cap; null = the whole split")
    # forgetting (llmcli/evaluation/forgetting.py): a base without an LM head of its own (a sentence encoder) is
    # scored with only its new MLM head fitted first, this many steps at this learning rate
    base_head_steps: int = Field(300, ge=1, le=1_000_000, description="steps fitting a base encoder's new MLM head "
                                 "before its 'before' LM figures are scored")
    base_head_lr: float = Field(1e-3, gt=0.0, le=1.0, description="AdamW learning rate of that head fit")


# Sampling bounds, shared with the `llmcli generate` options (llmcli/evaluation/generate.py checks the flags against them).
MAX_NEW_TOKENS = 1_000_000
MAX_TEMPERATURE = 100.0  # beyond this every distribution is uniform to float32 precision
MAX_TOP_K = 1_000_000  # no vocabulary is larger


class GenerateConfig(Strict):
    """`llmcli generate` defaults (each overridable on the command line)."""

    max_new_tokens: int = Field(100, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.8, ge=0.0, le=MAX_TEMPERATURE)
    top_k: int | None = Field(50, ge=1, le=MAX_TOP_K)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Seed = 0


class SweepConfig(Strict):
    """`llmcli sweep-alpha` defaults."""

    alphas: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min_length=1)


class DataBase(Strict):
    """Fields of `data:` besides the source and tokenizer components."""

    split: SplitConfig = Field(default_factory=SplitConfig)
    train_domains: list[str] | None = Field(
        None, min_length=1, description="domains trained on (in-domain); null = the first domain"
    )
    lm_only_domains: list[str] = Field(
        default_factory=list, description="domains whose training text feeds L only (their labels never reach T)"
    )
    lm_only_ratio: float = Field(
        1.0, ge=0.0, le=64.0, description="LM-only rows drawn per labeled row, beside the unchanged labeled batch "
        "(their own stream; training-time only, not part of the processed data)")
    lm_only_in_tokenizer: bool = Field(
        False, description="also train a from-scratch tokenizer on the lm_only domains' training text "
        "(a pretrained tokenizer is never retrained)")
    max_len: int = Field(64, ge=4, le=4096, description="tokens per record (BOS included); longer ones are cut")
    processed_dir: str = Field("data/processed", description="where preprocessed data is cached")
    augment: list[Augment] = Field(default_factory=list, description="training-time augmentations (train split only)")

    @model_validator(mode="after")
    def _consistent(self) -> DataBase:
        if getattr(self, "sources", None) and "source" in self.model_fields_set:
            if self.source != type(self).model_fields["source"].default_factory():  # type: ignore[attr-defined]
                raise ValueError("give either `source` or `sources` (a list), not both")
        both = set(self.train_domains or []) & set(self.split.holdout_domains)
        if both:
            raise ValueError(f"domains {sorted(both)} are both trained on and held out (split.holdout_domains)")
        return self


# Backbones that bring their own vocabulary: their tokenizer is the model's own (`data.tokenizer: pretrained`).
PRETRAINED_MODELS = ("hf_causal", "hf_encoder")


class ExperimentBase(Strict):
    """Top-level fields besides the concerns."""

    name: str = Field("experiment", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: Seed = 0

    @model_validator(mode="after")
    def _records_fit_the_model(self) -> ExperimentBase:
        # any backbone with a positional limit (`block_size`) must hold a whole record
        block, max_len = getattr(getattr(self, "model", None), "block_size", None), self.data.max_len
        if block is not None and max_len > block:
            raise ValueError(f"model.block_size: {block} is shorter than data.max_len ({max_len})")
        return self

    @model_validator(mode="after")
    def _pretrained_models_use_their_own_tokenizer(self) -> ExperimentBase:
        # default (data.tokenizer not given) and refusal for a pretrained model; a null path becomes model.path,
        # so every builder (and the processed data's key) sees a concrete path
        model, data = getattr(self, "model", None), getattr(self, "data", None)
        if model is None or data is None:
            return self
        pretrained_model = model.name in PRETRAINED_MODELS
        if pretrained_model and "tokenizer" not in data.model_fields_set:
            data.tokenizer = PretrainedTokenizer()
        tok = data.tokenizer
        if pretrained_model and tok.name != "pretrained":
            raise ValueError(f"data.tokenizer: {tok.name!r} cannot be used with model {model.name!r}: a pretrained "
                             "model needs its own tokenizer (data.tokenizer: {name: pretrained}, the default for it)")
        if tok.name == "pretrained" and tok.path is None:
            if not pretrained_model:
                raise ValueError(f"data.tokenizer.path: null means the model's own tokenizer, but model {model.name!r} "
                                 "has none; name a pretrained model (a folder, a .gguf file or builtin:NAME)")
            tok.path = model.path
        return self

    @model_validator(mode="after")
    def _dg_needs_domains(self) -> ExperimentBase:
        dg, data = getattr(self, "dg", None), getattr(self, "data", None)
        if dg is None or data is None or dg.name == "erm":
            return self
        n = len(data.train_domains or [None]) - len(self.train.exclude_domains)  # null = the first domain only
        if dg.name == "dann" and data.lm_only_ratio > 0:
            # DANN's classifier also tells the unlabeled target text apart: one labeled domain + target text is the
            # setting it was made for (Ganin et al. 2016: labeled source, unlabeled target)
            n += len(data.lm_only_domains)
        if n < 2:
            target = " (or, for dann, data.lm_only_domains: unlabeled target text)" if dg.name == "dann" else ""
            raise ValueError(f"dg.name: {dg.name!r} needs at least two data.train_domains{target} "
                             f"(given: {data.train_domains})")
        return self
