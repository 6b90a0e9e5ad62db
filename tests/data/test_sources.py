"""Sources: jsonl, csv, text, parquet, bible, several at once; labels; bad data named by file and line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from llmcli.cli import app
from llmcli.config import validate_config
from llmcli.data.dataset import ProcessedData
from llmcli.data.preprocess import preprocess
from llmcli.data.tokenizers import TextTokenizer
from llmcli.errors import UserError
from llmcli.registry import registry

QUIET = {"log": lambda m: None}


def source(**cfg):
    """Build a source from its config dict."""
    data = validate_config({"data": {"source": cfg}}).data
    return registry("source").build(data.source)


def build(tmp_path, sources, **data):
    """Preprocess `sources` (a list of source dicts) with a small char tokenizer and all-train splits."""
    cfg = validate_config({"data": {"sources": sources, "tokenizer": {"name": "char"},
                                    "split": {"val": 0.0, "test": 0.01, "seed": 3},
                                    "processed_dir": str(tmp_path / "p"), **data}})
    return ProcessedData(preprocess(cfg.data, **QUIET))


def texts_of(data: ProcessedData) -> list[str]:
    tok = TextTokenizer.load(data.path / "tokenizer.json")
    return [tok.decode(data.tokens[data.offsets[i] : data.offsets[i + 1]].tolist()) for i in range(len(data.labels))]


def test_jsonl_unicode_empty_lines_string_labels_and_domain_from_the_file_name(tmp_path):
    f = tmp_path / "news.jsonl"
    f.write_text('{"text": "Grüße aus Köln 😀", "label": "b"}\n\n   \n{"text": "ça va", "label": "a"}\n'
                 '{"text": "no label here"}\n{"text": "   "}\n', encoding="utf-8")
    recs = list(source(name="jsonl", path=str(f)).records())
    assert [r.text for r in recs] == ["Grüße aus Köln 😀", "ça va", "no label here"]  # blank text skipped
    assert [r.label for r in recs] == ["b", "a", None]
    assert {r.domain for r in recs} == {"news"} and recs[1].where == f"{f}:4"


def test_jsonl_columns_are_configurable_and_a_source_domain_tags_every_record(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"body": "x y", "cls": 2, "domain": "ignored", "doc": "d1"}\n', encoding="utf-8")
    (r,) = source(name="jsonl", path=str(f), text_field="body", label_field="cls", group_field="doc",
                  domain="legal").records()
    assert (r.text, r.label, r.domain, r.group) == ("x y", 2, "legal", "d1")


def test_csv_named_columns_unicode_quoted_newlines_and_integer_labels(tmp_path):
    f = tmp_path / "reviews.csv"
    f.write_text('id;body;stars\n1;"naïve, but\nfine";4\n\n2;日本語のテキスト;0\n3;;1\n', encoding="utf-8")
    recs = list(source(name="csv", path=str(f), delimiter=";", text_field="body", label_field="stars",
                       label_type="int").records())
    assert [(r.text, r.label) for r in recs] == [("naïve, but\nfine", 4), ("日本語のテキスト", 0)]
    assert recs[1].where == f"{f}:5"


@pytest.mark.parametrize(("unit", "expected"), [
    ("line", ["première ligne", "second line", "third ☃"]),
    ("paragraph", ["première ligne\nsecond line", "third ☃"]),
    ("file", ["première ligne\nsecond line\n\n\nthird ☃"]),
])
def test_text_units_line_paragraph_file(tmp_path, unit, expected):
    (tmp_path / "a.txt").write_text("première ligne\nsecond line\n\n\nthird ☃\n\n", encoding="utf-8")
    recs = list(source(name="text", glob=str(tmp_path / "*.txt"), unit=unit).records())
    assert [r.text for r in recs] == expected
    assert all(r.domain == "a" and r.label is None for r in recs)


def test_text_domain_from_folder_or_given_and_groups_by_file(tmp_path):
    for folder, name in (("modern", "x.txt"), ("old", "y.txt")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_text("one\ntwo\n", encoding="utf-8")
    pattern = str(tmp_path / "**" / "*.txt")
    recs = list(source(name="text", glob=pattern, domain_from="folder", group_by="file").records())
    assert [r.domain for r in recs] == ["modern", "modern", "old", "old"]
    assert recs[0].group == recs[1].group != recs[2].group
    assert {r.domain for r in source(name="text", glob=pattern, domain="all").records()} == {"all"}


def test_text_glob_matching_nothing_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"data\.source\.glob: no files match"):
        source(name="text", glob=str(tmp_path / "*.md"))


def test_parquet_rows_with_int_labels_nulls_and_unicode(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["αβγ", "", "hello\nworld"], "label": [1, 0, None]}), f)
    recs = list(source(name="parquet", path=str(f)).records())
    assert [(r.text, r.label, r.where) for r in recs] == [("αβγ", 1, f"{f}:row 1"), ("hello\nworld", None, f"{f}:row 3")]


def test_parquet_missing_text_on_a_row_names_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["ok", None]}), f)
    with pytest.raises(UserError, match=r"t\.parquet:row 2: no 'text' field"):
        list(source(name="parquet", path=str(f)).records())


def test_bible_any_installed_translation_beyond_the_default_five():
    recs = source(name="bible", versions=["asv"], books=[57]).records()  # Philemon, one chapter
    recs = list(recs)
    assert len(recs) == 25 and recs[0].domain == "asv" and recs[0].label == "pauline_epistles"


def test_bible_version_without_a_package_names_the_package():
    with pytest.raises(UserError, match=r"'xyz' is not installed; pip install pythonbible-xyz"):
        source(name="bible", versions=["xyz"])


def test_several_sources_each_tagged_with_a_domain_labels_merged_unlabeled_kept(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.csv"
    a.write_text("".join(json.dumps({"text": f"alpha {i} é", "label": "pos" if i % 2 else "neg"}) + "\n"
                         for i in range(20)), encoding="utf-8")
    b.write_text("text,label\n" + "".join(f"beta {i} ü,{'neu' if i % 3 else ''}\n" for i in range(12)),
                 encoding="utf-8")
    (tmp_path / "c.txt").write_text("gamma one\n\ngamma two\n", encoding="utf-8")
    data = build(tmp_path, [{"name": "jsonl", "path": str(a), "domain": "in"},
                            {"name": "csv", "path": str(b), "domain": "out"},
                            {"name": "text", "glob": str(tmp_path / "*.txt")}], train_domains=["in", "c"])
    assert data.domains == ["in", "out", "c"]
    assert data.label_names == ["neg", "neu", "pos"]  # strings -> ids in sorted order
    assert data.path.name.startswith("multi-")
    dom = np.array(data.domains)[data.domain_ids]
    assert (data.labels[dom == "c"] == -1).all()  # text without a label: LM only
    out = data.labels[dom == "out"]
    assert set(out.tolist()) == {-1, 1} and (out == -1).sum() == 4
    assert "gamma two" in texts_of(data) and "alpha 3 é" in texts_of(data)


def test_integer_labels_name_classes_by_id(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 3}) + "\n" for i in range(30)), encoding="utf-8")
    data = build(tmp_path, [{"name": "jsonl", "path": str(f)}])
    assert data.label_names == ["0", "1", "2"]


def test_unlabeled_only_data_has_no_classes(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("".join(f"line {i}\n" for i in range(30)), encoding="utf-8")
    data = build(tmp_path, [{"name": "text", "glob": str(f)}])
    assert data.label_names == [] and (data.labels == -1).all()



@pytest.mark.parametrize("label", ["only", 0])
def test_labeled_data_with_a_single_class_is_one_clear_error_and_leaves_no_cache(tmp_path, label):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f"t{i}", "label": label}) + "\n" for i in range(30)), encoding="utf-8")
    with pytest.raises(UserError, match="every labeled record has the label .*at least two classes"):
        build(tmp_path, [{"name": "jsonl", "path": str(f)}])
    assert not [p for p in (tmp_path / "p").glob("*") if not p.name.startswith(".")]  # nothing complete-looking


# ---------------------------------------------------------------- bad data: one line, exit 2, nothing written

BAD = [
    ("d.jsonl", b'{"text": "ok"}\n{"text": "fine"}\n{"text": oops}\n', {}, r"d\.jsonl:3: invalid JSON"),
    ("d.jsonl", b'{"text": "ok"}\n\n{"body": "no text"}\n', {}, r"d\.jsonl:3: no 'text' field"),
    ("d.jsonl", b'{"text": "ok", "label": "a"}\n{"text": "x", "label": 1.5}\n', {},
     r"d\.jsonl:2: 'label' must be a string, an integer or null, got float 1\.5$"),
    ("d.jsonl", b'{"text": "ok", "label": "a"}\n{"text": "x", "label": 3}\n', {},
     r"d\.jsonl:2: label 3 is an integer, but .*d\.jsonl:1 has a string label"),
    ("d.jsonl", b'{"text": "ok", "label": 0}\n{"text": "x", "label": "b"}\n', {},
     r"d\.jsonl:2: label 'b' is a string, but .*d\.jsonl:1 has an integer label"),
    ("d.csv", b"body,label\nhello,a\n", {}, r"d\.csv:1: no column 'text' in the header \(columns: body, label\)"),
    ("d.csv", b"text,label\nhello,1\nbye,x\n", {"label_type": "int"}, r"d\.csv:3: label 'x' is not an integer"),
    ("d.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', {}, r"d\.jsonl:2: invalid UTF-8"),
    ("d.csv", b"text\nok\ncaf\xe9\n", {}, r"d\.csv:3: invalid UTF-8"),
    ("d.txt", b"fine\n\xff\xfe\n", {}, r"d\.txt:2: invalid UTF-8"),
    ("d.jsonl", b"\n\n", {}, r"d\.jsonl: no records \(the source is empty\)"),
    ("d.csv", b"", {}, r"d\.csv: no records \(the source is empty\)"),
    ("d.txt", b"\n  \n", {}, r"no records \(the source is empty\)"),
]


@pytest.mark.parametrize(("name", "content", "extra", "message"), BAD)
def test_bad_data_is_one_line_naming_file_and_line_exit_2_nothing_written(tmp_path, name, content, extra, message):
    f = tmp_path / name
    f.write_bytes(content)
    kind = {"jsonl": "jsonl", "csv": "csv", "txt": "text"}[name.split(".")[1]]
    src = {"name": kind, **({"glob": str(f)} if kind == "text" else {"path": str(f)}), **extra}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"source": src, "tokenizer": {"name": "byte"},
                                            "processed_dir": str(tmp_path / "p")}}))
    result = CliRunner().invoke(app, ["preprocess", str(cfg)])
    assert result.exit_code == 2
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert re.search(message, errors[0]), errors[0]
    left = [p.name for p in (tmp_path / "p").iterdir()] if (tmp_path / "p").exists() else []
    assert all(n.endswith(".lock") for n in left), left


@pytest.mark.parametrize(("sources", "message"), [
    ([{"name": "jsonl", "path": "a", "txt_field": "x"}], r"data\.sources\.0\.txt_field: unknown key \(allowed here: path,"),
    ([{"name": "jsonl", "path": "a"}, {"name": "jsonx"}], r"data\.sources\.1\.name: unknown source 'jsonx' \(valid: bible"),
    ([{"name": "csv"}], r"data\.sources\.0\.path: Field required"),
])
def test_a_bad_item_of_data_sources_is_named_by_its_index(sources, message):
    with pytest.raises(UserError, match=message):
        validate_config({"data": {"sources": sources}})


def test_source_and_sources_together_is_a_config_error():
    with pytest.raises(UserError, match=r"data: give either `source` or `sources`"):
        validate_config({"data": {"source": {"name": "csv", "path": "a"}, "sources": [{"name": "jsonl", "path": "b"}]}})


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # the 0-class task head
def test_an_unlabeled_corpus_trains_the_lm_alone(tmp_path, tiny):
    from llmcli.training.engine import train

    f = tmp_path / "lm.txt"
    f.write_text("".join(f"plain line {i} ö\n" for i in range(200)), encoding="utf-8")
    cfg = tiny(f"data.source={{name: text, glob: '{f}'}}", "data.train_domains=null", "data.tokenizer={name: char}",
               "train.steps=4", "train.eval_every=4", f"data.processed_dir={tmp_path / 'p'}")
    run = train(cfg, runs_dir=tmp_path / "runs", progress=False, log=lambda m: None)
    val = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["split"] == "val" and r["domain"] == "lm"]
    assert val and np.isfinite(val[-1]["lm_loss"]) and "acc" not in val[-1]
