"""data.lm_only_domains: unlabeled target text in a stream of its own beside an unchanged labeled batch.

T must see exactly what it sees without the LM-only text (same rows, same dropout), L covers both streams,
the LM-only stream is a pure function of the step (exact resume), and the tokenizer reads that text only when
asked (data.lm_only_in_tokenizer)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmcli.data.preprocess import processed_path
from llmcli.training.engine import Session, _accumulate, _batch_indices, _lm_only_indices, _lm_only_loss, train
from tests.training.test_resume import same_weights
from tests.training.test_train import QUIET, metric_values

WYC = ("data.lm_only_domains=[wyc]",)
DROPOUT = "model.dropout=0.1"  # so the test also catches an LM-only forward that moves the labeled rows' RNG


def quiet_session(cfg) -> Session:
    return Session(cfg, log=lambda m: None)


def recorded_losses_calls(sess: Session) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Spy on the model's loss call: (tokens, labels, domains) of every batch it is given, in order."""
    calls, real = [], sess.model.losses

    def spy(batch, task_loss, **kwargs):
        calls.append((batch.tokens.clone(), batch.labels.clone(), batch.domains.clone()))
        return real(batch, task_loss, **kwargs)

    sess.model.losses = spy
    return calls


def six_steps(sess: Session) -> tuple[list, float]:
    """The loop's first six optimiser steps: every batch the model saw, and the first step's T."""
    calls, first_t = recorded_losses_calls(sess), None
    for step in range(6):
        sess.optimizer.zero_grad(set_to_none=True)
        _, task, _, _ = _accumulate(sess, step, sess.model.shared_parameters())
        first_t = task if first_t is None else first_t
        sess.optimizer.step()
    return calls, first_t


def test_the_labeled_batches_and_first_t_are_those_of_a_run_without_lm_only_text(tiny):
    plain = quiet_session(tiny(DROPOUT))  # each session runs right after its set-up seeded torch, as train does
    seen_plain, t_plain = six_steps(plain)
    mixed = quiet_session(tiny(DROPOUT, *WYC))
    seen_mixed, t_mixed = six_steps(mixed)
    assert plain.data.path != mixed.data.path and np.array_equal(plain.train_idx, mixed.train_idx)
    assert len(seen_plain) == 6 and len(seen_mixed) == 12  # one labeled and one LM-only forward per micro-batch
    labeled, extra = seen_mixed[0::2], seen_mixed[1::2]
    for (tok_a, lab_a, dom_a), (tok_b, lab_b, dom_b) in zip(seen_plain, labeled):
        assert tok_a.equal(tok_b) and lab_a.equal(lab_b) and dom_a.equal(dom_b) and (lab_b >= 0).all()
    wyc = mixed.data.domains.index("wyc")
    for tokens, labels, domains in extra:  # data.lm_only_ratio=1 by default: 16 LM-only rows per 16 labeled
        assert tokens.shape[0] == 16 and (labels == -1).all() and (domains == wyc).all()
    assert t_plain == t_mixed  # same weights, same rows, same dropout: the very same T


def test_at_alpha_zero_a_run_with_lm_only_text_is_bit_identical_and_at_half_it_is_not(tiny, tmp_path):
    runs = {}
    for alpha in (0.0, 0.5):
        for name, extra in (("plain", ()), ("mixed", WYC)):
            cfg = tiny(DROPOUT, f"objective.alpha={alpha}", *extra)
            runs[alpha, name] = train(cfg, runs_dir=tmp_path / f"{name}-{alpha}", **QUIET)

    def t_side(run):  # every record but the train L (which covers the LM-only rows when there are some)
        drop = ("lm_loss", "loss", "lm_only_loss", "grad_cosine")
        return [{k: v for k, v in r.items() if r["split"] != "train" or k not in drop} for r in metric_values(run)]

    assert same_weights(runs[0.0, "plain"], runs[0.0, "mixed"])  # weights, optimiser state and RNG, bit for bit
    assert t_side(runs[0.0, "plain"]) == t_side(runs[0.0, "mixed"])
    assert all("lm_only_loss" in r for r in metric_values(runs[0.0, "mixed"]) if r["split"] == "train")
    assert not same_weights(runs[0.5, "plain"], runs[0.5, "mixed"])  # at alpha > 0 the LM-only text reaches L


def test_l_is_the_mean_over_every_real_target_token_of_both_streams(tiny):
    sess = quiet_session(tiny(*WYC))
    sess.model.eval()
    batch = sess.data.batch(_batch_indices(sess, 3))
    extra = sess.data.batch(_lm_only_indices(sess, 3))
    with torch.no_grad():
        out = sess.model.losses(batch, sess.task_loss)
        lm, logs, n_tokens = _lm_only_loss(sess, 3, batch, out)
        nll = []
        for b in (batch, extra):
            per, mask = sess.model.lm_nll(sess.model(b.tokens), b.tokens, b.lengths)  # (B, T-1) each
            nll.append(per[mask])
        by_hand = torch.cat(nll).mean()
    assert abs(float(lm) - float(by_hand)) < 1e-5
    assert float(lm) != pytest.approx(float(out["lm_loss"]), abs=1e-3)  # the LM-only rows count
    assert n_tokens == extra.n_tokens and logs["lm_only_loss"] == pytest.approx(float(nll[1].mean()), abs=1e-5)
    assert out["lm_only_features"].shape == (16, sess.model.cls_head.in_features)


def test_the_ratio_sets_the_lm_only_rows_and_their_stream_is_a_pure_function_of_the_step(tiny):
    half = quiet_session(tiny(*WYC, "data.lm_only_ratio=0.5"))
    assert len(_lm_only_indices(half, 0)) == 8
    assert np.array_equal(_lm_only_indices(half, 5), _lm_only_indices(half, 5))
    assert not np.array_equal(_lm_only_indices(half, 5), _lm_only_indices(half, 6))
    none = quiet_session(tiny(*WYC, "data.lm_only_ratio=0"))
    assert none.data.path == half.data.path  # the ratio is a training-time setting: same processed data
    calls = recorded_losses_calls(none)
    _accumulate(none, 0, none.model.shared_parameters())
    assert len(calls) == 1  # no LM-only rows, no LM-only forward
    two = quiet_session(tiny("data.lm_only_domains=[web,wyc]", "train.sampler=balanced"))
    names = [two.data.domains[d] for d in two.data.domain_ids[_lm_only_indices(two, 1)]]
    assert names.count("web") == names.count("wyc") == 8  # equal shares per LM-only domain under balanced


def test_a_run_with_lm_only_text_resumes_exactly(tiny, tmp_path):
    settings = (DROPOUT, *WYC, "train.steps=14", "train.log_every=1", "train.eval_every=7")
    reference = train(tiny(*settings), runs_dir=tmp_path / "ref", **QUIET)
    run = train(tiny(*settings), runs_dir=tmp_path / "cut", stop_after=5, **QUIET)
    train(None, resume=run, **QUIET)
    assert metric_values(run) == metric_values(reference)
    assert same_weights(run, reference)


def test_the_tokenizer_reads_the_lm_only_text_only_when_asked(tiny):
    def tokenizer_sha(*overrides):
        return json.loads((quiet_session(tiny(*overrides)).data.path / "manifest.json").read_text())["tokenizer_sha256"]

    plain = tokenizer_sha()
    assert tokenizer_sha(*WYC) == plain
    assert tokenizer_sha(*WYC, "data.lm_only_in_tokenizer=true") != plain
    # without lm_only_domains the flag means nothing: the same cache (adding the field moved no existing one)
    assert processed_path(tiny("data.lm_only_in_tokenizer=true").data) == processed_path(tiny().data)


def test_dann_classifies_the_lm_only_rows_as_their_own_domain(tiny):
    sess = quiet_session(tiny("data.train_domains=[kjv,web]", "train.sampler=balanced", "dg.name=dann", *WYC))
    seen = []
    sess.dg.classifier.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    _, _, logs, _ = _accumulate(sess, 0, sess.model.shared_parameters())
    assert seen == [32]  # 16 labeled kjv + web rows and 16 unlabeled wyc rows
    assert 0.0 <= logs["domain_acc"] <= 1.0 and "lm_only_loss" in logs


def test_a_pretrained_tokenizer_is_never_retrained_and_an_encoder_learns_l_from_both_streams(tiny, tmp_path):
    pytest.importorskip("transformers")
    from tests.hf_models import tiny_bert

    bert = tiny_bert(tmp_path / "bert", mlm_head=False)
    encoder = (f"model={{name: hf_encoder, path: '{bert}'}}", "data.tokenizer={name: pretrained}")
    plain = quiet_session(tiny(*encoder))
    mixed = quiet_session(tiny(*encoder, *WYC, "data.lm_only_in_tokenizer=true"))  # asked, and still not retrained

    def sha(sess):
        return json.loads((sess.data.path / "manifest.json").read_text())["tokenizer_sha256"]

    assert sha(plain) == sha(mixed) and plain.data.path != mixed.data.path
    calls = recorded_losses_calls(mixed)
    lm, _, logs, _ = _accumulate(mixed, 0, mixed.model.shared_parameters())
    assert len(calls) == 2 and (calls[0][1] >= 0).all() and (calls[1][1] == -1).all()  # labeled, then LM-only
    assert np.isfinite(lm) and np.isfinite(logs["lm_only_loss"]) and logs["lm_only_loss"] > 0  # a masked-LM loss
