"""Nothing was lost in loading: llmcli's LM loss of a pretrained model equals transformers' own on the same tokens.

Tiny random GPT-2 (tied head), Llama (untied head) and BERT (its own MLM head) of tests/hf_models.py; for BERT the
masked positions are llmcli's (BERT's masking of the record), given to transformers as `labels`.
"""

from __future__ import annotations

import math

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

from llmcli.config import HFCausalConfig, HFEncoderConfig  # noqa: E402
from llmcli.models.model import build_model  # noqa: E402
from tests.hf_models import BUILDERS  # noqa: E402

PPL_RTOL = 0.005  # the bound; measured: ~1e-6


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero-shot")
    return {name: BUILDERS[name](root / name) for name in ("gpt2", "llama", "bert")}


def reference_loss(ref, tokens, lengths, masked=None, picked=None):
    """transformers' own mean loss: next-token for a causal LM, masked LM at `picked` for BERT."""
    attention = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()  # (B, T) right padding
    if masked is None:
        return ref(input_ids=tokens, attention_mask=attention, labels=tokens.masked_fill(attention == 0, -100)).loss
    return ref(input_ids=masked, attention_mask=attention, labels=tokens.masked_fill(~picked, -100)).loss


def batch(vocab, specials, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros((len(lengths), max(lengths)), dtype=torch.long)  # pad 0
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.cat([torch.tensor(specials[:1]), torch.randint(5, vocab, (n - 2,), generator=g),
                                   torch.tensor(specials[1:])])
    return tokens, torch.tensor(lengths)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_llmcli_lm_loss_is_transformers_loss_on_the_same_tokens(folders, name):
    path = folders[name]
    encoder = name == "bert"
    cfg = HFEncoderConfig(path=str(path)) if encoder else HFCausalConfig(path=str(path))
    vocab = 500 if encoder else 400
    model = build_model(cfg, vocab_size=vocab, n_classes=3, max_len=48).eval()
    auto = transformers.AutoModelForMaskedLM if encoder else transformers.AutoModelForCausalLM
    ref = auto.from_pretrained(str(path), local_files_only=True).eval()
    tokens, lengths = batch(vocab, [2, 3] if encoder else [1, 2], [40, 33, 12, 25])
    masked, picked = model.backbone.mask_tokens(tokens, lengths) if encoder else (None, None)
    with torch.no_grad():
        want = float(reference_loss(ref, tokens, lengths, masked, picked))
        plain = float(model.lm_loss(model(tokens, lengths), tokens, lengths))
    fused = float(model.lm_loss(model(tokens, lengths), tokens, lengths).detach())  # with grad: the chunked fused head
    for got in (plain, fused):
        assert math.exp(got) == pytest.approx(math.exp(want), rel=PPL_RTOL)
        assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_an_untrained_run_evaluates_to_transformers_perplexity_per_domain(tiny, tmp_path, folders, name):
    from llmcli.data.dataset import ProcessedData
    from llmcli.data.preprocess import preprocess
    from llmcli.evaluation.evaluate import evaluate, scored_indices
    from llmcli.models.load import load_trained
    from llmcli.training.engine import train

    encoder = name == "bert"
    model_name = "hf_encoder" if encoder else "hf_causal"
    # one step with the whole pretrained model frozen (only the task head trains): its LM is the loaded one
    cfg = tiny(f"model={{name: {model_name}, path: '{folders[name]}'}}", "data.tokenizer={name: pretrained}",
               "train.steps=1", "train.eval_every=1", "train.val_max_examples=8", "train.freeze=[backbone]",
               "eval.max_examples=24", "eval.batch_size=8")
    run = train(cfg, runs_dir=tmp_path, progress=False, log=lambda m: None)
    result = evaluate(run, write=False, plots=False, log=lambda m: None)
    t = load_trained(run)
    data = ProcessedData(preprocess(t.cfg.data, log=lambda m: None))
    auto = transformers.AutoModelForMaskedLM if encoder else transformers.AutoModelForCausalLM
    ref = auto.from_pretrained(str(folders[name]), local_files_only=True).eval()
    scored = scored_indices(t.cfg, data, "test")  # eval's own draw of 24 records per domain
    for domain, metrics in result["domains"].items():
        idx = scored[domain]
        nll, n = 0.0, 0
        for start in range(0, len(idx), 5):  # another batching than eval's: the masks are per record
            b = data.batch(idx[start : start + 5])
            masked, picked = t.model.backbone.mask_tokens(b.tokens, b.lengths) if encoder else (None, None)
            targets = int(picked.sum()) if encoder else int((b.lengths - 1).sum())
            with torch.no_grad():
                nll += float(reference_loss(ref, b.tokens, b.lengths, masked, picked)) * targets
            n += targets
        assert metrics["ppl"] == pytest.approx(math.exp(nll / n), rel=PPL_RTOL), domain
