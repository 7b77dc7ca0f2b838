"""k-means clustering of instruction embeddings (the text level of C-LoRA).

As in the paper, k-means (k-means++ init, 10 restarts, fixed seed) is fitted on a random sample of
the embeddings (20 % by default) and every example is then assigned to its nearest centroid.
K is either given or chosen from candidates by the mean silhouette coefficient on the sample.
Clusters smaller than ``min_cluster_size`` are folded into the cluster with the nearest centroid.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

__all__ = ["SILHOUETTE_MAX_POINTS", "Clustering", "ClusteringOptions", "cluster_embeddings"]

logger = logging.getLogger(__name__)

# The silhouette costs O(m^2 * dim) in the number m of points scored; past this many sample points
# it is computed on a seeded random subset of them.
SILHOUETTE_MAX_POINTS = 10_000


@dataclass(frozen=True)
class ClusteringOptions:
    """How to split the examples.

    Args:
        k: The number of clusters, or several candidates (e.g. ``range(4, 13)``) to choose from by
            silhouette on the sample. The paper found 10 to saturate.
        sample_fraction: Share of the examples k-means is fitted on (0.2 in the paper). The sample
            is raised to at least ``max(k) + 1`` examples when the data allow.
        min_cluster_size: Clusters with fewer examples are merged into their nearest neighbour.
            The default 10 is a judgement call: an adapter trained on a handful of examples mostly
            memorises them.

    Raises:
        ValueError: For a value out of range.
    """

    k: int | tuple[int, ...] = 10
    sample_fraction: float = 0.2
    min_cluster_size: int = 10

    def __post_init__(self) -> None:
        k = self.k
        if isinstance(k, Sequence) and not isinstance(k, str):
            k = tuple(k)
            object.__setattr__(self, "k", k)
            if not k or not all(_is_int(c) and c >= 2 for c in k) or len(set(k)) != len(k):
                raise ValueError(
                    f"Candidate K values must be distinct integers >= 2 (silhouette needs two clusters), "
                    f"got {k}."
                )
        elif not _is_int(k) or k < 1:
            raise ValueError(f"k must be an integer >= 1 or a sequence of candidates, got {k!r}.")
        if not 0.0 < self.sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction must be in (0, 1], got {self.sample_fraction!r}.")
        if not _is_int(self.min_cluster_size) or self.min_cluster_size < 1:
            raise ValueError(f"min_cluster_size must be an integer >= 1, got {self.min_cluster_size!r}.")

    @property
    def candidates(self) -> tuple[int, ...]:
        """The K values to try, in ascending order (one value when K is fixed)."""
        return tuple(sorted(self.k)) if isinstance(self.k, tuple) else (self.k,)

    def check_fits(self, num_examples: int) -> None:
        """Raises ValueError if these options cannot split ``num_examples`` examples."""
        largest = max(self.candidates)
        # A fixed K may equal the number of examples; scoring a candidate needs one point more.
        limit = num_examples if isinstance(self.k, int) else num_examples - 1
        if largest > limit:
            raise ValueError(
                f"k={self.k} is larger than the data allows: {num_examples} examples "
                f"(K must be <= {limit}{' to score a candidate' if not isinstance(self.k, int) else ''})."
            )
        if self.min_cluster_size > num_examples:
            raise ValueError(
                f"min_cluster_size={self.min_cluster_size} is larger than the number of examples "
                f"({num_examples})."
            )


@dataclass(frozen=True, eq=False)
class Clustering:
    """Result of `cluster_embeddings`.

    Attributes:
        labels: (num_examples,) int64 cluster index of every example, in ``range(k)``.
        centroids: (k, dim) float32 centroids. A merged cluster's centroid is the size-weighted
            mean of the centroids it was made from.
        k_scores: (K, mean silhouette) for every candidate when K was chosen automatically,
            else empty. A score is NaN when k-means found fewer than two distinct clusters.
        k_fitted: The K k-means was fitted with, before small clusters were merged.
        sample_size: Number of examples k-means was fitted on.
        merged: (small cluster, cluster it went into) pairs, numbered as fitted, in merge order.
    """

    labels: np.ndarray
    centroids: np.ndarray
    k_scores: tuple[tuple[int, float], ...]
    k_fitted: int
    sample_size: int
    merged: tuple[tuple[int, int], ...]

    @property
    def k(self) -> int:
        """Number of clusters after merging."""
        return len(self.centroids)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of examples in each cluster."""
        return tuple(int(c) for c in np.bincount(self.labels, minlength=self.k))


def cluster_embeddings(
    embeddings: np.ndarray,
    *,
    k: int | Sequence[int] = 10,
    sample_fraction: float = 0.2,
    min_cluster_size: int = 10,
    seed: int = 42,
    progress: bool = True,
) -> Clustering:
    """Clusters embeddings with k-means fitted on a sample.

    Args:
        embeddings: (num_examples, dim) array, e.g. from `embed_texts`.
        k, sample_fraction, min_cluster_size: See `ClusteringOptions`.
        seed: Seeds the sample and k-means; the same seed gives the same clustering.
        progress: Show a progress bar over candidate K values.

    Returns:
        The clustering; see `Clustering`.

    Raises:
        ValueError: If ``embeddings`` is not a finite 2-D array, or the options do not fit it.

    Example:
        >>> points = np.concatenate([np.zeros((20, 2)), np.ones((20, 2))])
        >>> result = cluster_embeddings(points, k=(2, 3), min_cluster_size=1, progress=False)
        >>> result.k, result.sizes
        (2, (20, 20))
    """
    options = ClusteringOptions(k=k, sample_fraction=sample_fraction, min_cluster_size=min_cluster_size)
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0 or not np.isfinite(embeddings).all():
        raise ValueError(
            f"embeddings must be a finite (num_examples, dim) array, got shape {embeddings.shape}."
        )
    num_examples = embeddings.shape[0]
    options.check_fits(num_examples)
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(seed)
    sample_size = min(
        num_examples, max(math.ceil(sample_fraction * num_examples), max(options.candidates) + 1)
    )
    sample = embeddings[np.sort(rng.choice(num_examples, size=sample_size, replace=False))]

    def fit(num_clusters: int) -> KMeans:
        model = KMeans(n_clusters=num_clusters, init="k-means++", n_init=10, random_state=seed)
        return model.fit(sample)

    if isinstance(options.k, int):
        model, k_scores = fit(options.k), ()
    else:
        model, k_scores = _choose_k(fit, sample, options.candidates, seed=seed, progress=progress)
    labels = model.predict(embeddings).astype(np.int64)
    centroids = model.cluster_centers_.astype(np.float64)
    labels, centroids, merged = _merge_small_clusters(labels, centroids, options.min_cluster_size)
    logger.info(
        "Clustered %d examples into %d clusters (sample of %d)", num_examples, len(centroids), sample_size
    )
    return Clustering(
        labels=labels,
        centroids=centroids.astype(np.float32),
        k_scores=k_scores,
        k_fitted=model.n_clusters,
        sample_size=sample_size,
        merged=merged,
    )


def _choose_k(fit, sample: np.ndarray, candidates: Sequence[int], *, seed: int, progress: bool):
    """Fits every candidate K and keeps the one with the highest mean silhouette (smallest K on ties)."""
    from sklearn.metrics import silhouette_score

    scored = []
    for num_clusters in tqdm(candidates, desc="choosing K", disable=not progress):
        model = fit(num_clusters)
        if len(np.unique(model.labels_)) < 2:
            score = float("nan")
        else:
            score = float(
                silhouette_score(
                    sample,
                    model.labels_,
                    sample_size=min(len(sample), SILHOUETTE_MAX_POINTS),
                    random_state=seed,
                )
            )
        logger.info("K=%d: mean silhouette %.4f", num_clusters, score)
        scored.append((num_clusters, score, model))
    valid = [item for item in scored if not math.isnan(item[1])]
    if not valid:
        raise ValueError(
            f"k-means found fewer than two distinct clusters for every K in {tuple(candidates)}."
        )
    best = max(valid, key=lambda item: (item[1], -item[0]))
    return best[2], tuple((num_clusters, score) for num_clusters, score, _ in scored)


def _merge_small_clusters(labels: np.ndarray, centroids: np.ndarray, min_size: int):
    """Folds clusters below ``min_size`` into the nearest centroid, smallest first; renumbers the rest."""
    sizes = np.bincount(labels, minlength=len(centroids))
    alive = list(range(len(centroids)))
    labels, centroids, merged = labels.copy(), centroids.copy(), []
    while len(alive) > 1:
        small = [c for c in alive if sizes[c] < min_size]
        if not small:
            break
        source = min(small, key=lambda c: (sizes[c], c))
        target = min(
            (c for c in alive if c != source),
            key=lambda c: (float(np.linalg.norm(centroids[c] - centroids[source])), c),
        )
        if sizes[source]:
            total = sizes[source] + sizes[target]
            centroids[target] = (
                sizes[target] * centroids[target] + sizes[source] * centroids[source]
            ) / total
        labels[labels == source] = target
        sizes[target] += sizes[source]
        alive.remove(source)
        merged.append((source, target))
    if merged:
        warnings.warn(
            f"Merged {len(merged)} cluster(s) smaller than min_cluster_size={min_size} into their nearest "
            f"neighbour ((small, into) as fitted: {merged}); {len(alive)} clusters remain.",
            stacklevel=3,
        )
    renumber = np.full(len(centroids), -1, dtype=np.int64)
    renumber[alive] = np.arange(len(alive))
    return renumber[labels], centroids[alive], tuple(merged)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
