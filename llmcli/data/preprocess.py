"""`llmcli preprocess`: sources -> splits -> tokenizer -> memory-mapped arrays + manifest + stats.

Streaming, in two passes over the sources, so a corpus bigger than memory is fine:
1. scan: every record's split, domain, label, group hash and normalised-text hash go into small
   typed arrays (about 25 bytes per record) while the train-split texts of the train domains
   stream into the tokenizer's trainer;
2. write: records are read again, encoded in batches (the `tokenizers` library encodes a batch in
   parallel threads) and appended to tokens.bin.
Between the two, the leakage checks run on the arrays: no group and no exact duplicate text crosses
splits (cross-split duplicates are dropped, or an error for a given fixed split).

The output folder is named by a hash of the data config; its manifest records every input file's
path, size, mtime and sha256 (and the bible's package versions). A second preprocess of the same config
finds the folder and does nothing while the inputs are the same (size + mtime the fast check, the
sha256 the truth); when an input changed it says which and rebuilds the folder in place. The folder is
built in a temporary folder and renamed into place, under a file lock, so a crash or a concurrent run
never leaves half of it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
import unicodedata
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmcli.data.sources import file_identity, input_files, input_packages
from llmcli.data.tokenizers import tokenizer_inputs
from llmcli.errors import UserError
from llmcli.files import atomic_write_json, create_temp_dir, sha256_file, sha256_json
from llmcli.registry import registry

if TYPE_CHECKING:
    from llmcli.config import DataBase

FORMAT_VERSION = 2
SPLITS = ("train", "val", "test")
BATCH_RECORDS = 4096  # records per encode batch


def split_of_group(group: str, seed: int, val: float, test: float) -> int:
    """0/1/2 = train/val/test, from a hash of (seed, group): the same group lands in the same split everywhere."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{group}".encode()).digest()[:8], "big") / 2**64
    return 2 if u < test else 1 if u < test + val else 0


def _hash64(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def text_key(text: str) -> int:
    """64-bit hash of the normalised text (NFKC, case-folded, white space folded): equal = exact duplicate."""
    return _hash64(" ".join(unicodedata.normalize("NFKC", text).casefold().split()))


def data_key(data_cfg: DataBase) -> dict[str, Any]:
    """What the processed data depends on (the cache location, training-time augmentation and the LM-only rows per
    step do not count; nor, without lm_only_domains, lm_only_in_tokenizer: so adding it moved no existing cache)."""
    skip = {"processed_dir", "augment", "lm_only_ratio"}
    if not data_cfg.lm_only_domains:
        skip.add("lm_only_in_tokenizer")
    return {"format": FORMAT_VERSION, **data_cfg.model_dump(mode="json", exclude=skip)}


def source_configs(data_cfg: DataBase) -> list[Any]:
    """The data config's sources: `sources` if given, else the single `source`."""
    return list(getattr(data_cfg, "sources", None) or [data_cfg.source])


def processed_path(data_cfg: DataBase) -> Path:
    """Where this data config's processed folder lives."""
    names = {s.name for s in source_configs(data_cfg)}
    prefix = names.pop() if len(names) == 1 else "multi"
    return Path(data_cfg.processed_dir) / f"{prefix}-{sha256_json(data_key(data_cfg))[:12]}"


def preprocess(data_cfg: DataBase, *, log: Any = print, tokenizer_path: Path | None = None) -> Path:
    """Build (or find) the processed data for a data config; returns its folder.

    tokenizer_path: encode with this tokenizer.json (scoring a run on another corpus) instead of training one;
    the folder name then carries its hash.
    """
    from filelock import FileLock

    out = processed_path(data_cfg)
    if tokenizer_path is not None:
        out = out.with_name(f"{out.name}-tok{hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()[:8]}")
    why = _why_stale(out, data_cfg, log)
    if why is None:
        log(f"preprocess: {out} is up to date, nothing to do")
        return out
    if why:
        log(f"preprocess: rebuilding {out}: {why}")
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # removed again on bad data
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"data.processed_dir: cannot create {out.parent} ({exc.strerror})") from None
    lock = Path(str(out) + ".lock")
    try:
        with FileLock(str(lock)):
            if _why_stale(out, data_cfg, lambda m: None) is None:  # another process built it while we waited
                log(f"preprocess: {out} is up to date, nothing to do")
            else:
                _build_into(data_cfg, out, log, tokenizer_path)
    except UserError:  # bad data or config: leave nothing behind (an older build stays as it was)
        if not out.exists():
            lock.unlink(missing_ok=True)
            _remove_empty(created)
        raise
    return out


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this call created (deepest first), stopping at the first that is not empty."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            break


def _build_into(data_cfg: DataBase, out: Path, log: Any, tokenizer_path: Path | None) -> None:
    """Build in a temporary folder beside `out`, then put it in place of any older `out` (call under the lock)."""
    try:
        tmp = create_temp_dir(out.parent, f".{out.name}.")
    except OSError as exc:
        raise UserError(f"data.processed_dir: cannot write in {out.parent} ({exc.strerror or exc})") from None
    try:
        _build(data_cfg, tmp, out.name, log, tokenizer_path)
        _replace_dir(tmp, out)
    except OSError as exc:
        raise UserError(f"data.processed_dir: writing {out} failed ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an older `out` is moved aside first and deleted after (put back if the rename fails).

    A process that has the old arrays memory-mapped keeps reading them: deleting unlinks, the data stays.
    """
    if not out.exists():
        new.rename(out)
        return
    old = create_temp_dir(out.parent, f".{out.name}.old.")
    old.rmdir()  # only its unique name is wanted
    out.rename(old)
    try:
        new.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- is the cache up to date?


def _why_stale(out: Path, data_cfg: DataBase, log: Any) -> str | None:
    """Why `out` must be (re)built: "" = it does not exist, None = up to date (built from the inputs there now)."""
    path = out / "manifest.json"
    if not path.is_file():
        return ""
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))["inputs"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return "its manifest.json is unreadable or records no inputs (made by an older llmcli)"
    return _inputs_changed(recorded, data_cfg, log)


def _packages(data_cfg: DataBase) -> dict[str, str | None]:
    """The packages (with versions) the data config's built-in sources read."""
    out: dict[str, str | None] = {}
    for c in source_configs(data_cfg):
        out.update(input_packages(c))
    return out


def input_record(data_cfg: DataBase, sources: list[Any]) -> dict[str, Any]:
    """The manifest's `inputs`: every user file's identity (path, size, mtime_ns, sha256), the packages read and
    a pretrained tokenizer's files (a changed tokenizer means other ids; a trained tokenizer has none to record)."""
    tokenizer = [file_identity(p) for p in tokenizer_inputs(data_cfg.tokenizer)]
    return {"files": [f for s in sources for f in s.inputs], "packages": _packages(data_cfg),
            **({"tokenizer": tokenizer} if tokenizer else {})}


def _inputs_changed(recorded: Any, data_cfg: DataBase, log: Any) -> str | None:
    """Why the recorded inputs differ from those on disk now (None: the same; a touched-only file is noted)."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("files"), list):
        return "its manifest records no inputs (made by an older llmcli)"
    return (_packages_changed(recorded.get("packages") or {}, data_cfg) or _files_changed(recorded, data_cfg, log)
            or _tokenizer_changed(recorded, data_cfg, log))


def _packages_changed(old: dict[str, Any], data_cfg: DataBase) -> str | None:
    """Which built-in source packages changed version since the cache was built."""
    packages = _packages(data_cfg)
    if packages == old:
        return None
    diff = [f"{k} {old.get(k)} -> {v}" for k, v in packages.items() if old.get(k) != v]
    return f"package versions changed ({', '.join(diff) or 'a package is no longer read'})"


def _files_changed(recorded: dict[str, Any], data_cfg: DataBase, log: Any) -> str | None:
    """Why the user files differ from their records (None: the same)."""
    paths = [str(p.absolute()) for c in source_configs(data_cfg) for p in (input_files(c) or [])]
    return _listed_files_changed(recorded["files"], paths, log)


def _tokenizer_changed(recorded: dict[str, Any], data_cfg: DataBase, log: Any) -> str | None:
    """Why a pretrained tokenizer's files differ from their records (None: the same; a trained tokenizer has none)."""
    paths = [str(p.absolute()) for p in tokenizer_inputs(data_cfg.tokenizer)]
    files = recorded.get("tokenizer", [])
    if not isinstance(files, list):
        return "its manifest's tokenizer record is damaged"
    return _listed_files_changed(files, paths, log, what="the tokenizer's files")


def _listed_files_changed(records: list[Any], paths: list[str], log: Any, what: str = "the input files") -> str | None:
    """Why the files at `paths` differ from their records (None: the same)."""
    files = [f if isinstance(f, dict) else {} for f in records]
    if paths != [f.get("path") for f in files]:
        return _paths_changed([f.get("path") for f in files], paths, what)
    for path, f in zip(paths, files):
        why = _file_changed(Path(path), f, log)
        if why:
            return why
    return None


def _paths_changed(before: list[Any], now: list[str], what: str = "the input files") -> str:
    """Which input files appeared or went away (a text source's glob, a moved file)."""
    added = [p for p in now if p not in before]
    gone = [str(p) for p in before if p not in now]
    parts = ([f"new: {', '.join(added)}"] if added else []) + ([f"gone: {', '.join(gone)}"] if gone else [])
    return f"{what} changed ({'; '.join(parts) or 'their order'})"


def _file_changed(path: Path, rec: dict[str, Any], log: Any) -> str | None:
    """Why one input file differs from its record: size + mtime the fast check, the sha256 the truth."""
    try:
        st = path.stat()
    except OSError:
        return f"{path} is gone"
    if (st.st_size, st.st_mtime_ns) == (rec.get("size"), rec.get("mtime_ns")):
        return None
    if st.st_size != rec.get("size"):
        return f"{path} changed ({rec.get('size')} -> {st.st_size} bytes)"
    if sha256_file(path) != rec.get("sha256"):
        return f"{path} changed (same size, different content: its sha256 differs)"
    log(f"preprocess: {path} was touched but its content is unchanged (same sha256)")
    return None


# ---------------------------------------------------------------- pass 1: scan


class Scan:
    """Per-record split/domain/label/hashes in typed arrays, filled while the records stream past."""

    def __init__(self, data_cfg: DataBase, sources: list[Any]) -> None:
        self.cfg = data_cfg
        self.sources = sources
        self.domains: dict[str, int] = {}
        for s in sources:
            for d in s.domains or []:
                self.domains.setdefault(d, len(self.domains))
        self.split, self.domain = array("b"), array("h")
        self.label, self.group_key, self.text_key = array("i"), array("Q"), array("Q")
        self.str_labels: dict[str, int] = {}  # provisional ids, first-seen order
        self.first_of_kind: dict[type, str] = {}  # where the first str / int label was
        self.train_domains: list[str] | None = data_cfg.train_domains
        self.n_train_texts = 0

    def records(self) -> Iterator[Any]:
        """All records of all sources, in order."""
        for s in self.sources:
            yield from s.records()

    def _split(self, r: Any) -> int:
        sp = self.cfg.split
        if r.domain in sp.holdout_domains:
            return 2
        if sp.field is None:
            return split_of_group(r.group, sp.seed, sp.val, sp.test)
        value = (r.fields or {}).get(sp.field)
        if value not in SPLITS:
            raise UserError(f"{r.where}: split field {sp.field!r} is {value!r}; allowed: train, val, test "
                            "(data.split.field)")
        return SPLITS.index(value)

    def _label(self, r: Any) -> int:
        if r.label is None:
            return -1
        self.first_of_kind.setdefault(type(r.label), r.where)
        if len(self.first_of_kind) > 1:
            mine, other = ("an integer", str) if isinstance(r.label, int) else ("a string", int)
            theirs = "a string" if other is str else "an integer"
            raise UserError(f"{r.where}: label {r.label!r} is {mine}, but {self.first_of_kind[other]} "
                            f"has {theirs} label; labels must be all strings or all integers")
        if isinstance(r.label, str):
            return self.str_labels.setdefault(r.label, len(self.str_labels))
        return r.label

    def train_texts(self) -> Iterator[str]:
        """Scan every record; yield the texts the tokenizer trains on (train split of the train domains)."""
        for r in self.records():
            d = self.domains.setdefault(r.domain, len(self.domains))
            if self.train_domains is None:  # default: the first domain that is not held out
                first = [x for x in self.domains if x not in self.cfg.split.holdout_domains][:1]
                self.train_domains = first or None
            s = self._split(r)
            self.split.append(s)
            self.domain.append(d)
            self.label.append(self._label(r))
            self.group_key.append(_hash64(r.group))
            self.text_key.append(text_key(r.text))
            if s == 0 and r.domain in (self.train_domains or ()):
                self.n_train_texts += 1
                yield r.text
            elif s == 0 and r.domain in self.cfg.lm_only_domains and self.cfg.lm_only_in_tokenizer:
                yield r.text  # unlabeled target text, only when asked (off by default: measured worse, docs/objectives.md)

    def arrays(self) -> dict[str, np.ndarray]:
        """The scanned arrays as numpy (views, no copy)."""
        return {"split": np.frombuffer(self.split, np.int8), "domain": np.frombuffer(self.domain, np.int16),
                "label": np.frombuffer(self.label, np.int32), "group": np.frombuffer(self.group_key, np.uint64),
                "text": np.frombuffer(self.text_key, np.uint64)}

    def label_names(self) -> tuple[list[str], np.ndarray]:
        """Class names in id order and the final label id of every record (-1 = unlabeled)."""
        labels = np.frombuffer(self.label, np.int32).astype(np.int64)
        if int in self.first_of_kind:
            return [str(i) for i in range(int(labels.max()) + 1)], labels
        declared = next((s.label_names for s in self.sources if s.label_names), [])
        names = list(declared) + sorted(set(self.str_labels) - set(declared))
        remap = np.array([names.index(n) for n in self.str_labels] + [-1], dtype=np.int64)
        return names, remap[labels]  # -1 indexes the trailing -1


def _check_classes(names: list[str], labels: np.ndarray) -> None:
    """A task needs two classes: labeled records that all share one label are a data error, not a task."""
    if (labels >= 0).any() and len(names) < 2:
        raise UserError(f"data: every labeled record has the label {names[0]!r}; the task needs at least two "
                        "classes (or no labels at all, for a language-model-only corpus)")


def _where(scan: Scan, i: int) -> str:
    """Where record i came from (a re-read; used only for error messages)."""
    for k, r in enumerate(scan.records()):
        if k == i:
            return r.where
    return f"record {i}"


def _leakage(scan: Scan, arr: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, int]]:
    """Which records to keep, and the leakage evidence for the manifest."""
    sp = scan.cfg.split
    policy = sp.duplicates or ("error" if sp.field else "drop")
    holdout = np.isin(arr["domain"], [scan.domains[d] for d in sp.holdout_domains if d in scan.domains])
    group_leak = _crossing(arr["group"][~holdout], arr["split"][~holdout])
    if group_leak.any():
        first = np.flatnonzero(~holdout)[np.flatnonzero(group_leak)[:2]]
        raise UserError(f"data.split.field: the fixed split leaks: {_where(scan, int(first[0]))} and "
                        f"{_where(scan, int(first[1]))} share a group but are in different splits")
    dup = _crossing(arr["text"], arr["split"], later_only=True)
    n_dup = int(dup.sum())
    if n_dup and policy == "error":
        i = int(np.flatnonzero(dup)[0])
        j = int(np.flatnonzero((arr["text"] == arr["text"][i]) & (arr["split"] < arr["split"][i]))[0])
        raise UserError(f"data.split: {_where(scan, i)} repeats the text of {_where(scan, j)} in another split "
                        "(set data.split.duplicates: drop to drop such copies)")
    keep = ~dup if policy == "drop" else np.ones(len(dup), dtype=bool)
    train_groups = arr["group"][keep & ~holdout & (arr["split"] == 0)]
    evidence = {
        "groups_crossing_splits": int(len(np.unique(arr["group"][~holdout][group_leak]))),
        "duplicate_texts_crossing_splits": 0 if policy == "drop" else n_dup,
        "duplicates_dropped": n_dup if policy == "drop" else 0,
        "holdout_groups_in_train": int(len(np.intersect1d(arr["group"][holdout], train_groups))),
    }
    return keep, evidence


def _crossing(key: np.ndarray, split: np.ndarray, later_only: bool = False) -> np.ndarray:
    """Per record: does its key also occur in another split? (later_only: in an earlier split.)"""
    if len(key) == 0:
        return np.zeros(0, dtype=bool)
    uniq, inv = np.unique(key, return_inverse=True)
    lo = np.full(len(uniq), 3, dtype=np.int8)
    hi = np.full(len(uniq), -1, dtype=np.int8)
    np.minimum.at(lo, inv, split)
    np.maximum.at(hi, inv, split)
    return split > lo[inv] if later_only else lo[inv] != hi[inv]


# ---------------------------------------------------------------- pass 2: write


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The narrowest unsigned type that holds every token id: uint16 up to 65,536 tokens, else uint32 (the 150K
    vocabularies of Qwen or Llama 3)."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _write_tokens(scan: Scan, tok: Any, keep: np.ndarray, tmp: Path, max_len: int, acc: Any) -> np.ndarray:
    """Encode the kept records in batches and append them to tokens.bin; returns the offsets."""
    n_read = 0
    offsets = array("q", [0])
    body = max_len - 2  # room for BOS and EOS
    keep_list = keep.tolist()
    with open(tmp / "tokens.bin", "wb") as f:
        batch: list[str] = []
        idx: list[int] = []
        for i, r in enumerate(scan.records()):
            n_read = i + 1
            if i >= len(keep_list):
                raise UserError(f"{r.where}: the source changed while preprocessing (more records than the first read)")
            if keep_list[i]:
                batch.append(r.text)
                idx.append(i)
            if len(batch) == BATCH_RECORDS:
                _flush(tok, batch, idx, body, f, offsets, acc)
                batch, idx = [], []
        if batch:
            _flush(tok, batch, idx, body, f, offsets, acc)
    if n_read != len(keep_list):
        raise UserError("data.source: the source changed while preprocessing (fewer records than the first read)")
    return np.frombuffer(offsets, np.int64)


def _flush(tok: Any, texts: list[str], idx: list[int], body: int, f: Any, offsets: array, acc: Any) -> None:
    ids = tok.encode_batch(texts)
    lens = np.fromiter((min(len(x), body) + 2 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lens.sum()), dtype=token_dtype(tok.vocab_size))  # BOS body EOS, record after record
    pos = 0
    for x, n in zip(ids, lens.tolist()):
        flat[pos] = tok.bos_id
        flat[pos + 1 : pos + n - 1] = x[: n - 2]
        flat[pos + n - 1] = tok.eos_id
        pos += n
    f.write(flat.tobytes())
    ends = offsets[-1] + np.cumsum(lens)
    offsets.extend(ends.tolist())
    acc.add(np.asarray(idx), lens, flat, np.fromiter((len(x) > body for x in ids), bool, len(ids)),
            np.fromiter((len(t.encode("utf-8")) for t in texts), np.int64, len(texts)))


# ---------------------------------------------------------------- the build


def _check_scan(scan: Scan, tok: Any) -> tuple[list[str], list[str]]:
    """Domains and train domains after the scan; unknown domains or an empty training split are errors."""
    domains = list(scan.domains)
    train_domains = scan.train_domains or domains[:1]
    for field, given in (("train_domains", train_domains), ("split.holdout_domains", scan.cfg.split.holdout_domains)):
        unknown = [d for d in given if d not in scan.domains]
        if unknown:
            raise UserError(f"data.{field}: {unknown} not in the data (domains: {', '.join(domains)})")
    if scan.n_train_texts == 0:
        raise UserError("data.split: the training split of the train domains is empty (too few groups?)")
    lm_only = scan.cfg.lm_only_domains
    unknown = [d for d in lm_only if d not in scan.domains]
    if unknown:
        raise UserError(f"data.lm_only_domains: {unknown} not in the data (domains: {', '.join(domains)})")
    both = [d for d in lm_only if d in train_domains]
    if both:
        raise UserError(f"data.lm_only_domains: {both} are also in data.train_domains (a domain is one or the other)")
    return domains, train_domains


def _build(data_cfg: DataBase, tmp: Path, data_id: str, log: Any, tokenizer_path: Path | None = None) -> None:
    from llmcli.data.report import Accumulator, write_report

    t0 = time.perf_counter()
    sources = [registry("source").build(s) for s in source_configs(data_cfg)]
    scan = Scan(data_cfg, sources)
    # Said only if the scan takes a while: bad data found at once stays a one-line error.
    making = "loading" if tokenizer_path is not None or data_cfg.tokenizer.name == "pretrained" else "training"
    notice = threading.Timer(2.0, log, args=(f"preprocess: scanning {len(sources)} source(s) and {making} the "
                                              f"{data_cfg.tokenizer.name} tokenizer ...",))
    notice.daemon = True
    notice.start()
    try:
        texts = scan.train_texts()
        if tokenizer_path is not None:  # a run's own tokenizer: nothing to train
            from llmcli.data.tokenizers import TextTokenizer

            tok = TextTokenizer.load(tokenizer_path)
        else:
            tok = registry("tokenizer").build(data_cfg.tokenizer, texts=texts)
        for _ in texts:  # finish the scan if the tokenizer did not read everything (byte, pretrained read nothing)
            pass
    finally:
        notice.cancel()
    domains, train_domains = _check_scan(scan, tok)
    arr = scan.arrays()
    keep, evidence = _leakage(scan, arr)
    label_names, labels = scan.label_names()
    _check_classes(label_names, labels)
    lm_only_train = (arr["split"] == 0) & np.isin(arr["domain"], [scan.domains[d] for d in data_cfg.lm_only_domains])
    labels[lm_only_train] = -1  # lm_only domains train L only: their training labels never exist for T

    log(f"preprocess: {len(keep)} records, {len(domains)} domains; writing tokens ...")
    acc = Accumulator(arr["split"], arr["domain"], labels, tok.fallback_mask(), len(domains), data_cfg.max_len)
    offsets = _write_tokens(scan, tok, keep, tmp, data_cfg.max_len, acc)
    groups = np.unique(arr["group"][keep], return_inverse=True)[1].astype(np.int32)
    np.save(tmp / "offsets.npy", offsets)
    np.save(tmp / "labels.npy", labels[keep])
    np.save(tmp / "domains.npy", arr["domain"][keep])
    np.save(tmp / "splits.npy", arr["split"][keep])
    np.save(tmp / "groups.npy", groups)
    np.save(tmp / "token_bytes.npy", tok.token_bytes())
    tok.save(tmp / "tokenizer.json")
    stats = write_report(tmp, acc, domains, label_names, data_cfg.tokenizer.name)
    manifest = {
        "id": data_id,
        "format": FORMAT_VERSION,
        "data_config": data_cfg.model_dump(mode="json"),
        "data_config_hash": sha256_json(data_key(data_cfg)),
        "input_hash": [s.input_hash for s in sources] if len(sources) > 1 else sources[0].input_hash,
        "inputs": input_record(data_cfg, sources),
        "sources": [s.name for s in sources],
        "domains": domains,
        "train_domains": train_domains,
        "holdout_domains": list(data_cfg.split.holdout_domains),
        "lm_only_domains": list(data_cfg.lm_only_domains),
        "split_mode": "field" if data_cfg.split.field else "group_hash",
        "label_names": label_names,
        "n_records": int(keep.sum()),
        "n_tokens": int(offsets[-1]),
        "n_truncated": stats["n_truncated"],
        "vocab_size": tok.vocab_size,  # every id the tokenizer can give, added tokens included
        "token_dtype": np.dtype(token_dtype(tok.vocab_size)).name,
        "pad_id": tok.pad_id,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "counts": {f"{s}/{d}": stats["splits"][s][d]["records"] for s in SPLITS for d in domains},
        **evidence,
        "tokenizer_sha256": hashlib.sha256((tmp / "tokenizer.json").read_bytes()).hexdigest(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(tmp / "manifest.json", manifest)
    log(f"preprocess: {manifest['n_records']} records, {manifest['n_tokens']} tokens, vocab {tok.vocab_size}, "
        f"{evidence['duplicates_dropped']} cross-split duplicates dropped, {manifest['seconds']} s")


def load_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a processed folder."""
    return json.loads((Path(path) / "manifest.json").read_text(encoding="utf-8"))
