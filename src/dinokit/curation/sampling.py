"""Balanced hierarchical sampling from a hierarchical k-means (Vo et al. 2024, ssl-data-curation).

`hierarchical_sampling` picks target_size data points so that the top-level clusters are represented as
evenly as their sizes allow, and recursively the sub-clusters within each of them:

- the size of a cluster is the number of DATA POINTS under it (at every level);
- water-filling (`balanced_quotas`): a budget T over clusters of sizes s_i gets the quotas min(t, s_i)
  with t the largest integer such that sum_i min(t, s_i) <= T; the remainder T - sum_i min(t, s_i)
  (fewer than the number of clusters with s_i > t) goes as +1 to that many of those clusters, chosen
  at random. Small clusters are taken whole, big ones are cut to the same size t or t + 1;
- the top level's clusters share target_size; a cluster of level l >= 2 with quota q shares q among its
  child clusters (the level l-1 clusters assigned to it) by the same rule, down to level 1;
- a level-1 cluster with quota q gives q of its data points: the q closest to its centroid (strategy
  "closest") or q of them at random (strategy "random").
"""

import numpy as np

from dinokit.curation.kmeans import Level
from dinokit.curation.vectors import whole_number
from dinokit.errors import require

STRATEGIES = ("random", "closest")


def balanced_quotas(sizes, target: int, rng: np.random.Generator) -> np.ndarray:
    """Water-filling quotas (len(sizes),) int64 for sizes (n,) of non-negative ints: quotas sum to target and
    never exceed sizes (see the module docstring). rng draws which clusters get the remainder."""
    sizes = np.asarray(sizes, dtype=np.int64)
    target = whole_number(target, "target")
    total = int(sizes.sum())
    require(
        [
            (sizes.ndim == 1 and (sizes >= 0).all(), "sizes must be a 1-D array of non-negative counts"),
            (0 <= target <= total, f"cannot take {target} items from clusters holding {total}: ask for 0 to {total}"),
        ]
    )
    low, high = 0, int(sizes.max(initial=0))  # invariant: sum(min(low, sizes)) <= target
    while low < high:
        middle = (low + high + 1) // 2
        if np.minimum(sizes, middle).sum() <= target:
            low = middle
        else:
            high = middle - 1
    quotas = np.minimum(sizes, low)
    remainder = target - int(quotas.sum())
    if remainder:
        quotas[rng.choice(np.flatnonzero(sizes > low), remainder, replace=False)] += 1
    return quotas


def cluster_sizes(levels: list[Level]) -> list[np.ndarray]:
    """Per level, the number of data points under each of its clusters: (k_l,) int64 arrays."""
    sizes = [np.bincount(levels[0].assignment, minlength=len(levels[0].centroids))]
    for level in levels[1:]:
        sizes.append(np.bincount(level.assignment, weights=sizes[-1], minlength=len(level.centroids)).astype(np.int64))
    return sizes


def hierarchical_sampling(levels: list[Level], target_size: int, strategy: str = "random", seed: int = 0) -> np.ndarray:
    """Balanced sample of target_size data points from `hierarchical_kmeans` levels (see the module docstring):
    their indices (target_size,) int64, ascending, no repeats. The first draw of the generator
    np.random.default_rng(seed) is the top level's `balanced_quotas`; same inputs and seed, same sample."""
    require([(len(levels) >= 1, "levels must hold at least one level of hierarchical_kmeans")])
    for number in range(1, len(levels)):
        below, above = len(levels[number - 1].centroids), len(levels[number].assignment)
        require(
            [
                (
                    below == above,
                    f"level {number + 1} assigns {above} items but level {number} has {below} clusters: "
                    "pass the levels of one hierarchical_kmeans run, in order",
                )
            ]
        )
    n_points = len(levels[0].assignment)
    target_size = whole_number(target_size, "target_size")
    require(
        [
            (strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}"),
            (
                1 <= target_size <= n_points,
                f"target_size must be between 1 and {n_points} (the number of data points), got {target_size}",
            ),
        ]
    )
    rng = np.random.default_rng(seed)
    sizes = cluster_sizes(levels)
    quotas = balanced_quotas(sizes[-1], target_size, rng)
    for number in range(len(levels) - 1, 0, -1):  # share each cluster's quota among its child clusters
        children = levels[number].members()
        child_quotas = np.zeros(len(levels[number - 1].centroids), dtype=np.int64)
        for cluster in np.flatnonzero(quotas):
            members = children[cluster]
            child_quotas[members] = balanced_quotas(sizes[number - 1][members], quotas[cluster], rng)
        quotas = child_quotas
    members = levels[0].members()
    selected = []
    for cluster in np.flatnonzero(quotas):
        if strategy == "closest":
            selected.append(members[cluster][: quotas[cluster]])
        else:
            selected.append(rng.choice(members[cluster], quotas[cluster], replace=False))
    return np.sort(np.concatenate(selected)).astype(np.int64)
