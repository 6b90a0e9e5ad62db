"""`compress`: pruned / int8 copies of a run that eval and generate read like any run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from llmcli.errors import UserError
from llmcli.evaluation.evaluate import evaluate
from llmcli.experiments.compress import check_options, compress, compressible, prune_linear, quantize_int8, render_report
from llmcli.models.load import load_trained
from tests.conftest import read_only_tree, refuse_writes_under

QUIET = {"log": lambda m: None}


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every path under root with its size, modification time and (for files) sha256: equal = nothing written."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


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
    from llmcli.evaluation.generate import generate_all

    parent, child = both
    report = json.loads((child / "compress.json").read_text())  # written by compress, inside the new run
    assert report["compressed"] == str(child) and report["parent"] == str(parent)
    assert report["weight_bytes"]["compressed"] < report["weight_bytes"]["parent"]
    assert report["checkpoint_bytes"]["compressed"] < report["checkpoint_bytes"]["parent"]
    kjv = report["domains"]["kjv"]
    assert kjv["acc"]["delta"] == pytest.approx(kjv["acc"]["compressed"] - kjv["acc"]["parent"])
    assert set(kjv) >= {"lm_loss", "ppl", "acc", "macro_f1", "macro_recall", "ece"}
    assert abs(kjv["lm_loss"]["delta"]) < 0.5  # compressed, not broken
    # the report's scores are eval's, computed without writing: the same numbers as an eval of each run
    assert kjv["acc"]["parent"] == evaluate(parent, write=False, **QUIET)["domains"]["kjv"]["acc"]
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


def test_compress_never_writes_into_the_parent(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from llmcli.cli import app

    parent = shutil.copytree(tiny_run, tmp_path / "parent")
    before = snapshot(parent)
    out = CliRunner().invoke(app, ["compress", str(parent), "--prune", "0.3"])
    assert out.exit_code == 0, out.output
    assert snapshot(parent) == before  # no eval/test.json, no picture, no touched file in the parent
    child = Path(out.stdout.strip())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["parent", child.name])  # no staging folder left
    assert (child / "compress.json").is_file() and not (child / "eval").exists()


def test_a_parent_that_cannot_be_written_compresses_completely(tiny_run, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from llmcli.cli import app

    parent = shutil.copytree(tiny_run, tmp_path / "parent")
    (tmp_path / "children").mkdir()
    refuse_writes_under(monkeypatch, parent)
    out = CliRunner().invoke(app, ["compress", str(parent), "--quantize", "int8", "--runs-dir", str(tmp_path / "children")])
    assert out.exit_code == 0, out.output
    (child,) = (tmp_path / "children").iterdir()
    assert out.stdout.strip() == str(child) and json.loads((child / "compress.json").read_text())["compressed"] == str(child)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions, so chmod cannot make the parent read-only")
def test_a_read_only_parent_compresses_completely(tiny_run, tmp_path):
    parent = shutil.copytree(tiny_run, tmp_path / "parent")
    with read_only_tree(parent):
        child = compress(parent, prune=0.3, runs_dir=tmp_path / "children", **QUIET)
    assert (child / "compress.json").is_file()


def test_a_failure_while_comparing_leaves_no_run_folder(tiny_run, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import llmcli.experiments.compress
    from llmcli.cli import app

    parent = shutil.copytree(tiny_run, tmp_path / "parent")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C during the side-by-side eval, after the weights were written

    monkeypatch.setattr(llmcli.experiments.compress, "side_by_side", interrupted)
    out = CliRunner().invoke(app, ["compress", str(parent), "--prune", "0.3"])
    assert out.exit_code == 130
    assert [p.name for p in tmp_path.iterdir()] == ["parent"]  # neither a child nor its staging folder


def test_latency_is_timed_after_a_warm_up_alternately_and_the_median_kept(tiny_run, monkeypatch):
    import llmcli.experiments.compress as c

    clock, calls = [0.0], []

    def fake_forward(model, batches):  # a model's first call costs 3 s (one-time set-up), each later one 10 / 20 ms
        calls.append(id(model))
        clock[0] += 3.0 if calls.count(id(model)) == 1 else 0.010 if id(model) == calls[0] else 0.020

    monkeypatch.setattr(c, "_forward", fake_forward)
    monkeypatch.setattr(c.time, "perf_counter", lambda: clock[0])
    got = c.forward_latency({"a": (tiny_run, "best"), "b": (tiny_run, "last")}, "test", repeats=4, examples=100, **QUIET)
    a, b = calls[0], calls[1]
    assert a != b and calls == [a, b, a, b, b, a, a, b, b, a]  # both warmed, then alternating order
    assert got["examples"] == 100 and got["repeats"] == 4
    assert got["ms_per_example"] == {"a": pytest.approx(10 / 100), "b": pytest.approx(20 / 100)}  # no warm-up cost


def test_the_report_compares_weights_not_checkpoint_files(both):
    from rich.console import Console

    parent, child = both
    report = json.loads((child / "compress.json").read_text())
    console = Console(width=300, record=True)
    console.print(render_report(report))
    rows = {line.split("│")[1].strip(): [x.strip() for x in line.split("│")[2:5]]
            for line in console.export_text().splitlines() if line.count("│") >= 5}
    w = report["weight_bytes"]
    assert rows["model weights (bytes)"][2] == f"{w['compressed'] / w['parent']:.3f}"
    assert rows["checkpoint file (bytes)"][2] == "-"  # the parent's file also holds the optimiser state
    t = report["ms_per_example"]
    assert rows["forward latency (ms/example)"][2] == f"{t['compressed'] / t['parent']:.3f}"
    assert report["timing"]["repeats"] == 5 and report["timing"]["examples"] > 0


def test_a_missing_checkpoint_of_a_compressed_run_names_the_one_it_has(both):
    from typer.testing import CliRunner

    from llmcli.cli import app

    _, child = both
    out = CliRunner().invoke(app, ["eval", str(child), "--checkpoint", "last"])
    assert out.exit_code == 2 and "has it trained" not in out.stderr
    assert out.stderr.strip() == (f"error: {child}: no last checkpoint (checkpoints/last.safetensors); a compressed run "
                                  "has only the checkpoint(s) it was written with: best")
