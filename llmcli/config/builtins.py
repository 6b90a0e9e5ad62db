"""The built-in components: each config model with the builder that makes it, registered at import.

This table is the one place a built-in component is added (docs/extending.md): its config model
(schema.py) and what builds it as "module:function", or "module:Class" where the class itself is the builder
(the contracts: llmcli/contracts.py), imported only when the component is built.
"""

from __future__ import annotations

from llmcli.config.schema import (
    AdamConfig,
    AdamWConfig,
    BibleSource,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    ConditionedObjective,
    ConstantSchedule,
    ConstrainedObjective,
    CORALConfig,
    CosineSchedule,
    CrossEntropyLoss,
    CsvSource,
    DANNConfig,
    ERMConfig,
    GPTConfig,
    GroupDROConfig,
    GRUConfig,
    HFCausalConfig,
    HFEncoderConfig,
    IRMConfig,
    JsonlSource,
    LinearSchedule,
    LSTMConfig,
    MGDAObjective,
    MLDGConfig,
    MLPConfig,
    MSELoss,
    ParquetSource,
    PCGradObjective,
    PretrainedTokenizer,
    RNNConfig,
    SGDConfig,
    TextSource,
    UncertaintyObjective,
    WeightedObjective,
)
from llmcli.registry import registry

_BUILTINS: dict[str, list[tuple[type, str]]] = {
    "source": [
        (BibleSource, "llmcli.data.sources:bible_source"),
        (JsonlSource, "llmcli.data.sources:jsonl_source"),
        (CsvSource, "llmcli.data.sources:csv_source"),
        (TextSource, "llmcli.data.sources:text_source"),
        (ParquetSource, "llmcli.data.sources:parquet_source"),
    ],
    "tokenizer": [
        (BPETokenizer, "llmcli.data.tokenizers:build_bpe"),
        (CharTokenizer, "llmcli.data.tokenizers:build_char"),
        (ByteTokenizer, "llmcli.data.tokenizers:build_byte"),
        (PretrainedTokenizer, "llmcli.data.tokenizers:build_pretrained"),
    ],
    "model": [
        (GPTConfig, "llmcli.models.gpt:build_gpt"),
        (LSTMConfig, "llmcli.models.recurrent:build_recurrent"),
        (GRUConfig, "llmcli.models.recurrent:build_recurrent"),
        (RNNConfig, "llmcli.models.recurrent:build_recurrent"),
        (MLPConfig, "llmcli.models.mlp:build_mlp"),
        (HFCausalConfig, "llmcli.models.hf:build_hf_causal"),
        (HFEncoderConfig, "llmcli.models.hf:build_hf_encoder"),
    ],
    "task_loss": [
        (CrossEntropyLoss, "llmcli.training.losses:build_cross_entropy"),
        (MSELoss, "llmcli.training.losses:build_mse"),
    ],
    "objective": [
        (WeightedObjective, "llmcli.training.objectives:Weighted"),
        (ConstrainedObjective, "llmcli.training.objectives:Constrained"),
        (PCGradObjective, "llmcli.training.objectives:PCGrad"),
        (MGDAObjective, "llmcli.training.objectives:MGDA"),
        (UncertaintyObjective, "llmcli.training.objectives:Uncertainty"),
        (ConditionedObjective, "llmcli.training.objectives:Conditioned"),
    ],
    "dg": [
        (ERMConfig, "llmcli.training.dg:ERM"),
        (GroupDROConfig, "llmcli.training.dg:GroupDRO"),
        (IRMConfig, "llmcli.training.dg:IRM"),
        (CORALConfig, "llmcli.training.dg:CORAL"),
        (MLDGConfig, "llmcli.training.dg:MLDG"),
        (DANNConfig, "llmcli.training.dg:DANN"),
    ],
    "optimizer": [
        (AdamWConfig, "llmcli.training.optim:build_adamw"),
        (AdamConfig, "llmcli.training.optim:build_adam"),
        (SGDConfig, "llmcli.training.optim:build_sgd"),
    ],
    "schedule": [
        (CosineSchedule, "llmcli.training.optim:build_cosine"),
        (LinearSchedule, "llmcli.training.optim:build_linear"),
        (ConstantSchedule, "llmcli.training.optim:build_constant"),
    ],
}
for _kind, _items in _BUILTINS.items():
    for _cls, _builder in _items:
        registry(_kind).register(_cls.model_fields["name"].default, _cls, _builder)
