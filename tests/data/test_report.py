"""The preprocess report: stats.json known answers, the length histogram PNG, the table on the terminal."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from llmcli.cli import app


def write_data(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"text": "ab", "label": "x", "split": "train", "domain": "in"},
            {"text": "é", "label": "y", "split": "train", "domain": "in"},
            {"text": "abcd", "split": "test", "domain": "in"},
            {"text": "zz zz", "label": "x", "split": "test", "domain": "out"},
            {"text": "a" * 40, "label": "y", "split": "val", "domain": "in"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {
        "source": {"name": "jsonl", "path": str(f)}, "tokenizer": {"name": "byte"}, "max_len": 12,
        "split": {"field": "split"}, "train_domains": ["in"], "processed_dir": str(tmp_path / "p")}}))
    return cfg


def test_preprocess_prints_the_table_and_writes_stats_and_histogram(tmp_path):
    result = CliRunner().invoke(app, ["preprocess", str(write_data(tmp_path))])
    assert result.exit_code == 0, result.output
    out = result.output.strip().splitlines()[-1]
    assert "fallback rate" in result.output and "labels per split" in result.output
    stats = json.loads((tmp_path / "p" / out.split("/")[-1] / "stats.json").read_text())
    train = stats["splits"]["train"]["in"]
    # byte tokenizer: one token per UTF-8 byte plus BOS and EOS; "é" is 2 bytes, both half a character
    assert train == {"records": 2, "tokens": 2 + 2 + 2 + 2, "mean_tokens": 4.0, "text_bytes": 4,
                     "bytes_per_token": 1.0, "fallback_rate": 0.5, "truncated": 0}
    assert stats["splits"]["val"]["in"]["tokens"] == 12 and stats["splits"]["val"]["in"]["truncated"] == 1
    assert stats["splits"]["test"]["out"]["records"] == 1 and stats["splits"]["val"]["out"]["records"] == 0
    assert stats["labels"] == {"train": {"x": 1, "y": 1}, "val": {"y": 1}, "test": {"x": 1, "unlabeled": 1}}
    assert stats["length_histogram"]["train"][4] == 2 and stats["length_histogram"]["val"][12] == 1
    png = (tmp_path / "p" / out.split("/")[-1] / "length_hist.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    again = CliRunner().invoke(app, ["preprocess", str(write_data(tmp_path))])
    assert "up to date" in again.output and "fallback rate" in again.output
