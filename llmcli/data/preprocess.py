"""`llmcli preprocess`: records -> splits by group -> tokenizer -> memory-mapped arrays + manifest.

The output folder is named by a hash of the data config and the source's inputs, so a second
preprocess of the same config finds it and does nothing. It is built in a temporary folder and
renamed into place, under a file lock, so a crash or a concurrent run never leaves half of it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from llmcli.errors import UserError
from llmcli.io import atomic_write_json, sha256_json
from llmcli.registry import registry

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


def split_of_group(group: str, seed: int, val: float, test: float) -> int:
    """0/1/2 = train/val/test, from a hash of (seed, group): the same group lands in the same split everywhere."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{group}".encode()).digest()[:8], "big") / 2**64
    return 2 if u < test else 1 if u < test + val else 0


def data_key(data_cfg: Any) -> dict[str, Any]:
    """What the processed data depends on (the cache location does not count)."""
    return {"format": FORMAT_VERSION, **data_cfg.model_dump(mode="json", exclude={"processed_dir"})}


def processed_path(data_cfg: Any) -> Path:
    """Where this data config's processed folder lives."""
    return Path(data_cfg.processed_dir) / f"{data_cfg.source.name}-{sha256_json(data_key(data_cfg))[:12]}"


def preprocess(data_cfg: Any, *, log: Any = print) -> Path:
    """Build (or find) the processed data for a data config; returns its folder."""
    from filelock import FileLock

    out = processed_path(data_cfg)
    if (out / "manifest.json").is_file():
        log(f"preprocess: {out} is up to date, nothing to do")
        return out
    # Read and check the source before anything is created: bad data leaves nothing behind.
    t0 = time.perf_counter()
    src = registry("source").build(data_cfg.source)
    plan = _plan(data_cfg, src)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"data.processed_dir: cannot create {out.parent} ({exc.strerror})") from None
    with FileLock(str(out) + ".lock"):
        if (out / "manifest.json").is_file():  # another process built it while we waited
            log(f"preprocess: {out} is up to date, nothing to do")
            return out
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        except OSError as exc:
            raise UserError(f"data.processed_dir: cannot write in {out.parent} ({exc.strerror})") from None
        try:
            _build(data_cfg, src, plan, tmp, out.name, log, t0)
            if out.exists():  # a stale, manifest-less folder from a crash before this lock existed
                shutil.rmtree(out)
            tmp.rename(out)
        except OSError as exc:
            raise UserError(f"data.processed_dir: writing {out} failed ({exc.strerror or exc})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _plan(data_cfg: Any, src: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Split and domain of every record, the train mask, and the train domains; bad choices are UserErrors."""
    records, domains = src.records, src.domains
    train_domains = data_cfg.train_domains or domains[:1]
    unknown = [d for d in train_domains if d not in domains]
    if unknown:
        raise UserError(f"data.train_domains: {unknown} not in the data (domains: {', '.join(domains)})")
    sp = data_cfg.split
    split = np.array([split_of_group(r.group, sp.seed, sp.val, sp.test) for r in records], dtype=np.int8)
    dom = np.array([domains.index(r.domain) for r in records], dtype=np.int16)
    in_train = (split == 0) & np.isin(dom, [domains.index(d) for d in train_domains])
    if not in_train.any():
        raise UserError("data.split: the training split of the train domains is empty (too few groups?)")
    return split, dom, in_train, train_domains


def _build(data_cfg: Any, src: Any, plan: tuple, tmp: Path, data_id: str, log: Any, t0: float) -> None:
    records, domains = src.records, src.domains
    split, dom, in_train, train_domains = plan
    log(f"preprocess: {len(records)} records, {len(domains)} domains; training the tokenizer ...")
    train_texts = [r.text for r, keep in zip(records, in_train) if keep]
    tok = registry("tokenizer").build(data_cfg.tokenizer, texts=train_texts)
    if tok.vocab_size > 65535:
        raise UserError(f"data.tokenizer: vocabulary of {tok.vocab_size} does not fit uint16 token arrays")

    ids = tok.encode_batch([r.text for r in records])
    body = data_cfg.max_len - 2  # room for BOS and EOS
    seqs = [[tok.bos_id, *x[:body], tok.eos_id] for x in ids]
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.memmap(tmp / "tokens.bin", dtype=np.uint16, mode="w+", shape=(int(offsets[-1]),))
    tokens[:] = np.fromiter((t for s in seqs for t in s), dtype=np.uint16, count=int(offsets[-1]))
    tokens.flush()
    del tokens

    groups = {g: i for i, g in enumerate(dict.fromkeys(r.group for r in records))}
    np.save(tmp / "offsets.npy", offsets)
    np.save(tmp / "labels.npy", np.array([r.label for r in records], dtype=np.int64))
    np.save(tmp / "domains.npy", dom)
    np.save(tmp / "splits.npy", split)
    np.save(tmp / "groups.npy", np.array([groups[r.group] for r in records], dtype=np.int32))
    np.save(tmp / "token_bytes.npy", tok.token_bytes())
    tok.save(tmp / "tokenizer.json")

    counts = Counter((SPLITS[s], domains[d]) for s, d in zip(split.tolist(), dom.tolist()))
    leaks = _group_leaks(records, split)
    manifest = {
        "id": data_id,
        "format": FORMAT_VERSION,
        "data_config": data_cfg.model_dump(mode="json"),
        "data_config_hash": sha256_json(data_key(data_cfg)),
        "input_hash": src.input_hash,
        "domains": domains,
        "train_domains": train_domains,
        "label_names": src.label_names,
        "n_records": len(records),
        "n_tokens": int(offsets[-1]),
        "n_truncated": int(sum(len(x) > body for x in ids)),
        "vocab_size": tok.vocab_size,
        "pad_id": tok.pad_id,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "counts": {f"{s}/{d}": counts.get((s, d), 0) for s in SPLITS for d in domains},
        "groups_crossing_splits": leaks,
        "tokenizer_sha256": hashlib.sha256((tmp / "tokenizer.json").read_bytes()).hexdigest(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(tmp / "manifest.json", manifest)
    log(f"preprocess: {len(records)} records, {manifest['n_tokens']} tokens, vocab {tok.vocab_size}, "
        f"{manifest['seconds']} s")


def _group_leaks(records: list[Any], split: np.ndarray) -> int:
    """Number of groups found in more than one split (0 by construction; recorded as evidence)."""
    seen: dict[str, set[int]] = {}
    for r, s in zip(records, split.tolist()):
        seen.setdefault(r.group, set()).add(s)
    return sum(len(v) > 1 for v in seen.values())


def load_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a processed folder."""
    return json.loads((Path(path) / "manifest.json").read_text(encoding="utf-8"))
