"""The on-disk layout of an adapter library and its ``library.json`` manifest.

A library folder holds::

    library.json        settings, clustering results, one entry per cluster (this module)
    centroids.npy       (k, dim) float32 cluster centroids in the encoder's space
    assignments.npy     (num_examples,) int64 cluster of every training example
    cluster_00/ ...     one PEFT adapter folder per cluster, plus training.json

A cluster folder only appears once its adapter is completely written (it is built under a
temporary name and renamed), so a folder that passes `is_cluster_complete` is never redone.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from ..folders.output import atomic_write_text

__all__ = [
    "ASSIGNMENTS_FILE",
    "CENTROIDS_FILE",
    "FORMAT",
    "MANIFEST_FILE",
    "TRAINING_FILE",
    "ClusterEntry",
    "Library",
    "LibraryManifest",
    "cluster_folder_name",
    "is_cluster_complete",
    "load_library",
    "write_json_atomic",
]

FORMAT = "peft-cp-merge.library/1"
MANIFEST_FILE = "library.json"
CENTROIDS_FILE = "centroids.npy"
ASSIGNMENTS_FILE = "assignments.npy"
TRAINING_FILE = "training.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class ClusterEntry:
    """One cluster of a library.

    Attributes:
        index: Cluster number, the row of ``centroids.npy``.
        folder: The adapter folder, relative to the library.
        size: Number of training examples in the cluster.
        examples: A few instructions closest to the centroid, to show what the cluster is about.
        training: What the training function reported, or None while the cluster is unfinished.
    """

    index: int
    folder: str
    size: int
    examples: tuple[str, ...]
    training: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class LibraryManifest:
    """Contents of ``library.json``.

    Attributes:
        settings: Everything the build depended on (data hash, base model, encoder, seed,
            clustering, LoRA and training options); a resumed build must match it exactly.
        k: Number of clusters (after merging small ones).
        k_scores: (K, mean silhouette) per candidate when K was chosen automatically.
        sample_size: Number of examples k-means was fitted on.
        merged_clusters: (small, into) pairs of clusters merged for being too small.
        clusters: One entry per cluster, in index order.
        package_version: peft-cp-merge version that wrote the library.
        complete: True once every cluster's adapter is written.
    """

    settings: Mapping[str, Any]
    k: int
    k_scores: tuple[tuple[int, float | None], ...]
    sample_size: int
    merged_clusters: tuple[tuple[int, int], ...]
    clusters: tuple[ClusterEntry, ...]
    package_version: str
    complete: bool = False
    centroids_file: str = CENTROIDS_FILE
    assignments_file: str = ASSIGNMENTS_FILE
    format: str = field(default=FORMAT)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of training examples per cluster."""
        return tuple(entry.size for entry in self.clusters)

    def with_training(self, stats: Mapping[int, Mapping[str, Any]]) -> LibraryManifest:
        """A copy with the training stats of every cluster filled in and ``complete`` set."""
        clusters = tuple(replace(entry, training=dict(stats[entry.index])) for entry in self.clusters)
        return replace(self, clusters=clusters, complete=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN scores become null)."""
        data = asdict(self)
        data["k_scores"] = [[k, None if s is None or math.isnan(s) else s] for k, s in self.k_scores]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LibraryManifest:
        """Inverse of `to_dict`.

        Raises:
            ValueError: If ``data`` is not a manifest of this format.
        """
        if data.get("format") != FORMAT:
            raise ValueError(f"Not a library manifest of format {FORMAT!r}: format={data.get('format')!r}.")
        fields = dict(data)
        fields["k_scores"] = tuple((int(k), s) for k, s in data["k_scores"])
        fields["merged_clusters"] = tuple((int(a), int(b)) for a, b in data["merged_clusters"])
        fields["clusters"] = tuple(
            ClusterEntry(**{**entry, "examples": tuple(entry["examples"])}) for entry in data["clusters"]
        )
        return cls(**fields)


@dataclass(frozen=True)
class Library:
    """A library folder and its manifest, as returned by `build_library` and `load_library`.

    Attributes:
        path: The library folder.
        manifest: Its parsed ``library.json``.
    """

    path: Path
    manifest: LibraryManifest

    @property
    def adapter_dirs(self) -> tuple[Path, ...]:
        """The adapter folder of every cluster, in cluster order."""
        return tuple(self.path / entry.folder for entry in self.manifest.clusters)


def load_library(path: str | os.PathLike) -> Library:
    """Reads a library folder's manifest.

    Args:
        path: A folder written by `build_library`.

    Raises:
        FileNotFoundError: If the folder has no ``library.json``.
        ValueError: If the manifest is not valid.

    Example:
        >>> library = load_library("my_library")  # doctest: +SKIP
        >>> library.manifest.k, library.manifest.sizes  # doctest: +SKIP
        (10, (812, 640, ...))
    """
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not an adapter library: it has no {MANIFEST_FILE}.")
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{manifest_path} is not valid JSON: {error}.") from error
    return Library(path=path, manifest=LibraryManifest.from_dict(data))


def cluster_folder_name(index: int, k: int) -> str:
    """``cluster_07``-style folder name, zero-padded so folders sort in cluster order."""
    return f"cluster_{index:0{max(2, len(str(k - 1)))}d}"


def is_cluster_complete(folder: Path) -> bool:
    """True if ``folder`` holds a readable adapter and its training record."""
    if not all((folder / name).is_file() for name in (*ADAPTER_FILES, TRAINING_FILE)):
        return False
    try:
        json.loads((folder / TRAINING_FILE).read_text(encoding="utf-8"))
        json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        with safe_open(folder / "adapter_model.safetensors", framework="pt") as weights:
            return len(list(weights.keys())) > 0
    except (OSError, ValueError, SafetensorError):
        return False


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes JSON atomically and durably (:func:`~peft_cp_merge.folders.output.atomic_write_text`)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
