"""The one JSON-lines reader/writer pair and the atomic, locked writes built on it."""
from __future__ import annotations

import json

import pytest

from imelodist_lib import jsonl

# U+0085 is what a cp1252 ellipsis becomes through the Latin-1 fallback of corpus._read_text.
LINE_BREAKERS = "a\u2028b\u2029c\u0085d\x1ce\r\nf"


def test_jsonl_round_trips_every_line_separator_python_knows(tmp_path):
    rows = [{"text": LINE_BREAKERS, "n": 1}, {"text": "X:1\nT:\u2028\nK:C\nC|]\n"}, {"text": ""}]
    path = tmp_path / "rows.jsonl"
    assert jsonl.write_jsonl(rows, path) == 3
    assert len(path.read_text(encoding="utf-8").splitlines()) > 3  # what the old reader saw
    assert jsonl.read_jsonl(path) == rows
    assert path.read_bytes().count(b"\n") == 3


def test_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON line"):
        jsonl.read_jsonl(path)


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "rows.jsonl"
    jsonl.write_jsonl([{"a": 1}], path)

    def rows():
        yield {"a": 2}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        jsonl.write_jsonl(rows(), path)
    assert jsonl.read_jsonl(path) == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]  # no temporary file left


def test_append_survives_a_half_written_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    jsonl.append_jsonl({"k": 1}, path)
    with path.open("a", encoding="utf-8") as fh:
        fh.write('{"k": 2, "text": "cut sho')  # a crash mid-line
    jsonl.append_jsonl({"k": 3, "text": "\u2028"}, path)
    rows, bad = jsonl.read_jsonl_tolerant(path)
    assert rows == [{"k": 1}, {"k": 3, "text": "\u2028"}] and bad == 1


def test_folder_lock_is_reentrant_in_one_process(tmp_path):
    with jsonl.folder_lock(tmp_path) as a:
        with jsonl.folder_lock(tmp_path) as b:
            assert a == b
    assert json.dumps(jsonl._HELD) == "{}"
