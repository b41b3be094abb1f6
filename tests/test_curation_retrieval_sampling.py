import numpy as np
import pytest

from dinokit.curation.kmeans import hierarchical_kmeans
from dinokit.curation.retrieval_sampling import seed_cluster_samples, seed_neighbours
from dinokit.errors import DinokitError
from dinokit.retrieval.index import FeatureIndex, normalise


def test_a_seed_never_lands_in_an_empty_cluster():
    # hand-built: centroid 1 has no pool image, and the seed is closest to it; the nearest non-empty is 0
    centroids = np.array([[1, 0], [0.999, 0.01], [0, 1]], np.float32)
    assignment = np.array([0, 0, 0, 2, 2])
    clusters, drawn = seed_cluster_samples(
        centroids, assignment, np.array([[0.999, 0.011]]), 2, np.random.default_rng(0)
    )
    assert clusters.tolist() == [0] and len(drawn[0]) == 2 and set(drawn[0].tolist()) <= {0, 1, 2}
    # a pool of exact copies of 3 images clustered with k = 6 leaves empty clusters whose centroids sit on the
    # copies (faiss splits a big cluster in two): each seed, equal to one of the images, still gets 4 of its copies
    base = normalise(np.random.default_rng(0).normal(size=(3, 16)))
    pool = np.repeat(base, [40, 30, 30], axis=0)
    for seed in range(5):
        level = hierarchical_kmeans(pool, [6], seed=seed)[0]
        clusters, drawn = seed_cluster_samples(level.centroids, level.assignment, base, 4, np.random.default_rng(0))
        assert np.bincount(level.assignment, minlength=6)[clusters].min() > 0
        for s, c in enumerate(clusters.tolist()):
            assert len(drawn[c]) == 4 and (np.abs(pool[drawn[c]] - base[s]) < 1e-6).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.0])
def test_seeds_without_a_direction_are_errors_not_silent_picks(bad):
    # a NaN seed got faiss label -1: no images (pool=) or, indexing the clusters, the last cluster's (clusters=)
    centroids = np.array([[1, 0], [0, 1]], np.float32)
    seeds = np.array([[1, 0], [bad, 0]], np.float32)
    with pytest.raises(DinokitError, match=r"seeds has 1 row\(s\) .* \(the first is row 1\)"):
        seed_cluster_samples(centroids, np.array([0, 1, 1]), seeds, 1, np.random.default_rng(0))
    index = FeatureIndex.create(np.array([[1, 0], [0, 1]], np.float32), ["a.png", "b.png"], {})
    with pytest.raises(DinokitError, match=r"seeds has 1 row\(s\) .* \(the first is row 1\)"):
        seed_neighbours(index, seeds, 1)


def test_seed_neighbours_drops_the_places_an_index_left_empty():
    # an ivf index with a small nprobe (or hnsw) can find fewer than k images: faiss fills the rest with
    # id -1 (score -3.4e38), which read as a pool id would be the last image
    class FewerFound:
        def search(self, queries, k):
            scores = np.full((len(queries), k), -3.4e38, np.float32)
            ids = np.full((len(queries), k), -1, np.int64)
            scores[:, :2], ids[:, :2] = [0.9, 0.5], [3, 1]
            return scores, ids

    hits = seed_neighbours(FewerFound(), np.array([[1, 0], [0, 1]], np.float32), 5)
    assert hits == [[(3, pytest.approx(0.9)), (1, pytest.approx(0.5))]] * 2
    assert seed_neighbours(FewerFound(), np.array([[1, 0]], np.float32), 5, min_score=0.6) == [
        [(3, pytest.approx(0.9))]
    ]
