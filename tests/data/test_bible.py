"""The built-in corpus: re-alignment of the pythonbible texts and the labels."""

from __future__ import annotations

from llmcli.data import bible


def test_alignment_recovers_all_kjv_verses_and_agrees_with_the_package_index():
    verses = {v.verse_id: v.text for v in bible.iter_verses("kjv")}
    assert len(verses) == 31102
    assert verses[1001001] == "In the beginning God created the heaven and the earth."
    assert verses[66022021] == "The grace of our Lord Jesus Christ be with you all. Amen."


def test_kjv_italic_brackets_are_removed_but_their_words_kept():
    verses = {v.verse_id: v.text for v in bible.iter_verses("kjv")}
    assert verses[19023001] == "The LORD is my shepherd; I shall not want."
    assert not any("[" in t or "]" in t for t in verses.values())


def test_bbe_is_realigned_where_the_package_index_drifts():
    # The package's own index gives Genesis 43:2 the text of 43:3 with a marker in it.
    verses = {v.verse_id: v.text for v in bible.iter_verses("bbe")}
    assert verses[1043001] == "Now the land was in bitter need of food."
    assert verses[1043002].startswith("And when the grain which they had got in Egypt was all used up")
    assert verses[40001001].startswith("The book of the generations of Jesus Christ")
    assert len(verses) > 30900


def test_wycliffe_apocrypha_does_not_shift_canonical_verses():
    verses = {v.verse_id: v.text for v in bible.iter_verses("wyc")}
    assert verses[17001001].startswith("In the daies of kyng Assuerus")  # Esther 1:1, after Tobit/Judith in the text
    assert verses[66022021].startswith("The grace of oure Lord Jhesu Crist")


def test_marker_walk_skips_a_missing_verse_instead_of_shifting():
    content = "1. a b 2. c d 4. g h"
    got = bible.align(content, (1001001, 1001002, 1001003, 1001004))
    assert {k: bible.clean_text(v) for k, v in got.items()} == {1001001: "a b", 1001002: "c d", 1001004: "g h"}


def test_genre_and_testament_labels():
    assert bible.label_of(1, "genre") == bible.GENRES.index("law")
    assert bible.label_of(19, "genre") == bible.GENRES.index("poetry_wisdom")
    assert bible.label_of(44, "genre") == bible.GENRES.index("acts")
    assert bible.label_of(66, "genre") == bible.GENRES.index("apocalyptic")
    assert bible.label_of(39, "testament") == 0 and bible.label_of(40, "testament") == 1
    assert len(bible.label_names("genre")) == 10
