"""Few-shot baselines of calibrated cp (issue 12): learned soup weights and a fresh multi-task LoRA.

Both train on the examples given to ``peft_cp_merge.calibrate`` and with its protocol, through its
private helpers (``_as_examples``, ``_batches``, ``_evaluate``, ``_calibration_state``): the same
``torch.Generator(seed)`` draws the same held-out part (``round(holdout * n)`` examples) and the same
batch order; eval mode, only the trained adapter active; the held-out loss is measured once per pass
over the training part, the parameters with the lowest held-out loss are kept (step 0 included), and
training stops after ``patience`` measurements without improvement.

- **Soups** (LoRA-Soups / CAT style, Prabhakar et al. 2024): PEFT's ``"cat"`` merge of the N adapters
  with weights ``1/N`` (rank ``sum r_i``; module ``m``'s delta ``sum_i (1/N) s_i B_i A_i``), then one
  gain ``g_{i,m}`` per adapter and module on adapter ``i``'s block of ``lora_A`` rows (a
  ``torch.nn.utils.parametrize`` scaling, tied per block, like ``calibrate``'s per-row gains), so the
  merged delta is ``sum_i w_{i,m} s_i B_i A_i`` with ``w = g / N``, initialised at the static mean
  (``g = 1``). Only ``g`` trains (Adam); as in ``calibrate``, the learning rate acts on a gain
  relative to the static merge.
- **Multi-task LoRA**: a fresh LoRA with the task adapters' config (``train.lora_config``) trained
  from scratch with their optimiser (``train.fit``: AdamW, linear warm-up and decay, gradient norm
  clipped at 1).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from train import TrainConfig, lora_config

from peft_cp_merge.calibration import (
    _as_examples,
    _batches,
    _calibration_state,
    _copy,
    _evaluate,
    _finite,
    _loss,
)

log = logging.getLogger("quality.fewshot")
SOUP = "soup"
MakeOptimizer = Callable[[list[nn.Parameter]], tuple[torch.optim.Optimizer, object | None]]


@dataclass(frozen=True)
class FitReport:
    """One few-shot training run (the fields of ``peft_cp_merge.CalibrationReport`` that apply)."""

    train_loss_before: float
    train_loss_after: float
    holdout_loss_before: float | None
    holdout_loss_after: float | None
    steps: int
    best_step: int
    early_stopped: bool
    n_train: int
    n_holdout: int
    seconds: float


def fit_few_shot(
    model,
    adapter_name: str,
    examples: list[dict],
    params: dict[str, nn.Parameter],
    make_optimizer: MakeOptimizer,
    *,
    steps: int,
    batch_size: int = 8,
    holdout: float = 0.25,
    patience: int = 3,
    seed: int = 0,
    clip: float | None = None,
) -> FitReport:
    """Train ``params`` of ``model`` on ``examples`` with ``calibrate``'s split and early stopping.

    Args:
        model: A ``PeftModel`` holding ``adapter_name`` (the only adapter active meanwhile).
        adapter_name: The adapter ``params`` belong to.
        examples: Dicts of 1-D ``input_ids``, ``attention_mask``, ``labels`` (``calibration_examples``).
        params: Name -> parameter, the only ones trained; left at the best held-out step's values.
        make_optimizer: ``params -> (optimizer, scheduler or None)``.
        steps: Planned optimizer steps.
        batch_size, holdout, patience, seed: As in ``peft_cp_merge.calibrate``.
        clip: Max gradient norm (``None``: no clipping).

    Returns:
        A :class:`FitReport`.
    """
    start = time.perf_counter()
    config = getattr(model, "config", None)
    rows = _as_examples(
        examples, getattr(config, "max_position_embeddings", None), getattr(config, "vocab_size", None)
    )
    device = next(model.parameters()).device
    pad_id = getattr(config, "pad_token_id", None) or 0
    generator = torch.Generator().manual_seed(seed)  # the same draws, in the same order, as calibrate
    order = torch.randperm(len(rows), generator=generator)
    n_holdout = 0 if len(rows) < 2 or holdout == 0 else min(max(1, round(holdout * len(rows))), len(rows) - 1)
    held, train = order[:n_holdout].sort().values, order[n_holdout:].sort().values
    train_eval = _batches(rows, train, batch_size, pad_id, device)
    holdout_eval = _batches(rows, held, batch_size, pad_id, device)
    per_pass = len(train_eval)
    with _calibration_state(model, adapter_name):
        for p in params.values():
            p.requires_grad_(True)
        train_before = _finite(_evaluate(model, train_eval), "loss on the training examples")
        holdout_before = _finite(_evaluate(model, holdout_eval), "held-out loss") if n_holdout else None
        optimizer, scheduler = make_optimizer(list(params.values()))
        best = (holdout_before, 0, _copy(params))
        bad_evaluations, early_stopped, step, batches = 0, False, 0, []
        while step < steps:
            if not batches:
                shuffled = train[torch.randperm(len(train), generator=generator)]
                batches = _batches(rows, shuffled, batch_size, pad_id, device)
            step += 1
            loss = _loss(model, batches.pop(0))
            batch_loss = _finite(float(loss.detach()), f"loss at step {step}")
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(list(params.values()), clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if n_holdout and (step % per_pass == 0 or step == steps):
                held_loss = _finite(_evaluate(model, holdout_eval), f"held-out loss at step {step}")
                log.info("step %d: batch loss %.4f, held-out loss %.4f", step, batch_loss, held_loss)
                if held_loss < best[0]:
                    best, bad_evaluations = (held_loss, step, _copy(params)), 0
                elif (bad_evaluations := bad_evaluations + 1) >= patience and step < steps:
                    early_stopped = True
                    break
        if n_holdout:
            with torch.no_grad():
                for key, p in params.items():
                    p.copy_(best[2][key])
        train_after = _evaluate(model, train_eval)
        holdout_after = _evaluate(model, holdout_eval) if n_holdout else None
    return FitReport(
        train_loss_before=train_before,
        train_loss_after=train_after,
        holdout_loss_before=holdout_before,
        holdout_loss_after=holdout_after,
        steps=step,
        best_step=best[1] if n_holdout else step,
        early_stopped=early_stopped,
        n_train=len(train),
        n_holdout=n_holdout,
        seconds=time.perf_counter() - start,
    )


def adam(lr: float) -> MakeOptimizer:
    """``calibrate``'s optimiser: plain Adam, constant learning rate."""
    return lambda params: (torch.optim.Adam(params, lr=lr), None)


def adamw_warmup(lr: float, steps: int, warmup: int) -> MakeOptimizer:
    """``train.fit``'s optimiser: AdamW (no weight decay), linear warm-up then linear decay to 0."""

    def make(params):
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (steps - step) / max(1, steps - warmup))

        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    return make


class BlockScale(nn.Module):
    """Parametrisation ``A (R, d_in) -> diag(g[block]) A``: one gain per adapter's block of rows.

    ``block`` (R,) holds the adapter index of each row (the order of PEFT's ``"cat"``).
    """

    def __init__(self, gains: nn.Parameter, block: Tensor) -> None:
        super().__init__()
        self.gains = gains
        self.register_buffer("block", block, persistent=False)

    def forward(self, weight: Tensor) -> Tensor:
        wide = torch.promote_types(weight.dtype, self.gains.dtype)
        scale = self.gains.to(wide)[self.block].reshape(-1, *([1] * (weight.ndim - 1)))
        return (weight.to(wide) * scale).to(weight.dtype)


def soup_model(base, adapter_dirs: dict[str, Path]):
    """A PeftModel (on a copy of ``base``) with the adapters and their ``"cat"`` merge ``"soup"`` at 1/N."""
    import merges

    peft_model = merges.peft_model_with(base, adapter_dirs)
    n = len(adapter_dirs)
    peft_model.add_weighted_adapter(list(adapter_dirs), [1 / n] * n, SOUP, combination_type="cat")
    return peft_model


def add_soup_gains(peft_model, names: list[str]) -> dict[str, nn.Parameter]:
    """A :class:`BlockScale` (gains 1, one per adapter of ``names``) on every ``lora_A`` of the soup."""
    from peft.tuners.lora import LoraLayer

    ranks = [peft_model.peft_config[name].r for name in names]
    gains = {}
    for key, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer) or SOUP not in layer.lora_A:
            continue
        holder = layer.lora_A[SOUP]
        if holder.weight.shape[0] != sum(ranks) or any(name not in layer.lora_A for name in names):
            raise ValueError(f"{key}: soup rank {holder.weight.shape[0]} is not the sum of {ranks}")
        device = holder.weight.device
        block = torch.repeat_interleave(
            torch.arange(len(ranks), device=device), torch.tensor(ranks, device=device)
        )
        gains[key.removeprefix("base_model.model.")] = g = nn.Parameter(torch.ones(len(ranks), device=device))
        parametrize.register_parametrization(holder, "weight", BlockScale(g, block))
    return gains


@torch.no_grad()
def bake_soup_gains(peft_model) -> None:
    """Multiply the gains into ``lora_A``'s rows and remove the parametrisations (a plain LoRA again)."""
    for module in peft_model.modules():
        if parametrize.is_parametrized(module, "weight") and isinstance(
            module.parametrizations.weight[0], BlockScale
        ):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def soup_weight_stats(gains: dict[str, nn.Parameter], names: list[str]) -> dict:
    """Statistics of the learned weights ``w = g / N`` (module x adapter), and every module's weights."""
    modules = list(gains)
    w = torch.stack([gains[m].detach().double().cpu() for m in modules]) / len(names)  # (modules, N)
    by_kind: dict[str, list[int]] = {}
    for i, module in enumerate(modules):
        by_kind.setdefault(module.rsplit(".", 1)[-1], []).append(i)
    return {
        "static_weight": 1 / len(names),
        "min": float(w.min()),
        "max": float(w.max()),
        "mean": float(w.mean()),
        "std": float(w.std()),
        "negative_share": float((w < 0).double().mean()),
        "mean_by_adapter": {name: float(w[:, j].mean()) for j, name in enumerate(names)},
        "mean_by_projection_and_adapter": {
            kind: {name: float(w[rows, j].mean()) for j, name in enumerate(names)}
            for kind, rows in sorted(by_kind.items())
        },
        "module_weights": {m: [float(x) for x in w[i]] for i, m in enumerate(modules)},
    }


def multitask_model(base, *, rank: int, seed: int):
    """A fresh LoRA on a copy of ``base``: the task adapters' config at ``rank``, ``lora_alpha = 2 rank``."""
    from peft import get_peft_model

    defaults = TrainConfig()
    alpha = rank * defaults.lora_alpha // defaults.r  # the adapters' scaling alpha / r = 2
    torch.manual_seed(seed)  # the LoRA A initialisation
    return get_peft_model(copy.deepcopy(base), lora_config(TrainConfig(r=rank, lora_alpha=alpha)))


def lora_params(peft_model, adapter_name: str = "default") -> dict[str, nn.Parameter]:
    """The trainable LoRA factors of ``adapter_name``."""
    return {n: p for n, p in peft_model.named_parameters() if f".{adapter_name}." in n and "lora_" in n}
