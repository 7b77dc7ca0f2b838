"""Calibrated ``"cp"`` merges: learn one gain per CP component from a few examples.

A ``"cp"`` merged adapter of rank ``R`` holds, per module, ``R`` components
``lora_B[:, r] lora_A[r, :]`` whose strengths the static merge guesses (``docs/design.md`` §4).
:func:`calibrate` learns a gain ``g_r`` per component and module from a handful of examples, with the
base model and the CP factors frozen, and bakes it into ``lora_A``: the result is an ordinary LoRA
adapter that saves and reloads with plain PEFT.

How: each LoRA layer of the adapter gets a parametrisation ``lora_A -> diag(g) lora_A``
(``torch.nn.utils.parametrize``, ``g`` initialised to 1, so the first forward pass is the static
merge). Only the gains train (Adam; every other parameter has ``requires_grad=False`` meanwhile), on
the model's own loss, with an optional pull ``l2 * sum (g - 1)^2`` towards the static merge. Part of
the examples is held out; the gains with the lowest held-out loss are kept (the static merge, step 0,
included) and training stops after ``patience`` evaluations without improvement. Then the gains are
multiplied into ``lora_A``'s rows and the parametrisation removed: the parameters are the same
``nn.Parameter`` objects, with the same ``state_dict`` keys.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import Tensor, nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from .input_checks import check_device, check_factor_values, check_lora_config
from .peft_binding import _lora_model
from .token_examples import IGNORE_INDEX, padded_batches, token_rows

__all__ = ["CalibrationReport", "calibrate"]

logger = logging.getLogger(__name__)

_KEYS = ("input_ids", "attention_mask", "labels")


@dataclass(frozen=True)
class CalibrationReport:
    """What :func:`calibrate` did.

    Attributes:
        adapter_name: The calibrated adapter.
        train_loss_before: Mean token loss on the training examples with the static merge.
        train_loss_after: The same with the kept gains.
        holdout_loss_before: Mean token loss on the held-out examples with the static merge
            (``None`` without held-out examples).
        holdout_loss_after: The same with the kept gains (never above ``holdout_loss_before``).
        steps: Optimizer steps taken.
        best_step: The step whose gains were kept (0: the static merge, left unchanged).
        early_stopped: Whether training stopped before the planned steps (held-out loss stalled).
        n_train: Training examples.
        n_holdout: Held-out examples.
        gain_min: Smallest kept gain.
        gain_max: Largest kept gain.
        gain_mean: Mean kept gain.
        module_gain_mean: Module name -> mean kept gain of its components.
        seconds: Wall time.

    All-zero components (the padding of modules fitted below rank ``R``) have no effect and are left
    out of the gain statistics.
    """

    adapter_name: str
    train_loss_before: float
    train_loss_after: float
    holdout_loss_before: float | None
    holdout_loss_after: float | None
    steps: int
    best_step: int
    early_stopped: bool
    n_train: int
    n_holdout: int
    gain_min: float
    gain_max: float
    gain_mean: float
    module_gain_mean: dict[str, float]
    seconds: float


class RowScale(nn.Module):
    """Parametrisation ``A (R, ...) -> diag(g) A``, computed in the wider of ``A``'s and ``g``'s dtypes."""

    def __init__(self, gains: nn.Parameter) -> None:
        super().__init__()
        self.gains = gains

    def forward(self, weight: Tensor) -> Tensor:
        wide = torch.promote_types(weight.dtype, self.gains.dtype)
        scale = self.gains.to(wide).reshape(-1, *([1] * (weight.ndim - 1)))
        return (weight.to(wide) * scale).to(weight.dtype)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_options(lr, steps, epochs, batch_size, l2, holdout, seed, patience) -> None:
    for name, value, ok, accepted in (
        ("lr", lr, lambda v: v > 0, "> 0"),
        ("l2", l2, lambda v: v >= 0, ">= 0"),
        ("holdout", holdout, lambda v: 0 <= v < 1, "in [0, 1)"),
    ):
        if not (_is_finite_number(value) and ok(value)):
            raise ValueError(f"{name} must be a finite number {accepted}, got {value!r}")
    if steps is not None and not (_is_int(steps) and steps >= 1):
        raise ValueError(f"steps must be None or an integer >= 1, got {steps!r}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("patience", patience)):
        if not (_is_int(value) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def _cp_layers(lora_model, adapter_name: str) -> dict[str, tuple[nn.Module, str]]:
    """Module name -> (holder, attribute) of ``lora_A`` of a ``"cp"``-made adapter; refuses others."""
    known = sorted(lora_model.peft_config)
    if not isinstance(adapter_name, str) or adapter_name not in lora_model.peft_config:
        raise ValueError(f"Unknown adapter {adapter_name!r}; this model has {known}")
    config = lora_model.peft_config[adapter_name]
    source = f"Adapter {adapter_name!r}"
    check_lora_config(config, source=source)
    # What a "cp" merge writes (peft_binding._new_config): r == lora_alpha, scaling 1, no rsLoRA,
    # DoRA or per-module patterns. Nothing else marks such an adapter.
    made_by_cp = config.r == config.lora_alpha and not (
        config.use_rslora or config.use_dora or config.rank_pattern or config.alpha_pattern
    )
    if not made_by_cp:
        raise ValueError(
            f"{source} was not made by combination_type='cp' (r == lora_alpha, no rsLoRA/DoRA, no "
            f"rank/alpha patterns): r={config.r}, lora_alpha={config.lora_alpha}, "
            f"use_rslora={config.use_rslora}, use_dora={config.use_dora}, "
            f"rank_pattern={config.rank_pattern}, alpha_pattern={config.alpha_pattern}"
        )
    layers = {}
    for key, layer in lora_model.model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        if layer.merged or layer.disable_adapters:
            raise ValueError(
                f"Module {key!r} has adapters merged into the base weights or disabled; call "
                "unmerge_adapter() / leave disable_adapter() before calibrating"
            )
        if adapter_name in layer.lora_embedding_A:
            holder, attr = layer.lora_embedding_A, adapter_name
            a, b = layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]
        elif adapter_name in layer.lora_A:
            holder, attr = layer.lora_A[adapter_name], "weight"
            a, b = getattr(holder, "weight", None), getattr(layer.lora_B[adapter_name], "weight", None)
            if not isinstance(a, nn.Parameter) or not isinstance(b, nn.Parameter) or a.ndim < 2:
                raise ValueError(f"{source}, module {key!r}: LoRA layer {type(layer).__name__} not supported")
        else:
            continue
        if a.shape[0] != config.r or float(layer.scaling[adapter_name]) != 1.0:
            raise ValueError(
                f"{source}, module {key!r}: rank {a.shape[0]} and scaling {layer.scaling[adapter_name]} "
                f"instead of the config's r={config.r} and scaling 1 of a 'cp'-made adapter"
            )
        check_factor_values(a.flatten(1), b.flatten(1), where=f"{source}, module {key!r}")
        layers[key] = (holder, attr)
    if not layers:
        raise ValueError(f"{source} has no LoRA layer in this model")
    return layers


def _as_examples(examples, max_length: int | None, vocab: int | None) -> list[dict[str, Tensor]]:
    """One dict of 1-D int64 CPU tensors per example, checked (``token_rows``), each with a label."""
    rows = token_rows(
        examples, name="examples", keys=("input_ids", "labels"), max_length=max_length, vocab=vocab
    )
    empty = [i for i, row in enumerate(rows) if bool((row["labels"] == IGNORE_INDEX).all())]
    if len(empty) == len(rows):
        raise ValueError(f"Every label of every example is {IGNORE_INDEX}: there is nothing to calibrate on")
    if empty:
        raise ValueError(f"Examples {empty[:10]} have every label {IGNORE_INDEX}; remove them")
    return rows


def _batches(rows, order: Tensor, batch_size: int, pad_id: int, device) -> list[dict[str, Tensor]]:
    """Right-padded batches of ``rows[order]`` (pad: ``pad_id``, mask 0, label ``IGNORE_INDEX``)."""
    fills = dict(zip(_KEYS, (pad_id, 0, IGNORE_INDEX), strict=True))
    return list(padded_batches(rows, order.tolist(), batch_size, fills, device))


def _loss(model, batch) -> Tensor:
    loss = model(**batch).loss
    if loss is None:
        raise ValueError("The model returned no loss for labels=...; calibration needs a model with a loss")
    return loss


@torch.no_grad()
def _evaluate(model, batches) -> float:
    """Mean of the batches' losses, weighted by their label tokens."""
    total = count = 0.0
    for batch in batches:
        n = float((batch["labels"] != IGNORE_INDEX).sum())
        total += float(_loss(model, batch)) * n
        count += n
    return total / count


def _copy(gains: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: g.detach().clone() for key, g in gains.items()}


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"The {what} is {value}; check the examples (and lr), nothing was changed")
    return value


@contextlib.contextmanager
def _calibration_state(model, adapter_name: str) -> Iterator[None]:
    """Only ``adapter_name`` active, eval mode, every parameter frozen; all restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    kinds = BaseTunerLayer | AuxiliaryTrainingWrapper
    active = [(m, m._active_adapter) for m in model.modules() if isinstance(m, kinds)]
    try:
        for m, _ in active:  # a wrapper without this adapter passes through
            m._active_adapter = [adapter_name]
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, value in active:
            m._active_adapter = value
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _row_gains(targets: dict[str, tuple[nn.Module, str]]) -> Iterator[dict[str, nn.Parameter]]:
    """Gains ``g`` (R,) = 1 per module as :class:`RowScale` parametrisations of ``lora_A``.

    On a normal exit ``lora_A <- diag(g) lora_A`` and the parametrisations are removed (the same
    ``nn.Parameter`` objects stay); on an exception they are removed and ``lora_A`` restored exactly.
    """
    originals = {key: getattr(holder, attr).detach().clone() for key, (holder, attr) in targets.items()}
    gains = {}
    try:
        for key, (holder, attr) in targets.items():
            gains[key] = nn.Parameter(torch.ones(originals[key].shape[0], device=originals[key].device))
            parametrize.register_parametrization(holder, attr, RowScale(gains[key]))
        yield gains
        for key, (holder, attr) in targets.items():
            parametrize.remove_parametrizations(holder, attr, leave_parametrized=True)
            if type(getattr(holder, attr)) is not nn.Parameter or parametrize.is_parametrized(holder):
                raise RuntimeError(f"Module {key!r}: lora_A is not a plain nn.Parameter after baking")
    except BaseException:
        for key, (holder, attr) in targets.items():
            if parametrize.is_parametrized(holder, attr):
                parametrize.remove_parametrizations(holder, attr, leave_parametrized=False)
            with torch.no_grad():
                getattr(holder, attr).copy_(originals[key])
        raise


def calibrate(
    model,
    adapter_name: str,
    examples,
    *,
    steps: int | None = None,
    epochs: int = 1,
    lr: float = 5e-2,
    batch_size: int = 8,
    l2: float = 0.0,
    holdout: float = 0.25,
    patience: int = 3,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> CalibrationReport:
    """Learn one gain per component of a ``"cp"`` merged adapter and bake it into ``lora_A``.

    The model runs in eval mode throughout (LoRA dropout off), with only ``adapter_name`` active, so
    a seed gives bit-identical gains. Afterwards modes, ``requires_grad`` flags and active adapters are
    as before; only ``lora_A`` of ``adapter_name`` has changed (rows multiplied by their gains).

    Args:
        model: A ``PeftModel`` (or ``LoraModel``) holding ``adapter_name``, whose forward takes
            ``input_ids``, ``attention_mask`` and ``labels`` and returns ``.loss`` (a causal LM).
        adapter_name: An adapter made by ``combination_type="cp"``: recognised as plain LoRA with
            ``r == lora_alpha``, no rsLoRA/DoRA, no rank/alpha patterns, every layer of rank ``r`` with
            scaling 1 (nothing else marks it).
        examples: Dicts with ``input_ids``, ``labels`` (``-100`` ignored) and optionally
            ``attention_mask`` (lists or 1-D tensors, one length per example; padded on the right
            here), e.g. a ``datasets.Dataset``; or a ``DataLoader`` of such dicts of 2-D tensors, whose
            batches are split into rows and re-batched.
        steps: Optimizer steps (default: ``epochs`` passes over the training examples).
        epochs: Passes over the training examples when ``steps`` is ``None``.
        lr: Adam learning rate of the gains.
        batch_size: Examples per step.
        l2: Weight of ``sum (g - 1)^2`` over all gains, a pull towards the static merge.
        holdout: Fraction of the examples held out for early stopping (at least one when there are
            two or more; 0 keeps the last gains).
        patience: Held-out evaluations (one per pass over the training examples) without improvement
            before training stops.
        seed: Seed of the held-out split and the batch order.
        device: Where the examples go (default: where the model's first parameter is).
        progress: Progress bar (``None``: on a terminal only).

    Returns:
        A :class:`CalibrationReport`.

    Raises:
        ValueError: For an unknown or non-``"cp"`` adapter, merged or disabled adapters, bad options,
            no examples, malformed examples (shapes, ids out of the vocabulary, longer than
            ``config.max_position_embeddings``, an example whose every label is ``-100``) or a
            non-finite loss. The model is then exactly as before, as it is after any other error.

    Example:
        >>> from peft_cp_merge.calibration import calibrate
        >>> model.add_weighted_adapter(
        ...     ["math", "code"], [1.0, 1.0], "merged", combination_type="cp"
        ... )  # doctest: +SKIP
        >>> report = calibrate(model, "merged", few_examples, steps=50)  # doctest: +SKIP
        >>> report.holdout_loss_after <= report.holdout_loss_before  # doctest: +SKIP
        True
        >>> model.save_pretrained("out", selected_adapters=["merged"])  # doctest: +SKIP
    """
    start = time.perf_counter()
    lora_model = _lora_model(model)
    _check_options(lr, steps, epochs, batch_size, l2, holdout, seed, patience)
    device = check_device(device)
    targets = _cp_layers(lora_model, adapter_name)
    config = getattr(lora_model.model, "config", None)
    rows = _as_examples(
        examples, getattr(config, "max_position_embeddings", None), getattr(config, "vocab_size", None)
    )
    if device is None:
        device = next(model.parameters()).device
    pad_id = getattr(config, "pad_token_id", None) or 0

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=generator)
    n_holdout = 0 if len(rows) < 2 or holdout == 0 else min(max(1, round(holdout * len(rows))), len(rows) - 1)
    held, train = order[:n_holdout].sort().values, order[n_holdout:].sort().values
    train_eval = _batches(rows, train, batch_size, pad_id, device)
    holdout_eval = _batches(rows, held, batch_size, pad_id, device)
    per_pass = len(train_eval)
    total_steps = steps if steps is not None else epochs * per_pass

    live = {key: getattr(h, a).detach().flatten(1).ne(0).any(dim=1) for key, (h, a) in targets.items()}
    bar = tqdm(total=total_steps, desc="calibrating", disable=None if progress is None else not progress)
    with bar, _calibration_state(model, adapter_name), _row_gains(targets) as gains:
        train_before = _finite(_evaluate(model, train_eval), "loss on the training examples")
        holdout_before = _finite(_evaluate(model, holdout_eval), "held-out loss") if n_holdout else None
        logger.info("calibrating %r: %d modules, %d steps", adapter_name, len(gains), total_steps)
        optimizer = torch.optim.Adam(list(gains.values()), lr=lr)
        best = (holdout_before, 0, _copy(gains))
        bad_evaluations, early_stopped, step, batches = 0, False, 0, []
        while step < total_steps:
            if not batches:
                shuffled = train[torch.randperm(len(train), generator=generator)]
                batches = _batches(rows, shuffled, batch_size, pad_id, device)
            step += 1
            loss = _loss(model, batches.pop(0))
            _finite(float(loss.detach()), f"loss at step {step}")
            penalty = sum(((g - 1) ** 2).sum() for g in gains.values()) if l2 else 0.0
            (loss + l2 * penalty).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            if n_holdout and (step % per_pass == 0 or step == total_steps):
                held_loss = _finite(_evaluate(model, holdout_eval), f"held-out loss at step {step}")
                logger.debug("step %d: held-out loss %.4f", step, held_loss)
                if held_loss < best[0]:
                    best, bad_evaluations = (held_loss, step, _copy(gains)), 0
                elif (bad_evaluations := bad_evaluations + 1) >= patience and step < total_steps:
                    early_stopped = True
                    break
        if n_holdout:  # keep the gains with the lowest held-out loss
            with torch.no_grad():
                for key, g in gains.items():
                    g.copy_(best[2][key])
        train_after = _evaluate(model, train_eval)
        holdout_after = _evaluate(model, holdout_eval) if n_holdout else None
        kept = {key: g.detach()[live[key].to(g.device)].double().cpu() for key, g in gains.items()}

    values = torch.cat(list(kept.values()) or [torch.ones(1, dtype=torch.float64)])
    report = CalibrationReport(
        adapter_name=adapter_name,
        train_loss_before=train_before,
        train_loss_after=train_after,
        holdout_loss_before=holdout_before,
        holdout_loss_after=holdout_after,
        steps=step,
        best_step=best[1] if n_holdout else step,
        early_stopped=early_stopped,
        n_train=len(train),
        n_holdout=n_holdout,
        gain_min=float(values.min()),
        gain_max=float(values.max()),
        gain_mean=float(values.mean()),
        module_gain_mean={k: float(v.mean()) for k, v in kept.items() if v.numel()},
        seconds=time.perf_counter() - start,
    )
    logger.info("calibrated %r: %s", adapter_name, report)
    return report
