"""Tokenised examples in the Hugging Face convention, checked and padded (``calibrate``, ``osrm_init``).

An example is a dict of 1-D integer sequences: ``input_ids``, optionally ``attention_mask`` (ones
when absent) and, for a loss, ``labels`` (``IGNORE_INDEX`` where no loss is taken); other keys are
ignored. A ``DataLoader`` of such dicts of 2-D tensors is split into rows. :func:`token_rows` checks
everything a forward pass would otherwise fail on (or silently misread) and names the example;
:func:`padded_batches` right-pads rows into batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "padded_batches", "token_rows"]

IGNORE_INDEX = -100  # the label Hugging Face losses skip


def _fields(item, index: int, keys: Sequence[str], is_loader: bool) -> dict[str, Tensor]:
    where = f"{'Batch' if is_loader else 'Example'} {index}"
    if not isinstance(item, Mapping) or any(key not in item for key in keys):
        raise ValueError(f"{where} must be a dict with {list(keys)} (and 'attention_mask'), got {item!r:.80}")
    fields = {key: torch.as_tensor(item[key]) for key in (*keys, "attention_mask") if key in item}
    if "attention_mask" not in fields:
        fields["attention_mask"] = torch.ones_like(fields["input_ids"])
    ndim = 2 if is_loader else 1
    shapes = {key: tuple(value.shape) for key, value in fields.items()}
    if any(value.ndim != ndim for value in fields.values()) or len(set(shapes.values())) != 1:
        raise ValueError(f"{where}: {list(fields)} must be {ndim}-D of one shape, got {shapes}")
    if any(value.is_floating_point() or value.is_complex() for value in fields.values()):
        raise ValueError(f"{where}: {list(fields)} must hold integers")
    return {key: value.to("cpu", torch.long) for key, value in fields.items()}


def _check_row(i: int, row: dict[str, Tensor], max_length: int | None, vocab: int | None) -> None:
    ids, mask = row["input_ids"], row["attention_mask"]
    if ids.numel() == 0 or (max_length is not None and ids.numel() > max_length):
        raise ValueError(
            f"Example {i} has {ids.numel()} tokens; the model takes 1 to {max_length} "
            "(config.max_position_embeddings)"
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"Example {i}: attention_mask must hold 0 and 1 only")
    bad = ids < 0
    if vocab is not None:
        bad |= ids >= vocab
    if "labels" in row:
        labels = row["labels"]
        bad |= (labels < 0) & (labels != IGNORE_INDEX)
        if vocab is not None:
            bad |= labels >= vocab
    if bool(bad.any()):
        if "labels" in row:
            raise ValueError(
                f"Example {i} has ids or labels outside [0, {vocab}) (labels may also be {IGNORE_INDEX})"
            )
        raise ValueError(f"Example {i} has input_ids outside [0, {vocab})")


def token_rows(
    examples,
    *,
    name: str,
    keys: Sequence[str] = ("input_ids",),
    max_examples: int | None = None,
    max_length: int | None = None,
    vocab: int | None = None,
) -> list[dict[str, Tensor]]:
    """The first ``max_examples`` examples as dicts of 1-D int64 CPU tensors, checked.

    Args:
        examples: An iterable of dicts (a list, a ``datasets.Dataset``) or a ``DataLoader`` of batches.
        name: The argument's name, for messages.
        keys: Required keys besides the optional ``attention_mask``.
        max_examples: Rows kept at most (``None``: all).
        max_length: The model's context (``None``: unchecked).
        vocab: The vocabulary size (``None``: unchecked).

    Raises:
        ValueError: Not an iterable of dicts, a missing key, sequences of other shapes or of floats, no
            example, an empty or too long example, a mask other than 0/1, ids (or labels other than
            ``IGNORE_INDEX``) outside the vocabulary.

    Example:
        >>> rows = token_rows([{"input_ids": [5, 6, 7]}], name="examples")
        >>> rows[0]["attention_mask"]
        tensor([1, 1, 1])
    """
    if isinstance(examples, Mapping | str | bytes) or not isinstance(examples, Iterable):
        kind = type(examples).__name__
        raise ValueError(f"{name} must be an iterable of dicts or a DataLoader, got {kind}")
    is_loader = isinstance(examples, torch.utils.data.DataLoader)
    limit = float("inf") if max_examples is None else max_examples
    rows: list[dict[str, Tensor]] = []
    for index, item in enumerate(examples):
        if len(rows) >= limit:
            break
        fields = _fields(item, index, keys, is_loader)
        if is_loader:
            rows += [dict(zip(fields, row, strict=True)) for row in zip(*fields.values(), strict=True)]
        else:
            rows.append(fields)
    rows = rows[:max_examples]
    if not rows:
        raise ValueError(f"{name} is empty; at least one example is needed")
    for i, row in enumerate(rows):
        _check_row(i, row, max_length, vocab)
    return rows


def padded_batches(
    rows: Sequence[dict[str, Tensor]],
    order: Sequence[int],
    batch_size: int,
    fills: Mapping[str, int],
    device,
) -> Iterator[dict[str, Tensor]]:
    """Right-padded batches of ``rows`` taken in ``order``: one ``(batch, longest)`` tensor per key.

    Example:
        >>> rows = [{"input_ids": torch.tensor([1, 2])}, {"input_ids": torch.tensor([3])}]
        >>> next(padded_batches(rows, [0, 1], 2, {"input_ids": 0}, "cpu"))["input_ids"]
        tensor([[1, 2],
                [3, 0]])
    """
    order = list(order)
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start : start + batch_size]]
        length = max(row["input_ids"].numel() for row in chunk)
        batch = {}
        for key, fill in fills.items():
            batch[key] = torch.full((len(chunk), length), fill, dtype=torch.long)
            for j, row in enumerate(chunk):
                batch[key][j, : row[key].numel()] = row[key]
        yield {key: value.to(device) for key, value in batch.items()}
