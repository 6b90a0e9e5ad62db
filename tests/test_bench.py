"""The benchmark scripts still run against the package (their figures are measured by `make bench`, not here)."""

from __future__ import annotations

import json
import subprocess
import sys

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
