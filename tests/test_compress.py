"""`compress`: pruned / int8 copies of a run that eval and generate read like any run."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from llmcli.compress import check_options, compress, compressible, prune_linear, quantize_int8, side_by_side
from llmcli.errors import UserError
from llmcli.evaluate import evaluate
from llmcli.models.load import load_trained

QUIET = {"log": lambda m: None}


@pytest.fixture(scope="module")
def both(tiny_run, tmp_path_factory):
    """A copy of the tiny run and its int8 + 30 %-pruned child."""
    root = tmp_path_factory.mktemp("compress")
    parent = root / "parent"
    shutil.copytree(tiny_run, parent)
    return parent, compress(parent, quantize="int8", prune=0.3, **QUIET)


def _batch(run):
    from llmcli.data.dataset import ProcessedData

    data = ProcessedData(json.loads((run / "meta.json").read_text())["data"])
    return data.batch(data.indices("test")[:8])


def test_compressed_run_is_self_describing(both):
    parent, child = both
    meta = json.loads((child / "meta.json").read_text())
    assert meta["parent"] == str(parent) and meta["status"] == "completed"
    assert meta["compression"]["quantize"] == "int8" and meta["compression"]["prune"] == 0.3
    assert child.parent == parent.parent and re.fullmatch(r"\d{8}-\d{6}-tiny-int8-p30-[0-9a-f]{4}", child.name)
    for name in ("config.yaml", "tokenizer.json", "data_manifest.json", "checkpoints/best.safetensors"):
        assert (child / name).is_file()


def test_loading_rebuilds_exactly_the_compressed_model(both):
    parent, child = both
    ref = load_trained(parent, "best").model
    names = compressible(ref)
    assert "lm_head" not in names and "cls_head" in names  # the tied head stays float
    prune_linear(ref, names, 0.3)
    quantize_int8(ref, names)
    got = load_trained(child, "best").model
    b = _batch(parent)
    with torch.inference_mode():
        h_ref, h_got = ref(b.tokens), got(b.tokens)
        assert torch.equal(h_ref, h_got)
        assert torch.equal(ref.cls_head(h_ref[:, -1]), got.cls_head(h_got[:, -1]))
    assert type(got.cls_head).__name__ == "Linear" and got.cls_head.weight().dtype == torch.qint8


def test_pruning_zeroes_the_smallest_share_of_each_linear(tiny_run):
    m = load_trained(tiny_run, "best").model
    emb = m.backbone.embed.weight.clone()
    sparsity = prune_linear(m, compressible(m), 0.3)
    assert sparsity == pytest.approx(0.3, abs=0.01)
    for n in compressible(m):
        w = dict(m.named_modules())[n].weight
        assert int((w == 0).sum()) == round(0.3 * w.numel())
    assert torch.equal(m.backbone.embed.weight, emb)


def test_eval_and_generate_work_on_the_compressed_run(both):
    from llmcli.generate import generate_all

    parent, child = both
    report = side_by_side(parent, child, **QUIET)
    assert report["weight_bytes"]["compressed"] < report["weight_bytes"]["parent"]
    assert report["checkpoint_bytes"]["compressed"] < report["checkpoint_bytes"]["parent"]
    kjv = report["domains"]["kjv"]
    assert kjv["acc"]["delta"] == pytest.approx(kjv["acc"]["compressed"] - kjv["acc"]["parent"])
    assert set(kjv) >= {"lm_loss", "ppl", "acc", "macro_f1", "macro_recall", "ece"}
    assert abs(kjv["lm_loss"]["delta"]) < 0.5  # compressed, not broken
    assert json.loads((child / "compress.json").read_text())["compressed"] == str(child)
    assert evaluate(child, **QUIET)["domains"] == evaluate(child, **QUIET)["domains"]
    assert generate_all(child, ["And"], temperature=0, max_new_tokens=5)[0].text


@pytest.mark.parametrize(("q", "p", "msg"), [(None, None, "give --quantize int8, --prune"),
                                            ("int4", None, "--quantize: 'int4' is not supported"),
                                            (None, 1.5, "--prune: must be a fraction in \\(0, 1\\)")])
def test_bad_options(q, p, msg):
    with pytest.raises(UserError, match=msg):
        check_options(q, p)


def test_compress_cli_bad_input_exits_2(both, tmp_path):
    from typer.testing import CliRunner

    from llmcli.cli import app

    parent, child = both
    bare = tmp_path / "bare"
    shutil.copytree(parent, bare)
    shutil.rmtree(bare / "checkpoints")
    for args, msg in (([str(bare), "--quantize", "int8"], "no last checkpoint"),
                      ([str(child), "--prune", "0.2"], "already a compressed run"),
                      ([str(parent), "--prune", "0"], "--prune: must be a fraction")):
        out = CliRunner().invoke(app, ["compress", *args])
        assert out.exit_code == 2 and len(out.stderr.strip().splitlines()) == 1 and msg in out.stderr
    assert len(list(parent.parent.iterdir())) == 2  # no half-written run folder left behind
