import pytest

from ds_realloc.data.records import Record, read_jsonl
from ds_realloc.utils.errors import DataError


def test_reads_objects_with_line_numbers_and_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n\n{"prompt": "c", "answer": "d"}\n')
    records = read_jsonl(path)
    assert [r.source for r in records] == [f"{path}:1", f"{path}:3"]
    assert records[1].text("answer") == "d"


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a" "answer": "b"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON: Expecting ',' delimiter \(column \d+\)"):
        read_jsonl(path)


def test_non_object_empty_and_missing_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('[1, 2]\n')
    with pytest.raises(DataError, match=r"d\.jsonl:1: each line must be a JSON object, got list"):
        read_jsonl(path)
    path.write_text("\n\n")
    with pytest.raises(DataError, match="has no records"):
        read_jsonl(path)
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_missing_and_mistyped_fields_name_source_and_field():
    record = Record("f.jsonl:7", {"prompt": 3})
    with pytest.raises(DataError, match=r"f\.jsonl:7: field 'answer' is missing \(the record has: prompt\)"):
        record.text("answer")
    with pytest.raises(DataError, match=r"f\.jsonl:7: field 'prompt' must be a string, got int"):
        record.text("prompt")
    assert record.text("answer", optional=True) is None
    with pytest.raises(DataError, match=r"field 'messages\[0\]\.content' is missing"):
        Record("f.jsonl:8", {"messages": [{"role": "user"}]}).messages()
