"""The built-in corpus: verse-aligned English Bible translations from the pythonbible packages.

The packages ship each translation as one long string plus a verse index. Some indices are
broken (BBE's drifts from Genesis 43 on), so we do not trust them: we re-align every version
ourselves by walking the text's own verse-number markers ("12. ", or "\\43:2\\") in canonical
order. A verse we cannot find is left out rather than given its neighbour's text.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

# Versions known to exist as pythonbible-<code> packages; any other code is tried too.
KNOWN_VERSIONS = ("kjv", "web", "bbe", "ylt", "wyc", "asv")

GENRES = (
    "law",
    "history",
    "poetry_wisdom",
    "major_prophets",
    "minor_prophets",
    "gospels",
    "acts",
    "pauline_epistles",
    "general_epistles",
    "apocalyptic",
)
TESTAMENTS = ("old", "new")

# How far ahead of the expected verse we look for its marker before calling it missing.
_LOOKAHEAD = 6
_MARKER = re.compile(r"(?<![\d:])(\d{1,3})\.(?=[^\d.])|\\(\d{1,3}):(\d{1,3})\\")
_ITALICS = re.compile(r"[\[\]]")  # KJV marks translators' additions as [was]; keep the word, drop the marks
_STRAY = re.compile(r"\\\d+:\d+\\|\s+\d{1,3}\.\s*$")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Verse:
    """One verse of one version, with its labels."""

    verse_id: int  # BBCCCVVV, the pythonbible id
    book: int
    chapter: int
    verse: int
    text: str


def _genre_of_book() -> dict[int, int]:
    from pythonbible.book_groups import BookGroup

    groups = (
        BookGroup.OLD_TESTAMENT_LAW,
        BookGroup.OLD_TESTAMENT_HISTORY,
        BookGroup.OLD_TESTAMENT_POETRY_WISDOM,
        BookGroup.OLD_TESTAMENT_MAJOR_PROPHETS,
        BookGroup.OLD_TESTAMENT_MINOR_PROPHETS,
        BookGroup.NEW_TESTAMENT_GOSPELS,
        BookGroup.NEW_TESTAMENT_HISTORY,
        BookGroup.NEW_TESTAMENT_PAUL_EPISTLES,
        BookGroup.NEW_TESTAMENT_GENERAL_EPISTLES,
        BookGroup.NEW_TESTAMENT_APOCALYPTIC,
    )
    return {book.value: i for i, g in enumerate(groups) for book in g.books}


def label_names(label: str) -> tuple[str, ...]:
    """The class names of a bible label scheme, in id order."""
    return GENRES if label == "genre" else TESTAMENTS


def label_of(book: int, label: str, _cache: dict[int, int] = {}) -> int:  # noqa: B006 - memo
    """Class id of a book under the `genre` (10 classes) or `testament` (2 classes) scheme."""
    if not _cache:
        _cache.update(_genre_of_book())
    genre = _cache[book]
    return genre if label == "genre" else int(genre >= GENRES.index("gospels"))


def package_name(version: str) -> str:
    """The PyPI package that ships a version."""
    return f"pythonbible-{version}"


def load_bible(version: str):
    """Import a version's plain-text Bible; ImportError names the package if it is missing."""
    try:
        module = importlib.import_module(f"pythonbible_{version}.plain_text_bible")
    except ModuleNotFoundError as exc:
        raise ImportError(
            f"bible version {version!r} needs the package {package_name(version)!r} "
            f"(pip install {package_name(version)})"
        ) from exc
    return module.bible


def canonical_verse_ids() -> tuple[int, ...]:
    """The 31,102 verse ids of the Protestant canon, in order (KJV's verse set)."""
    return load_bible("kjv").get_verse_ids()


def clean_text(raw: str) -> str:
    """Drop markers, KJV's italics brackets and stray verse numbers; fold white space."""
    text = _STRAY.sub(" ", raw)
    text = _ITALICS.sub("", text)
    return _SPACE.sub(" ", text).strip()


def align(content: str, verse_ids: tuple[int, ...]) -> dict[int, str]:
    """Map verse ids to their raw text by walking the content's markers in canonical order."""
    markers = [(m.start(), m.end(), m.group(1), m.group(2), m.group(3)) for m in _MARKER.finditer(content)]
    found: list[tuple[int, int, int]] = []  # (verse_id, text start, marker start)
    cursor = 0
    for vid in verse_ids:
        chapter, verse = (vid // 1000) % 1000, vid % 1000
        for k in range(cursor, min(cursor + _LOOKAHEAD, len(markers))):
            start, end, num, c, v = markers[k]
            hit = int(num) == verse if num is not None else (int(c), int(v)) == (chapter, verse)
            if hit:
                found.append((vid, end, start))
                cursor = k + 1
                break
    texts: dict[int, str] = {}
    for i, (vid, text_start, _) in enumerate(found):
        text_end = found[i + 1][2] if i + 1 < len(found) else len(content)
        texts[vid] = content[text_start:text_end]
    return texts


def iter_verses(version: str, verse_ids: tuple[int, ...] | None = None) -> Iterator[Verse]:
    """Yield the cleaned, non-empty verses of one version in canonical order."""
    bible = load_bible(version)
    # Walk the package's own id list in text order (it may hold books outside the canon, such
    # as Wycliffe's Apocrypha), then keep the canonical verses.
    order = tuple(sorted(bible.get_verse_ids(), key=lambda v: bible.verse_start_indices[v]))
    keep = set(verse_ids if verse_ids is not None else canonical_verse_ids())
    for vid, raw in align(bible.scripture_content, order).items():
        text = clean_text(raw)
        if vid in keep and text:
            yield Verse(vid, vid // 1_000_000, (vid // 1000) % 1000, vid % 1000, text)
