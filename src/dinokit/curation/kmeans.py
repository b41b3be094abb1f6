"""k-means and hierarchical k-means with resampling: the clustering step of data curation.

Hierarchical k-means with resampling is Vo et al. 2024, "Automatic data curation for self-supervised
learning" (ssl-data-curation, the curation of DINOv3's data), not the DINOv2 paper, whose pool is
clustered by one plain k-means (for retrieval around seeds, `dinokit curate retrieve clusters=`).
It follows ssl-data-curation.

`kmeans` clusters the rows of x with L2 distance: k-means++ (or random) initialisation computed here,
then Lloyd iterations and nearest-centroid assignment in faiss (which also re-seeds empty clusters by
splitting big ones). Vectors are processed as float32; they do not need to be normalised.

`hierarchical_kmeans` builds a hierarchy of levels. Level 1 clusters the data points, level l clusters
the centroids of level l-1. At every level, after the first k-means, the resampling loop runs
n_resamples times:

1. from every cluster take sample_size of its items: the ones closest to its centroid (strategy
   "closest") or a random subset (strategy "random"); a cluster smaller than sample_size gives all;
2. run a fresh k-means (same init method, new seed) with the same k on that sample only;
3. reassign every item of the level to its nearest new centroid.

Every cluster gives about as many points to the sample, however many it has, so dense regions stop
hoarding centroids and the centroids move towards a uniform coverage of the concepts in the data
(sample_size of about half the average cluster size works; sample_size 1 only snaps each centroid
to its closest member). Like the reference, step 2 starts from a fresh initialisation on the sample,
not from the current centroids: a Lloyd run started from them stays in the same local optimum and
would not move centroids out of a dense region.
"""

from dataclasses import dataclass

import faiss
import numpy as np

from dinokit.curation.vectors import whole_number
from dinokit.errors import DinokitError, require

INITS = ("kmeans++", "random")
STRATEGIES = ("closest", "random")


def as_vectors(x, name: str = "x") -> np.ndarray:
    """x (N, D) as a C-contiguous float32 array, after checking it has rows, a dimension and only finite
    values small enough for float32 squared distances (faiss aborts the process on D = 0 or on overflow)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    require(
        [
            (
                x.ndim == 2 and len(x) > 0 and x.shape[1] > 0,
                f"{name} must be a non-empty (N, D) array of vectors, got shape {x.shape}",
            )
        ]
    )
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if len(bad):
        raise DinokitError(
            f"{name} has {len(bad)} rows with NaN or inf values (first: row {bad[0]}): "
            "drop or recompute those embeddings before clustering"
        )
    # a squared distance between two rows (or a row and a mean of rows) is at most 4 max ||x||^2
    bad = np.flatnonzero(np.einsum("ij,ij->i", x, x, dtype=np.float64) > np.finfo(np.float32).max / 4)
    if len(bad):
        raise DinokitError(
            f"{name} has {len(bad)} rows too large for float32 distances (first: row {bad[0]}, norm "
            f"{np.linalg.norm(x[bad[0]].astype(np.float64)):.3g}): L2-normalise or rescale the vectors"
        )
    return x


def nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For x (N, D) and centroids (k, D): (assignment (N,) int64 index of the nearest centroid by L2,
    distances (N,) float32 squared L2 distance to it, computed exactly as sum((x - c)^2)). Both are
    shifted by the centroids' mean first: faiss computes ||x||^2 + ||c||^2 - 2 x.c, whose float32
    cancellation far from the origin (~1e-7 ||x||^2) would otherwise pick wrong centroids."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    shift = centroids.mean(axis=0, dtype=np.float64).astype(np.float32)
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids - shift)
    assignment = np.empty(len(x), dtype=np.int64)
    distances = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), 65536):  # chunks bound the (chunk, D) shifted and difference arrays
        rows = slice(start, start + 65536)
        assignment[rows] = index.search(x[rows] - shift, 1)[1][:, 0]
        diff = x[rows] - centroids[assignment[rows]]
        distances[rows] = np.einsum("ij,ij->i", diff, diff)
    return assignment, distances


def _offset(x: np.ndarray) -> np.ndarray | None:
    """x's mean row (float32) when x lies far from the origin relative to its spread (||mean||^2 > 100 times
    the mean ||x - mean||^2), where faiss's float32 distance expansion would lose the spread; else None."""
    mean = x.mean(axis=0, dtype=np.float64)
    spread = 0.0
    for start in range(0, len(x), 16384):  # chunks bound the float64 copy
        centred = x[start : start + 16384] - mean
        spread += float(np.einsum("ij,ij->", centred, centred))
    return mean.astype(np.float32) if float(mean @ mean) > 100 * spread / len(x) else None


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k initial centroids (k, D) by D^2 sampling: k distinct rows of x (N, D), the first uniform, each next
    one drawn with probability proportional to its squared distance to the nearest row already chosen.
    The distance array is updated once per chosen row: O(N k D) in all. When every remaining row
    duplicates a chosen one (all distances 0), the next row is drawn uniformly among the unchosen.
    Distances are expanded about the mean row, not the origin, so that data far from the origin keeps
    its small distances (the plain expansion cancels to float32 errors of ~1e-7 ||x||^2)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    require([(1 <= k <= n, f"kmeans++ needs 1 <= k <= {n} (the number of rows), got k = {k}")])
    mean = x.mean(axis=0, dtype=np.float64)
    squared_norms = np.empty(n)  # ||x - mean||^2, in chunks that bound the float64 copy
    for start in range(0, n, 16384):
        centred = x[start : start + 16384] - mean
        squared_norms[start : start + 16384] = np.einsum("ij,ij->i", centred, centred)
    chosen = np.zeros(n, dtype=bool)
    indices = [int(rng.integers(n))]
    nearest = np.full(n, np.inf)
    for _ in range(1, k):
        c = x[indices[-1]] - mean
        # ||(x - mean) - c||^2 expanded, so that each step is one float32 matrix-vector product
        products = (x @ c.astype(np.float32)).astype(np.float64) - float(mean @ c)
        to_last = squared_norms - 2.0 * products + float(c @ c)
        nearest = np.minimum(nearest, np.maximum(to_last, 0.0))
        chosen[indices[-1]] = True
        nearest[chosen] = 0.0  # rounding in the expansion must not let a chosen row be drawn again
        total = nearest.sum()
        if total > 0:
            indices.append(int(rng.choice(n, p=nearest / total)))
        else:
            indices.append(int(rng.choice(np.flatnonzero(~chosen))))
    return x[indices].copy()


def kmeans(
    x: np.ndarray,
    k: int,
    iterations: int = 50,
    init: str = "kmeans++",
    seed: int = 0,
    init_centroids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k-means with L2 distance on x (N, D): (centroids (k, D) float32, assignment (N,) int64 of every row
    to its nearest centroid). init is "kmeans++" (D^2 sampling, `kmeans_plus_plus`) or "random" (k distinct
    random rows); init_centroids (k, D), when given, replaces it. Then `iterations` Lloyd iterations in faiss,
    on all N rows (no subsampling), shifted by their mean if they lie far from the origin (a copy of x; see
    `nearest_centroid`). Same inputs and seed give the same result."""
    x = as_vectors(x)
    centroids = _fit(x, k, iterations, init, seed, init_centroids)
    assignment, _ = nearest_centroid(x, centroids)
    return centroids, assignment


def _fit(x: np.ndarray, k: int, iterations: int, init: str, seed: int, init_centroids=None) -> np.ndarray:
    """The centroids of `kmeans` on x (checked by as_vectors), without the final assignment of x."""
    n, d = x.shape
    require(
        [
            (1 <= k <= n, f"k-means on {n} vectors needs 1 <= k <= {n}, got k = {k}"),
            (iterations >= 1, f"iterations must be >= 1, got {iterations}"),
            (init in INITS, f"init must be one of {', '.join(INITS)}, got {init!r}"),
        ]
    )
    rng = np.random.default_rng(seed)
    if init_centroids is not None:
        start = as_vectors(init_centroids, "init_centroids")
        require([(start.shape == (k, d), f"init_centroids must have shape ({k}, {d}), got {start.shape}")])
    elif init == "kmeans++":
        start = kmeans_plus_plus(x, k, rng)
    else:
        start = x[np.sort(rng.choice(n, k, replace=False))].copy()
    # min/max_points_per_centroid: no "please provide at least 39 points per centroid" warning on small
    # inputs, and no subsampling to 256 points per centroid on large ones
    km = faiss.Kmeans(
        d,
        int(k),
        niter=int(iterations),
        seed=int(rng.integers(2**31 - 1)),
        spherical=False,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=n,
    )
    shift = _offset(x)  # Lloyd iterations on x - shift when x is far from the origin (a copy of x)
    if shift is None:
        km.train(x, init_centroids=start)
        centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    else:
        km.train(x - shift, init_centroids=start - shift)
        centroids = np.ascontiguousarray(km.centroids + shift, dtype=np.float32)
    return centroids


@dataclass
class Level:
    """One level of a hierarchical k-means. Its items are the data points at level 1, and the clusters
    (centroids) of level l-1 at level l.

    centroids: (k_l, D) float32; assignment: (n_items,) int64, the cluster of each item;
    distances: (n_items,) float32, the squared L2 distance of each item to its cluster's centroid."""

    centroids: np.ndarray
    assignment: np.ndarray
    distances: np.ndarray

    def members(self) -> list[np.ndarray]:
        """Per cluster (k_l of them), the indices of its items sorted by distance to the centroid,
        closest first (ties by index); empty arrays for empty clusters."""
        order = np.lexsort((np.arange(len(self.assignment)), self.distances, self.assignment))
        counts = np.bincount(self.assignment, minlength=len(self.centroids))
        return np.split(order, np.cumsum(counts)[:-1])


def per_level(value, n_levels: int, name: str) -> list[int]:
    """An int applies to every level; a list must give one value per level."""
    if isinstance(value, (int, np.integer)):
        return [whole_number(value, name)] * n_levels
    value = list(value)
    require(
        [
            (
                len(value) == n_levels,
                f"{name} has {len(value)} values but n_clusters has {n_levels} levels: give one value per level, "
                f"or a single int for all levels",
            )
        ]
    )
    return [whole_number(v, f"{name}[{i}]") for i, v in enumerate(value)]


def hierarchical_kmeans(
    x: np.ndarray,
    n_clusters: list[int],
    n_resamples: list[int] | int = 0,
    sample_size: list[int] | int = 1,
    strategy: str = "closest",
    iterations: int = 50,
    seed: int = 0,
    init: str = "kmeans++",
) -> list[Level]:
    """Hierarchical k-means with resampling (see the module docstring) of x (N, D). n_clusters gives k per
    level; n_resamples and sample_size are one int for all levels or one value per level; init ("kmeans++"
    or "random") starts every k-means run, the first and the resampled ones. Returns one
    Level per entry of n_clusters: level 1's assignment has length N, level l's has length
    n_clusters[l-2] (it assigns the clusters of level l-1). Same inputs and seed give the same levels."""
    x = as_vectors(x)
    n_clusters = [whole_number(k, f"n_clusters[{i}]", low=1) for i, k in enumerate(n_clusters)]
    require([(len(n_clusters) >= 1, "n_clusters must list at least one level, e.g. [100, 10]")])
    n_resamples = per_level(n_resamples, len(n_clusters), "n_resamples")
    sample_size = per_level(sample_size, len(n_clusters), "sample_size")
    checks = [(strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")]
    checks.append((init in INITS, f"init must be one of {', '.join(INITS)}, got {init!r}"))
    checks.append((iterations >= 1, f"iterations must be >= 1, got {iterations}"))
    n_items = len(x)
    for level, k in enumerate(n_clusters, start=1):
        items = "data points" if level == 1 else f"items (the level-{level - 1} clusters)"
        checks.append(
            (
                1 <= k <= n_items,
                f"level {level} has {n_items} {items} but n_clusters[{level - 1}] = {k}: ask for at least 1 and at "
                f"most {n_items} (each level clusters the centroids of the level below, so n_clusters may not grow)",
            )
        )
        checks.append(
            (n_resamples[level - 1] >= 0, f"n_resamples[{level - 1}] must be >= 0, got {n_resamples[level - 1]}")
        )
        checks.append(
            (sample_size[level - 1] >= 1, f"sample_size[{level - 1}] must be >= 1, got {sample_size[level - 1]}")
        )
        n_items = k
    require(checks)

    rng = np.random.default_rng(seed)
    levels = []
    items = x
    for level, k in enumerate(n_clusters):
        # _fit, not kmeans: the assignment is made once below (at N = 1M, k = 100k one costs ~10 min)
        centroids = _fit(items, k, iterations, init, seed=int(rng.integers(2**31 - 1)))
        assignment, distances = nearest_centroid(items, centroids)
        for _ in range(n_resamples[level]):
            clusters = Level(centroids, assignment, distances).members()
            if strategy == "closest":
                sample = [members[: sample_size[level]] for members in clusters]
            else:
                sample = [rng.choice(m, min(len(m), sample_size[level]), replace=False) for m in clusters]
            sample = np.sort(np.concatenate(sample))
            if len(sample) < k:  # empty clusters (e.g. duplicate items): top up with random other items
                others = np.setdiff1d(np.arange(len(items)), sample)
                sample = np.sort(np.concatenate([sample, rng.choice(others, k - len(sample), replace=False)]))
            centroids = _fit(items[sample], k, iterations, init, seed=int(rng.integers(2**31 - 1)))
            assignment, distances = nearest_centroid(items, centroids)
        levels.append(Level(centroids, assignment, distances))
        items = centroids
    return levels
