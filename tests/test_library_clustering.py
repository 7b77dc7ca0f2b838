"""Embedding and clustering of instructions (peft_cp_merge.library.embedding / .clustering)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("sentence_transformers")

from testing_utils import planted_texts, save_tiny_encoder

from peft_cp_merge.library import cluster_embeddings, embed_texts
from peft_cp_merge.library.clustering import _merge_small_clusters

pytestmark = pytest.mark.library


def blobs(sizes, *, dim=16, spread=0.05, seed=0, centers=None):
    """Gaussian blobs around given (or random unit) centers; returns points and true labels."""
    rng = np.random.default_rng(seed)
    if centers is None:
        centers = rng.normal(size=(len(sizes), dim))
        centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    points = [c + spread * rng.normal(size=(n, len(c))) for c, n in zip(centers, sizes, strict=True)]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.concatenate(points).astype(np.float32), labels


def same_partition(a, b) -> bool:
    """True when labelings a and b split the points identically (up to renaming)."""
    from sklearn.metrics import adjusted_rand_score

    return adjusted_rand_score(a, b) == 1.0


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(save_tiny_encoder(tmp_path_factory.mktemp("encoder"))), device="cpu")


def test_planted_text_groups_are_recovered(tiny_encoder):
    from sklearn.metrics import adjusted_rand_score

    texts, groups = planted_texts((50, 50, 50))
    vectors = embed_texts(texts, encoder=tiny_encoder, progress=False)
    result = cluster_embeddings(vectors, k=3, min_cluster_size=1, progress=False)
    assert result.sample_size == 30  # 20 % of 150, the paper's default
    assert adjusted_rand_score(groups, result.labels) > 0.95


def test_embeddings_are_unit_length_when_normalized(tiny_encoder):
    vectors = embed_texts(["add sum plus", "reverse letters"], encoder=tiny_encoder, progress=False)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)


def test_automatic_k_finds_planted_blob_count_and_reports_scores():
    points, truth = blobs([40, 40, 40, 40])
    result = cluster_embeddings(points, k=range(2, 8), min_cluster_size=1, progress=False)
    assert [k for k, _ in result.k_scores] == [2, 3, 4, 5, 6, 7]
    assert result.k == 4
    assert max(result.k_scores, key=lambda item: item[1])[0] == 4
    assert same_partition(truth, result.labels)


def test_small_cluster_is_merged_into_nearest_with_warning():
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [1.5, 0.0]])  # the small one sits next to the first
    points, truth = blobs([30, 30, 4], spread=0.1, centers=centers)
    with pytest.warns(UserWarning, match="min_cluster_size=5"):
        result = cluster_embeddings(points, k=3, sample_fraction=1.0, min_cluster_size=5, progress=False)
    assert result.k == 2
    assert result.k_fitted == 3
    assert sorted(result.sizes) == [30, 34]
    assert same_partition(np.where(truth == 2, 0, truth), result.labels)
    # The merged centroid is the size-weighted mean (30 and 4 points), i.e. the mean of all 34 points.
    merged = result.labels[truth == 2][0]
    np.testing.assert_allclose(result.centroids[merged], points[truth != 1].mean(axis=0), atol=1e-5)


def test_small_clusters_merge_smallest_first_and_sizes_add_up():
    # Fitted clusters on a line, as (index: size at x): 0: 4 at 18, 1: 3 at 10, 2: 30 at 0, 3: 30 at 25.
    # Smallest first, cluster 1 goes into its nearest, 0 (8 away; 2 is 10 away); 0 then has 7 >= 5
    # examples and stays. Taking the lowest index first would send 0 into 3 (7 away) instead, and
    # forgetting that 0 grew would merge it again.
    sizes, xs = [4, 3, 30, 30], [18.0, 10.0, 0.0, 25.0]
    labels = np.repeat(np.arange(4), sizes)
    centroids = np.array([[x, 0.0] for x in xs])
    with pytest.warns(UserWarning, match=r"Merged 1 cluster\(s\) .*\(1, 0\).*; 3 clusters remain"):
        new_labels, new_centroids, merged = _merge_small_clusters(labels, centroids, min_size=5)
    assert merged == ((1, 0),)
    np.testing.assert_array_equal(new_labels, np.repeat([0, 0, 1, 2], sizes))
    np.testing.assert_allclose(new_centroids, [[(4 * 18 + 3 * 10) / 7, 0.0], [0.0, 0.0], [25.0, 0.0]])


def test_same_seed_reproduces_bit_for_bit():
    points, _ = blobs([25, 25, 25], spread=0.3)
    first = cluster_embeddings(points, k=3, min_cluster_size=1, seed=7, progress=False)
    second = cluster_embeddings(points, k=3, min_cluster_size=1, seed=7, progress=False)
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.centroids, second.centroids)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k": 11}, "larger than the data"),
        ({"k": (2, 10)}, "larger than the data"),
        ({"k": 0}, "k must be an integer >= 1"),
        ({"k": (1, 3)}, "distinct integers >= 2"),
        ({"sample_fraction": 0.0}, "sample_fraction"),
        ({"k": 2, "min_cluster_size": 11}, "min_cluster_size=11"),
    ],
)
def test_bad_options_raise_clear_errors(options, message):
    points, _ = blobs([5, 5])
    with pytest.raises(ValueError, match=message):
        cluster_embeddings(points, **{"min_cluster_size": 1, **options}, progress=False)


def test_embed_texts_rejects_empty_input(tiny_encoder):
    with pytest.raises(ValueError, match="non-empty sequence"):
        embed_texts([], encoder=tiny_encoder)
