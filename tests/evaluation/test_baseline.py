"""`llmcli eval --baseline tfidf`: the bag-of-words reference, fitted on the run's own training split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from llmcli.cli import app
from llmcli.evaluation.evaluate import evaluate

QUIET = {"log": lambda m: None}
runner = CliRunner()


@pytest.fixture(scope="module")
def scored(tiny_run) -> dict:
    """The tiny run's eval result with the baseline (nothing written)."""
    return evaluate(tiny_run, baseline="tfidf", write=False, **QUIET)


def direct_fit_figures(run: Path) -> tuple[dict[str, int], dict[str, dict[str, float]]]:
    """Independently of llmcli's baseline: the run's records read from its source, split by group hash, cross-split
    duplicates dropped, a plain sklearn fit on the train split of kjv; per-split counts and per-domain test scores."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline

    from llmcli.config import load_config
    from llmcli.data.preprocess import split_of_group, text_key
    from llmcli.registry import registry

    cfg = load_config(run / "config.yaml")
    names = json.loads((run / "data_manifest.json").read_text())["label_names"]
    sp = cfg.data.split
    rows = [(r.text, names.index(r.label), r.domain, split_of_group(r.group, sp.seed, sp.val, sp.test), text_key(r.text))
            for r in registry("source").build(cfg.data.source).records()]
    first = {}  # the earliest split each normalised text occurs in: a later copy is a dropped duplicate
    for _, _, _, s, k in rows:
        first[k] = min(first.get(k, 3), s)
    rows = [r for r in rows if r[3] == first[r[4]]]
    counts = {}
    for _, _, d, s, _ in rows:
        key = f"{('train', 'val', 'test')[s]}/{d}"
        counts[key] = counts.get(key, 0) + 1
    train = [(t, y) for t, y, d, s, _ in rows if s == 0 and d == "kjv"]
    pipe = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2),
                         LogisticRegression(C=10.0, max_iter=1000, random_state=0))
    pipe.fit([t for t, _ in train], [y for _, y in train])
    scores = {}
    for dom in ("kjv", "web", "wyc"):
        test = [(t, y) for t, y, d, s, _ in rows if s == 2 and d == dom]
        gold, pred = np.array([y for _, y in test]), pipe.predict([t for t, _ in test])
        scores[dom] = {"n": len(test), "acc": accuracy_score(gold, pred),
                       "macro_f1": f1_score(gold, pred, average="macro", labels=np.unique(gold), zero_division=0)}
    return counts, scores


def test_tfidf_baseline_equals_a_direct_sklearn_fit_on_the_runs_own_split(tiny_run, scored):
    result = scored
    counts, direct = direct_fit_figures(tiny_run)
    manifest = json.loads((tiny_run / "data_manifest.json").read_text())
    assert counts == {k: v for k, v in manifest["counts"].items() if v}  # the very split the run trained on
    b = result["baseline"]
    assert b["name"] == "tfidf" and b["train_records"] == manifest["counts"]["train/kjv"]
    for d, m in direct.items():
        assert b["domains"][d]["n"] == m["n"] == result["domains"][d]["n"]  # the records eval scores the run on
        assert b["domains"][d]["acc"] == pytest.approx(m["acc"], abs=1e-12)
        assert b["domains"][d]["macro_f1"] == pytest.approx(m["macro_f1"], abs=1e-12)
    assert b["gap"]["wyc"]["gap_acc"] == pytest.approx(direct["kjv"]["acc"] - direct["wyc"]["acc"])
    assert b["domains"]["kjv"]["acc"] > 0.4  # well above the majority class on this data: it learned the genres


def test_baseline_is_in_the_eval_json_and_beside_the_runs_figures_in_the_table(tiny_run, tmp_path):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    out = runner.invoke(app, ["eval", str(run), "--baseline", "tfidf"])
    assert out.exit_code == 0, out.output
    saved = json.loads((run / "eval" / "test.json").read_text())
    b = saved["baseline"]
    assert {"name", "settings", "domains", "gap", "seconds"} <= set(b)
    assert b["settings"]["tfidf"]["ngram_range"] == [1, 2] and b["settings"]["logistic_regression"]["random_state"] == 0
    header = next(ln for ln in out.stdout.splitlines() if "domain" in ln and "acc" in ln)
    assert "tfidf acc" in header and "tfidf macro_f1" in header and "tfidf gap_acc" in header
    row = next(ln for ln in out.stdout.splitlines() if "wyc" in ln)
    cells = [c.strip() for c in row.split("│") if c.strip()]
    run_acc, tfidf = f"{saved['domains']['wyc']['acc']:.4f}", b["domains"]["wyc"]
    assert run_acc in cells and cells[-3:] == [f"{tfidf['acc']:.4f}", f"{tfidf['macro_f1']:.4f}",
                                               f"{b['gap']['wyc']['gap_acc']:.4f}"]
    plain = runner.invoke(app, ["eval", str(run), "--no-write"])
    assert plain.exit_code == 0 and "tfidf" not in plain.stdout  # only when asked


def test_the_same_run_gives_the_same_baseline_figures(tiny_run, scored):
    again = evaluate(tiny_run, baseline="tfidf", write=False, **QUIET)["baseline"]
    assert again["domains"] == scored["baseline"]["domains"] and again["gap"] == scored["baseline"]["gap"]


def test_scored_on_another_configs_data_the_baseline_still_trains_on_the_runs_own_split(tiny_run, scored, tmp_path,
                                                                                        processed_dir):
    other = tmp_path / "other.yaml"
    other.write_text(json.dumps({"data": {"source": {"name": "bible", "versions": ["kjv", "bbe"], "label": "genre",
                                                     "max_chapters_per_book": 2},
                                          "split": {"val": 0.15, "test": 0.15, "seed": 0},
                                          "processed_dir": str(processed_dir)}}))
    own = scored["baseline"]
    there = evaluate(tiny_run, baseline="tfidf", data_config=other, write=False, **QUIET)["baseline"]
    assert set(there["domains"]) == {"kjv", "bbe"} and there["train_records"] == own["train_records"]
    assert there["domains"]["kjv"] == own["domains"]["kjv"]  # same model, same kjv test records: same figures
    assert there["gap"]["bbe"]["gap_acc"] == pytest.approx(there["domains"]["kjv"]["acc"] - there["domains"]["bbe"]["acc"])


def lab_data(folder: Path, name: str) -> Path:
    """A lab's own labeled jsonl (its own text/label/domain field names) and a config training on it."""
    rng = np.random.default_rng(0)
    topics = {"sport": "ball goal team match score", "food": "bread cheese soup cook taste", "law": "court judge law appeal"}
    lines = []
    for _ in range(300):
        topic = str(rng.choice(list(topics)))
        words = [*rng.choice(topics[topic].split(), 4), *rng.choice("the a of and to in".split(), 4)]
        lines.append(json.dumps({"body": " ".join(words), "topic": topic, "site": str(rng.choice(["news", "blog"]))}))
    (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    cfg = folder / f"{name}.yaml"
    cfg.write_text(json.dumps({
        "name": "lab", "data": {"source": {"name": "jsonl", "path": str(folder / f"{name}.jsonl"), "text_field": "body",
                                           "label_field": "topic", "domain_field": "site"},
                                "train_domains": ["news"], "tokenizer": {"name": "byte"}, "max_len": 24,
                                "split": {"val": 0.2, "test": 0.3}, "processed_dir": str(folder / "processed")},
        "model": {"name": "gpt", "n_layer": 1, "n_head": 2, "d_model": 16, "block_size": 24},
        "train": {"steps": 2, "batch_size": 8, "eval_every": 2, "log_every": 2, "threads": 1}}))
    return cfg


def test_a_labs_own_data_gets_its_baseline_and_moved_sources_are_one_line_exit_2(tmp_path):
    from llmcli.config import load_config
    from llmcli.training.engine import train

    run = train(load_config(lab_data(tmp_path, "lab")), runs_dir=tmp_path / "runs", progress=False, log=lambda m: None)
    b = evaluate(run, baseline="tfidf", write=False, **QUIET)["baseline"]
    manifest = json.loads((run / "data_manifest.json").read_text())
    assert b["train_records"] == manifest["counts"]["train/news"] and set(b["domains"]) == {"news", "blog"}
    assert b["domains"]["news"]["acc"] > 0.9  # the topic words give the label away
    other = lab_data(tmp_path, "other")  # another corpus with the same labels, for --data
    (tmp_path / "lab.jsonl").rename(tmp_path / "moved.jsonl")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for args, fragment in ((["--baseline", "tfidf"], "data.source.path"),
                           (["--data", str(other), "--baseline", "tfidf"], "--baseline: cannot re-read")):
        out = runner.invoke(app, ["eval", str(run), *args])
        errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
        assert out.exit_code == 2 and len(errors) == 1 and "Traceback" not in out.output, out.output
        assert fragment in errors[0] and str(tmp_path / "lab.jsonl") in errors[0] and "not found" in errors[0]
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing written
    # the run itself still scores on the other corpus: only the baseline needs the run's own records
    assert runner.invoke(app, ["eval", str(run), "--data", str(other), "--no-write"]).exit_code == 0


def test_the_comparison_table_puts_each_runs_baseline_under_it(scored):
    from rich.console import Console

    from llmcli.evaluation.evaluate import render_comparison

    console = Console(width=250, record=True)
    console.print(render_comparison([scored, {k: v for k, v in scored.items() if k != "baseline"}]))
    rows = [[c.strip() for c in ln.split("│") if c.strip()] for ln in console.export_text().splitlines()]
    tfidf = [r for r in rows if r and r[0] == "tfidf (same data)"]
    b = scored["baseline"]
    assert len(tfidf) == 1  # only the run that has one
    assert tfidf[0][1] == f"{b['domains']['kjv']['acc']:.4f}" and tfidf[0][-1] == f"{b['gap']['mean']['gap_acc']:.4f}"
