"""The GPT backbone and the two-headed model."""

from __future__ import annotations

import pytest
import torch

from llmcli.config import GPTConfig, validate_config
from llmcli.contracts import Backbone
from llmcli.data.dataset import Batch
from llmcli.models.model import build_model, n_params
from llmcli.training.losses import build_cross_entropy


def small_model(vocab: int = 50, classes: int = 3):
    torch.manual_seed(0)
    return build_model(GPTConfig(n_layer=2, n_head=2, d_model=16, block_size=32), vocab_size=vocab,
                       n_classes=classes, max_len=16)


def test_lm_head_is_tied_to_the_embedding():
    m = small_model()
    assert m.lm_head.weight is m.backbone.embed.weight
    assert n_params(m) < sum(p.numel() for p in m.state_dict().values())


def test_padding_changes_neither_loss():
    m = small_model().eval()
    ce = build_cross_entropy(validate_config({}).task_loss, n_classes=3)
    toks = torch.tensor([[1, 5, 6, 7, 2]])
    a = m.losses(Batch(toks, torch.tensor([5]), torch.tensor([1]), torch.tensor([0])), ce)
    padded = torch.cat([toks, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    b = m.losses(Batch(padded, torch.tensor([5]), torch.tensor([1]), torch.tensor([0])), ce)
    assert torch.allclose(a["lm_loss"], b["lm_loss"]) and torch.allclose(a["task_loss"], b["task_loss"])


def test_unlabeled_rows_do_not_reach_the_task_loss():
    ce = build_cross_entropy(validate_config({}).task_loss, n_classes=3)
    logits = torch.tensor([[5.0, 0, 0], [0, 0, 5.0]])
    only_first = ce(logits[:1], torch.tensor([0]))
    assert torch.allclose(ce(logits, torch.tensor([0, -1])), only_first)
    assert ce(logits, torch.tensor([-1, -1])).item() == 0.0


def assert_cache_matches_full_forward(backbone) -> None:
    """Prefill 5 tokens, then 3 cached single-token steps: the states equal one full forward."""
    seq = torch.tensor([[1, 4, 9, 3, 8, 7, 2, 5]])
    full, _ = backbone(seq)
    h, cache = backbone(seq[:, :5])
    steps = [h]
    for t in range(5, 8):
        h, cache = backbone(seq[:, t : t + 1], cache)
        steps.append(h)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_weight_decay_spares_norms_biases_and_embeddings():
    m = small_model()
    decay, no_decay = m.decay_groups()
    emb = m.backbone.embed.weight
    assert all(p.dim() >= 2 for p in decay) and all(p is not emb for p in decay)
    assert any(p is emb for p in no_decay)
    assert len(decay) + len(no_decay) == len({id(p) for p in m.parameters()})


# ---------------------------------------------------------------- every backbone

BACKBONES = ["gpt", "lstm", "gru", "rnn", "mlp"]


def backbone_model(name: str, vocab: int = 50, classes: int = 3):
    torch.manual_seed(0)
    cfg = validate_config({"model": {"name": name, "d_model": 16}})
    return build_model(cfg.model, vocab_size=vocab, n_classes=classes, max_len=16)


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_caches_exactly_and_ties_its_lm_head(name):
    m = backbone_model(name).eval()
    assert m.lm_head.weight is m.backbone.embed.weight and m.backbone.d_model == 16
    assert_cache_matches_full_forward(m.backbone)


@pytest.mark.parametrize("name", BACKBONES)
def test_padding_changes_neither_loss_for_any_backbone(name):
    m = backbone_model(name).eval()
    ce = build_cross_entropy(validate_config({}).task_loss, n_classes=3)
    toks = torch.tensor([[1, 5, 6, 7, 2]])
    a = m.losses(Batch(toks, torch.tensor([5]), torch.tensor([1]), torch.tensor([0])), ce)
    padded = torch.cat([toks, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    b = m.losses(Batch(padded, torch.tensor([5]), torch.tensor([1]), torch.tensor([0])), ce)
    assert torch.allclose(a["lm_loss"], b["lm_loss"]) and torch.allclose(a["task_loss"], b["task_loss"], atol=1e-6)


def test_mlp_sees_a_fixed_window_and_its_task_head_sees_the_whole_record():
    m = backbone_model("mlp").eval()  # context 4
    a = torch.tensor([[1, 5, 6, 7, 8, 9, 2]])
    b = a.clone()
    b[0, 1] = 11  # changes positions 1..4 only
    ha, hb = m.backbone(a)[0], m.backbone(b)[0]
    assert torch.allclose(ha[:, 5:], hb[:, 5:]) and not torch.allclose(ha[:, 1], hb[:, 1])
    lengths = torch.tensor([7])
    assert not torch.allclose(m.pool(ha, lengths), m.pool(hb, lengths))


def test_recurrent_classification_reads_the_last_real_state():
    m = backbone_model("lstm").eval()
    toks = torch.tensor([[1, 5, 6, 7, 2, 0, 0]])
    h = m(toks)
    assert torch.equal(m.pool(h, torch.tensor([5])), h[:, 4])


@pytest.mark.parametrize("bias", [True, False])
def test_the_functional_decoding_step_gives_the_module_forwards_states(bias):
    """GPT._step (one token, inference, no hooks) equals the module path it stands in for, padded or not."""
    from types import SimpleNamespace

    from llmcli.models.gpt import GPT

    torch.manual_seed(0)
    m = GPT(SimpleNamespace(d_model=16, n_head=2, n_layer=2, dropout=0.0, bias=bias), 50, 32).eval()
    ids = torch.randint(3, 50, (2, 8))
    for pad in (None, torch.tensor([2, 0])):
        states = []
        for hooked in (False, True):  # a forward hook inside the backbone sends steps through the modules
            handle = m.blocks[0].register_forward_hook(lambda *a: None) if hooked else None
            assert m._hooked() == hooked
            with torch.inference_mode():
                h, cache = m(ids[:, :5], pad=pad)
                for t in range(5, 8):
                    h, cache = m(ids[:, t : t + 1], cache, pad=pad)
            assert bool(cache.weights) != hooked  # the unhooked steps really took the functional path
            states.append(h)
            if handle:
                handle.remove()
        assert torch.allclose(states[0], states[1], atol=1e-6)


def test_a_quantised_or_hooked_gpt_decodes_through_its_modules():
    """decode_weights() is empty (module path) when a Linear is quantised or a hook sits in the backbone."""
    from types import SimpleNamespace

    from llmcli.models.gpt import GPT

    m = GPT(SimpleNamespace(d_model=16, n_head=2, n_layer=2, dropout=0.0, bias=True), 50, 32).eval()
    assert len(m.decode_weights()) == 2
    handle = m.blocks[1].mlp[0].register_forward_pre_hook(lambda *a: None)  # deep inside a block
    assert m._hooked() and m.decode_weights() == []
    handle.remove()
    q = torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)
    assert q.decode_weights() == []
    ids = torch.randint(3, 50, (1, 6))
    with torch.inference_mode():
        h, cache = q(ids[:, :5])
        step, cache = q(ids[:, 5:], cache)
    # (dynamic int8 scales activations per call, so a step is not bit-comparable to a full forward)
    assert cache.weights == [] and step.shape == (1, 1, 16) and torch.isfinite(step).all()


class _Lookup(torch.nn.Module, Backbone):
    """A third-party backbone written to the contract: an embedding and nothing else, no hook overridden."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.d_model, self.block_size = 8, 32
        self.embed = torch.nn.Embedding(vocab_size, 8)

    def forward(self, idx: torch.Tensor, cache: None = None) -> tuple[torch.Tensor, None]:
        return self.embed(idx), None  # (B, T, D)


def test_a_backbone_that_overrides_no_hook_gets_last_token_pooling_and_no_blocks():
    from llmcli.models.model import TwoHeadModel

    m = TwoHeadModel(_Lookup(20), 8, 20, 3)
    assert m.lm_head.weight is m.backbone.embed.weight  # tied through the contract's `embed`
    toks = torch.tensor([[1, 5, 6, 2, 0], [1, 7, 2, 0, 0]])
    h, lengths = m(toks), torch.tensor([4, 3])
    assert torch.equal(m.pool(h, lengths), torch.stack([h[0, 3], h[1, 2]]))  # each row's EOS state
    assert list(m.backbone.residual_blocks()) == []
    ce = build_cross_entropy(validate_config({}).task_loss, n_classes=3)
    out = m.losses(Batch(toks, lengths, torch.tensor([0, 2]), torch.tensor([0, 0])), ce)
    assert out["features"].shape == (2, 8) and torch.isfinite(out["task_loss"])


def test_the_gpt_blocks_are_its_residual_blocks_and_the_other_backbones_have_none():
    from llmcli.models.film import attach_film

    m = small_model()
    assert list(m.backbone.residual_blocks()) == list(m.backbone.blocks) and len(m.backbone.blocks) == 2
    assert attach_film(m, 4).sites == 2 + 2  # FiLM after each block, and at the embedding and the output
    for name in ("lstm", "mlp"):
        assert list(backbone_model(name).backbone.residual_blocks()) == []


def test_every_registered_backbone_is_built_to_the_contract():
    from llmcli.registry import registry

    for name in registry("model").names():
        if name in ("hf_causal", "hf_encoder"):  # need a model folder; tests/models/test_hf*.py build them
            continue
        backbone = registry("model").build(registry("model").get(name).config(), vocab_size=30, max_len=16)
        assert isinstance(backbone, Backbone) and isinstance(backbone, torch.nn.Module), name
        h, _ = backbone(torch.tensor([[1, 4, 5, 2]]))
        assert h.shape == (1, 4, backbone.d_model) and backbone.embed.weight.shape[0] == 30
