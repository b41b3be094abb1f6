"""Retrieval-based sampling (the DINOv2 paper's LVD-142M): pool images chosen for their closeness to
a curated seed set, both embedded by the same model.

The paper picks one of two ways per seed dataset:
  neighbours  each seed image takes its `per_seed` nearest pool images (cosine): for large seed sets
  cluster     each seed image takes `per_seed` pool images drawn at random from the pool cluster
              nearest to it (a k-means of the pool, `dinokit curate cluster`): for small seed sets,
              whose few images then reach their whole concept, not only its closest copies
The selection is the union over the seeds.
"""

import numpy as np

from dinokit.curation.kmeans import nearest_centroid
from dinokit.curation.vectors import unit_rows, whole_number
from dinokit.errors import DinokitError
from dinokit.retrieval.index import FeatureIndex


def seed_neighbours(
    pool: FeatureIndex,
    seeds: np.ndarray,
    per_seed: int,
    min_score: float | None = None,
    allowed: np.ndarray | None = None,
) -> list[list[tuple[int, float]]]:
    """Per seed (S, D), its `per_seed` nearest pool images as [(pool id, cosine), ...], most similar
    first; hits under `min_score` are dropped. allowed (N,) bool: only those pool ids are retrieved (the
    seeds with fewer than per_seed allowed hits are searched again for 4 times more neighbours, until
    they have them or k reaches N; the others are not searched again, so memory holds S x per_seed hits
    and the few seeds searched further)."""
    per_seed = count_per_seed(per_seed)
    queries = unit_rows(seeds, "seeds", allow_empty=True)
    hits: list[list[tuple[int, float]]] = [[] for _ in range(len(queries))]
    todo, k = np.arange(len(queries)), per_seed
    while len(todo):
        scores, ids = pool.search(queries[todo], k)
        usable = ids >= 0
        if allowed is not None:
            usable &= allowed[np.maximum(ids, 0)]
        last = allowed is None or k >= pool.index.ntotal  # no search would find more
        done = np.full(len(todo), True) if last else usable.sum(axis=1) >= per_seed
        for row in np.flatnonzero(done).tolist():
            hits[todo[row]] = [
                (int(j), float(s))
                for s, j in zip(scores[row][usable[row]], ids[row][usable[row]], strict=True)
                if min_score is None or s >= min_score
            ][:per_seed]
        todo, k = todo[~done], k * 4
    return hits


def seed_cluster_samples(
    centroids: np.ndarray, assignment: np.ndarray, seeds: np.ndarray, per_seed: int, rng: np.random.Generator
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Pool images drawn from the clusters of the seeds.

    centroids (C, D): the pool's k-means centroids (of L2-normalised vectors); assignment (N,): the
    cluster of each pool image; seeds (S, D). Each seed goes to its nearest centroid among the clusters
    holding pool images (L2 on the normalised seed, as k-means assigned the pool; an empty cluster, e.g.
    one k-means split off a group of exact copies, would give the seed nothing). A cluster that s seeds chose gives
    min(s * per_seed, its size) of its images, drawn at random without repeats, so seeds sharing a
    cluster add different images.
    Returns (the cluster of each seed (S,), {cluster: pool ids drawn from it (sorted)}).
    """
    per_seed = count_per_seed(per_seed)
    assignment = np.asarray(assignment, dtype=np.int64)
    filled = np.flatnonzero(np.bincount(assignment, minlength=len(centroids)))  # clusters with pool images
    if not len(filled):
        raise DinokitError("the pool clusters hold no images: cluster a non-empty pool first")
    nearest, _ = nearest_centroid(unit_rows(seeds, "seeds", allow_empty=True), np.asarray(centroids)[filled])
    seed_clusters = filled[nearest]
    chosen, seeds_per_cluster = np.unique(seed_clusters, return_counts=True)
    order = np.argsort(assignment, kind="stable")  # pool ids grouped by cluster, one sort for all clusters
    starts = np.searchsorted(assignment[order], chosen, side="left")
    ends = np.searchsorted(assignment[order], chosen, side="right")
    drawn = {}
    for cluster, count, start, end in zip(chosen.tolist(), seeds_per_cluster.tolist(), starts, ends, strict=True):
        members = order[start:end]
        take = min(count * per_seed, len(members))
        drawn[cluster] = np.sort(rng.choice(members, size=take, replace=False))
    return seed_clusters, drawn


def count_per_seed(per_seed) -> int:
    """per_seed as an int, or a DinokitError if it is not a whole number >= 1 (2.5 was a TypeError)."""
    try:
        return whole_number(per_seed, "per_seed", low=1)
    except DinokitError:
        raise DinokitError(
            f"per_seed must be a positive number of pool images per seed image (a whole number), got {per_seed!r}"
        ) from None
