"""`llmcli eval RUN --baseline tfidf`: the bag-of-words reference beside a run's scores.

Word 1-2-gram TF-IDF + logistic regression (scikit-learn), fitted on the raw texts of exactly the records the
run's task head trained on and scored on exactly the records eval scores the run on, with eval's own metric
function: whether the neural model is worth its cost is then one look at the table.

The processed arrays hold tokens, so the texts are re-read from the run's sources through preprocess's own `Scan`
(its split assignment, domains, labels and cross-split duplicate dropping; nothing of it is re-implemented here),
and the re-read records are checked against the processed data before anything is fitted.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmcli.errors import UserError

BASELINES = ("tfidf",)
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}

# Fixed settings (no search on the scored split): the same run gives the same figures. C was chosen once on the
# default config's KJV *val* split (docs/pretrained.md, "TF-IDF baseline").
TFIDF = {"analyzer": "word", "ngram_range": (1, 2), "lowercase": True, "sublinear_tf": True, "min_df": 2}
LOGREG = {"C": 10.0, "solver": "lbfgs", "max_iter": 1000, "tol": 1e-4, "class_weight": None, "random_state": 0}
TEXT = "each record's raw text, whole (not cut to data.max_len, no data.augment)"


def check_name(name: str | None) -> None:
    """`--baseline` takes one of BASELINES (or nothing)."""
    if name is not None and name not in BASELINES:
        raise UserError(f"--baseline: {name!r} is not a baseline (allowed: {', '.join(BASELINES)})")


def settings() -> dict[str, Any]:
    """The baseline's settings as the eval JSON records them."""
    return {"tfidf": {**TFIDF, "ngram_range": list(TFIDF["ngram_range"])}, "logistic_regression": dict(LOGREG),
            "text": TEXT}


def make_pipeline() -> Any:
    """An unfitted TF-IDF + logistic regression Pipeline with the fixed settings."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    return Pipeline([("tfidf", TfidfVectorizer(**TFIDF)), ("logreg", LogisticRegression(**LOGREG))])


# ---------------------------------------------------------------- the records, re-read as preprocess read them


@dataclass
class Corpus:
    """A data config's records as preprocess keeps them, in its processed folder's order, with their texts."""

    texts: list[str]
    labels: np.ndarray  # (N,) class id, -1 = unlabeled
    domains: np.ndarray  # (N,) index into domain_names
    splits: np.ndarray  # (N,) 0/1/2 = train/val/test
    domain_names: list[str]
    label_names: list[str]

    def counts(self) -> dict[str, int]:
        """Records per `split/domain`, keyed as a processed manifest's `counts`."""
        return {f"{s}/{d}": int(((self.splits == i) & (self.domains == k)).sum())
                for s, i in SPLIT_IDS.items() for k, d in enumerate(self.domain_names)}


def read_corpus(data_cfg: Any, what: str) -> Corpus:
    """Every record of a data config, split, labeled and de-duplicated exactly as preprocess does it."""
    from llmcli.data.preprocess import Scan, _leakage, source_configs
    from llmcli.registry import registry

    class TextScan(Scan):
        """preprocess's Scan, also keeping each record's text (in record order) during its one pass."""

        texts: list[str]

        def records(self) -> Any:
            for r in super().records():
                self.texts.append(r.text)
                yield r

    try:
        scan = TextScan(data_cfg, [registry("source").build(s) for s in source_configs(data_cfg)])
        scan.texts = []
        for _ in scan.train_texts():  # the scan itself (it yields the tokenizer's texts, not needed here)
            pass
        texts, arr = scan.texts, scan.arrays()
        keep, _ = _leakage(scan, arr)
        label_names, labels = scan.label_names()
    except UserError as exc:
        raise UserError(f"--baseline: cannot re-read {what}: {exc}") from None
    lm_only = [scan.domains[d] for d in data_cfg.lm_only_domains if d in scan.domains]
    labels[(arr["split"] == 0) & np.isin(arr["domain"], lm_only)] = -1  # as preprocess: no label for T there
    return Corpus([t for t, k in zip(texts, keep.tolist()) if k], labels[keep], arr["domain"][keep].astype(np.int64),
                  arr["split"][keep].astype(np.int64), list(scan.domains), label_names)


def check_matches(corpus: Corpus, data: Any, what: str) -> None:
    """The re-read records must be the processed data's records, one for one (labels, domains, splits)."""
    same = (corpus.domain_names == list(data.domains) and corpus.label_names == list(data.label_names)
            and len(corpus.labels) == len(data.labels) and np.array_equal(corpus.labels, data.labels)
            and np.array_equal(corpus.domains, data.domain_ids) and np.array_equal(corpus.splits, data.splits))
    if not same:
        raise UserError(f"--baseline: {what} no longer gives the records of the processed data at {data.path} "
                        f"({len(corpus.labels)} records re-read, {len(data.labels)} processed); re-run "
                        "llmcli preprocess on that config")


def check_counts(corpus: Corpus, manifest: dict[str, Any], what: str) -> None:
    """The re-read records per split and domain, and the labels, must be those the run's data manifest records."""
    if corpus.counts() != manifest.get("counts") or corpus.label_names != list(manifest["label_names"]):
        diff = [k for k, n in corpus.counts().items() if (manifest.get("counts") or {}).get(k) != n]
        raise UserError(f"--baseline: {what} no longer gives the records the run trained on "
                        f"(differs in: {', '.join(diff[:4]) or 'label names'}); the baseline needs the run's own data")


# ---------------------------------------------------------------- fit and score


def tfidf_baseline(cfg: Any, manifest: dict[str, Any], data: Any, records: dict[str, np.ndarray],
                   in_domain: list[str], *, run_dir: Path, data_config: str | Path | None = None,
                   log: Any = print) -> dict[str, Any]:
    """The eval JSON's `baseline`: fitted on the run's training split, scored on the records eval scored the run on.

    cfg / manifest: the run's config and data manifest; data: the ProcessedData eval scores on (the run's own, or
    `data_config`'s); records: eval's scored indices per domain (evaluate.scored_indices); in_domain: eval's
    in-domain list (the gaps are taken against it, as the run's are).
    """
    t0 = time.perf_counter()
    own = read_corpus(cfg.data, f"the data of {run_dir / 'config.yaml'}")
    if data_config is None:
        check_matches(own, data, f"the data of {run_dir / 'config.yaml'}")
        scored = own
    else:
        from llmcli.config import load_config

        check_counts(own, manifest, f"the data of {run_dir / 'config.yaml'}")
        scored = read_corpus(load_config(Path(data_config)).data, f"the data of {data_config}")
        check_matches(scored, data, f"the data of {data_config}")
    trained = [d for d in manifest["train_domains"] if d not in cfg.train.exclude_domains]
    train_idx = np.flatnonzero((own.splits == 0) & np.isin(own.domains, [own.domain_names.index(d) for d in trained])
                               & (own.labels >= 0))
    pipe, converged = _fit(own, train_idx)
    per_domain = _score(pipe, scored, records, len(own.label_names))
    ind = [d for d in in_domain if d in per_domain]
    from llmcli.evaluation.metrics import gaps

    seconds = time.perf_counter() - t0
    log(f"eval: tfidf baseline fitted on {len(train_idx)} {'+'.join(trained)} training records, {seconds:.1f} s")
    return {"name": "tfidf", "settings": settings(), "train_records": int(len(train_idx)), "train_domains": trained,
            "converged": converged, "domains": per_domain, "gap": gaps(per_domain, ind) if ind else {},
            "seconds": round(seconds, 2)}


def _fit(corpus: Corpus, idx: np.ndarray) -> tuple[Any, bool]:
    """The fitted pipeline and whether lbfgs converged within max_iter (said in the JSON, not as a warning)."""
    from sklearn.exceptions import ConvergenceWarning

    if len(np.unique(corpus.labels[idx])) < 2:
        raise UserError("--baseline: the run's training split has fewer than two classes; nothing to fit")
    pipe = make_pipeline()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe.fit([corpus.texts[i] for i in idx], corpus.labels[idx])
    return pipe, bool(pipe.named_steps["logreg"].n_iter_.max() < LOGREG["max_iter"])


def _score(pipe: Any, corpus: Corpus, records: dict[str, np.ndarray], n_classes: int) -> dict[str, dict[str, float]]:
    """Per domain with labeled records: n and eval's classification metrics (acc, macro_f1, macro_recall, ece)."""
    from llmcli.evaluation.metrics import classification_metrics

    out = {}
    for d, idx in records.items():
        idx = idx[corpus.labels[idx] >= 0]
        if not len(idx):
            continue
        probs = np.zeros((len(idx), n_classes))  # (N, C): a class absent from training gets probability 0
        probs[:, pipe.classes_] = pipe.predict_proba([corpus.texts[i] for i in idx])
        out[d] = {"n": int(len(idx)), **classification_metrics(probs, corpus.labels[idx])}
    return out


# ---------------------------------------------------------------- the table


def table_columns(result: dict[str, Any]) -> list[str]:
    """The eval table's baseline columns (none without a baseline)."""
    b = result.get("baseline")
    return [f"{b['name']} acc", f"{b['name']} macro_f1", f"{b['name']} gap_acc"] if b else []


def table_cells(result: dict[str, Any], domain: str | None) -> list[float | None]:
    """One row's baseline cells: acc, macro_f1 and gap_acc of `domain`; domain None = the mean-OOD-gap row."""
    b = result.get("baseline")
    if not b:
        return []
    if domain is None:  # as the run's own mean row: the mean gap of each metric under it
        mean = b["gap"].get("mean", {})
        return [mean.get("gap_acc"), mean.get("gap_macro_f1"), mean.get("gap_acc")]
    m = b["domains"].get(domain, {})
    return [m.get("acc"), m.get("macro_f1"), b["gap"].get(domain, {}).get("gap_acc")]
