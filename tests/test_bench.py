"""The benchmark scripts still run against the package (their figures are measured by `make bench`, not here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _run(script: str, *args: str) -> list[dict]:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_throughput_bench_takes_llmclis_own_step_and_reports_the_shape():
    lines = _run("train_throughput.py", "--steps", "1", "--warmup", "0", "--rounds", "1", "--device", "cpu")
    assert [x["bench"] for x in lines] == ["matmul_peak", "train_throughput_tokens_per_s", "train_achieved_flops",
                                           "train_flops_vs_peak"]
    assert all(x["value"] > 0 and x["vocab"] == 8192 and x["n_layer"] == 4 for x in lines)


def test_generate_bench_times_both_paths_on_a_run(tiny_run):
    lines = _run("generate.py", "--run", str(tiny_run), "--new-tokens", "20", "--repeats", "1")
    assert [x["bench"] for x in lines] == ["generate_tokens_per_s_cached", "generate_tokens_per_s_uncached",
                                           "generate_kv_cache_speedup"]
    assert all(x["value"] > 0 and x["new_tokens"] == 20 and x["model"] == "gpt" for x in lines)


def test_pretrained_bench_sets_llmcli_beside_transformers_on_a_tiny_gpt2(tmp_path):
    pytest.importorskip("transformers")
    from tests.hf_models import tiny_gpt2

    lines = _run("pretrained.py", "--model", str(tiny_gpt2(tmp_path / "gpt2")), "--steps", "1", "--warmup", "0",
                 "--batch", "2", "--len", "16", "--eval-records", "4", "--new-tokens", "6", "--repeats", "1",
                 "--threads", "1", "--chapters", "1", "--parts", "train,eval,generate,prefix", "--prefix-top", "1",
                 "--inline")
    got = {(x["bench"], x.get("side")) for x in lines}
    for part, sides in (("train", ("llmcli", "llmcli_alpha1", "llmcli_bf16", "transformers")),
                        ("eval", ("llmcli", "llmcli_bf16", "transformers")), ("generate", ("llmcli", "transformers"))):
        assert {(f"pretrained_{part}_tokens_per_s", s) for s in sides} <= got
    assert ("pretrained_train_tokens_per_s", "llmcli_one_pass") not in got  # an encoder's option only
    assert all(x["value"] > 0 for x in lines if x["bench"].endswith(("tokens_per_s", "speedup")))
    train = {x["side"]: x for x in lines if x["bench"] == "pretrained_train_tokens_per_s"}
    assert train["llmcli"]["tokens"] == train["transformers"]["tokens"]  # the same batches on both sides
    (ppl,) = [x for x in lines if x["bench"] == "pretrained_zero_shot_ppl"]
    assert ppl["rel_diff"] < 1e-5 and ppl["value"] > 1
    assert [x["value"] for x in lines if x["bench"] == "pretrained_generate_same_tokens"] == [1.0]
    prefix = {x["side"]: x for x in lines if x["bench"] == "pretrained_prefix_tokens_per_s"}
    assert prefix["prefix_cached"]["cache_records"] > 0 and "cache_records" not in prefix["prefix_off"]
    assert prefix["prefix_cached"]["tokens"] == prefix["prefix_off"]["tokens"] == train["llmcli"]["tokens"]


def test_search_bench_sets_the_search_beside_plain_commands_and_times_the_trackers():
    pytest.importorskip("optuna")
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    lines = _run("search.py", "--trials", "1", "--steps", "2", "--threads", "1", "--repeats", "1")
    got = {x["bench"]: x for x in lines}
    assert list(got) == ["search_wall_per_trial", "search_trial_own_wall", "search_share_per_trial", "plain_train_wall",
                         "plain_train_eval_wall", "search_vs_plain_train_eval", "trackers_ms_per_step"]
    assert all(got[k]["value"] > 0 for k in ("search_wall_per_trial", "search_trial_own_wall", "plain_train_wall"))
    assert got["plain_train_eval_wall"]["value"] > got["plain_train_wall"]["value"]  # two evals more
    assert got["trackers_ms_per_step"]["steps"] == 2


def test_pretrained_bench_sets_an_encoders_one_pass_step_beside_transformers_on_a_tiny_bert(tmp_path):
    pytest.importorskip("transformers")
    from tests.hf_models import tiny_bert

    lines = _run("pretrained.py", "--model", str(tiny_bert(tmp_path / "bert")), "--steps", "1", "--warmup", "0",
                 "--batch", "2", "--len", "16", "--eval-records", "4", "--threads", "1", "--chapters", "1",
                 "--parts", "train,eval,generate", "--no-bf16", "--inline")
    train = {x["side"]: x for x in lines if x["bench"] == "pretrained_train_tokens_per_s"}
    assert set(train) == {"llmcli", "llmcli_alpha1", "llmcli_one_pass", "transformers"}
    assert all(x["value"] > 0 for x in train.values())
    assert train["llmcli_one_pass"]["tokens"] == train["llmcli"]["tokens"] == train["transformers"]["tokens"]
    (ppl,) = [x for x in lines if x["bench"] == "pretrained_zero_shot_ppl"]  # the masked-LM ppl, llmcli's masks
    assert ppl["rel_diff"] < 1e-5 and ppl["value"] > 1
    evals = {x["side"]: x for x in lines if x["bench"] == "pretrained_eval_tokens_per_s"}
    assert set(evals) == {"llmcli", "transformers"} and evals["llmcli"]["tokens"] == evals["transformers"]["tokens"]
    assert not any(x["bench"].startswith("pretrained_generate") for x in lines)  # an encoder generates nothing
