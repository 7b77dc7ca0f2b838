"""Reading instruction/response files (peft_cp_merge.library.data)."""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("accelerate")  # imported by the peft_cp_merge.library package

from peft_cp_merge.library.data import (
    Example,
    examples_fingerprint,
    load_examples,
    validate_examples,
)

pytestmark = pytest.mark.library

RECORDS = [
    {"prompt": "Add 2 and 3.", "answer": "5", "id": 1},
    {"prompt": 'Reverse "abc".', "answer": "cba", "id": 2},
]
EXPECTED = [Example("Add 2 and 3.", "5"), Example('Reverse "abc".', "cba")]


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    return path


def write_csv(path, records):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


@pytest.mark.parametrize("writer", [write_jsonl, write_csv], ids=["jsonl", "csv"])
def test_reads_jsonl_and_csv_with_custom_fields(tmp_path, writer):
    path = writer(tmp_path / ("data.jsonl" if writer is write_jsonl else "data.csv"), RECORDS)
    assert load_examples(path, instruction_field="prompt", response_field="answer") == EXPECTED


def test_missing_field_names_the_field_and_the_fields_present(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    with pytest.raises(
        ValueError, match=r"Line 1 of data.jsonl has no field 'instruction'; its fields are \['answer'"
    ):
        load_examples(path, response_field="answer")


def test_missing_csv_column(tmp_path):
    path = write_csv(tmp_path / "data.csv", RECORDS)
    with pytest.raises(ValueError, match=r"Row 1 of data\.csv has no field 'response'"):
        load_examples(path, instruction_field="prompt")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", "\n\n", "contains no examples"),
        ("empty.csv", "prompt,answer\n", "contains no examples"),
        (
            "broken.jsonl",
            '{"prompt": "a", "answer": "b"}\n{"prompt": \n',
            "Line 2 of broken.jsonl is not valid JSON",
        ),
        ("list.jsonl", '["a", "b"]\n', "is a JSON list, expected an object"),
        ("blank.jsonl", '{"prompt": " ", "answer": "b"}\n', "'prompt' must be a non-empty string"),
        ("data.txt", "x", r"expected one of \['.jsonl', '.csv'\]"),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_examples(path, instruction_field="prompt", response_field="answer")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")


def test_validate_examples_rejects_non_examples():
    with pytest.raises(ValueError, match=r"examples\[1\] is a tuple"):
        validate_examples([Example("a", "b"), ("c", "d")])
    with pytest.raises(ValueError, match="examples is empty"):
        validate_examples([])


def test_fingerprint_depends_on_content_and_boundaries():
    base = examples_fingerprint([Example("ab", "c")])
    assert examples_fingerprint([Example("ab", "c")]) == base
    assert examples_fingerprint([Example("a", "bc")]) != base
