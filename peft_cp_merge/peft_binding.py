"""``combination_type="cp"`` for PEFT's ``add_weighted_adapter``.

:func:`add_cp_weighted_adapter` merges LoRA adapters of a ``PeftModel`` / ``LoraModel`` into a new
adapter with :func:`.merge_modules`. :func:`register` makes ``combination_type="cp"`` (with ``cp_*``
options) come here and leaves every other combination type to PEFT; ``import peft_cp_merge`` calls
it, :func:`unregister` undoes it. Where PEFT has a combination-type hook
(``peft.tuners.lora.register_combination_type``, proposed in ``upstream/``), "cp" is registered
through it; otherwise ``LoraModel.add_weighted_adapter`` is wrapped. :func:`registered_via` says which.

Order of work: validate everything, compute the merged factors (the model is not touched), then add
and fill the new adapter; if that last step fails, the half-made adapter is deleted again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig
from peft.tuners import lora as peft_lora
from peft.tuners.lora import LoraLayer, LoraModel
from peft.utils import _freeze_adapter
from torch import Tensor

from .engine.als import check_rank
from .engine.compression import LoraStack
from .input_checks import (
    check_device,
    check_factor_values,
    check_lora_config,
    check_merge_weights,
    check_rank_bound,
)
from .methods import CPOptions, MergedLora, merge_modules
from .methods.cp import default_rank

__all__ = [
    "CPMergeReport",
    "add_cp_weighted_adapter",
    "is_registered",
    "register",
    "registered_via",
    "unregister",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CPMergeReport:
    """What a ``"cp"`` merge did.

    Attributes:
        adapter_name: The new adapter.
        rank: Its rank ``R`` (``r = lora_alpha = R``).
        rel_error: Module name -> distance of the merged delta to the exact weighted sum
            ``sum_i w_i dW_i``, relative to the sum (the meaning every method shares).
        fit_error: Module name -> relative error of the CP fit of that module's stacked deltas.
        n_iter: Module name -> CP-ALS sweeps run.
        module_rank: Module name -> components fitted there (below ``rank`` where the module has
            fewer inputs or ``rank_tol`` chose fewer; the rest are zero).
        not_converged: Modules whose CP-ALS stopped at ``n_iter_max`` before meeting ``tol``.
        seconds: Wall time of the merge (and calibration).
        calibration: What :func:`~peft_cp_merge.calibration.calibrate` did when ``calibration``
            examples were given, else ``None``.
    """

    adapter_name: str
    rank: int
    rel_error: dict[str, float]
    fit_error: dict[str, float]
    n_iter: dict[str, int]
    module_rank: dict[str, int]
    not_converged: tuple[str, ...]
    seconds: float
    calibration: object = None


def _lora_model(model) -> LoraModel:
    inner = getattr(model, "base_model", None)
    if isinstance(model, LoraModel):
        return model
    if isinstance(inner, LoraModel):
        return inner
    raise ValueError(f"Expected a PeftModel with LoRA adapters or a LoraModel, got {type(model).__name__}")


def _as_matrices(layer: LoraLayer, adapter: str) -> tuple[Tensor, Tensor]:
    """``(lora_A (r, d_in), lora_B (d_out, r))`` of one adapter in one layer, as matrices."""
    if adapter in layer.lora_embedding_A:
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if a.ndim > 2:  # Conv: kernel in A (r, in, *k), 1x1 in B (out, r, 1, ...)
        if getattr(layer.get_base_layer(), "groups", 1) != 1:
            raise ValueError(f"Conv layers with groups > 1 are not supported (layer {type(layer).__name__})")
        a, b = a.flatten(start_dim=1), b.flatten(start_dim=1)
    return a, b


def _has(layer: LoraLayer, adapter: str) -> bool:
    return adapter in layer.lora_A or adapter in layer.lora_embedding_A


def _validate(lora_model: LoraModel, adapters, weights, adapter_name) -> list[float]:
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
        raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    known = sorted(lora_model.peft_config)
    for name in adapters:
        if name not in lora_model.peft_config:
            raise ValueError(f"Unknown adapter {name!r}; this model has {known}")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters lists a name twice: {list(adapters)}")
    weights = check_merge_weights(weights, len(adapters))
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    if "." in adapter_name or any(
        hasattr(d, adapter_name) for d in (torch.nn.ModuleDict(), torch.nn.ParameterDict())
    ):
        raise ValueError(
            f"adapter_name {adapter_name!r} cannot name a LoRA layer's entry (it contains '.' or is an "
            "attribute of torch.nn.ModuleDict/ParameterDict); choose another adapter_name"
        )
    if adapter_name in lora_model.peft_config:
        raise ValueError(f"An adapter named {adapter_name!r} already exists; choose another adapter_name")
    for name in adapters:
        check_lora_config(lora_model.peft_config[name], source=f"Adapter {name!r}")
    return weights


def _collect_stacks(
    lora_model: LoraModel, adapters: Sequence[str], weights: Sequence[float]
) -> tuple[dict[str, LoraStack], dict[str, list[float]], dict[str, LoraLayer]]:
    """Per module: the stack of the adapters it has, their weights, and the layer."""
    stacks, module_weights, layers = {}, {}, {}
    for key, layer in lora_model.model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        present = [(a, w) for a, w in zip(adapters, weights, strict=True) if _has(layer, a)]
        if not present:
            continue
        lora_A, lora_B, scales = [], [], []
        for adapter, _ in present:
            a, b = _as_matrices(layer, adapter)
            check_factor_values(a, b, where=f"Adapter {adapter!r}, module {key!r}")
            lora_A.append(a.detach()[None])
            lora_B.append(b.detach()[None])
            scales.append(float(layer.scaling[adapter]))
        stacks[key] = LoraStack(lora_A, lora_B, scales)
        module_weights[key] = [w for _, w in present]
        layers[key] = layer
    if not stacks:
        raise ValueError(f"None of the adapters {list(adapters)} has a LoRA layer in this model")
    return stacks, module_weights, layers


def _new_config(lora_model: LoraModel, adapters: Sequence[str], modules: list[str], rank: int) -> LoraConfig:
    first = lora_model.peft_config[adapters[0]]
    return LoraConfig(
        task_type=first.task_type,
        base_model_name_or_path=first.base_model_name_or_path,
        revision=first.revision,
        inference_mode=first.inference_mode,
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(modules),
        lora_dropout=first.lora_dropout,
        fan_in_fan_out=first.fan_in_fan_out,
        bias=first.bias,
        init_lora_weights=True,
    )


def _write(layer: LoraLayer, adapter_name: str, merged: MergedLora) -> None:
    if adapter_name in layer.lora_embedding_A:
        targets = (layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name])
    else:
        targets = (layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight)
    for target, value in zip(targets, (merged.lora_A, merged.lora_B), strict=True):
        target.data.copy_(value.reshape(target.shape))


def add_cp_weighted_adapter(
    model,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    *,
    rank: int | None = None,
    aggregation: str = "weighted",
    init: str = "gevd",
    n_iter_max: int = 200,
    tol: float = 1e-5,
    l2: float = 0.0,
    seed: int = 0,
    line_search: bool = True,
    whiten: bool = True,
    sharing_exponent: float = 0.0,
    isotropic: bool = True,
    rank_tol: float = 0.0,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    calibration: Iterable | None = None,
) -> CPMergeReport:
    """Add a new adapter that merges ``adapters`` by a joint CP decomposition of their deltas.

    Per module the CP components' directions are decorrelated (``whiten``) and given one common
    strength (``isotropic``): each adapter's directions are kept at about their own strength, so
    weights of about 1 each are the natural scale (not weights summing to 1). With
    ``whiten=False, isotropic=False`` the merge is the sum-like ``dW = sum_r lambda_r (sum_i w_i c_ir)
    u_r v_r^T`` (``aggregation="weighted"``): at a rank large enough for an exact fit this is
    ``sum_i w_i s_i B_i A_i``, PEFT's ``"cat"``, and a smaller rank (e.g. ``2 max r_i``) denoises it.
    The new adapter has ``r = lora_alpha = rank``, no rsLoRA/DoRA, empty rank/alpha patterns, and
    targets exactly the modules where any input adapter has a LoRA layer (each module merges the
    adapters it has). It is not activated (as with PEFT's ``add_weighted_adapter``).

    Args:
        model: A ``PeftModel`` with LoRA adapters, or a ``LoraModel``.
        adapters: Names of the adapters to merge.
        weights: One merge weight per adapter (negative subtracts).
        adapter_name: Name of the new adapter; must not exist yet.
        rank: CP rank ``R`` and rank of the new adapter (default: `default_rank` of the modules'
            input ranks, ``sum r_i``, the largest over modules). A rank above every
            module's ``sum r_i`` is refused: it would only add all-zero components.
        aggregation: ``"weighted"`` or ``"disjoint"``, see :mod:`peft_cp_merge.methods.cp`.
        init: CP-ALS start, ``"gevd"``, ``"svd"`` or ``"random"``.
        n_iter_max: Maximum ALS sweeps.
        tol: ALS stopping tolerance on the change of relative error.
        l2: Relative ridge term of the ALS normal equations.
        seed: Seed of every random number used.
        line_search: Extrapolate after each ALS sweep (Bro's line search); ``False``: plain ALS.
        whiten: Replace the CP factors ``U``, ``V`` by their polar factors before the gains are
            applied (TSV-style decorrelation, on by default), see :mod:`peft_cp_merge.methods.cp`.
        sharing_exponent: From 0 (off) to 1: divide each component's gain by the effective number
            of adapters that use it to this power (1: shared components are not added up).
        isotropic: Give every component the mean gain magnitude (Iso-C's flat spectrum in the CP
            basis, on by default; exactly flat with ``whiten=True``).
        rank_tol: From 0 (off) to 1: per module, the fewest components (of ``rank`` x 1/4, 2/4, 3/4,
            1) whose CP fit error is within ``rank_tol`` of the fit at ``rank``; the rest are zero.
        device: Where to compute (default: where the first adapter's weights are).
        progress: Progress bars: ``None`` shows them on a terminal only.
        calibration: Optional examples (dicts with ``input_ids``, ``attention_mask``, ``labels``, or a
            ``DataLoader`` of such batches): after the merge, :func:`~peft_cp_merge.calibrate` learns
            each component's gain on them with its defaults (call it yourself for other settings).
            A calibration failure removes the new adapter again.

    Returns:
        A :class:`CPMergeReport`.

    Warns:
        UserWarning: Modules whose CP-ALS stopped at ``n_iter_max`` (listed in the report).

    Raises:
        ValueError: On any bad input, before the model is changed: see :mod:`.input_checks` for the
            weights (finite, not all zero), the factors (no NaN/Inf or overflowing values), the rank
            bound and the device.

    Example:
        >>> import peft_cp_merge
        >>> report = peft_cp_merge.add_cp_weighted_adapter(
        ...     model, ["math", "code"], [1.0, 1.0], "math_code"
        ... )  # doctest: +SKIP
        >>> model.set_adapter("math_code")  # doctest: +SKIP
    """
    start = time.perf_counter()
    lora_model = _lora_model(model)
    weights = _validate(lora_model, adapters, weights, adapter_name)
    options = CPOptions(
        aggregation=aggregation,
        init=init,
        n_iter_max=n_iter_max,
        tol=tol,
        l2=l2,
        seed=seed,
        line_search=line_search,
        whiten=whiten,
        sharing_exponent=sharing_exponent,
        isotropic=isotropic,
        rank_tol=rank_tol,
    )
    if rank is not None:
        check_rank(rank)
    device = check_device(device)
    stacks, module_weights, layers = _collect_stacks(lora_model, adapters, weights)
    if rank is None:
        rank = max(default_rank(stack.ranks) for stack in stacks.values())
    check_rank_bound(rank, {key: sum(stack.ranks) for key, stack in stacks.items()})
    if device is None:
        device = next(iter(stacks.values())).lora_A[0].device

    merged = merge_modules(
        stacks, module_weights, rank=rank, options=options, device=device, progress=progress
    )

    lora_model.peft_config[adapter_name] = _new_config(lora_model, adapters, list(stacks), rank)
    try:
        lora_model.inject_adapter(lora_model.model, adapter_name)
        for key, layer in layers.items():
            _write(layer, adapter_name, merged[key])
        _freeze_adapter(lora_model.model, adapter_name)
    except BaseException:
        _remove_adapter(lora_model, adapter_name)
        raise
    not_converged = tuple(key for key, m in merged.items() if not m.converged)
    if not_converged:
        warnings.warn(
            f"{len(not_converged)} of {len(merged)} modules stopped at n_iter_max={n_iter_max} before "
            f"converging (e.g. {not_converged[0]!r}); their CP fit may improve with a larger n_iter_max",
            stacklevel=2,
        )
    calibration_report = None
    if calibration is not None:
        from .calibration import calibrate  # calibration builds on this module

        try:
            calibration_report = calibrate(model, adapter_name, calibration, progress=progress)
        except BaseException:
            _remove_adapter(lora_model, adapter_name)
            raise
    return CPMergeReport(
        adapter_name=adapter_name,
        rank=rank,
        rel_error={key: m.rel_error for key, m in merged.items()},
        fit_error={key: m.fit_error for key, m in merged.items()},
        n_iter={key: m.n_iter for key, m in merged.items()},
        module_rank={key: m.rank for key, m in merged.items()},
        not_converged=not_converged,
        seconds=time.perf_counter() - start,
        calibration=calibration_report,
    )


def _remove_adapter(lora_model: LoraModel, adapter_name: str) -> None:
    """Undo a partly added adapter: layers first, then the config entry."""
    for layer in lora_model.model.modules():
        if isinstance(layer, LoraLayer):
            # Best effort: the error that brought us here is the one to report.
            with contextlib.suppress(Exception):
                layer.delete_adapter(adapter_name)
    lora_model.peft_config.pop(adapter_name, None)


_CP_OPTIONS = ("rank", *(f.name for f in dataclasses.fields(CPOptions)), "device", "progress", "calibration")
# PEFT options that are left at their defaults when combination_type="cp".
_PEFT_DEFAULTS = {
    "svd_rank": None,
    "svd_clamp": None,
    "svd_full_matrices": True,
    "svd_driver": None,
    "density": None,
    "majority_sign_method": "total",
}


def _cp_options(kwargs: dict) -> dict:
    """``cp_*`` keyword options -> :func:`add_cp_weighted_adapter` keywords; anything else is refused."""
    unknown = sorted(k for k in kwargs if not k.startswith("cp_") or k[3:] not in _CP_OPTIONS)
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for combination_type='cp'; "
            f"expected {['cp_' + k for k in _CP_OPTIONS]}"
        )
    return {k[3:]: v for k, v in kwargs.items()}


def _wrap(original):
    @functools.wraps(original)
    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", *args, **kwargs):
        cp_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("cp_")}
        if combination_type != "cp":
            if cp_kwargs:
                raise ValueError(
                    f"{sorted(cp_kwargs)} only apply to combination_type='cp', not {combination_type!r}"
                )
            return original(self, adapters, weights, adapter_name, combination_type, *args, **kwargs)
        if args:
            raise ValueError(
                "combination_type='cp' takes its options as keywords only "
                f"({['cp_' + k for k in _CP_OPTIONS]}), got {len(args)} extra positional argument(s)"
            )
        options = _cp_options(cp_kwargs)
        ignored = sorted(k for k, v in kwargs.items() if k not in _PEFT_DEFAULTS or v != _PEFT_DEFAULTS[k])
        if ignored:
            raise ValueError(
                f"Option(s) {ignored} are not used by combination_type='cp'; "
                f"its options are {['cp_' + k for k in _CP_OPTIONS]}"
            )
        return add_cp_weighted_adapter(self, adapters, weights, adapter_name, **options)

    add_weighted_adapter._peft_cp_merge_original = original
    return add_weighted_adapter


def _check_through_hook(lora_model, adapters, weights, **kwargs) -> None:
    _cp_options(kwargs)


def _merge_through_hook(lora_model, adapters, weights, adapter_name, **kwargs) -> CPMergeReport:
    return add_cp_weighted_adapter(lora_model, adapters, weights, adapter_name, **_cp_options(kwargs))


# Whether "cp" is registered through PEFT's hook (the wrapper is recognised by its attribute instead).
_hooked = False


def registered_via() -> str | None:
    """How ``combination_type="cp"`` reaches this package: ``"hook"``, ``"wrapper"`` or ``None``.

    Example:
        >>> import peft_cp_merge
        >>> registered_via() in ("hook", "wrapper")
        True
    """
    if _hooked:
        return "hook"
    if hasattr(LoraModel.add_weighted_adapter, "_peft_cp_merge_original"):
        return "wrapper"
    return None


def is_registered() -> bool:
    """Whether ``add_weighted_adapter(..., combination_type="cp")`` currently comes to this package."""
    return registered_via() is not None


def register() -> None:
    """Make ``add_weighted_adapter(..., combination_type="cp")`` come here. Idempotent.

    Through ``peft.tuners.lora.register_combination_type`` where PEFT has it, else by wrapping
    ``LoraModel.add_weighted_adapter``. A PEFT that implements "cp" itself is left alone (with a
    warning): this package's merge is then :func:`add_cp_weighted_adapter`.
    """
    global _hooked
    if is_registered():
        return
    hook = getattr(peft_lora, "register_combination_type", None)
    if hook is None:
        LoraModel.add_weighted_adapter = _wrap(LoraModel.add_weighted_adapter)
    elif "cp" in getattr(peft_lora.model, "BUILTIN_COMBINATION_TYPES", ()):
        warnings.warn(
            "PEFT has its own combination_type='cp' (options: cp_rank); it is left in place. This package's "
            "merge and its other options are available as peft_cp_merge.add_cp_weighted_adapter",
            stacklevel=2,
        )
    else:
        hook("cp", _merge_through_hook, check=_check_through_hook)
        _hooked = True
        logger.debug("combination_type='cp' registered through peft.tuners.lora.register_combination_type")


def unregister() -> None:
    """Restore PEFT's own ``add_weighted_adapter`` (or remove "cp" from its hook). Idempotent."""
    global _hooked
    if _hooked:
        peft_lora.unregister_combination_type("cp")
        _hooked = False
    elif is_registered():
        LoraModel.add_weighted_adapter = LoraModel.add_weighted_adapter._peft_cp_merge_original
