"""Clustering features to K codebook centres: determinism, allocation of centres to groups, quality vs random."""

from __future__ import annotations

import numpy as np
import pytest

from vqtok.codebook import CLUSTER_METHODS, allocate, assign, cluster


def blobs(sizes: list[int], dim: int = 16, spread: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian blobs: features (sum(sizes), dim) float32 and blob ids."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10.0, size=(len(sizes), dim))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return (centres[labels] + rng.normal(scale=spread, size=(len(labels), dim))).astype(np.float32), labels


@pytest.mark.parametrize("method", CLUSTER_METHODS)
def test_same_seed_same_codebook_other_seed_another(method: str) -> None:
    x, labels = blobs([600, 300, 100])
    first = cluster(x, 40, method=method, labels=labels, seed=3)
    again = cluster(x, 40, method=method, labels=labels, seed=3)
    other = cluster(x, 40, method=method, labels=labels, seed=4)
    assert first.shape == (40, 16) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_per_class_gives_k_over_classes_centres_per_label() -> None:
    x, labels = blobs([500, 200, 800, 100])
    codebook = cluster(x, 40, method="per-class", labels=labels, seed=0)
    _, nearest_blob = assign(codebook, np.stack([x[labels == c].mean(0) for c in range(4)]))
    assert np.bincount(nearest_blob, minlength=4).tolist() == [10, 10, 10, 10]


def test_per_class_remainder_goes_to_the_largest_classes() -> None:
    assert allocate(np.array([500, 200, 800, 100]), 42, share=np.ones(4)).tolist() == [11, 10, 11, 10]


def test_two_level_gives_clusters_centres_in_proportion_to_their_size() -> None:
    x, labels = blobs([3000, 1000])
    codebook = cluster(x, 40, method="two-level", seed=0)
    _, nearest_blob = assign(codebook, np.stack([x[labels == c].mean(0) for c in range(2)]))
    counts = np.bincount(nearest_blob, minlength=2)
    assert abs(counts[0] - 30) <= 2 and counts.sum() == 40


def test_allocate_caps_small_groups_and_reassigns_the_surplus() -> None:
    capacity = np.array([1, 2, 100, 5])
    quota = allocate(capacity, 20, share=np.array([50, 50, 1, 1]))  # the two tiny groups "deserve" ~10 each
    assert quota.tolist() == [1, 2, 15, 2]  # capped at their points; the surplus 15 split 99 : 4 by room left
    assert allocate(capacity, 108, share=capacity).tolist() == capacity.tolist()  # K = N: every point
    with pytest.raises(ValueError, match="no more centres than points"):
        allocate(capacity, 109, share=capacity)


def test_two_level_handles_clusters_smaller_than_their_share() -> None:
    """K close to N: coarse clusters cannot all take their proportional share; every feature is still a centre
    at K = N and no centre is duplicated below it."""
    x, _ = blobs([50, 7, 3], spread=1.0)
    assert np.unique(cluster(x, 60, method="two-level"), axis=0).shape == (60, 16)
    assert np.unique(cluster(x, 55, method="two-level"), axis=0).shape == (55, 16)


def test_two_level_quantizes_held_out_features_better_than_random() -> None:
    x, _ = blobs([200] * 20, spread=2.0, seed=1)
    order = np.random.default_rng(0).permutation(len(x))
    train, held_out = x[order[:3000]], x[order[3000:]]
    error = {m: assign(held_out, cluster(train, 200, method=m, seed=0))[0].mean() for m in ("two-level", "random")}
    assert error["two-level"] < 0.8 * error["random"], error


def test_random_picks_distinct_training_features() -> None:
    x, _ = blobs([100, 100])
    codebook = cluster(x, 50, method="random", seed=0)
    rows = {row.tobytes() for row in x}
    assert all(row.tobytes() in rows for row in codebook) and len({r.tobytes() for r in codebook}) == 50


def test_cluster_rejects_bad_requests_with_a_hint() -> None:
    x, labels = blobs([10, 10])
    with pytest.raises(ValueError, match="more crops"):
        cluster(x, 21)
    with pytest.raises(ValueError, match="two-level"):
        cluster(x, 4, method="per-class")
    with pytest.raises(ValueError, match="choose one of"):
        cluster(x, 4, method="hierarchical")
    with pytest.raises(ValueError, match="NaN"):
        cluster(np.full((10, 2), np.nan, np.float32), 2)
