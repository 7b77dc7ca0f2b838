"""Evaluation harness: batched greedy generation + exact match, on the base model with dense deltas.

Every model evaluated (an individual adapter, the multi-task adapter, a merge) is represented by a
dict ``{module_name: delta (d_out, d_in)}`` of dense weight deltas that is added to the weights of
the fp32 base model for the evaluation and subtracted afterwards. This evaluates every method with
the same code and at the base model's speed (no LoRA forward overhead), and treats a merge exactly
as it would be served after ``merge_and_unload``.

Generation: SmolLM2's chat format without a system turn (``tasks.chat``), left padding, KV cache,
greedy, stop at ``<|im_end|>`` or after (longest reference of the batch in tokens + 3) new tokens
(an output longer than that cannot match). Score: ``tasks.normalise(pred) == tasks.normalise(ref)``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from tasks import Example, chat, normalise

Deltas = dict[str, torch.Tensor]


@contextlib.contextmanager
@torch.no_grad()
def applied(model: torch.nn.Module, deltas: Deltas | None) -> Iterator[torch.nn.Module]:
    """Add ``deltas`` to the model's Linear weights for the duration of the block (exactly restored)."""
    if not deltas:
        yield model
        return
    modules = dict(model.named_modules())
    saved = {}
    try:
        for name, delta in deltas.items():
            weight = modules[name].weight
            if weight.shape != delta.shape:
                raise ValueError(f"{name}: delta {tuple(delta.shape)} vs weight {tuple(weight.shape)}")
            saved[name] = weight.detach().clone()
            weight.add_(delta.to(weight.dtype))
        yield model
    finally:
        for name, original in saved.items():
            modules[name].weight.copy_(original)


def _encode(tok, examples: list[Example]) -> list[list[int]]:
    return [tok(chat(e.prompt), add_special_tokens=False).input_ids for e in examples]


@torch.no_grad()
def generate(model, tok, examples: list[Example], *, batch_size: int = 48) -> list[str]:
    """Greedy completions of ``examples`` (order preserved); batches are formed by prompt length."""
    ids = _encode(tok, examples)
    ref_len = [len(tok(e.answer, add_special_tokens=False).input_ids) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: len(ids[i]))
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    outputs: list[str] = [""] * len(examples)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
            mask[row, width - len(ids[i]) :] = 1
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max(ref_len[i] for i in chunk) + 3,
            do_sample=False,
            eos_token_id=end_id,
            pad_token_id=tok.pad_token_id,
        )
        for row, i in enumerate(chunk):
            outputs[i] = tok.decode(out[row, width:], skip_special_tokens=True)
    return outputs


def score(examples: list[Example], predictions: list[str]) -> list[bool]:
    return [normalise(p) == normalise(e.answer) for e, p in zip(examples, predictions, strict=True)]


def evaluate(
    model, tok, data: dict[str, list[Example]], deltas: Deltas | None = None, *, batch_size: int = 48
) -> dict:
    """Accuracy per task of base + ``deltas`` on ``data = {task: examples}``.

    Returns:
        ``{"accuracy": {task: float}, "correct": {task: [0/1 per item]}, "predictions": {task: [...]},
        "seconds": float}``; item order is the order of ``data[task]`` (for paired bootstrap).
    """
    start = time.perf_counter()
    flat = [e for task in data for e in data[task]]
    with applied(model, deltas):
        preds = generate(model, tok, flat, batch_size=batch_size)
    correct = score(flat, preds)
    result: dict = {"accuracy": {}, "correct": {}, "predictions": {}}
    pos = 0
    for task, items in data.items():
        ok = correct[pos : pos + len(items)]
        result["correct"][task] = [int(c) for c in ok]
        result["accuracy"][task] = sum(ok) / len(ok)
        result["predictions"][task] = preds[pos : pos + len(items)]
        pos += len(items)
    result["seconds"] = time.perf_counter() - start
    return result
