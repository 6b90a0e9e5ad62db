"""hf_encoder: a BERT-style encoder, masked-LM loss (BERT's 80/10/10), its own or a new tied MLM head."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

from llmcli.config import HFEncoderConfig  # noqa: E402
from llmcli.errors import UserError  # noqa: E402
from llmcli.models.model import build_model  # noqa: E402
from tests.hf_models import tiny_bert  # noqa: E402

PAD, CLS, SEP, MASK = 0, 2, 3, 4  # tiny_bert's WordPiece: [PAD] [UNK] [CLS] [SEP] [MASK]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert-bare"), mlm_head=False)


def encoder(path, **kw):
    torch.manual_seed(0)
    return build_model(HFEncoderConfig(path=str(path), **kw), vocab_size=500, n_classes=3, max_len=48)


def records(lengths, width=None, seed=0):
    """Right-padded [CLS] text [SEP] records of random word ids (5..499), and their lengths."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    tokens = torch.full((len(lengths), width), PAD)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.cat([torch.tensor([CLS]), torch.randint(5, 500, (n - 2,), generator=g), torch.tensor([SEP])])
    return tokens, torch.tensor(lengths)


def test_masking_is_berts_recipe_on_real_tokens_only(bert_dir):
    m = encoder(bert_dir)
    tokens, lengths = records([200] * 50 + [40] * 10, width=210)
    masked, picked = m.backbone.mask_tokens(tokens, lengths, step=3)
    real = (torch.arange(210)[None] < lengths[:, None]) & (tokens != CLS) & (tokens != SEP)
    assert not (picked & ~real).any()  # never a special token or a pad
    assert abs(float(picked.sum() / real.sum()) - 0.15) < 0.01
    sel_in, sel_orig = masked[picked], tokens[picked]
    assert abs(float((sel_in == MASK).float().mean()) - 0.8) < 0.03
    assert abs(float((sel_in == sel_orig).float().mean()) - 0.1) < 0.02  # kept (or drawn as itself)
    assert (masked[~picked] == tokens[~picked]).all()


def test_masks_are_a_function_of_the_record_and_the_step(bert_dir):
    m = encoder(bert_dir)
    tokens, lengths = records([30, 20, 12])
    a = m.backbone.mask_tokens(tokens, lengths, step=7)
    assert all((x == y).all() for x, y in zip(a, m.backbone.mask_tokens(tokens, lengths, step=7)))
    alone = m.backbone.mask_tokens(tokens[1:2, :20], lengths[1:2], step=7)  # another batch, less padding
    assert (alone[0] == a[0][1:2, :20]).all() and (alone[1] == a[1][1:2, :20]).all()
    assert not (m.backbone.mask_tokens(tokens, lengths, step=8)[1] == a[1]).all()  # a new draw each step
    ev = m.backbone.mask_tokens(tokens, lengths)  # evaluation: the same mask every time
    assert (ev[1] == m.backbone.mask_tokens(tokens, lengths)[1]).all()


def test_its_own_mlm_head_is_used_and_a_bare_encoder_gets_a_tied_new_one(bert_dir, bare_dir):
    own = encoder(bert_dir)
    pred = own.backbone.hf_module().cls.predictions
    assert own.lm_head.transform is pred.transform and own.lm_head.decoder is pred.decoder
    assert not own.backbone.fresh_head
    bare = encoder(bare_dir)
    assert bare.backbone.fresh_head and isinstance(bare.backbone.hf_module(), transformers.BertModel)
    assert bare.lm_head.decoder.weight is bare.backbone.embed.weight and (bare.lm_head.decoder.bias == 0).all()
    assert any(k.startswith("backbone.mlm_head.transform") for k in bare.state_dict())  # trained and saved
    assert bare.backbone.pretrained_record()["path"] == str(bare_dir)


def test_padding_changes_neither_the_states_nor_the_losses(bert_dir):
    from llmcli.config import validate_config
    from llmcli.data.dataset import Batch
    from llmcli.training.losses import build_cross_entropy

    m = encoder(bert_dir).eval()
    ce = build_cross_entropy(validate_config({}).task_loss, n_classes=3)
    tokens, lengths = records([12])
    padded = torch.cat([tokens, torch.full((1, 6), PAD)], dim=1)
    with torch.no_grad():
        a = m.losses(Batch(tokens, lengths, torch.tensor([1]), torch.tensor([0])), ce)
        b = m.losses(Batch(padded, lengths, torch.tensor([1]), torch.tensor([0])), ce)
        assert torch.allclose(m(tokens, lengths), m(padded, lengths)[:, :12], atol=1e-5)
    assert torch.allclose(a["lm_loss"], b["lm_loss"], atol=1e-6) and torch.allclose(a["task_loss"], b["task_loss"])


def test_pool_is_the_mean_over_real_tokens_or_cls(bert_dir):
    tokens, lengths = records([12, 7])
    with torch.no_grad():
        for pool in ("mean", "cls"):
            m = encoder(bert_dir, pool=pool).eval()
            h = m(tokens, lengths)
            want = torch.stack([h[0, :12].mean(0), h[1, :7].mean(0)]) if pool == "mean" else h[:, 0]
            assert torch.allclose(m.pool(h, lengths), want, atol=1e-6)


def test_the_fused_head_with_a_bias_equals_plain_cross_entropy():
    from llmcli.models.model import fused_nll

    g = torch.Generator().manual_seed(0)
    h, w, b = (torch.randn(9, 8, generator=g, requires_grad=True), torch.randn(40, 8, generator=g, requires_grad=True),
               torch.randn(40, generator=g, requires_grad=True))
    targets, row_w = torch.randint(0, 40, (9,), generator=g), torch.rand(9, generator=g)
    fused = fused_nll(h, w, b, targets, row_w)
    plain = (torch.nn.functional.cross_entropy(h @ w.t() + b, targets, reduction="none") * row_w).sum()
    grads = torch.autograd.grad(fused, (h, w, b))
    want = torch.autograd.grad(plain, (h, w, b))
    assert torch.allclose(fused, plain, atol=1e-5) and all(torch.allclose(x, y, atol=1e-5) for x, y in zip(grads, want))


def test_a_causal_lm_folder_is_no_encoder(tmp_path):
    from tests.hf_models import tiny_gpt2

    with pytest.raises(UserError, match=r"^model.path: cannot load .* as a BERT-style encoder \(AutoModelForMaskedLM\)"):
        build_model(HFEncoderConfig(path=str(tiny_gpt2(tmp_path / "gpt2"))), vocab_size=400, n_classes=3, max_len=48)


def test_hf_encoder_trains_evaluates_as_masked_lm_repeats_and_refuses_generate(tiny, tmp_path, bare_dir):
    from llmcli.evaluation.evaluate import evaluate
    from llmcli.evaluation.generate import generate
    from llmcli.training.engine import train

    def run(name):
        cfg = tiny(f"model={{name: hf_encoder, path: '{bare_dir}'}}", "data.tokenizer={name: pretrained}",
                   "train.steps=3", "train.eval_every=3", "train.log_every=1", "train.val_max_examples=16",
                   "eval.max_examples=16", "eval.base_head_steps=20")  # the base's head fit (forgetting): short
        return train(cfg, runs_dir=tmp_path / name, progress=False, log=lambda m: None)

    first, second = run("a"), run("b")
    recs = [[{k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "time_s")}
             for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (first, second)]
    assert recs[0] == recs[1] and any(r["split"] == "val" for r in recs[0])  # masking is reproducible
    result = evaluate(first, write=False, plots=False, log=lambda m: None)
    assert result["lm"] == "masked" and all(d["ppl"] > 1 for d in result["domains"].values())
    again = evaluate(first, write=False, plots=False, log=lambda m: None)
    assert [d["ppl"] for d in again["domains"].values()] == [d["ppl"] for d in result["domains"].values()]
    with pytest.raises(UserError, match=r"^generate needs a causal model; .* is an hf_encoder"):
        list(generate(first, "In the beginning", max_new_tokens=3))


def test_task_input_masked_trains_both_losses_on_one_forward_and_evaluates_the_unmasked_record(bert_dir):
    from llmcli.config import validate_config
    from llmcli.data.dataset import Batch
    from llmcli.training.losses import build_cross_entropy

    ce = build_cross_entropy(validate_config({}).task_loss, n_classes=3)
    tokens, lengths = records([12, 9])
    batch = Batch(tokens, lengths, torch.tensor([1, 2]), torch.tensor([0, 0]))
    two, one = encoder(bert_dir).train(), encoder(bert_dir, task_input="masked").train()
    calls = []
    for m in (two, one):
        m.backbone.hf.base_model.register_forward_hook(lambda mod, args, out, m=m: calls.append(m))
        torch.manual_seed(1)  # the same dropout draws on both models' first forward
        out = m.losses(batch, ce, step=5)
        (out["lm_loss"] + out["task_loss"]).backward()
    assert calls.count(two) == 2 and calls.count(one) == 1  # one forward serves L and T
    masked, picked = one.backbone.mask_tokens(tokens, lengths, step=5)
    one.eval()
    with torch.no_grad():
        h = one.backbone.states(masked, lengths)  # (B, T, D) of the masked input, no dropout
        train_mode = one.losses(batch, ce, step=5)
        eval_mode = one.losses(batch, ce)  # evaluation: T reads the unmasked record
    assert torch.allclose(train_mode["logits"], one.cls_head(one.pool(h, lengths)), atol=1e-6)
    assert torch.allclose(train_mode["lm_loss"], one.lm_loss(h, tokens, lengths, picked=picked), atol=1e-6)
    assert torch.allclose(eval_mode["logits"], one.cls_head(one.pool(one(tokens, lengths), lengths)), atol=1e-6)
    assert not torch.allclose(train_mode["logits"], eval_mode["logits"], atol=1e-4)
    assert torch.allclose(train_mode["lm_loss"], two.eval().losses(batch, ce, step=5)["lm_loss"], atol=1e-6)


def test_a_one_pass_run_killed_mid_save_resumes_to_the_uninterrupted_metrics(tiny, bert_dir, tmp_path, monkeypatch):
    import llmcli.models.checkpoint as ck
    from llmcli.training.engine import train
    from tests.training.test_resume import Killed, same_weights
    from tests.training.test_train import QUIET, metric_values

    sets = [f"model={{name: hf_encoder, path: '{bert_dir}', task_input: masked}}", "data.tokenizer={name: pretrained}",
            "train.steps=10", "train.checkpoint_every=4", "train.eval_every=10", "train.log_every=1",
            "train.val_max_examples=16"]
    reference = train(tiny(*sets), runs_dir=tmp_path / "reference", **QUIET)
    real = ck.atomic_write_json

    def write_json(path, obj):
        if path.name == "last.json" and obj["step"] == 8:
            raise Killed  # the crash: step 8's tensors written, its sidecar not, so the run goes back to step 4
        real(path, obj)

    monkeypatch.setattr(ck, "atomic_write_json", write_json)
    with pytest.raises(Killed):
        train(tiny(*sets), runs_dir=tmp_path / "killed", **QUIET)
    monkeypatch.undo()
    run = next((tmp_path / "killed").iterdir())
    train(None, resume=run, **QUIET)
    assert json.loads((run / "meta.json").read_text())["resumed_at_step"] == 4
    assert metric_values(run) == metric_values(reference)  # steps 5-8's masks and dropout drawn again, the same
    assert same_weights(run, reference)
