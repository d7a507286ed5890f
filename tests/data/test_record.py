"""record.py: record_from_json's errors (scoring relies on them) and the whole-or-nothing writers."""

import os

import pytest

from dreamprm.data.record import Record, record_from_json, write_jsonl
from dreamprm.errors import DataError


def test_record_from_json_names_every_bad_field():
    with pytest.raises(KeyError, match="question, steps"):
        record_from_json({"id": "a"})
    with pytest.raises(ValueError) as e:
        record_from_json({"schema": True, "id": None, "question": "q", "steps": ["s"]})
    assert str(e.value) == ("schema: expected an integer (this dreamprm reads 1), got bool True; "
                            "id: expected a string or an integer, got null")
    assert record_from_json({"id": 3, "question": "q", "steps": ["s"], "meta": None}) == Record("3", "q", ["s"], [None])


def test_write_jsonl_checks_every_record_before_writing(tmp_path):
    recs = [Record("a", "q", ["s"], [1.0]), Record("b", "q", ["s"], [1.0], meta={"why": "x\udc80"})]
    with pytest.raises(DataError) as e:
        write_jsonl(recs, tmp_path / "out.jsonl")
    assert e.value.problems == [f"{tmp_path / 'out.jsonl'}: record 2 (id 'b') cannot be written as UTF-8 JSON: "
                                "a string holds a lone surrogate (surrogates not allowed); fix or drop it; "
                                "nothing was written"]
    assert os.listdir(tmp_path) == []
