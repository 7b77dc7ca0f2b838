"""Checks of merge inputs shared by every entry point (PEFT binding, folder merge, ``analyze``).

One answer per question, so the binding and the command line refuse the same things with the same
words:

- :func:`check_lora_config`: can adapters with this config be merged at all? Only plain LoRA whose
  forward is ``x -> s B A x`` on an unmodified base model. Everything else is refused, in memory and
  from folders alike: DoRA, LoRA biases, trained base biases, ``modules_to_save`` and trainable
  tokens (full weights, not low-rank deltas: a merged adapter could not carry them), layer
  replication, parameter targets, every LoRA variant PEFT marks as such, and initialisations that
  change the base weights (PiSSA, OLoRA, CorDA, LoftQ, ...).
- :func:`check_merge_weights`: finite numbers, one per adapter, not all zero.
- :func:`check_factor_values`: no NaN or Inf in ``lora_A`` / ``lora_B``, and no values so large that
  the merge's products (Gram matrices in float32 or the adapters' precision, whichever is wider)
  overflow. Such an adapter is broken (a diverged training run, a corrupt file); merging it would
  write NaN or fail deep inside a factorisation without naming it.
- :func:`check_rank_bound`: a merged rank above the largest total input rank ``sum r_i`` of any module
  only adds all-zero components (a bigger file, no other change), so it is refused.
- :func:`check_device`: a device string torch understands and that exists here.
- :func:`is_fraction`: a real number from 0 to 1 (method options such as exponents and shares).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
from peft import LoraConfig
from torch import Tensor

__all__ = [
    "check_device",
    "check_factor_values",
    "check_lora_config",
    "check_merge_weights",
    "check_rank_bound",
    "is_fraction",
]

# Config fields that change what the adapter computes beyond ``s * B @ A``: refused when set.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA adds a magnitude vector that a merged LoRA cannot carry",
    "lora_bias": "a trained lora_B bias is not part of the low-rank delta B @ A",
    "target_parameters": "adapters on nn.Parameter targets (e.g. MoE experts) are not LoRA layers "
    "(PEFT's add_weighted_adapter refuses them too)",
    "modules_to_save": "full copies of modules are not low-rank deltas and cannot be merged",
    "trainable_token_indices": "trainable token embeddings are full rows, not low-rank deltas",
    "layer_replication": "replicated layers change the base model the merged adapter would need",
    "use_qalora": "QA-LoRA pools the input, so its delta is not B @ A",
    "alora_invocation_tokens": "activated LoRA applies its delta only after invocation tokens",
    "use_bdlora": "block-diagonal LoRA layers are not plain B @ A factors",
    "arrow_config": "Arrow routes between adapters at run time",
    "kasa_config": "KaSA adds a trained singular-value vector",
    "monteclora_config": "MonteCLoRA samples its factors",
    "megatron_config": "Megatron-parallel layers store sharded factors",
}
# Initialisations that change the base weights (the adapter only works on the modified base) or
# select a LoRA variant; PEFT's own list (field metadata) is added where it has one.
_UNSUPPORTED_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")
_PEFT_INIT_VARIANTS = tuple(
    str(v).lower()
    for f in dataclasses.fields(LoraConfig)
    if f.name == "init_lora_weights"
    for v in f.metadata.get("lora_variants", ())
)

# Headroom below the largest finite value of the compute dtype: a Gram entry is at most the sum of
# squares of a factor, and the merge adds a few such terms.
_OVERFLOW_MARGIN = 1e-3


def check_lora_config(config: object, *, source: str) -> None:
    """Refuse an adapter config whose adapters cannot be merged through ``A`` and ``B`` alone.

    Args:
        config: The adapter's PEFT config.
        source: The adapter's name or folder, for the message.

    Raises:
        ValueError: ``f"{source}: ..."`` with the field and the reason.

    Example:
        >>> check_lora_config(LoraConfig(use_dora=True), source="math")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: math: use_dora=True is not supported: DoRA adds a magnitude vector ...
    """
    if not isinstance(config, LoraConfig):
        kind = getattr(config, "peft_type", type(config).__name__)
        raise ValueError(f"{source}: not a LoRA adapter (peft_type={kind!s}); only LoRA can be merged")
    for field, reason in _UNSUPPORTED_FIELDS.items():
        if getattr(config, field, None):
            raise ValueError(f"{source}: {field}={getattr(config, field)!r} is not supported: {reason}")
    for field in dataclasses.fields(config):
        if field.metadata.get("is_lora_variant") and getattr(config, field.name):
            raise ValueError(
                f"{source}: {field.name}={getattr(config, field.name)!r} is not supported: it selects a LoRA "
                "variant whose delta is not s * B @ A"
            )
    if config.bias != "none":
        raise ValueError(
            f"{source}: bias={config.bias!r} is not supported: trained base-model biases are not low-rank"
        )
    for field in ("r", "lora_alpha"):
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{source}: {field} must be a positive number, got {value!r}")
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(_UNSUPPORTED_INITS + _PEFT_INIT_VARIANTS):
        raise ValueError(
            f"{source}: init_lora_weights={init!r} is not supported: the adapter belongs to a modified base "
            "model or a LoRA variant; save it with path_initial_model_for_weight_conversion to get a plain "
            "LoRA"
        )


def check_merge_weights(weights: Sequence[float] | Tensor, count: int) -> list[float]:
    """Return ``weights`` as floats after checking them.

    Args:
        weights: One merge weight per adapter.
        count: The number of adapters.

    Raises:
        ValueError: A wrong count, a non-finite weight, or all weights zero (the merge would be an
            all-zero adapter).

    Example:
        >>> check_merge_weights([1, 0.5], 2)
        [1.0, 0.5]
    """
    if isinstance(weights, str) or not isinstance(weights, Sequence | Tensor):
        raise ValueError(f"Expected {count} weights (one per adapter), got {weights!r}")
    if len(weights) != count:
        raise ValueError(f"Got {len(weights)} weights for {count} adapters; give one weight per adapter")
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ValueError(f"Weights must be numbers, got {list(weights)!r}") from None
    if not all(math.isfinite(w) for w in values):
        raise ValueError(f"Weights must be finite numbers, got {values}")
    if not any(values):
        raise ValueError(f"All weights are zero ({values}): the merged adapter would be all zero")
    return values


def check_factor_values(lora_A: Tensor, lora_B: Tensor, *, where: str) -> None:
    """Refuse factors with NaN/Inf values, or values whose products overflow the compute dtype.

    Args:
        lora_A: The ``A`` factor (any shape).
        lora_B: The ``B`` factor (any shape).
        where: The adapter and module, for the message (e.g. ``"adapters/math: module 'q_proj'"``).

    Raises:
        ValueError: Naming ``where``, the tensor and what is wrong.

    Example:
        >>> check_factor_values(torch.ones(2, 3), torch.full((4, 2), float("nan")), where="a: module 'fc'")
        Traceback (most recent call last):
        ...
        ValueError: a: module 'fc': lora_B has 8 non-finite value(s) (NaN or Inf) out of 8
    """
    for part, tensor in (("lora_A", lora_A), ("lora_B", lora_B)):
        work = torch.promote_types(tensor.dtype, torch.float32)
        sum_sq = float(torch.linalg.vector_norm(tensor.detach(), dtype=torch.float64) ** 2)
        if not math.isfinite(sum_sq):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"{where}: {part} has {bad} non-finite value(s) (NaN or Inf) out of {tensor.numel()}"
            )
        limit = torch.finfo(work).max * _OVERFLOW_MARGIN
        if sum_sq > limit:
            largest = float(tensor.detach().abs().max())
            raise ValueError(
                f"{where}: {part} has values up to {largest:.3g}; their products overflow "
                f"{str(work).removeprefix('torch.')} (sum of squares {sum_sq:.3g} > {limit:.3g}). "
                "The adapter is broken or needs rescaling"
            )


def check_rank_bound(rank: int, total_ranks: Mapping[str, int]) -> None:
    """Refuse a merged rank above every module's total input rank ``M = sum_i r_i``.

    Args:
        rank: The requested rank of the merged adapter.
        total_ranks: Module name -> ``M`` of that module.

    Raises:
        ValueError: ``rank`` exceeds the largest ``M``; the message gives the bound.

    Example:
        >>> check_rank_bound(64, {"q": 16, "v": 16})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: rank 64 is above 16, the largest total rank sum(r_i) of the inputs in any module ...
    """
    if not total_ranks:
        return
    name, largest = max(total_ranks.items(), key=lambda item: item[1])
    if rank > largest:
        raise ValueError(
            f"rank {rank} is above {largest}, the largest total rank sum(r_i) of the inputs in any module "
            f"(e.g. {name!r}): every component above it would be all zero. Use a rank <= {largest} "
            "(that rank keeps every input direction)"
        )


def check_device(device: torch.device | str | None) -> torch.device | None:
    """Parse ``device`` and check that it exists on this machine (``None`` passes through).

    Raises:
        ValueError: An unknown device string, CUDA without CUDA, or a CUDA index out of range.

    Example:
        >>> check_device("cpu")
        device(type='cpu')
    """
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"Unknown device {device!r}; expected 'cpu', 'cuda' or 'cuda:N'") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"Device {device!r} was requested but CUDA is not available here; use 'cpu'")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"Device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                "device(s)"
            )
    elif parsed.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"Unsupported device {device!r}; expected 'cpu', 'cuda' or 'cuda:N'")
    return parsed


def is_fraction(value: object) -> bool:
    """Whether ``value`` is a real number from 0 to 1 (not a bool, not NaN).

    Example:
        >>> is_fraction(0.5), is_fraction(1), is_fraction(True), is_fraction(float("nan")), is_fraction("0.5")
        (True, True, False, False, False)
    """
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value <= 1
