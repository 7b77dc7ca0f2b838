"""Instruction/response examples: the records a library is built from, and reading them from disk.

Two formats are read: JSON Lines (one JSON object per line) and CSV with a header row. The field
names are configurable because every data set spells them differently ("instruction", "prompt",
"input", ...). Everything is checked before it is returned, so a bad file fails here and not
halfway through a build.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SUPPORTED_SUFFIXES", "Example", "examples_fingerprint", "load_examples", "validate_examples"]

SUPPORTED_SUFFIXES = (".jsonl", ".csv")


@dataclass(frozen=True)
class Example:
    """One training example.

    Args:
        instruction: What the model is asked; this is the text that gets embedded and clustered.
        response: The target the adapter learns to produce.
    """

    instruction: str
    response: str


def load_examples(
    path: str | os.PathLike,
    *,
    instruction_field: str = "instruction",
    response_field: str = "response",
) -> list[Example]:
    """Reads instruction/response examples from a JSONL or CSV file.

    Args:
        path: A ``.jsonl`` file (one JSON object per line, blank lines ignored) or a ``.csv`` file
            with a header row.
        instruction_field: Name of the field holding the instruction.
        response_field: Name of the field holding the response.

    Returns:
        The examples in file order.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: For an unsupported suffix, a record that is not valid JSON or lacks a field, a
            field that is not a non-empty string, or a file without records.

    Example:
        >>> examples = load_examples("train.jsonl", instruction_field="prompt")  # doctest: +SKIP
        >>> examples[0].instruction  # doctest: +SKIP
        'Add 3 and 4.'
    """
    path = Path(path)
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise ValueError(f"Unsupported data file {str(path)!r}; expected one of {list(SUPPORTED_SUFFIXES)}.")
    if not path.is_file():
        raise FileNotFoundError(f"Data file {str(path)!r} does not exist.")
    if instruction_field == response_field:
        raise ValueError(f"instruction_field and response_field are both {instruction_field!r}.")
    records = _read_jsonl(path) if path.suffix.lower() == ".jsonl" else _read_csv(path)
    examples = []
    for where, record in records:
        values = []
        for field in (instruction_field, response_field):
            if field not in record:
                raise ValueError(
                    f"{where} has no field {field!r}; its fields are {sorted(record)}. "
                    "Pass instruction_field=/response_field= (--instruction-field/--response-field) "
                    "to name the right ones."
                )
            value = record[field]
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: field {field!r} must be a non-empty string, got {value!r}.")
            values.append(value)
        examples.append(Example(instruction=values[0], response=values[1]))
    if not examples:
        raise ValueError(f"Data file {str(path)!r} contains no examples.")
    return examples


def validate_examples(examples: Sequence[Example]) -> None:
    """Checks that ``examples`` is a non-empty sequence of `Example` with non-empty texts.

    Raises:
        ValueError: Naming the first offending item.
    """
    if isinstance(examples, (str, bytes, os.PathLike)) or not isinstance(examples, Sequence):
        raise ValueError(
            f"examples must be a sequence of Example, got {type(examples).__name__}; "
            "read a file with load_examples() first."
        )
    if not examples:
        raise ValueError("examples is empty; a library needs at least one example per cluster.")
    for i, example in enumerate(examples):
        if not isinstance(example, Example):
            raise ValueError(f"examples[{i}] is a {type(example).__name__}, expected Example.")
        if not example.instruction.strip() or not example.response.strip():
            raise ValueError(f"examples[{i}] has an empty instruction or response: {example!r}.")


def examples_fingerprint(examples: Sequence[Example]) -> str:
    """SHA-256 over the examples in order; a resumed build uses it to detect changed data."""
    digest = hashlib.sha256()
    for example in examples:
        for text in (example.instruction, example.response):
            encoded = text.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
    return digest.hexdigest()


def _read_jsonl(path: Path) -> Iterator[tuple[str, Mapping[str, object]]]:
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"Line {line_number} of {path.name}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not valid JSON: {error}.") from error
            if not isinstance(record, dict):
                raise ValueError(f"{where} is a JSON {type(record).__name__}, expected an object.")
            yield where, record


def _read_csv(path: Path) -> Iterator[tuple[str, Mapping[str, object]]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for row_number, row in enumerate(reader, start=1):
            # DictReader puts surplus cells under the key None; report the declared columns only.
            yield f"Row {row_number} of {path.name}", {k: v for k, v in row.items() if k is not None}
