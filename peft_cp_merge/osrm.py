"""OSRM initialisation: start a LoRA adapter where the other tasks' inputs have the least energy.

OSRM (Zhang & Zhou, "Unraveling LoRA Interference: Orthogonal Subspaces for Robust Model Merging",
ACL 2025, arXiv 2505.22934): after merging, task ``j``'s inputs ``h`` reach task ``i``'s update as
``B_i A_i h``. Before training, each row of ``A_i`` is set to an eigenvector of the other tasks'
input second moment ``M = sum_t h_t h_t^T`` with the smallest eigenvalues, which solves
``min ||A H^T||_F^2 s.t. A A^T = I`` (``H``: the other tasks' inputs to the module, one row per
token). ``lora_B`` stays zero, so the model's outputs are unchanged until training starts.

How: forward pre-hooks on each LoRA module of the adapter stream ``sum h h^T`` over the examples'
tokens (padding left out) in float64 (float32 above ``FLOAT64_MAX_DIM`` inputs), with every adapter
disabled (the base model's features, as in the paper). Modules that read the same input tensor
(q/k/v, gate/up) share one statistic. The ``r`` smallest eigenvectors come from block inverse
iteration on a Cholesky factor (``bottom_eigenvectors``). ``docs/design.md`` §11 has the choices.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from .input_checks import check_device
from .osrm_statistics import InputMoments, collect_moments, example_rows, module_passes, moment_bytes
from .peft_binding import _lora_model

__all__ = ["InputMoments", "OSRMReport", "bottom_eigenvectors", "input_moments", "osrm_init", "statistics_gb"]

logger = logging.getLogger(__name__)

DENSE_MAX_DIM = 256  # at most this size a full eigh is cheaper than inverse iteration
GIB = 2**30


@dataclass(frozen=True)
class OSRMReport:
    """What :func:`osrm_init` did.

    The energy ratio of rows ``A`` (r, d_in) is ``(tr(A M A^T) / ||A||_F^2) / (tr(M) / d_in)``: the
    other examples' mean input energy per unit row, relative to a random direction's (1 for random
    rows, 0 for rows orthogonal to every other input).

    Attributes:
        adapter_name: The initialised adapter.
        modules: Its LoRA modules, in model order.
        groups: Modules sharing one input statistic.
        examples: Other examples the statistics are over.
        tokens: Tokens per module (the fewest over the groups).
        energy_ratio_mean: Mean over modules of the new rows' energy ratio.
        energy_ratio_max: The largest of them.
        replaced_energy_ratio_mean: Mean energy ratio of the rows they replaced (the random init).
        module_energy_ratio: Module name -> the new rows' energy ratio.
        frozen_a: Whether ``lora_A`` was frozen (``requires_grad=False``).
        seconds: Wall time.
    """

    adapter_name: str
    modules: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]
    examples: int
    tokens: int
    energy_ratio_mean: float
    energy_ratio_max: float
    replaced_energy_ratio_mean: float
    module_energy_ratio: dict[str, float]
    frozen_a: bool
    seconds: float


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_options(max_examples, batch_size, freeze_a, force, max_memory_gb=1.0) -> None:
    for name, value in (("max_examples", max_examples), ("batch_size", batch_size)):
        if not (_is_int(value) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if max_memory_gb is not None and (
        isinstance(max_memory_gb, bool) or not isinstance(max_memory_gb, int | float) or not max_memory_gb > 0
    ):
        raise ValueError(f"max_memory_gb must be a number > 0 or None (no limit), got {max_memory_gb!r}")
    for name, value in (("freeze_a", freeze_a), ("force", force)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")


def _osrm_layers(lora_model, adapter_name: str, *, force: bool) -> dict[str, LoraLayer]:
    """Module name -> LoRA layer of ``adapter_name``; refuses what OSRM cannot initialise."""
    known = sorted(lora_model.peft_config)
    if not isinstance(adapter_name, str) or adapter_name not in lora_model.peft_config:
        raise ValueError(f"Unknown adapter {adapter_name!r}; this model has {known}")
    layers = {}
    for key, layer in lora_model.model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        if adapter_name not in layer.lora_A and adapter_name not in layer.lora_embedding_A:
            continue
        if layer.merged:
            raise ValueError(f"Module {key!r} has adapters merged into its weights; call unmerge_adapter()")
        lora_A = dict(layer.lora_A).get(adapter_name)  # embeddings keep theirs elsewhere
        if not isinstance(lora_A, nn.Linear):
            raise ValueError(
                f"OSRM initialises LoRA layers on Linear modules only; module {key!r} is a "
                f"{type(layer.get_base_layer()).__name__}: leave it out of target_modules"
            )
        rank, d_in = lora_A.weight.shape
        if rank > d_in:
            raise ValueError(f"Module {key!r}: rank {rank} exceeds its input size {d_in}")
        lora_B = layer.lora_B[adapter_name].weight
        if not force and bool(lora_B.ne(0).any()):
            raise ValueError(
                f"Adapter {adapter_name!r} is not freshly initialised: lora_B of module {key!r} is not "
                "zero. OSRM initialises a new adapter (B = 0, outputs unchanged); pass force=True to "
                "rewrite lora_A anyway (the adapter's outputs then change)"
            )
        layers[key] = layer
    if not layers:
        raise ValueError(f"Adapter {adapter_name!r} has no LoRA layer in this model")
    return layers


def _prepare(model, adapter_name, examples, max_examples, batch_size, device, force, max_memory_gb):
    lora_model = _lora_model(model)
    _check_options(max_examples, batch_size, False, force, max_memory_gb)
    device = check_device(device)
    layers = _osrm_layers(lora_model, adapter_name, force=force)
    if isinstance(examples, InputMoments):
        return lora_model, layers, examples, device
    config = getattr(lora_model.model, "config", None)
    vocab, length = getattr(config, "vocab_size", None), getattr(config, "max_position_embeddings", None)
    rows = example_rows(examples, max_examples, vocab, length)
    if device is None:
        device = next(model.parameters()).device
    return lora_model, layers, rows, device


@torch.no_grad()
def input_moments(
    model,
    adapter_name: str,
    examples,
    *,
    max_examples: int = 256,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    max_memory_gb: float | None = 8.0,
    progress: bool | None = None,
) -> InputMoments:
    """The base model's input second moments at the LoRA modules of ``adapter_name``.

    Arguments as :func:`osrm_init` (any adapter state: nothing is written). Returns
    :class:`InputMoments`, which :func:`osrm_init` takes in place of examples. All statistics are
    held at once, so ``max_memory_gb`` must hold them (:func:`statistics_gb`); :func:`osrm_init` on
    examples needs no more than its budget, collecting them in passes.

    Raises:
        ValueError: As :func:`osrm_init`, and when the statistics exceed ``max_memory_gb``.

    Example:
        >>> total = input_moments(model, "default", every_cluster_sample)  # doctest: +SKIP
        >>> osrm_init(model, "default", total.minus(own_sample_moments))  # doctest: +SKIP
    """
    _, layers, rows, device = _prepare(
        model, adapter_name, examples, max_examples, batch_size, device, True, max_memory_gb
    )
    if isinstance(rows, InputMoments):
        raise ValueError("examples must be examples here, not InputMoments")
    need = statistics_gb(model, adapter_name)
    if max_memory_gb is not None and need > max_memory_gb:
        raise ValueError(
            f"The statistics of adapter {adapter_name!r} need up to {need:.3g} GB, over max_memory_gb="
            f"{max_memory_gb!r}: raise it, or call osrm_init on the examples (it works in passes)"
        )
    return collect_moments(model, layers, rows, batch_size=batch_size, device=device, progress=progress)


def statistics_gb(model, adapter_name: str) -> float:
    """GB (2**30 bytes) that one set of input statistics of ``adapter_name`` takes, without sharing.

    Each LoRA module's ``sum h h^T``: ``d_in^2`` float64 (float32 above 8,192 inputs). Modules
    reading one input (q/k/v, gate/up) share theirs, so the real figure is lower.

    Example:
        >>> round(statistics_gb(model, "default"), 2)  # doctest: +SKIP
        1.22
    """
    layers = _osrm_layers(_lora_model(model), adapter_name, force=True)
    return sum(moment_bytes(_d_in(layer, adapter_name)) for layer in layers.values()) / GIB


def _d_in(layer, adapter_name: str) -> int:
    return layer.lora_A[adapter_name].weight.shape[1]


def bottom_eigenvectors(moment: Tensor, rank: int, *, max_iter: int = 100, tol: float = 1e-8) -> Tensor:
    """Eigenvectors of the ``rank`` smallest eigenvalues of a symmetric PSD ``moment`` (d, d).

    Up to ``DENSE_MAX_DIM`` a full ``eigh``; above, block inverse iteration on the Cholesky factor of
    ``moment + shift I`` (a ``d^3 / 3`` factorisation instead of ``eigh``'s ~``9 d^3``) with a
    Rayleigh-Ritz step per iteration, until the Ritz values change by less than ``tol`` relative.
    Computed in float64; each vector's largest entry is made positive (a deterministic sign).

    Returns:
        ``(d, rank)`` orthonormal columns, smallest eigenvalue first, float64, on ``moment``'s device.

    Example:
        >>> m = torch.diag(torch.tensor([3.0, 1e-6, 2.0, 5.0], dtype=torch.float64))
        >>> bottom_eigenvectors(m, 2).T
        tensor([[0., 1., 0., 0.],
                [0., 0., 1., 0.]], dtype=torch.float64)
    """
    m = moment.to(torch.float64)
    d = m.shape[0]
    scale = float(m.diagonal().sum()) / d
    if d <= DENSE_MAX_DIM or 4 * rank >= d or scale <= 0:
        vectors = torch.linalg.eigh(m)[1][:, :rank]
    else:
        vectors = _inverse_iteration(m, rank, scale, max_iter=max_iter, tol=tol)
    signs = torch.sign(vectors.gather(0, vectors.abs().argmax(dim=0, keepdim=True)))
    return vectors * torch.where(signs == 0, 1.0, signs)


def _inverse_iteration(m: Tensor, rank: int, scale: float, *, max_iter: int, tol: float) -> Tensor:
    d = m.shape[0]
    for shift in (1e-12, 1e-9, 1e-6):  # the smallest that factorises (M may be singular)
        shifted = m.clone()
        shifted.diagonal().add_(shift * scale)
        factor, info = torch.linalg.cholesky_ex(shifted)
        del shifted
        if int(info) == 0:
            break
    else:
        return torch.linalg.eigh(m)[1][:, :rank]
    block = min(d, 2 * rank + 8)
    x = torch.randn(d, block, generator=torch.Generator().manual_seed(0), dtype=m.dtype).to(m.device)
    previous = None
    for _ in range(max_iter):
        x = torch.linalg.qr(torch.cholesky_solve(x, factor))[0]
        values, ritz = torch.linalg.eigh(x.T @ m @ x)
        x = x @ ritz
        floor = 1e-12 * scale * d  # above the rounding of the Ritz values (||M|| <= tr(M) = scale * d)
        if previous is not None and bool(
            ((values[:rank] - previous).abs() <= tol * previous.abs() + floor).all()
        ):
            break
        previous = values[:rank]
    return x[:, :rank]


def _energy_ratio(rows: Tensor, moment: Tensor, d: int) -> float:
    """``(tr(A M A^T) / ||A||_F^2) / (tr(M) / d)`` in float64 (see :class:`OSRMReport`)."""
    a = rows.to(torch.float64)
    trace = float(moment.diagonal().sum())
    norm = float((a * a).sum())
    if trace <= 0 or norm == 0:
        return 0.0
    return float(((a @ moment) * a).sum()) / norm / (trace / d)


def _new_rows(layers, adapter_name: str, moments: InputMoments):
    """Module name -> (new lora_A (r, d_in) float64, its energy ratio, the replaced rows' ratio)."""
    group_of = {name: i for i, group in enumerate(moments.groups) for name in group}
    missing = [name for name in layers if name not in group_of]
    if missing:
        raise ValueError(f"The moments lack {len(missing)} module(s) of the adapter, e.g. {missing[:5]}")
    out = {}
    for index, total in enumerate(moments.sums):
        members = [name for name in moments.groups[index] if name in layers]
        if not members:
            continue
        if not bool(torch.isfinite(total).all()):
            raise ValueError(f"Non-finite moments for modules {members}")
        moment = total.to(torch.float64)
        ranks = {name: layers[name].lora_A[adapter_name].weight.shape[0] for name in members}
        vectors = bottom_eigenvectors(moment, max(ranks.values()))
        d = moment.shape[0]
        for name in members:
            rows = vectors[:, : ranks[name]].T.contiguous()
            old = layers[name].lora_A[adapter_name].weight.detach().to(moment.device)
            out[name] = (rows, _energy_ratio(rows, moment, d), _energy_ratio(old, moment, d))
    return out


@torch.no_grad()
def osrm_init(
    model,
    adapter_name: str,
    other_examples,
    *,
    max_examples: int = 256,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    freeze_a: bool = False,
    force: bool = False,
    max_memory_gb: float | None = 8.0,
    progress: bool | None = None,
) -> OSRMReport:
    """Set ``lora_A`` of a new adapter to the directions the other tasks' inputs barely excite.

    Call it between ``get_peft_model`` / ``add_adapter`` and training, in any training loop (Trainer,
    TRL, Accelerate, plain PyTorch). Each module's ``lora_A`` rows become the orthonormal eigenvectors
    of the smallest eigenvalues of the other examples' input second moment at that module (the
    paper's ``A A^T = I``); ``lora_B`` is left at zero, so the outputs are unchanged. Both stay
    trainable, as in the paper's experiments, unless ``freeze_a``. Modes and adapter states are
    restored afterwards.

    Args:
        model: A ``PeftModel`` (or ``LoraModel``) holding ``adapter_name``, whose forward takes
            ``input_ids`` and ``attention_mask``.
        adapter_name: A freshly added LoRA adapter (``lora_B`` zero) on Linear modules.
        other_examples: The other tasks' examples: dicts with ``input_ids`` and optionally
            ``attention_mask`` (lists or 1-D tensors; other keys ignored), e.g. a ``datasets.Dataset``;
            or a ``DataLoader`` of such dicts of 2-D tensors; or :class:`InputMoments` computed before.
        max_examples: Examples used at most (the first ones: shuffle beforehand for a random sample).
        batch_size: Examples per forward pass.
        device: Where the examples go (default: where the model's first parameter is).
        freeze_a: Set ``requires_grad=False`` on the new ``lora_A`` (only ``lora_B`` trains then).
        force: Rewrite ``lora_A`` even when ``lora_B`` is not zero (the outputs then change).
        max_memory_gb: Budget for the statistics held at once (``None``: no limit). When all of them
            need more (:func:`statistics_gb`; about 39 GB for a Mistral-7B-shaped model with every
            projection), the modules are split into consecutive passes over the examples, each
            pass's forward stopping after its last module, and each pass's statistics are freed
            once its rows are computed. Same result, more forward passes.
        progress: Progress bar (``None``: on a terminal only).

    Returns:
        An :class:`OSRMReport`.

    Raises:
        ValueError: For an unknown adapter, bad options, no other examples, malformed examples, an
            adapter whose ``lora_B`` is not zero (without ``force``), non-Linear or merged LoRA layers,
            modules the examples never reach, or non-finite activations. The model is then exactly
            as before: every check and computation comes before the first write.

    Example:
        >>> config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"])  # doctest: +SKIP
        >>> model = get_peft_model(base, config)  # doctest: +SKIP
        >>> report = osrm_init(model, "default", other_tasks_dataset)  # doctest: +SKIP
        >>> report.energy_ratio_mean < report.replaced_energy_ratio_mean  # doctest: +SKIP
        True
    """
    start = time.perf_counter()
    _check_options(max_examples, batch_size, freeze_a, force, max_memory_gb)
    _, layers, rows, device = _prepare(
        model, adapter_name, other_examples, max_examples, batch_size, device, force, max_memory_gb
    )
    if isinstance(rows, InputMoments):
        passes = [(rows, layers)]
    else:
        budget = float("inf") if max_memory_gb is None else max_memory_gb * GIB
        names = module_passes({n: _d_in(layer, adapter_name) for n, layer in layers.items()}, budget)
        passes = [(rows, {n: layers[n] for n in chunk}) for chunk in names]
    new, groups, tokens, examples = {}, [], [], 0
    for index, (source, chunk) in enumerate(passes):
        if isinstance(source, InputMoments):
            moments = source
        else:
            desc = "OSRM statistics" + (f" (pass {index + 1}/{len(passes)})" if len(passes) > 1 else "")
            moments = collect_moments(
                model, chunk, source, batch_size=batch_size, device=device, progress=progress, desc=desc
            )
        new.update(_new_rows(chunk, adapter_name, moments))
        groups += [tuple(n for n in group if n in chunk) for group in moments.groups]
        group_of = {name: i for i, group in enumerate(moments.groups) for name in group}
        tokens += [moments.tokens[group_of[name]] for name in chunk]
        examples = moments.examples
        del moments  # this pass's statistics are freed before the next pass
    for name, layer in layers.items():  # every check passed: write
        weight = layer.lora_A[adapter_name].weight
        weight.copy_(new[name][0].to(weight.device, weight.dtype))
        if freeze_a:
            weight.requires_grad_(False)
    ratios = {name: new[name][1] for name in layers}
    report = OSRMReport(
        adapter_name=adapter_name,
        modules=tuple(layers),
        groups=tuple(g for g in groups if g),
        examples=examples,
        tokens=min(tokens),
        energy_ratio_mean=sum(ratios.values()) / len(ratios),
        energy_ratio_max=max(ratios.values()),
        replaced_energy_ratio_mean=sum(new[name][2] for name in layers) / len(layers),
        module_energy_ratio=ratios,
        frozen_a=freeze_a,
        seconds=time.perf_counter() - start,
    )
    logger.info(
        "OSRM-initialised %r: %d modules, %d examples, energy ratio %.3g (replaced rows %.3g)",
        adapter_name,
        len(layers),
        report.examples,
        report.energy_ratio_mean,
        report.replaced_energy_ratio_mean,
    )
    return report
