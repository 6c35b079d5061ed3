"""Tests for minillavamed/records.py: the one reader of JSON / JSON-lines records and the resumable JSONL files.
(data.py's tests read its JSON arrays and lines, with their errors, through data.load_records.)"""

import json

import pytest

from minillavamed.records import located_records, read_jsonl_resume


def test_a_grouped_object_is_read_only_when_asked_and_named_by_index(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"mri": [{"pair_id": "a"}, {"pair_id": "b"}], "gross": [{"pair_id": "c"}]}, indent=1))
    flat = lambda doc: [r for rs in doc.values() for r in rs]  # noqa: E731
    assert located_records(path, grouped=flat) == [(f"{path}[0]", {"pair_id": "a"}), (f"{path}[1]", {"pair_id": "b"}),
                                                   (f"{path}[2]", {"pair_id": "c"})]
    with pytest.raises(ValueError, match=rf"{path.name}:1: not valid JSON"):  # without `grouped` it is not records
        located_records(path)
    # JSON lines whose records hold lists are still lines, named by file:line, with or without `grouped`.
    lines = tmp_path / "lines.jsonl"
    lines.write_text('{"pair_id": "a", "tags": []}\n\n{"pair_id": "b"}\n')
    for grouped in (None, flat):
        assert located_records(lines, grouped) == [(f"{lines}:1", {"pair_id": "a", "tags": []}),
                                                   (f"{lines}:3", {"pair_id": "b"})]
    lines.write_text('{"pair_id": "a"}\n[1]\n')
    with pytest.raises(ValueError, match=r"lines\.jsonl:2: record 1 is not a JSON object"):
        located_records(lines, flat)


def test_read_jsonl_resume_truncates_torn_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a"}\n\n{"id": "b"}\n{"id": "c", "conv')
    assert [r["id"] for r in read_jsonl_resume(str(path))] == ["a", "b"]
    assert path.read_bytes() == b'{"id": "a"}\n\n{"id": "b"}\n'
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}')  # complete but unterminated: kept, newline added
    assert [r["id"] for r in read_jsonl_resume(str(path))] == ["a", "b"]
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n'
    path.write_bytes(b'{"id": "a"}\n{"id": \n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"out.jsonl:2: not valid JSON"):
        read_jsonl_resume(str(path))
    assert read_jsonl_resume(str(tmp_path / "absent.jsonl")) == []
