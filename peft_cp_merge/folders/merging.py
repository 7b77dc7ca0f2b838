"""Merge PEFT LoRA adapter folders into a new adapter folder, without loading any base model.

The result is what PEFT's in-memory ``add_weighted_adapter(adapters, weights, name,
combination_type=...)`` would give (see :mod:`.plan` for the config and scalings), written as a
folder that ``PeftModel.from_pretrained(base, out)`` loads. Any registered method
(:data:`peft_cp_merge.methods.METHODS`) can be used; the output folder is made safely by
:mod:`.output` (``docs/design.md`` section 7).

Memory: modules are read, merged and written group by group (``group_bytes`` of input factors at a
time; CP-ALS batches the modules of a group). The output file is streamed, so peak memory is one
group plus small per-module cores, whatever the number of layers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import peft
import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..engine.compression import LoraStack
from ..input_checks import check_device, check_factor_values
from ..methods import MergedLora, get_method
from .output import MARKER, TOOL_NAME, atomic_directory, check_output_dir
from .plan import MergePlan, ModulePlan, plan_merge
from .reading import CONFIG_NAME, WEIGHTS_NAME, read_factors, stream_safetensors

__all__ = [
    "DEFAULT_GROUP_BYTES",
    "MergeResult",
    "check_values",
    "iter_module_stacks",
    "merge_adapter_folders",
]

logger = logging.getLogger(__name__)

DEFAULT_GROUP_BYTES = 256 * 2**20


@dataclass(frozen=True)
class MergeResult:
    """A finished folder merge.

    Attributes:
        out_dir: The written adapter folder.
        plan: The plan that was carried out.
        modules: Module name -> its :class:`.MergedLora` without the factors (``rel_error``:
            distance to the exact weighted sum; ``fit_error``, ``n_iter``, ``converged``).
        seconds: Wall time of reading, merging and writing.
    """

    out_dir: Path
    plan: MergePlan
    modules: Mapping[str, MergedLora]
    seconds: float

    @property
    def rel_errors(self) -> dict[str, float | None]:
        """Module name -> distance of the merged delta to the exact weighted sum (relative)."""
        return {name: m.rel_error for name, m in self.modules.items()}

    @property
    def not_converged(self) -> list[str]:
        """Modules whose CP-ALS stopped at ``n_iter_max`` before meeting its tolerance."""
        return [name for name, m in self.modules.items() if m.converged is False]


def iter_module_stacks(
    plan: MergePlan, *, device: torch.device | str = "cpu", group_bytes: int = DEFAULT_GROUP_BYTES
) -> Iterator[dict[str, LoraStack]]:
    """Read the planned modules group by group, as one-module stacks with PEFT's scalings.

    Args:
        plan: A plan from :func:`.plan_merge`.
        device: Where the factors go.
        group_bytes: Input bytes read at a time (at least one module per group).

    Yields:
        ``{module name: LoraStack}`` for consecutive modules in plan order; each stack has batch size
        1 and holds the adapters present in that module (``plan.modules[k].adapters``), cast to
        ``plan.dtype``.

    Raises:
        AdapterError: A weights file that cannot be read.
        ValueError: Factors with NaN/Inf or overflowing values
            (:func:`~.input_checks.check_factor_values`), naming the adapter, module and tensor.
    """
    if group_bytes < 1:
        raise ValueError(f"group_bytes must be positive, got {group_bytes}")
    for group in _groups(plan, group_bytes):
        factors: dict[str, list] = {m.name: [] for m in group}
        for index, adapter in enumerate(plan.adapters):
            names = [m.name for m in group if index in m.adapters]
            for name, (lora_A, lora_B) in read_factors(adapter, names, device=device).items():
                check_factor_values(lora_A, lora_B, where=f"{adapter.path}: module {name!r}")
                factors[name].append((lora_A.to(plan.dtype), lora_B.to(plan.dtype)))
        yield {
            m.name: LoraStack(
                [a[None] for a, _ in factors[m.name]], [b[None] for _, b in factors[m.name]], m.scales
            )
            for m in group
        }


def _groups(plan: MergePlan, group_bytes: int) -> Iterator[list[ModulePlan]]:
    """Consecutive modules whose input factors together stay under ``group_bytes`` (at least one)."""
    itemsize = torch.empty((), dtype=plan.dtype).element_size()
    group, size = [], 0
    for module in plan.modules:
        module_bytes = sum(module.ranks) * (module.d_in + module.d_out) * itemsize
        if group and size + module_bytes > group_bytes:
            yield group
            group, size = [], 0
        group.append(module)
        size += module_bytes
    if group:
        yield group


def _merge_group(
    plan: MergePlan, stacks: Mapping[str, LoraStack], options: object, device: torch.device | None
) -> dict[str, MergedLora]:
    modules = {m.name: m for m in plan.modules}
    weights = {name: [plan.weights[i] for i in modules[name].adapters] for name in stacks}
    return get_method(plan.method).merge(stacks, weights, rank=plan.rank, options=options, device=device)


def check_values(
    plan: MergePlan, *, device: torch.device | str = "cpu", group_bytes: int = DEFAULT_GROUP_BYTES
) -> None:
    """Read every planned factor once and refuse NaN/Inf or overflowing values (``--dry-run``).

    Raises:
        AdapterError, ValueError: See :func:`iter_module_stacks`.
    """
    for _ in iter_module_stacks(plan, device=device, group_bytes=group_bytes):
        pass


@torch.no_grad()
def merge_adapter_folders(
    adapter_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    weights: Sequence[float],
    rank: int | None = None,
    method: str = "cp",
    options: object = None,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    allow_different_base: bool = False,
    group_bytes: int = DEFAULT_GROUP_BYTES,
    progress: bool = True,
) -> MergeResult:
    """Merge LoRA adapter folders into a new PEFT adapter folder.

    Everything is checked (:func:`plan_merge`, the output folder, the options) before any tensor is
    read; the folder appears at ``out_dir`` only once complete, with ``README.md`` (a model card)
    and ``merge_info.json`` recording how it was made.

    Args:
        adapter_dirs: PEFT LoRA adapter folders (at least 2).
        out_dir: Folder to create.
        weights: One merge weight per adapter.
        rank: Rank ``R`` of the merged adapter; ``None`` for the method's default (must be ``None``
            for ``"cat"``).
        method: A registered method name (:data:`peft_cp_merge.methods.METHODS`).
        options: The method's options: its options dataclass (e.g.
            :class:`.CPOptions`), a mapping of its fields, or ``None`` for
            the defaults.
        device: Where to compute (``"cpu"`` or ``"cuda"``).
        overwrite: Replace an existing ``out_dir``, which must be a folder this tool wrote (with its
            ``merge_info.json``) or empty.
        allow_different_base: Merge adapters made for different base models (with a warning).
        group_bytes: Input bytes read and merged at a time.
        progress: Show a progress bar over modules.

    Returns:
        The :class:`MergeResult`.

    Warns:
        UserWarning: Modules whose CP-ALS stopped at ``n_iter_max`` (their fit may improve with more
            sweeps); each module's iterations and convergence are in ``merge_info.json``.

    Raises:
        ValueError, AdapterError: See :func:`plan_merge`; also unknown or bad options, an unknown or
            absent device, factors with NaN/Inf or overflowing values (naming adapter, module and
            tensor).
        OutputError: ``out_dir`` overlaps an input or the current directory, exists with content this
            tool did not write (even with ``overwrite``), or is being written by another process
            (:mod:`.output`).
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.

    Example:
        >>> merge_adapter_folders(["math", "code"], "merged", weights=[1, 1])  # doctest: +SKIP
    """
    options = get_method(method).make_options(options)
    if group_bytes < 1:
        raise ValueError(f"group_bytes must be positive, got {group_bytes}")
    device = check_device(device)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, adapter_dirs, overwrite=overwrite)
    plan = plan_merge(
        adapter_dirs, weights=weights, rank=rank, method=method, allow_different_base=allow_different_base
    )
    start = time.perf_counter()
    layout = [entry for m in plan.modules for entry in ((m.key_A, m.shape_A), (m.key_B, m.shape_B))]
    merged_modules: dict[str, MergedLora] = {}
    with (
        atomic_directory(out_dir, overwrite=overwrite, inputs=adapter_dirs) as tmp,
        stream_safetensors(tmp / WEIGHTS_NAME, layout, dtype=plan.dtype) as write,
        tqdm(total=len(plan.modules), desc=f"Merging ({method})", unit="module", disable=not progress) as bar,
    ):
        modules = {m.name: m for m in plan.modules}
        for stacks in iter_module_stacks(plan, device=device, group_bytes=group_bytes):
            logger.info("Merging %d modules from %s", len(stacks), next(iter(stacks)))
            for name, merged in _merge_group(plan, stacks, options, None).items():
                module = modules[name]
                lora_A = merged.lora_A.to(plan.dtype).reshape(module.shape_A)
                lora_B = merged.lora_B.to(plan.dtype).reshape(module.shape_B)
                check_factor_values(lora_A, lora_B, where=f"the merged adapter's module {name!r}")
                write(module.key_A, lora_A)
                write(module.key_B, lora_B)
                merged_modules[name] = dataclasses.replace(
                    merged, lora_A=torch.empty(0), lora_B=torch.empty(0)
                )
            bar.update(len(stacks))
        seconds = time.perf_counter() - start
        result = MergeResult(out_dir=out_dir, plan=plan, modules=merged_modules, seconds=seconds)
        _save_config(plan, tmp)
        _write_provenance(tmp, result, device=str(device), options=options)
    _warn_not_converged(result, options)
    return result


def _save_config(plan: MergePlan, folder: Path) -> None:
    """The merged config, with ``target_modules`` as a sorted list (PEFT keeps a set: random order)."""
    plan.merged_config().save_pretrained(str(folder))
    path = folder / CONFIG_NAME
    config = json.loads(path.read_text())
    config["target_modules"] = [m.name for m in plan.modules]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _warn_not_converged(result: MergeResult, options: object) -> None:
    late = result.not_converged
    if late:
        n_iter_max = getattr(options, "n_iter_max", None)
        warnings.warn(
            f"{len(late)} of {len(result.modules)} modules stopped at n_iter_max={n_iter_max} before "
            f"converging (e.g. {late[0]!r}); their CP fit may improve with a larger n_iter_max "
            "(--n-iter-max). Per-module iterations and fit are in merge_info.json",
            stacklevel=3,
        )


def _provenance(result: MergeResult, *, device: str, options: object) -> dict:
    plan = result.plan
    errors = [e for e in result.rel_errors.values() if e is not None]
    return {
        "tool": f"{TOOL_NAME} {__version__}",
        "peft": peft.__version__,
        "torch": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": plan.method,
        "rank": plan.rank,
        "options": dataclasses.asdict(options),
        "device": device,
        "inputs": [
            {
                "path": str(adapter.path.resolve()),
                "weight": weight,
                "base_model_name_or_path": adapter.config.base_model_name_or_path,
                "r": adapter.config.r,
                "lora_alpha": adapter.config.lora_alpha,
                "use_rslora": adapter.config.use_rslora,
                "rank_pattern": dict(adapter.config.rank_pattern),
                "alpha_pattern": dict(adapter.config.alpha_pattern),
                "modules": len(adapter.modules),
            }
            for adapter, weight in zip(plan.adapters, plan.weights, strict=True)
        ],
        "modules": len(plan.modules),
        "rel_error_meaning": _REL_ERROR_MEANING,
        "rel_error_mean": sum(errors) / len(errors) if errors else None,
        "rel_error_max": max(errors) if errors else None,
        "not_converged": result.not_converged,
        "module_stats": {
            name: {
                "rel_error": m.rel_error,
                "fit_error": m.fit_error,
                "n_iter": m.n_iter,
                "converged": m.converged,
            }
            for name, m in result.modules.items()
        },
        "seconds": round(result.seconds, 3),
    }


_REL_ERROR_MEANING = (
    "rel_error: ||merged delta - sum_i w_i dW_i||_F / ||sum_i w_i dW_i||_F per module, the distance to "
    "the exact weighted sum (method cat); fit_error: the method's own fit (cp: CP fit of the stacked "
    "deltas; svd, tsv: share dropped by the rank truncation; iso_c, iso_cts: share of the weighted sum "
    "outside the merged subspaces); n_iter, converged: CP-ALS sweeps (cp only)"
)


def _write_provenance(folder: Path, result: MergeResult, *, device: str, options: object) -> None:
    """``merge_info.json`` and a ``README.md`` model card saying how the adapter was made.

    PEFT's config loader warns about unknown keys in ``adapter_config.json``, so provenance lives
    beside it rather than in it.
    """
    info = _provenance(result, device=device, options=options)
    (folder / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    summary = {k: v for k, v in info.items() if k not in ("module_stats", "rel_error_meaning")}
    rows = "\n".join(
        f"| `{item['path']}` | {item['weight']:g} | {item['r']} | {item['lora_alpha']:g} |"
        for item in info["inputs"]
    )
    base = result.plan.adapters[0].config.base_model_name_or_path
    card = (
        "---\nlibrary_name: peft\n"
        + (f"base_model: {base}\n" if base else "")
        + "tags:\n- lora\n- merge\n- peft-cp-merge\n---\n\n"
        + f"# Merged LoRA adapter\n\nMade by `{info['tool']}` with method `{info['method']}` at rank "
        + f"{info['rank']} from {len(info['inputs'])} adapters:\n\n"
        + f"| adapter | weight | r | lora_alpha |\n|---|---|---|---|\n{rows}\n\n"
        + "Per-module errors are in `merge_info.json`. Provenance:\n\n"
        + f"```json\n{json.dumps(summary, indent=2)}\n```\n"
    )
    (folder / "README.md").write_text(card)
