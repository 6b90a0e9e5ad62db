"""`soup`: the weight average of runs (and its mix toward a pretrained base) as a run that eval reads like any run."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from typer.testing import CliRunner

from llmcli.cli import app
from llmcli.errors import UserError
from llmcli.evaluation.evaluate import evaluate
from llmcli.experiments.soup import check_options, soup
from llmcli.models.load import load_trained
from tests.hf_models import tiny_bert

QUIET = {"progress": False, "log": lambda m: None}


@pytest.fixture(scope="module")
def two_seeds(tiny, tmp_path_factory):
    """Two tiny runs that differ only in their seed."""
    from llmcli.training.engine import train

    root = tmp_path_factory.mktemp("soup")
    return [train(tiny(f"seed={s}", "train.steps=6", "train.eval_every=6"), runs_dir=root, **QUIET) for s in (0, 1)]


def test_a_soup_holds_the_mean_of_the_runs_weights_and_eval_scores_it(two_seeds):
    out = soup(two_seeds, log=lambda m: None)
    assert out.parent == two_seeds[0].parent and re.fullmatch(r"\d{8}-\d{6}-tiny-soup2-[0-9a-f]{4}", out.name)
    a, b, s = (load_trained(r).model.state_dict() for r in (*two_seeds, out))
    assert set(s) == set(a)
    for k, v in s.items():
        if v.is_floating_point():
            assert torch.allclose(v, (a[k] + b[k]) / 2, atol=1e-7), k
        else:
            assert torch.equal(v, a[k])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "completed" and meta["soup"]["runs"] == [str(r) for r in two_seeds]
    assert meta["soup"]["checkpoints"] == ["best", "best"] and meta["soup"]["base_weight"] == 0.0
    res = evaluate(out, write=False, log=lambda m: None)
    assert 0.0 <= res["domains"]["kjv"]["acc"] <= 1.0 and res["checkpoint"] == "best"


def test_a_pretrained_run_mixed_toward_its_base_moves_only_the_pretrained_weights(tiny, tmp_path):
    from llmcli.models.model import build_model
    from llmcli.training.engine import train

    bert = tiny_bert(tmp_path / "bert")
    run = train(tiny(f"model={{name: hf_encoder, path: '{bert}'}}", "data.tokenizer={name: pretrained}",
                     "train.steps=4", "train.eval_every=4", "train.val_max_examples=8", "optim.lr=0.01"),
                runs_dir=tmp_path / "runs", **QUIET)
    out = soup([run], base_weight=0.25, runs_dir=tmp_path / "soups", log=lambda m: None)
    t = load_trained(run)
    base = build_model(t.cfg.model, vocab_size=t.manifest["vocab_size"], n_classes=len(t.manifest["label_names"]),
                       max_len=t.cfg.data.max_len).state_dict()
    tuned, mixed = t.model.state_dict(), load_trained(out).model.state_dict()
    moved = [k for k in tuned if k.startswith("backbone.hf.") and not torch.equal(tuned[k], base[k])]
    assert moved  # the run trained its pretrained weights: there is something to mix
    for k in moved:
        assert torch.allclose(mixed[k], 0.75 * tuned[k] + 0.25 * base[k], atol=1e-6), k
    assert torch.equal(mixed["cls_head.weight"], tuned["cls_head.weight"])  # the task head: the run's own
    assert re.fullmatch(r"\d{8}-\d{6}-tiny-soup1-base25-[0-9a-f]{4}", out.name)
    assert json.loads((out / "meta.json").read_text())["soup"]["base_model"] == str(bert)


@pytest.mark.parametrize(("n_runs", "weight", "message"), [
    (1, 0.0, "give two or more runs to average, or one run with --base-weight"),
    (2, 1.0, r"--base-weight: must be in \[0, 1\)"),
    (2, -0.1, r"--base-weight: must be in \[0, 1\)"),
])
def test_soup_options_out_of_range_are_refused(n_runs, weight, message):
    with pytest.raises(UserError, match=message):
        check_options(["a", "b"][:n_runs], weight)


def test_runs_that_cannot_be_averaged_are_refused_in_one_line_with_nothing_written(tiny, two_seeds, tmp_path):
    from llmcli.training.engine import train

    other = train(tiny("model.d_model=48", "train.steps=2", "train.eval_every=2"), runs_dir=tmp_path / "o", **QUIET)
    root = two_seeds[0].parent
    before = sorted(p.name for p in root.iterdir())
    runner = CliRunner()
    cases = [
        ([*map(str, two_seeds), str(two_seeds[0])], "a run is named twice"),
        ([str(two_seeds[0]), str(other)], "its model section differs"),
        ([str(two_seeds[0]), "--base-weight", "0.3"], "trains model 'gpt' from scratch; there is no pretrained base"),
        ([*map(str, two_seeds), "--checkpoint", "final"], "--checkpoint: 'final' is not allowed"),
        ([str(two_seeds[0]), str(tmp_path / "missing")], "missing"),
    ]
    for args, message in cases:
        res = runner.invoke(app, ["soup", *args])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1, res.output
    assert sorted(p.name for p in root.iterdir()) == before  # no soup and no staging folder left behind


def test_a_soup_is_not_souped_again(two_seeds, tmp_path):
    first = soup(two_seeds, runs_dir=tmp_path, log=lambda m: None)
    copy = tmp_path / "copy"
    shutil.copytree(two_seeds[0], copy)
    with pytest.raises(UserError, match="is a soup run; put the runs it was made from into the soup"):
        soup([first, copy], log=lambda m: None)
