"""k-means and hierarchical k-means with resampling: the clustering step of data curation.

Hierarchical k-means with resampling is Vo et al. 2024, "Automatic data curation for self-supervised
learning" (ssl-data-curation, the curation of DINOv3's data), not the DINOv2 paper, whose pool is
clustered by one plain k-means (for retrieval around seeds, `dinokit curate retrieve clusters=`).
It follows ssl-data-curation.

`kmeans` clusters the rows of x with L2 distance: k-means++ (or random) initialisation, then Lloyd
iterations and nearest-centroid assignment, all in torch on `device` (a GPU for the paper's scale: a
million images into 100,000 clusters), in full float32 (TF32 off). A cluster left empty takes half of
a big one, as in faiss. Vectors are processed as float32; they do not need to be normalised.

`hierarchical_kmeans` builds a hierarchy of levels. Level 1 clusters the data points, level l clusters
the centroids of level l-1. At every level, after the first k-means, the resampling loop runs
n_resamples times:

1. from every cluster take sample_size of its items: the ones closest to its centroid (strategy
   "closest") or a random subset (strategy "random"); a cluster smaller than sample_size gives all;
2. run a fresh k-means (same init method, new seed) with the same k on that sample only;
3. reassign every item of the level to its nearest new centroid.

Every cluster gives about as many points to the sample, however many it has, so dense regions stop
hoarding centroids and the centroids move towards a uniform coverage of the concepts in the data
(sample_size of about half the average cluster size works). A level whose sample_size is 1 is not
resampled, as in ssl-data-curation (its production config asks for 1 resampling with sample_size 1 at
level 1, which it skips): a k-means on one member per cluster would only move each centroid onto its
closest member, and cost a k-means and an assignment of the whole level. Like the reference, step 2
starts from a fresh initialisation on the sample, not from the current centroids: a Lloyd run started
from them stays in the same local optimum and would not move centroids out of a dense region.
"""

from dataclasses import dataclass

import numpy as np
import torch

from dinokit.curation.vectors import on_device, whole_number
from dinokit.errors import DinokitError, require
from dinokit.runtime import exact_float32_products, resolve_device

INITS = ("kmeans++", "random")
STRATEGIES = ("closest", "random")


def as_vectors(x, name: str = "x") -> np.ndarray:
    """x (N, D) as a C-contiguous float32 array, after checking it has rows, a dimension and only finite
    values small enough for float32 squared distances (an overflow would make every distance inf)."""
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


def nearest_centroid(x, centroids, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """For x (N, D) and centroids (k, D): (assignment (N,) int64 index of the nearest centroid by L2,
    distances (N,) float32 squared L2 distance to it, computed exactly as sum((x - c)^2)), on `device`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    dev = resolve_device(device)
    with exact_float32_products():
        assignment, distances = _nearest(on_device(x, dev), on_device(centroids, dev))
    return assignment.cpu().numpy(), distances.cpu().numpy()


def _nearest(
    x: torch.Tensor, centroids: torch.Tensor, distances: bool = True, centre: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(assignment (N,) int64, squared distances (N,) float32 or None) of x (N, D) to centroids (k, D).
    The nearest centroid minimises ||c||^2 - 2 x.c about the centroids' mean (centre=True): expanded
    about the origin, the float32 cancellation far from it (~1e-7 ||x||^2) would pick wrong centroids;
    centre=False where x is known to be near the origin (the Lloyd iterations on shifted data). Rows go
    in chunks of at most 2^26 products (256 MB)."""
    shift = centroids.double().mean(dim=0).float() if centre else None
    c = centroids - shift if centre else centroids
    c_squared = (c * c).sum(dim=1)
    assignment = torch.empty(len(x), dtype=torch.long, device=x.device)
    squared = torch.empty(len(x), device=x.device) if distances else None
    step = max(1, 2**26 // len(c))
    for start in range(0, len(x), step):
        rows = x[start : start + step]
        best = torch.addmm(c_squared, rows - shift if centre else rows, c.T, alpha=-2).argmin(dim=1)
        assignment[start : start + step] = best
        if distances:
            diff = rows - centroids[best]
            squared[start : start + step] = (diff * diff).sum(dim=1)
    return assignment, squared


def _far_from_origin(x: torch.Tensor) -> torch.Tensor | None:
    """x's mean row (float32) when x lies far from the origin relative to its spread (||mean||^2 > 100 times
    the mean ||x - mean||^2), where the float32 distance expansion would lose the spread; else None."""
    mean = x.double().mean(dim=0)
    spread = sum(float(((x[s : s + 16384].double() - mean) ** 2).sum()) for s in range(0, len(x), 16384))
    return mean.float() if float(mean @ mean) > 100 * spread / len(x) else None


def kmeans_plus_plus(x, k: int, rng: np.random.Generator, device: str | torch.device = "cpu") -> np.ndarray:
    """k initial centroids (k, D) by D^2 sampling: k distinct rows of x (N, D), the first uniform, each next
    one drawn with probability proportional to its squared distance to the nearest row already chosen.
    The distance array is updated once per chosen row: O(N k D) in all, on `device`. When every
    remaining row duplicates a chosen one (all distances 0), the next row is drawn uniformly among the
    unchosen. Distances are expanded about the mean row, not the origin, so that data far from the
    origin keeps its small distances (the plain expansion cancels to float32 errors of ~1e-7 ||x||^2)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    require([(1 <= k <= len(x), f"kmeans++ needs 1 <= k <= {len(x)} (the number of rows), got k = {k}")])
    dev = resolve_device(device)
    with exact_float32_products():
        indices = _kmeans_plus_plus(on_device(x, dev), k, rng)
    return x[indices].copy()


def _kmeans_plus_plus(x: torch.Tensor, k: int, rng: np.random.Generator) -> list[int]:
    """The row indices `kmeans_plus_plus` picks; draws come from rng (the same as rng.choice(n, p=...))."""
    n = len(x)
    mean = x.double().mean(dim=0)
    squared_norms = torch.cat([((x[s : s + 16384].double() - mean) ** 2).sum(dim=1) for s in range(0, n, 16384)])
    # (D, N), a copy of x: c @ columns took 3.3 ms where x @ c took 7.8 at 50,000 x 384 on this 2-core CPU
    # (a throwaway probe; numpy's x @ c 4.1 ms), the step repeated k times
    columns = x.T.contiguous()
    chosen = torch.zeros(n, dtype=torch.bool, device=x.device)
    indices = [int(rng.integers(n))]
    nearest = torch.full((n,), torch.inf, dtype=torch.float64, device=x.device)
    for _ in range(1, k):
        c = x[indices[-1]].double() - mean
        # ||(x - mean) - c||^2 expanded, so that each step is one float32 matrix-vector product; scalars stay
        # tensors, so that a step waits for the device once (its draw)
        products = (c.float() @ columns).double() - mean @ c
        to_last = (squared_norms - 2.0 * products + c @ c).clamp_(min=0.0)
        torch.minimum(nearest, to_last, out=nearest)
        chosen[indices[-1]] = True
        nearest.masked_fill_(chosen, 0.0)  # rounding in the expansion must not let a chosen row be drawn again
        cumulative = nearest.cumsum(dim=0)
        # as numpy's choice(n, p=nearest / total): the first row whose cumulative weight exceeds a uniform share
        drawn = int(torch.searchsorted(cumulative, cumulative[-1:] * rng.random(), right=True))
        if drawn >= n and float(cumulative[-1]) > 0:  # a share rounded up to the total: the last weighted row
            drawn = int(torch.nonzero(nearest)[-1])
        elif drawn >= n:  # every row left duplicates a chosen one (all weights 0): a uniform draw among them
            drawn = int(rng.choice(torch.nonzero(~chosen)[:, 0].cpu().numpy()))
        indices.append(drawn)
    return indices


def kmeans(
    x: np.ndarray,
    k: int,
    iterations: int = 50,
    init: str = "kmeans++",
    seed: int = 0,
    init_centroids: np.ndarray | None = None,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """k-means with L2 distance on x (N, D): (centroids (k, D) float32, assignment (N,) int64 of every row
    to its nearest centroid). init is "kmeans++" (D^2 sampling, `kmeans_plus_plus`) or "random" (k distinct
    random rows); init_centroids (k, D), when given, replaces it. Then up to `iterations` Lloyd iterations on
    all N rows (no subsampling; they stop early at a fixed point, where an iteration leaves every row in
    its cluster), shifted by their mean if they lie far from the origin; a cluster left empty
    takes half of a big one, as faiss does (`_split_big_clusters`). All on `device` (x is copied there).
    Same inputs and seed give the same result on a device."""
    x = as_vectors(x)
    dev = resolve_device(device)
    with exact_float32_products():
        rows = on_device(x, dev)
        start = None if init_centroids is None else on_device(as_vectors(init_centroids, "init_centroids"), dev)
        centroids = _fit(rows, k, iterations, init, seed, start)
        assignment, _ = _nearest(rows, centroids, distances=False)
    return centroids.cpu().numpy(), assignment.cpu().numpy()


def _fit(
    x: torch.Tensor, k: int, iterations: int, init: str, seed: int, init_centroids: torch.Tensor | None = None
) -> torch.Tensor:
    """The centroids (k, D) of `kmeans` on x (checked by as_vectors, on its device), without the final
    assignment of x."""
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
        shape = tuple(init_centroids.shape)
        require([(shape == (k, d), f"init_centroids must have shape ({k}, {d}), got {shape}")])
        start = init_centroids
    elif init == "kmeans++":
        start = x[_kmeans_plus_plus(x, k, rng)]
    else:
        start = x[torch.from_numpy(np.sort(rng.choice(n, k, replace=False))).to(x.device)]
    split_rng = np.random.default_rng(int(rng.integers(2**31 - 1)))
    shift = _far_from_origin(x)  # Lloyd iterations on x - shift when x is far from the origin (a copy of x)
    if shift is not None:
        x, start = x - shift, start - shift
    centroids = start.clone()
    means_of = None  # the assignment whose cluster means the centroids are (None: a start or a split)
    for _ in range(iterations):  # x is near the origin (shifted if it was not): no centring in _nearest
        assignment, _ = _nearest(x, centroids, distances=False, centre=False)
        if means_of is not None and torch.equal(assignment, means_of):
            break  # a fixed point: every further iteration would give these centroids again
        counts = torch.bincount(assignment, minlength=k)
        sums = torch.zeros(k, d, device=x.device).index_add_(0, assignment, x)  # float32 sums, as faiss
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        means_of = assignment
        if not bool(filled.all()):
            _split_big_clusters(centroids, counts.cpu().numpy(), split_rng)
            means_of = None
    return centroids if shift is None else centroids + shift


def _split_big_clusters(centroids: torch.Tensor, counts: np.ndarray, rng: np.random.Generator) -> None:
    """faiss's rule for empty clusters, in place: each empty cluster takes the centroid of a cluster drawn
    with probability proportional to (its size - 1), and the two move apart by a factor 1 +- 1/1024 in
    alternating coordinates; each is counted with half the items for the next draws."""
    sign = torch.ones(centroids.shape[1], device=centroids.device)
    sign[1::2] = -1
    counts = counts.astype(np.float64)
    for empty in np.flatnonzero(counts == 0):
        weights = np.maximum(counts - 1, 0)
        if weights.sum() <= 0:  # every cluster holds at most one item: nothing to split
            return
        big = int(rng.choice(len(counts), p=weights / weights.sum()))
        centroids[empty] = centroids[big] * (1 + sign / 1024)
        centroids[big] *= 1 - sign / 1024
        counts[empty] = counts[big] / 2
        counts[big] -= counts[empty]


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
    n_clusters: list[int] | int,
    n_resamples: list[int] | int = 0,
    sample_size: list[int] | int = 1,
    strategy: str = "closest",
    iterations: int = 50,
    seed: int = 0,
    init: str = "kmeans++",
    device: str | torch.device = "cpu",
) -> list[Level]:
    """Hierarchical k-means with resampling (see the module docstring) of x (N, D). n_clusters gives k per
    level (an int: one level); n_resamples and sample_size are one int for all levels or one value per
    level; init ("kmeans++" or "random") starts every k-means run, the first and the resampled ones. Returns one
    Level per entry of n_clusters: level 1's assignment has length N, level l's has length
    n_clusters[l-2] (it assigns the clusters of level l-1). Every k-means and assignment runs on `device`
    (x is copied there). Same inputs and seed give the same levels on a device."""
    x = as_vectors(x)
    dev = resolve_device(device)
    n_clusters = [n_clusters] if isinstance(n_clusters, int | np.integer) else n_clusters  # one level
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
    with exact_float32_products():
        items = on_device(x, dev)
        for level, k in enumerate(n_clusters):
            # _fit, not kmeans: the assignment is made once below (at N = 1M, k = 100k one is the cost of an iteration)
            centroids = _fit(items, k, iterations, init, seed=int(rng.integers(2**31 - 1)))
            assignment, distances = (t.cpu().numpy() for t in _nearest(items, centroids))
            for _ in range(n_resamples[level] if sample_size[level] > 1 else 0):  # as the reference
                clusters = Level(centroids.cpu().numpy(), assignment, distances).members()
                if strategy == "closest":
                    sample = [members[: sample_size[level]] for members in clusters]
                else:
                    sample = [rng.choice(m, min(len(m), sample_size[level]), replace=False) for m in clusters]
                sample = np.sort(np.concatenate(sample))
                if len(sample) < k:  # empty clusters (e.g. duplicate items): top up with random other items
                    others = np.setdiff1d(np.arange(len(items)), sample)
                    sample = np.sort(np.concatenate([sample, rng.choice(others, k - len(sample), replace=False)]))
                subset = items[torch.from_numpy(sample).to(dev)]
                centroids = _fit(subset, k, iterations, init, seed=int(rng.integers(2**31 - 1)))
                assignment, distances = (t.cpu().numpy() for t in _nearest(items, centroids))
            levels.append(Level(centroids.cpu().numpy(), assignment, distances))
            items = centroids
    return levels
