"""Read PEFT LoRA adapter folders lazily and write adapter folders atomically.

An adapter folder is ``adapter_config.json`` plus ``adapter_model.safetensors``. Opening one reads
the config and the safetensors header only; the factors of a group of modules are read on demand
with :func:`read_factors` (memory-mapped, so a group costs only its own tensors). Every factor is
handled as a matrix: ``A`` is ``(r, d_in)`` and ``B`` is ``(d_out, r)``, with convolution kernels
flattened (``d_in = in_channels * prod(kernel)``) and restored by :meth:`AdapterModule.file_shapes`.

Anything that would silently give a wrong merged adapter (DoRA, LoRA biases, trained base biases,
``modules_to_save``, LoRA variants whose forward is not ``x -> s B A x``, weights that belong to a
modified base model) is refused when the folder is opened, with the reason: the one policy of
:func:`.check_lora_config`, which the PEFT binding applies too.

The weights file of a merged adapter is streamed tensor by tensor (:func:`stream_safetensors`), so
writing never holds the whole merged adapter in memory; the folder around it is made safely by
:mod:`.folders.output`.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..input_checks import check_lora_config

__all__ = [
    "AdapterError",
    "AdapterFolder",
    "AdapterModule",
    "layer_index",
    "module_sort_key",
    "open_adapter_folder",
    "read_factors",
    "stream_safetensors",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."

# Key suffix -> (factor, layer kind); the kind is refined to "conv" from the tensor rank.
_FACTOR_SUFFIXES = {
    ".lora_A.weight": ("A", "linear"),
    ".lora_B.weight": ("B", "linear"),
    ".lora_embedding_A": ("A", "embedding"),
    ".lora_embedding_B": ("B", "embedding"),
}

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class AdapterError(ValueError):
    """An adapter folder that cannot be read or merged; the message names the folder and the reason."""


class FactorShapes:
    """``rank``, ``d_in`` and ``d_out`` of a module's LoRA factors from their file shapes."""

    shape_A: tuple[int, ...]
    shape_B: tuple[int, ...]

    @property
    def rank(self) -> int:
        return self.shape_A[0]

    @property
    def d_in(self) -> int:
        return math.prod(self.shape_A[1:])

    @property
    def d_out(self) -> int:
        return self.shape_B[0]


@dataclass(frozen=True)
class AdapterModule(FactorShapes):
    """One adapted module of an adapter file.

    Attributes:
        name: Module name in the base model, e.g. ``model.layers.0.self_attn.q_proj``.
        kind: ``"linear"``, ``"embedding"`` or ``"conv"``.
        key_A: Key of the A factor in the file; ``key_B`` likewise.
        shape_A: Shape of A in the file, ``(r, d_in)`` or ``(r, in_channels, *kernel)``.
        shape_B: Shape of B in the file, ``(d_out, r)`` or ``(out_channels, r, 1, ...)``.
    """

    name: str
    kind: str
    key_A: str
    key_B: str
    shape_A: tuple[int, ...]
    shape_B: tuple[int, ...]

    def file_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """File shapes of A and B for a module of this kind and shape with rank ``rank``."""
        return (rank, *self.shape_A[1:]), (self.d_out, rank, *self.shape_B[2:])


@dataclass(frozen=True)
class AdapterFolder:
    """A LoRA adapter folder, opened without reading its weights.

    Attributes:
        path: The folder.
        config: The adapter's :class:`peft.LoraConfig`, as PEFT loads it.
        modules: The adapted modules by name, in file order.
        dtype: The factors' dtype.
        nbytes: Size of the weights file in bytes.
    """

    path: Path
    config: LoraConfig
    modules: Mapping[str, AdapterModule]
    dtype: torch.dtype
    nbytes: int

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_NAME

    def scaling(self, name: str) -> float:
        """PEFT's scaling of module ``name``: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).

        ``rank_pattern`` and ``alpha_pattern`` are resolved for the module exactly as PEFT does
        (:func:`peft.utils.other.get_pattern_key`).
        """
        config, r = self.config, self.config_rank(name)
        alpha = config.alpha_pattern.get(
            get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha
        )
        return alpha / math.sqrt(r) if config.use_rslora else alpha / r

    def config_rank(self, name: str) -> int:
        """The rank the config gives module ``name`` (``r``, or its ``rank_pattern`` entry)."""
        config = self.config
        return config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)


def module_sort_key(name: str) -> tuple[str | int, ...]:
    """Natural order of module names: ``layers.2`` before ``layers.10``."""
    return tuple(int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name)))


def layer_index(name: str) -> int | None:
    """The first integer component of a module name (its layer depth), or ``None``.

    Example:
        >>> layer_index("model.layers.12.self_attn.q_proj")
        12
    """
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


def _refuse(path: Path, what: str) -> AdapterError:
    return AdapterError(f"{path}: {what}")


def _check_config(path: Path, config: PeftConfig) -> LoraConfig:
    try:
        check_lora_config(config, source=str(path))
    except ValueError as exc:
        raise AdapterError(str(exc)) from None
    return config


def _parse_modules(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, AdapterModule]:
    factors: dict[str, dict[str, tuple[str, str]]] = {}
    unknown = []
    for key in shapes:
        suffix = next((s for s in _FACTOR_SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(KEY_PREFIX):
            unknown.append(key)
            continue
        factor, kind = _FACTOR_SUFFIXES[suffix]
        factors.setdefault(key[len(KEY_PREFIX) : -len(suffix)], {})[factor] = (key, kind)
    if unknown:
        raise _refuse(
            path,
            f"{len(unknown)} tensor(s) are not LoRA factors, e.g. {unknown[:3]}; only keys "
            f"'{KEY_PREFIX}<module>' + one of {sorted(_FACTOR_SUFFIXES)} can be merged "
            "(DoRA magnitudes, biases and full modules are not supported)",
        )
    modules = {}
    for name, pair in factors.items():
        if set(pair) != {"A", "B"} or pair["A"][1] != pair["B"][1]:
            raise _refuse(
                path,
                f"module {name!r} lacks a matching lora_A/lora_B pair: {sorted(k for k, _ in pair.values())}",
            )
        (key_A, kind), (key_B, _) = pair["A"], pair["B"]
        shape_A, shape_B = shapes[key_A], shapes[key_B]
        if len(shape_A) > 2 and kind == "linear":
            kind = "conv"
        expected_B = 2 if kind != "conv" else len(shape_A)
        if (
            len(shape_A) < 2
            or len(shape_B) != expected_B
            or shape_B[1] != shape_A[0]
            or any(s != 1 for s in shape_B[2:])
        ):
            raise _refuse(
                path,
                f"module {name!r}: factor shapes A {shape_A} / B {shape_B} are not a plain LoRA pair "
                "(expected A (r, d_in[, kernel]) and B (d_out, r[, 1, ...]); grouped convolutions are not "
                "supported)",
            )
        modules[name] = AdapterModule(name, kind, key_A, key_B, shape_A, shape_B)
    if not modules:
        raise _refuse(path, f"{WEIGHTS_NAME} holds no LoRA factors")
    return modules


def open_adapter_folder(path: str | os.PathLike) -> AdapterFolder:
    """Open a PEFT LoRA adapter folder: read its config and the weights file's header.

    Args:
        path: Folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
        The :class:`AdapterFolder`; no tensor is read.

    Raises:
        AdapterError: Missing or unreadable files (invalid JSON, a truncated safetensors file), a
            non-LoRA or unsupported adapter, or tensors that are not LoRA factors. The message names
            the folder and the reason.

    Example:
        >>> adapter = open_adapter_folder("adapters/math")  # doctest: +SKIP
        >>> adapter.modules["model.layers.0.self_attn.q_proj"].rank  # doctest: +SKIP
        16
    """
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise _refuse(path, f"no {CONFIG_NAME}; expected a PEFT adapter folder")
    if not (path / WEIGHTS_NAME).is_file():
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        raise _refuse(path, f"no {WEIGHTS_NAME} (found {found}); only safetensors weights are supported")
    try:
        config = PeftConfig.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise _refuse(path, f"{CONFIG_NAME} cannot be read: {_one_line(exc)}") from None
    config = _check_config(path, config)
    try:
        with safe_open(path / WEIGHTS_NAME, framework="pt") as f:
            slices = {key: f.get_slice(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            shapes = {key: tuple(s.get_shape()) for key, s in slices.items()}
            dtypes = {s.get_dtype() for s in slices.values()}
    except (SafetensorError, OSError) as exc:
        raise _refuse(
            path, f"{WEIGHTS_NAME} is truncated or not a safetensors file: {_one_line(exc)}"
        ) from None
    if not dtypes <= set(_DTYPES):
        raise _refuse(
            path, f"unsupported dtype(s) {sorted(dtypes - set(_DTYPES))}; expected {sorted(_DTYPES)}"
        )
    modules = _parse_modules(path, shapes)
    dtype = _DTYPES[dtypes.pop()] if len(dtypes) == 1 else torch.float32
    return AdapterFolder(path, config, modules, dtype, (path / WEIGHTS_NAME).stat().st_size)


def read_factors(
    adapter: AdapterFolder, names: Sequence[str], *, device: torch.device | str = "cpu"
) -> dict[str, tuple[Tensor, Tensor]]:
    """Read the factors of some modules as matrices.

    Args:
        adapter: The opened folder.
        names: Module names to read (each must be in ``adapter.modules``).
        device: Where the tensors go.

    Returns:
        ``{name: (A (r, d_in), B (d_out, r))}`` in the file's dtype, unscaled.
    """
    out = {}
    try:
        with safe_open(adapter.weights_path, framework="pt", device=str(device)) as f:
            for name in names:
                module = adapter.modules[name]
                lora_A = f.get_tensor(module.key_A).reshape(module.rank, module.d_in)
                lora_B = f.get_tensor(module.key_B).reshape(module.d_out, module.rank)
                out[name] = (lora_A, lora_B)
    except (SafetensorError, OSError) as exc:  # e.g. changed or truncated since it was opened
        raise _refuse(adapter.path, f"{WEIGHTS_NAME} cannot be read: {_one_line(exc)}") from None
    return out


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


@contextmanager
def stream_safetensors(
    path: str | os.PathLike,
    layout: Sequence[tuple[str, tuple[int, ...]]],
    *,
    dtype: torch.dtype,
    metadata: Mapping[str, str] | None = None,
) -> Iterator[Callable[[str, Tensor], None]]:
    """Write a safetensors file one tensor at a time, in a layout declared up front.

    The header (names, shapes, offsets) is written first; the yielded ``write(key, tensor)`` must
    then be called for every entry of ``layout`` in order. Only one tensor is held at a time.

    Args:
        path: File to create.
        layout: ``(key, shape)`` of every tensor, in write order.
        dtype: The dtype of every tensor (tensors are cast to it).
        metadata: String metadata stored in the header (``__metadata__``).

    Yields:
        ``write(key, tensor)``.

    Raises:
        ValueError: A tensor written out of order or with the wrong shape, or missing at the end.

    Example:
        >>> layout = [("a", (2, 3))]
        >>> with stream_safetensors("x.safetensors", layout, dtype=torch.float32) as write:  # doctest: +SKIP
        ...     write("a", torch.zeros(2, 3))
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for key, shape in layout:
        size = math.prod(shape) * itemsize
        header[key] = {
            "dtype": _DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    pending = iter(layout)

    def write(key: str, tensor: Tensor) -> None:
        expected_key, shape = next(pending, (None, None))
        if key != expected_key or tuple(tensor.shape) != shape:
            raise ValueError(
                f"Expected tensor {expected_key!r} of shape {shape}, got {key!r} {tuple(tensor.shape)}"
            )
        data = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        file.write(data.view(torch.uint8).numpy().tobytes())

    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        yield write
        missing = [key for key, _ in pending]
        if missing:
            raise ValueError(f"{len(missing)} tensor(s) were never written, e.g. {missing[:3]}")
        file.flush()
        os.fsync(file.fileno())
