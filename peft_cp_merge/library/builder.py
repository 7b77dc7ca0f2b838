"""Builds a clustered adapter library (C-LoRA): embed, cluster, train one LoRA per cluster.

The build runs in three stages, each safe to interrupt:

1. plan (main process): embed the instructions, cluster them, write ``centroids.npy``,
   ``assignments.npy`` and a first ``library.json`` (``complete: false``). A re-run reuses the
   plan when the settings match and refuses to touch the folder when they do not.
2. train (every process): each cluster's adapter is trained in a temporary folder and renamed to
   ``cluster_XX`` when complete; clusters whose folder is complete are skipped.
3. finish (main process): collect every cluster's ``training.json`` into ``library.json`` and
   mark it complete.

Under ``accelerate launch --num_processes P`` (or ``torchrun``) the clusters are split across the P processes
(largest first, each to the least loaded process, so the split only depends on the cluster sizes)
and every process trains its clusters alone, without gradient synchronisation. Each cluster is
seeded with ``seed + cluster index`` wherever it runs, so one process and P processes write the
same library (up to floating-point differences between devices and thread counts). Processes
that finish early wait for the others at the end; the process group is created with a
``BARRIER_TIMEOUT`` long enough for uneven splits. On machines without GPUs, Accelerate 1.x only
runs several processes with MPI (``accelerate launch --cpu``) or, with the gloo backend, when
``ACCELERATE_USE_CPU=true`` is set for a torchrun launch::

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 build_script.py
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from datetime import timedelta
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, get_int_from_env, parse_flag_from_env, set_seed
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from .._version import __version__
from .cluster_init import ClusterOSRM
from .clustering import ClusteringOptions, cluster_embeddings
from .data import Example, examples_fingerprint, validate_examples
from .embedding import embed_texts, encoder_name
from .manifest import (
    ASSIGNMENTS_FILE,
    CENTROIDS_FILE,
    MANIFEST_FILE,
    TRAINING_FILE,
    ClusterEntry,
    Library,
    LibraryManifest,
    cluster_folder_name,
    is_cluster_complete,
    load_library,
    write_json_atomic,
)
from .training import LoraTrainer, TrainingOptions

__all__ = ["BARRIER_TIMEOUT", "TrainFn", "build_library"]

logger = logging.getLogger(__name__)

BARRIER_TIMEOUT = timedelta(hours=24)
EXAMPLES_PER_CLUSTER = 3  # instructions nearest to each centroid, shown in the manifest
EXAMPLE_CHARS = 200  # each cut to this many characters

TrainFn = Callable[[torch.nn.Module, Sequence[Example], Path], Mapping[str, Any] | None]
"""``train_fn(peft_model, cluster_examples, output_dir) -> stats or None``: trains the adapter in place.

Files it writes to ``output_dir`` end up in the cluster's folder; the stats must be JSON-serialisable.
"""


def build_library(
    examples: Sequence[Example],
    out_dir: str | os.PathLike,
    *,
    base_model: str | os.PathLike | torch.nn.Module,
    lora_config: LoraConfig,
    tokenizer: Any = None,
    encoder: Any = None,
    embed_batch_size: int = 64,
    clustering: ClusteringOptions | None = None,
    training: TrainingOptions | None = None,
    train_fn: TrainFn | None = None,
    seed: int = 42,
    progress: bool = True,
) -> Library:
    """Clusters ``examples`` by instruction and trains one LoRA adapter per cluster.

    Args:
        examples: The training data, e.g. from `load_examples`.
        out_dir: The library folder; created if missing. An existing library with the same settings
            is resumed.
        base_model: A model folder or name for ``AutoModelForCausalLM``, or a loaded model (it gets
            each adapter in turn and is restored after each).
        lora_config: The adapter every cluster gets.
        tokenizer: The base model's tokenizer; loaded from ``base_model`` when it is a folder or
            name. Needed by the built-in trainer only.
        encoder: Sentence encoder (name, folder or SentenceTransformer); None for all-MiniLM-L6-v2.
        embed_batch_size: Instructions per encoder forward pass.
        clustering: K, sample fraction and minimum cluster size; see `ClusteringOptions`.
        training: Options of the built-in trainer; see `TrainingOptions`.
        train_fn: Replaces the built-in trainer; see `TrainFn`.
        seed: Seeds the clustering and, as ``seed + cluster index``, each adapter's training.
        progress: Show progress bars.

    Returns:
        The finished library.

    Raises:
        ValueError: For bad arguments, data that does not fit the options, a base model folder that
            does not exist, a base model or tokenizer that cannot be loaded (the message names it and
            gives the reason on one line), or an ``out_dir`` that is not empty and not a library with
            the same settings; nothing is written then.
        RuntimeError: Under several processes, when another process failed.

    Example:
        >>> library = build_library(  # doctest: +SKIP
        ...     load_examples("train.jsonl"), "my_library", base_model="SmolLM2-135M-Instruct",
        ...     lora_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        ...     clustering=ClusteringOptions(k=10),
        ... )
        >>> library.adapter_dirs[0].name  # doctest: +SKIP
        'cluster_00'
    """
    clustering = clustering or ClusteringOptions()
    training = training or TrainingOptions()
    _validate(
        examples, base_model, lora_config, tokenizer, embed_batch_size, clustering, training, train_fn, seed
    )
    out_dir = Path(out_dir)
    settings = _settings(examples, base_model, lora_config, encoder, clustering, training, train_fn, seed)
    state = _process_state()

    error, previous, model = None, None, None
    try:
        previous = _previous_manifest(out_dir, settings)
        need_tokenizer = train_fn is None or training.init == "osrm"
        model, tokenizer = _load_base_model(base_model, tokenizer, need_tokenizer=need_tokenizer)
    except Exception as exc:
        error = exc
    _raise_if_any_failed(state, error, "loading")

    error = None
    if state.is_main_process and previous is None:
        try:
            _plan(examples, out_dir, settings, encoder, embed_batch_size, clustering, seed, progress)
        except Exception as exc:
            error = exc
    _raise_if_any_failed(state, error, "planning")

    error = None
    try:
        manifest = load_library(out_dir).manifest
        labels = np.load(out_dir / manifest.assignments_file)
        train_fn = train_fn or LoraTrainer(tokenizer, options=training, progress=progress)
        osrm = None
        if training.init == "osrm":
            osrm = ClusterOSRM(examples, labels, tokenizer, options=training, seed=seed, progress=progress)
        mine = _split_clusters(manifest.sizes, state.num_processes)[state.process_index]
        for index in tqdm(mine, desc=f"clusters (process {state.process_index})", disable=not progress):
            entry = manifest.clusters[index]
            if is_cluster_complete(out_dir / entry.folder):
                logger.info("Cluster %d is already trained; skipping it", index)
                continue
            cluster_examples = [examples[i] for i in np.flatnonzero(labels == index)]
            init = None if osrm is None else functools.partial(osrm, index=index)
            folder = out_dir / entry.folder
            model = _train_cluster(
                model, lora_config, cluster_examples, folder, train_fn, seed=seed + index, init=init
            )
    except Exception as exc:
        error = exc
    _raise_if_any_failed(state, error, "training")

    error = None
    if state.is_main_process:
        try:
            stats = {
                entry.index: json.loads((out_dir / entry.folder / TRAINING_FILE).read_text(encoding="utf-8"))
                for entry in manifest.clusters
            }
            write_json_atomic(out_dir / MANIFEST_FILE, manifest.with_training(stats).to_dict())
        except Exception as exc:
            error = exc
    _raise_if_any_failed(state, error, "writing the manifest")
    return load_library(out_dir)


def _process_state() -> PartialState:
    """Accelerate's view of the launch; refuses a multi-process launch it would run as many single ones."""
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=BARRIER_TIMEOUT)
    world_size = get_int_from_env(["WORLD_SIZE"], 1)
    if world_size > 1 and state.num_processes == 1:
        raise ValueError(
            f"Launched as {world_size} processes but Accelerate sees one (no GPU found); every process would "
            "build the whole library. On CPUs set ACCELERATE_USE_CPU=true, e.g. "
            "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 script.py."
        )
    return state


def _validate(
    examples, base_model, lora_config, tokenizer, embed_batch_size, clustering, training, train_fn, seed
):
    validate_examples(examples)
    if not isinstance(clustering, ClusteringOptions):
        raise ValueError(f"clustering must be a ClusteringOptions, got {type(clustering).__name__}.")
    if not isinstance(training, TrainingOptions):
        raise ValueError(f"training must be a TrainingOptions, got {type(training).__name__}.")
    clustering.check_fits(len(examples))
    if not isinstance(lora_config, LoraConfig):
        raise ValueError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}.")
    if not isinstance(base_model, (str, os.PathLike, torch.nn.Module)):
        raise ValueError(
            f"base_model must be a folder, a model name or a model, got {type(base_model).__name__}."
        )
    _check_base_model_path(base_model)
    if train_fn is not None and not callable(train_fn):
        raise ValueError(f"train_fn must be callable, got {type(train_fn).__name__}.")
    if train_fn is None and tokenizer is None and isinstance(base_model, torch.nn.Module):
        raise ValueError("The built-in trainer needs tokenizer= when base_model is a loaded model.")
    if training.init == "osrm" and tokenizer is None and isinstance(base_model, torch.nn.Module):
        raise ValueError("init='osrm' needs tokenizer= when base_model is a loaded model.")
    if not isinstance(embed_batch_size, int) or embed_batch_size < 1:
        raise ValueError(f"embed_batch_size must be an integer >= 1, got {embed_batch_size!r}.")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}.")


def _check_base_model_path(base_model: str | os.PathLike | torch.nn.Module) -> None:
    """Refuses a base model path that cannot be a loadable model folder, before any expensive work.

    A name that is neither an existing folder nor a local-looking path is left to transformers
    (it may be a model on the Hugging Face Hub or in its cache).

    Raises:
        ValueError: For a local-looking path that does not exist, a file, or a folder without
            ``config.json`` (or ``adapter_config.json``).
    """
    if isinstance(base_model, torch.nn.Module):
        return
    name = os.fspath(base_model)
    path = Path(name)
    if path.is_dir():
        if not any((path / file).is_file() for file in ("config.json", "adapter_config.json")):
            raise ValueError(f"Base model folder {name!r} has no config.json; it is not a model folder.")
    elif path.exists():
        raise ValueError(f"Base model {name!r} is a file; give the folder the model was saved to.")
    elif _looks_like_local_path(base_model):
        raise ValueError(f"Base model folder {name!r} does not exist.")


def _looks_like_local_path(base_model: str | os.PathLike) -> bool:
    """True for a path object or a string that cannot be a Hub model name ``name`` or ``owner/name``.

    That is an absolute path, one that starts with ``.`` or ``~``, has a backslash, or has more than
    one ``/``; ``owner/name`` itself stays ambiguous and is left to transformers.
    """
    if not isinstance(base_model, str):
        return True
    return (
        os.path.isabs(base_model)
        or base_model.startswith((".", "~"))
        or "\\" in base_model
        or base_model.count("/") > 1
    )


def _one_line(error: BaseException, limit: int = 400) -> str:
    """The message of ``error`` with its whitespace and line breaks collapsed, cut to ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _settings(
    examples, base_model, lora_config, encoder, clustering, training, train_fn, seed
) -> dict[str, Any]:
    """Everything the library depends on, as the JSON the manifest stores (so it compares equal)."""
    if isinstance(base_model, torch.nn.Module):
        base_name = getattr(base_model, "name_or_path", "") or type(base_model).__name__
    else:
        base_name = str(base_model)
    lora = {
        k: v for k, v in lora_config.to_dict().items() if k not in ("base_model_name_or_path", "revision")
    }
    training_settings = asdict(training)
    init = {key: training_settings.pop(key) for key in ("init", "osrm_examples", "osrm_freeze_a")}
    settings = {
        "data_sha256": examples_fingerprint(examples),
        "num_examples": len(examples),
        "base_model": base_name,
        "encoder": encoder_name(encoder),
        "seed": seed,
        "clustering": asdict(clustering),
        "lora": lora,
        "training": training_settings
        if train_fn is None
        else {"train_fn": getattr(train_fn, "__qualname__", type(train_fn).__qualname__)},
    }
    if init["init"] != "default":  # absent for the default, so libraries built before it still resume
        settings["init"] = init
    return json.loads(json.dumps(settings, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Enum):
        return value.value
    return str(value)


def _previous_manifest(out_dir: Path, settings: Mapping[str, Any]) -> LibraryManifest | None:
    """The plan of an earlier run with the same settings, or None for a new or empty folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {str(out_dir)!r} is a file, not a folder.")
    if not (out_dir / MANIFEST_FILE).is_file():
        if out_dir.exists() and any(out_dir.iterdir()):
            raise ValueError(
                f"out_dir {str(out_dir)!r} is not empty and not an adapter library; use a new folder."
            )
        return None
    manifest = load_library(out_dir).manifest
    changed = {key: (manifest.settings.get(key), value) for key, value in settings.items()}
    changed = {key: pair for key, pair in changed.items() if pair[0] != pair[1]}
    if changed:
        raise ValueError(
            f"out_dir {str(out_dir)!r} holds a library built with other settings (was, now): {changed}. "
            "Use a new out_dir, or delete this one to rebuild."
        )
    logger.info("Resuming the library in %s", out_dir)
    return manifest


def _load_base_model(base_model, tokenizer, *, need_tokenizer: bool):
    """The base model (and its tokenizer when needed); a load failure becomes a one-line ValueError."""
    if isinstance(base_model, torch.nn.Module):
        return base_model, tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = os.fspath(base_model)
    try:
        model = AutoModelForCausalLM.from_pretrained(name)
    except (OSError, ValueError) as error:
        logger.debug("Loading the base model %r failed", name, exc_info=True)
        raise ValueError(f"Cannot load base model {name!r}: {_one_line(error)}") from None
    if tokenizer is None and need_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as error:
            logger.debug("Loading the tokenizer of %r failed", name, exc_info=True)
            raise ValueError(
                f"Cannot load the tokenizer of base model {name!r}: {_one_line(error)} "
                "(save the tokenizer in the model folder, or pass tokenizer=)"
            ) from None
    return model, tokenizer


def _plan(examples, out_dir, settings, encoder, embed_batch_size, clustering, seed, progress) -> None:
    """Embeds and clusters the instructions; writes centroids, assignments and the first manifest."""
    vectors = embed_texts(
        [example.instruction for example in examples],
        encoder=encoder,
        batch_size=embed_batch_size,
        normalize=True,
        progress=progress,
    )
    result = cluster_embeddings(vectors, **asdict(clustering), seed=seed, progress=progress)
    entries = []
    for index, size in enumerate(result.sizes):
        members = np.flatnonzero(result.labels == index)
        distances = np.linalg.norm(vectors[members] - result.centroids[index], axis=1)
        nearest = members[np.argsort(distances, kind="stable")[:EXAMPLES_PER_CLUSTER]]
        shown = tuple(examples[i].instruction[:EXAMPLE_CHARS] for i in nearest)
        entries.append(ClusterEntry(index, cluster_folder_name(index, result.k), size, shown))
    manifest = LibraryManifest(
        settings=settings,
        k=result.k,
        k_scores=result.k_scores,
        sample_size=result.sample_size,
        merged_clusters=result.merged,
        clusters=tuple(entries),
        package_version=__version__,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / CENTROIDS_FILE, result.centroids)
    np.save(out_dir / ASSIGNMENTS_FILE, result.labels)
    write_json_atomic(out_dir / MANIFEST_FILE, manifest.to_dict())  # last: its presence marks a plan
    logger.info("Planned %d clusters of sizes %s in %s", result.k, result.sizes, out_dir)


def _train_cluster(model, lora_config, examples, folder: Path, train_fn, *, seed: int, init=None):
    """Trains one adapter into a temporary folder and renames it to ``folder``; returns the base model.

    ``init(peft_model) -> stats`` initialises the new adapter first; its stats go under ``"osrm"``.
    """
    partial = folder.with_name(f".{folder.name}.partial")
    for leftover in (partial, folder):  # an interrupted run may have left either behind
        if leftover.exists():
            shutil.rmtree(leftover)
    partial.mkdir()
    set_seed(seed)
    peft_model = get_peft_model(model, copy.deepcopy(lora_config))
    try:
        init_stats = None if init is None else init(peft_model)
        stats = train_fn(peft_model, examples, partial)
        peft_model.save_pretrained(partial)
    finally:
        model = peft_model.unload()
    stats = dict(stats or {})
    if init_stats is not None:
        stats["osrm"] = init_stats
    try:
        json.dumps(stats)
    except TypeError as error:
        raise ValueError(f"train_fn must return JSON-serialisable stats, got {stats!r}.") from error
    write_json_atomic(partial / TRAINING_FILE, stats)
    os.replace(partial, folder)
    logger.info("Trained %s on %d examples: %s", folder.name, len(examples), stats)
    return model


def _split_clusters(sizes: Sequence[int], num_processes: int) -> list[list[int]]:
    """Largest cluster first, each to the least loaded process; deterministic in the sizes."""
    loads, shares = [0] * num_processes, [[] for _ in range(num_processes)]
    for index in sorted(range(len(sizes)), key=lambda c: (-sizes[c], c)):
        rank = min(range(num_processes), key=lambda r: (loads[r], r))
        shares[rank].append(index)
        loads[rank] += sizes[index]
    return [sorted(share) for share in shares]


def _raise_if_any_failed(state: PartialState, error: Exception | None, stage: str) -> None:
    """Re-raises this process's error; with several processes it is also a barrier that fails all."""
    failures = []
    if state.num_processes > 1:
        reports = gather_object([None if error is None else f"process {state.process_index}: {error!r}"])
        failures = [report for report in reports if report is not None]
    if error is not None:
        raise error
    if failures:
        raise RuntimeError(f"{stage} failed on another process: {failures}")
