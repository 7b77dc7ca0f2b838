"""Input statistics of LoRA modules: streamed second moments ``sum h h^T`` of what reaches them.

Used by :mod:`peft_cp_merge.osrm`. Forward pre-hooks on the LoRA modules see each module's input
``h`` (batch, seq, d_in); the padding tokens are left out with the batch's ``attention_mask``. Each
batch's ``h^T h`` is a float32 product added to a float64 sum (float32 above ``FLOAT64_MAX_DIM``,
where ``d_in^2 * 8`` bytes per statistic would be too much); sums are shared between modules that
read the same input tensor (q/k/v, gate/up): a module reading the very tensor object the module
hooked just before it read joins its group. All adapters are disabled meanwhile, so the statistics
are the base model's (``docs/design.md`` §11). A forward pass stops as soon as every hooked module
has seen its input (the rest of the model is not needed), and :func:`module_passes` splits the
modules into passes whose statistics fit a memory budget.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn
from tqdm.auto import tqdm

from .token_examples import padded_batches, token_rows

__all__ = [
    "FLOAT64_MAX_DIM",
    "InputMoments",
    "collect_moments",
    "example_rows",
    "module_passes",
    "moment_bytes",
]

FLOAT64_MAX_DIM = 8192  # inputs wider than this are accumulated in float32 (d_in^2 * 8 bytes otherwise)


def moment_bytes(d_in: int) -> int:
    """Bytes of one module's statistic: its sum (float64, float32 above ``FLOAT64_MAX_DIM``)."""
    return d_in * d_in * (8 if d_in <= FLOAT64_MAX_DIM else 4)


def module_passes(d_ins: Mapping[str, int], budget_bytes: float) -> list[list[str]]:
    """Modules (in model order) split into consecutive passes whose statistics fit ``budget_bytes``.

    Counted without sharing (an upper bound), plus one float32 batch product of the widest module.
    A module too large for the budget alone gets a pass of its own.

    Example:
        >>> module_passes({"a": 10, "b": 10, "c": 20}, budget_bytes=2400)
        [['a', 'b'], ['c']]
    """
    passes: list[list[str]] = []
    used = 0.0
    for name, d_in in d_ins.items():
        need = moment_bytes(d_in)
        if passes and used + need + 4 * d_in * d_in <= budget_bytes:
            passes[-1].append(name)
            used += need
        else:
            passes.append([name])
            used = need
    return passes


@dataclass(frozen=True)
class InputMoments:
    """Uncentred second moments of the inputs of an adapter's LoRA modules.

    Attributes:
        groups: Module names, one tuple per input tensor (modules that read the same tensor share it).
        sums: Per group, ``sum_t h_t h_t^T`` (d_in, d_in) over the tokens seen.
        tokens: Per group, the number of tokens summed.
        examples: Examples the sums are over.

    Sums with counts subtract exactly: the moments of "every cluster but one" are
    ``total.minus(own)`` (used by the library builder).
    """

    groups: tuple[tuple[str, ...], ...]
    sums: tuple[Tensor, ...]
    tokens: tuple[int, ...]
    examples: int

    def plus(self, other: InputMoments) -> InputMoments:
        """The moments of the examples of ``self`` and of ``other`` together (disjoint sets of examples).

        Raises:
            ValueError: For other groups.
        """
        if other.groups != self.groups:
            raise ValueError(f"Cannot add moments of groups {other.groups} to {self.groups}")
        sums = tuple(a + b for a, b in zip(self.sums, other.sums, strict=True))
        tokens = tuple(a + b for a, b in zip(self.tokens, other.tokens, strict=True))
        return InputMoments(self.groups, sums, tokens, self.examples + other.examples)

    def minus(self, other: InputMoments) -> InputMoments:
        """The moments of the examples in ``self`` but not in ``other`` (``other`` a subset of them).

        Raises:
            ValueError: For other groups, or when nothing would be left.
        """
        if other.groups != self.groups:
            raise ValueError(f"Cannot subtract moments of groups {other.groups} from {self.groups}")
        tokens = tuple(a - b for a, b in zip(self.tokens, other.tokens, strict=True))
        if min(tokens) < 1 or self.examples - other.examples < 1:
            raise ValueError(f"Nothing is left after the subtraction: tokens {tokens}")
        sums = tuple(a - b for a, b in zip(self.sums, other.sums, strict=True))
        return InputMoments(self.groups, sums, tokens, self.examples - other.examples)


def example_rows(examples, max_examples: int, vocab, max_length) -> list[tuple[Tensor, Tensor]]:
    """``(input_ids, attention_mask)`` 1-D int64 CPU rows of the first ``max_examples`` examples."""
    rows = token_rows(
        examples, name="other_examples", max_examples=max_examples, max_length=max_length, vocab=vocab
    )
    if not any(bool(row["attention_mask"].any()) for row in rows):
        raise ValueError("Every attention_mask of other_examples is 0: there is no token to learn from")
    return [(row["input_ids"], row["attention_mask"]) for row in rows]


def _batches(rows, batch_size: int, device) -> Iterator[tuple[Tensor, Tensor]]:
    """Right-padded ``(input_ids, attention_mask)`` batches, rows sorted by length (less padding)."""
    order = sorted(range(len(rows)), key=lambda i: rows[i][0].numel())
    as_dicts = [{"input_ids": ids, "attention_mask": mask} for ids, mask in rows]
    for batch in padded_batches(as_dicts, order, batch_size, {"input_ids": 0, "attention_mask": 0}, device):
        yield batch["input_ids"], batch["attention_mask"]


@contextlib.contextmanager
def _base_features(model) -> Iterator[None]:
    """Eval mode and every adapter disabled (the base model's features); both restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    tuners = [(m, m._disable_adapters) for m in model.modules() if isinstance(m, BaseTunerLayer)]
    try:
        model.eval()
        for m, _ in tuners:
            m._disable_adapters = True
        yield
    finally:
        for m, flag in tuners:
            m._disable_adapters = flag
        for m, mode in modes:
            m.training = mode


class _Done(Exception):
    """Raised by the last hook of a forward pass to stop it."""


class _MomentHooks:
    """Forward pre-hooks accumulating ``sum h h^T`` per group of modules that read one input tensor.

    A module joins the group of the module hooked just before it when it receives the very same tensor
    object (q/k/v, gate/up); only the group's first module accumulates, the others check the identity.
    """

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers, self.mask, self.last = layers, None, None
        self.seen: set[str] = set()  # modules hooked in the current forward pass
        self.group_of: dict[str, int] = {}
        self.groups: list[list[str]] = []
        self.sums: list[Tensor | None] = []
        self.tokens: list[int] = []

    def hook(self, name: str):
        def pre_hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if name not in self.group_of:
                if self.last is not None and x is self.last[0]:
                    self.group_of[name] = self.last[1]
                    self.groups[self.last[1]].append(name)
                else:
                    self.group_of[name] = len(self.groups)
                    self.groups.append([name])
                    self.sums.append(None)
                    self.tokens.append(0)
                    self._add(self.group_of[name], x)
            elif self.groups[self.group_of[name]][0] == name:
                self._add(self.group_of[name], x)
            elif self.last is None or x is not self.last[0]:
                raise RuntimeError(f"Module {name!r} no longer reads the input of its group; cannot share")
            self.last = (x, self.group_of[name])
            self.seen.add(name)
            if len(self.seen) == len(self.layers):
                raise _Done  # every module has its input: the rest of the forward is not needed

        return pre_hook

    def _add(self, group: int, x: Tensor) -> None:
        mask = self.mask
        if x.ndim == 3 and mask is not None and x.shape[:2] == mask.shape:
            h = x[mask.bool()]
        else:  # a layout without (batch, seq): every row counts
            h = x.reshape(-1, x.shape[-1])
        dtype = torch.float64 if h.shape[-1] <= FLOAT64_MAX_DIM else torch.float32
        h = h.to(torch.float32)
        if self.sums[group] is None:
            self.sums[group] = torch.zeros(h.shape[-1], h.shape[-1], dtype=dtype, device=h.device)
        self.sums[group].add_(h.T @ h)  # a float32 product per batch: half the time of float64
        self.tokens[group] += h.shape[0]

    @contextlib.contextmanager
    def registered(self) -> Iterator[_MomentHooks]:
        handles = [
            m.register_forward_pre_hook(self.hook(n), with_kwargs=True) for n, m in self.layers.items()
        ]
        try:
            yield self
        finally:
            self.last = None
            for handle in handles:
                handle.remove()


def collect_moments(
    model,
    layers: dict[str, nn.Module],
    rows,
    *,
    batch_size: int,
    device,
    progress: bool | None,
    desc: str = "OSRM statistics",
) -> InputMoments:
    """The base model's input moments at ``layers`` over ``rows`` (one pass; see the module notes)."""
    hooks = _MomentHooks(layers)
    bar = tqdm(total=len(rows), desc=desc, disable=None if progress is None else not progress)
    with bar, _base_features(model), hooks.registered():
        for ids, mask in _batches(rows, batch_size, device):
            hooks.mask, hooks.last = mask, None
            hooks.seen.clear()
            try:
                model(input_ids=ids, attention_mask=mask)
            except _Done:
                pass
            except (IndexError, RuntimeError) as error:
                raise ValueError(f"The model's forward pass failed on the examples: {error}") from error
            bar.update(ids.shape[0])
    unreached = [n for n in layers if n not in hooks.group_of or hooks.tokens[hooks.group_of[n]] == 0]
    if unreached:
        raise ValueError(
            f"The examples never reach {len(unreached)} module(s) of the adapter, e.g. {unreached[:5]}: "
            "OSRM needs their inputs"
        )
    for group, total in zip(hooks.groups, hooks.sums, strict=True):
        if not bool(torch.isfinite(total).all()):
            raise ValueError(f"Non-finite activations reach modules {group}; check the model and examples")
    groups = tuple(tuple(g) for g in hooks.groups)
    return InputMoments(groups, tuple(hooks.sums), tuple(hooks.tokens), len(rows))
