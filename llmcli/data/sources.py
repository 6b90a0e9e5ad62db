"""Data sources: each is a re-iterable stream of records `{text, label?, domain, group}`.

A source never holds its corpus in memory: `Source.records()` reads the input again on every call
(preprocess makes two passes). Bad input is a `UserError` naming the file and line. Labels stay raw
here (a string, an integer or None); preprocess maps them to ids over all sources together.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmcli.errors import UserError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from llmcli.config import BibleSource, CsvSource, JsonlSource, ParquetSource, TableFields, TextSource

Label = str | int | None
# Integer labels are class ids; the classifier gets max id + 1 outputs, so a stray huge id must not pass.
MAX_CLASS_ID = 100_000


@dataclass(frozen=True)
class Record:
    """One example. label None = unlabeled (it feeds the LM loss only)."""

    text: str
    label: Label
    domain: str
    group: str
    where: str  # "file:line", for error messages
    fields: Mapping[str, Any] | None = None  # the raw row, for split.field


@dataclass
class Source:
    """A source's record stream plus what it declares up front."""

    name: str
    records: Callable[[], Iterator[Record]]
    input_hash: str
    label_names: list[str] | None = None  # a declared class order (bible); else taken from the data
    domains: list[str] | None = None  # a declared domain order; else first-seen
    inputs: list[dict[str, Any]] = field(default_factory=list)  # `file_identity` of each user file it reads


def _nonempty(records: Iterator[Record], what: str) -> Iterator[Record]:
    """Pass records through; an empty source is a UserError naming it."""
    n = 0
    for r in records:
        n += 1
        yield r
    if n == 0:
        raise UserError(f"{what}: no records (the source is empty)")


def utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line with its newline) of a UTF-8 file; a bad byte names the line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}:{n}: invalid UTF-8 (byte {exc.start + 1} of the line); "
                                "the file must be UTF-8 text") from None
            yield n, line.lstrip("\ufeff") if n == 1 else line


def _file(path: str, where: str = "data.source.path") -> Path:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{where}: {p}: file not found")
    return p


# ---------------------------------------------------------------- what a source reads (the cache's key)


def file_identity(path: Path) -> dict[str, Any]:
    """An input file as the processed-data cache records it: absolute path, size, mtime_ns and sha256."""
    from llmcli.files import sha256_file

    st = path.stat()  # before the hash: a write during hashing leaves a newer mtime, so the next check re-hashes
    return {"path": str(path.absolute()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}


def input_files(cfg: BaseModel) -> list[Path] | None:
    """The user files a source config reads, in read order (cheap: no file is opened).

    None for a source without user files (the bible) or one this module does not know (a plugin).
    """
    if cfg.name in ("jsonl", "csv", "parquet"):
        return [Path(cfg.path)]
    if cfg.name == "text":
        return _glob_files(cfg.glob)
    return None


def input_packages(cfg: BaseModel) -> dict[str, str | None]:
    """The installed packages a built-in source reads, with their versions (None = not installed); {} otherwise."""
    from importlib.metadata import PackageNotFoundError, version

    if cfg.name != "bible":
        return {}
    from llmcli.data import bible

    out: dict[str, str | None] = {}
    for name in ("pythonbible", *(bible.package_name(v) for v in cfg.versions)):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------- table-like rows -> records


def _row_record(cfg: TableFields, row: Mapping[str, Any], path: Path, where: str, label: Label) -> Record | None:
    """A record from one row (dict); None for an empty text. `label` is already type-checked."""
    text = row.get(cfg.text_field)
    if text is None:
        raise UserError(f"{where}: no {cfg.text_field!r} field (data.source.text_field)")
    if not isinstance(text, str):
        raise UserError(f"{where}: {cfg.text_field!r} must be a string, got {type(text).__name__}")
    if not text.strip():
        return None
    domain = cfg.domain or (row.get(cfg.domain_field) if cfg.domain_field else None) or path.stem
    group = row.get(cfg.group_field) if cfg.group_field else None
    return Record(text, label, str(domain), str(group) if group is not None else where, where, row)


def _native_label(cfg: TableFields, row: Mapping[str, Any], where: str) -> Label:
    """A label that must already be a string or an integer (JSON, Parquet)."""
    label = row.get(cfg.label_field) if cfg.label_field else None
    if label is None or isinstance(label, str):
        return label
    if isinstance(label, int) and not isinstance(label, bool):
        if not 0 <= label < MAX_CLASS_ID:
            raise UserError(f"{where}: an integer {cfg.label_field!r} is a class id in [0, {MAX_CLASS_ID}), got {label}")
        return label
    raise UserError(f"{where}: {cfg.label_field!r} must be a string, an integer or null, "
                    f"got {type(label).__name__} {label!r}")


def _file_source(kind: str, cfg: TableFields, rows: Callable[..., Iterator[Record]]) -> Source:
    """A source over one file (`cfg.path`): rows read lazily, the file's sha256 as its cache identity."""
    path = _file(cfg.path)
    identity = file_identity(path)
    return Source(kind, lambda: _nonempty(rows(cfg, path), str(path)), identity["sha256"], inputs=[identity])


def _jsonl_rows(cfg: JsonlSource, path: Path) -> Iterator[Record]:
    for n, line in utf8_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
        rec = _row_record(cfg, row, path, where, _native_label(cfg, row, where))
        if rec is not None:
            yield rec


def jsonl_source(cfg: JsonlSource) -> Source:
    """Records from a JSON-lines file."""
    return _file_source("jsonl", cfg, _jsonl_rows)


def _csv_label(cfg: CsvSource, row: Mapping[str, Any], where: str) -> Label:
    raw = row.get(cfg.label_field) if cfg.label_field else None
    if raw is None or raw == "":
        return None
    if cfg.label_type == "str":
        return raw
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"{where}: label {raw!r} is not an integer (data.source.label_type: int)") from None
    if value < 0:
        raise UserError(f"{where}: label {value} is negative (integer labels are class ids 0, 1, ...)")
    return value


def _csv_rows(cfg: CsvSource, path: Path) -> Iterator[Record]:
    import csv

    lines = (line for _, line in utf8_lines(path))
    reader = csv.DictReader(lines, delimiter=cfg.delimiter)
    header = reader.fieldnames
    if not header:
        raise UserError(f"{path}: no records (the source is empty)")
    if cfg.text_field not in header:  # the other columns are optional: a missing one means "none"
        raise UserError(f"{path}:1: no column {cfg.text_field!r} in the header (columns: {', '.join(header) or 'none'})")
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise UserError(f"{where}: {len(header) + len(row[None])} fields, the header has {len(header)}")
            rec = _row_record(cfg, row, path, where, _csv_label(cfg, row, where))
            if rec is not None:
                yield rec
    except csv.Error as exc:
        raise UserError(f"{path}:{reader.line_num}: bad CSV ({exc})") from None


def csv_source(cfg: CsvSource) -> Source:
    """Records from a CSV file with a header row."""
    return _file_source("csv", cfg, _csv_rows)


def _parquet_rows(cfg: ParquetSource, path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise UserError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    names = pf.schema_arrow.names
    if cfg.text_field not in names:
        raise UserError(f"{path}: no column {cfg.text_field!r} (columns: {', '.join(names)})")
    wanted = [c for c in (cfg.text_field, cfg.label_field, cfg.domain_field, cfg.group_field) if c in names]
    row_no = 0
    for batch in pf.iter_batches(batch_size=8192, columns=list(dict.fromkeys(wanted))):
        for row in batch.to_pylist():
            row_no += 1
            where = f"{path}:row {row_no}"
            rec = _row_record(cfg, row, path, where, _native_label(cfg, row, where))
            if rec is not None:
                yield rec


def parquet_source(cfg: ParquetSource) -> Source:
    """Records from a Parquet file, read in row batches."""
    return _file_source("parquet", cfg, _parquet_rows)


# ---------------------------------------------------------------- plain text files


def _text_units(path: Path, unit: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) of each record in one file."""
    if unit == "line":
        for n, line in utf8_lines(path):
            if line.strip():
                yield n, line.rstrip("\r\n")
        return
    buf: list[str] = []
    start = 1
    for n, line in utf8_lines(path):
        if unit == "paragraph" and not line.strip():
            if buf:
                yield start, "".join(buf).strip()
            buf = []
            continue
        if not buf:
            start = n
        buf.append(line)
    if buf and "".join(buf).strip():
        yield start, "".join(buf).strip()


def _text_rows(cfg: TextSource, files: list[Path]) -> Iterator[Record]:
    for path in files:
        domain = cfg.domain or (path.stem if cfg.domain_from == "file" else path.parent.name)
        for n, text in _text_units(path, cfg.unit):
            where = f"{path}:{n}"
            yield Record(text, cfg.label, domain, str(path) if cfg.group_by == "file" else where, where)


def _glob_files(pattern: str) -> list[Path]:
    """The files a text source's glob matches, sorted (folders skipped)."""
    import glob

    return sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())


def text_source(cfg: TextSource) -> Source:
    """Records from plain-text files matched by a glob."""
    import hashlib

    files = _glob_files(cfg.glob)
    if not files:
        raise UserError(f"data.source.glob: no files match {cfg.glob!r}")
    inputs = [file_identity(f) for f in files]
    h = hashlib.sha256()
    for f in inputs:
        h.update(f"{f['path']}\0{f['sha256']}\n".encode())
    return Source("text", lambda: _nonempty(_text_rows(cfg, files), f"data.source.glob {cfg.glob!r}"), h.hexdigest(),
                  inputs=inputs)


# ---------------------------------------------------------------- the built-in corpus


def _bible_rows(cfg: BibleSource) -> Iterator[Record]:
    from llmcli.data import bible

    books = set(cfg.books) if cfg.books else None
    names = bible.label_names(cfg.label)
    for ver in cfg.versions:
        for v in bible.iter_verses(ver):
            if books and v.book not in books:
                continue
            if cfg.max_chapters_per_book and v.chapter > cfg.max_chapters_per_book:
                continue
            group = f"{v.book:02d}.{v.chapter:03d}"
            yield Record(v.text, names[bible.label_of(v.book, cfg.label)], ver, group, f"bible {ver} {v.verse_id}")


def bible_source(cfg: BibleSource) -> Source:
    """The built-in corpus: one domain per version, one group per chapter (shared across versions)."""
    from importlib.metadata import PackageNotFoundError, version

    from llmcli.data import bible

    versions: dict[str, str] = {}
    for ver in cfg.versions:
        try:
            bible.load_bible(ver)
            versions[ver] = version(bible.package_name(ver))
        except (ImportError, PackageNotFoundError):
            raise UserError(
                f"data.source.versions: bible version {ver!r} is not installed; "
                f"pip install {bible.package_name(ver)}"
            ) from None
    what = "data.source: the bible source (check books / max_chapters_per_book)"
    cached: list[Record] = []  # the built-in corpus is small; aligning it once serves both passes

    def records() -> Iterator[Record]:
        if not cached:
            cached.extend(_nonempty(_bible_rows(cfg), what))
        return iter(cached)

    return Source("bible", records, json.dumps(versions),
                  list(bible.label_names(cfg.label)), list(cfg.versions))
