import numpy as np
import pytest

from dinokit.curation.kmeans import Level, hierarchical_kmeans, kmeans, kmeans_plus_plus, nearest_centroid
from dinokit.curation.sampling import balanced_quotas, cluster_sizes, hierarchical_sampling
from dinokit.errors import DinokitError


def blobs(sizes, spread, distance=10.0, dim=8, seed=0):
    """Gaussian blobs: blob 0 at the origin, the others at random directions `distance` away.
    Returns x (N, dim) float32, the blob of each row, and the blob centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim))
    centres *= distance / np.linalg.norm(centres, axis=1, keepdims=True)
    centres[0] = 0
    labels = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[labels] + rng.normal(size=(len(labels), dim)) * np.asarray(spread)[labels][:, None]
    return x.astype(np.float32), labels, centres


def imbalanced(seed):
    """One dense blob of 2000 points (std 1) and 9 small ones of 20 points (std 0.3), 10 apart, in 8-D."""
    return blobs([2000] + [20] * 9, [1.0] + [0.3] * 9, seed=seed)


def same_partition(a, b):
    """Whether two labelings split the rows the same way, up to renaming the labels."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# balanced_quotas


def test_balanced_quotas_hand_computed():
    rng = np.random.default_rng(0)
    assert balanced_quotas([10, 3, 1], 9, rng).tolist() == [5, 3, 1]  # t = 5: 5 + 3 + 1 = 9
    assert balanced_quotas([10, 3, 1], 14, rng).tolist() == [10, 3, 1]  # everything
    assert balanced_quotas([10, 3, 1], 0, rng).tolist() == [0, 0, 0]
    # t = 3 gives 7, t = 4 would give 9 > 8: the remainder 1 goes to one of the two clusters bigger than 3
    results = {tuple(balanced_quotas([10, 10, 1], 8, np.random.default_rng(seed)).tolist()) for seed in range(20)}
    assert results == {(4, 3, 1), (3, 4, 1)}


def test_balanced_quotas_properties_on_random_sizes():
    rng = np.random.default_rng(1)
    for _ in range(200):
        sizes = rng.integers(0, 50, rng.integers(1, 12))
        target = int(rng.integers(0, sizes.sum() + 1))
        quotas = balanced_quotas(sizes, target, rng)
        assert quotas.dtype == np.int64 and quotas.sum() == target and (quotas <= sizes).all()
        # water-filling: clusters not taken whole all get the same quota, t or t + 1, and no less than a whole one
        cut = quotas[quotas < sizes]
        if len(cut):
            assert cut.max() - cut.min() <= 1 and (quotas[quotas == sizes] <= cut.min() + 1).all()


def test_balanced_quotas_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(DinokitError, match="cannot take 15 items from clusters holding 14: ask for 0 to 14"):
        balanced_quotas([10, 3, 1], 15, rng)
    with pytest.raises(DinokitError, match="non-negative"):
        balanced_quotas([3, -1], 1, rng)
    with pytest.raises(DinokitError, match=r"target must be a whole number >= 0, got 2\.5"):
        balanced_quotas([3, 1], 2.5, rng)  # not truncated to 2


# kmeans


def test_kmeans_recovers_separated_blobs_and_is_deterministic():
    x, labels, _ = blobs([60, 40, 80, 30, 50], [0.5] * 5, distance=30.0, seed=3)
    centroids, assignment = kmeans(x, 5, seed=0)
    assert centroids.shape == (5, 8) and centroids.dtype == np.float32
    assert assignment.shape == (len(x),) and assignment.dtype == np.int64
    assert same_partition(assignment, labels)
    again = kmeans(x, 5, seed=0)
    assert np.array_equal(again[0], centroids) and np.array_equal(again[1], assignment)
    assert np.array_equal(kmeans(x, 5, init="random", seed=1)[0], kmeans(x, 5, init="random", seed=1)[0])
    # started from one row of each blob, the Lloyd iterations end at the blob means
    start = x[[0, 60, 100, 180, 210]]
    centroids, assignment = kmeans(x, 5, init_centroids=start, iterations=5)
    assert np.array_equal(assignment, labels)
    assert np.allclose(centroids, [x[labels == b].mean(axis=0) for b in range(5)], atol=1e-4)


def test_kmeans_plus_plus_picks_distinct_rows():
    x, _, _ = blobs([30, 30, 30], [0.5] * 3, seed=0)
    x[:5] = x[0]  # duplicates of one row must not be picked twice once others are left
    for seed in range(5):
        start = kmeans_plus_plus(x, 20, np.random.default_rng(seed))
        rows = [np.flatnonzero((x == c).all(axis=1)) for c in start]
        assert all(len(r) for r in rows)  # each centroid is a row of x
        assert len(np.unique(start, axis=0)) == 20
    # only 2 distinct rows and k = 4: the last ones are drawn among the unchosen rows, still 4 indices
    tiny = np.array([[0, 0], [0, 0], [1, 1], [1, 1]], dtype=np.float32)
    assert kmeans_plus_plus(tiny, 4, np.random.default_rng(0)).shape == (4, 2)
    # D^2 sampling: after a point of one blob, the next one comes from the other, far blob
    two = np.concatenate([np.zeros((50, 2)), np.full((50, 2), 100.0)]).astype(np.float32)
    two += np.random.default_rng(0).normal(size=two.shape).astype(np.float32) * 0.01
    for seed in range(5):
        first, second = kmeans_plus_plus(two, 2, np.random.default_rng(seed))
        assert abs(first[0] - second[0]) > 50


def test_kmeans_plus_plus_is_not_blinded_by_data_far_from_the_origin():
    # 20 tight blobs (squared distances ~2 between, ~0.02 within) shifted 300 per coordinate (norm ~5,900):
    # ||x||^2 - 2 x.c + ||c||^2 in float32 cancels to errors of ~1, and the D^2 draws became nearly uniform
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 384)) * 0.05
    labels = rng.integers(0, 20, 2000)
    base = centres[labels] + rng.normal(size=(2000, 384)) * 0.005
    for offset in (0.0, 300.0):
        x = (base + offset).astype(np.float32)
        covered = []
        for seed in range(5):
            start = kmeans_plus_plus(x, 20, np.random.default_rng(seed)).astype(np.float64)
            nearest_blob = ((start[:, None] - (centres + offset)[None]) ** 2).sum(-1).argmin(axis=1)
            covered.append(len(set(nearest_blob.tolist())))
        assert min(covered) >= 19, (offset, covered)  # uniform draws would cover about 13


def test_assignment_and_lloyd_iterations_are_exact_far_from_the_origin():
    # the same 20 tight blobs shifted 300 per coordinate: faiss's ||x||^2 + ||c||^2 - 2 x.c put 1,888 of 2,000
    # rows in the wrong cluster, even given the true centres
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 384)) * 0.05
    labels = rng.integers(0, 20, 2000)
    x = (centres[labels] + rng.normal(size=(2000, 384)) * 0.005 + 300).astype(np.float32)
    assignment, distances = nearest_centroid(x, (centres + 300).astype(np.float32))
    assert np.array_equal(assignment, labels)
    assert np.allclose(distances, ((x - (centres + 300)[labels]) ** 2).sum(1), rtol=1e-2)
    centroids, assignment = kmeans(x, 20, init_centroids=(centres + 300).astype(np.float32), iterations=5)
    assert np.array_equal(assignment, labels)
    assert np.abs(centroids - np.array([x[labels == b].mean(0) for b in range(20)])).max() < 1e-3
    assert same_partition(kmeans(x, 20, seed=2)[1], labels)  # as at offset 0 (seeds 0 and 1 merge two blobs there too)


def test_kmeans_errors():
    x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    with pytest.raises(DinokitError, match=r"k-means on 10 vectors needs 1 <= k <= 10, got k = 11"):
        kmeans(x, 11)
    with pytest.raises(DinokitError, match="needs 1 <= k <= 10, got k = 0"):
        kmeans(x, 0)
    with pytest.raises(DinokitError, match="init must be one of kmeans\\+\\+, random, got 'kmeans'"):
        kmeans(x, 2, init="kmeans")
    x[3, 1] = np.nan
    with pytest.raises(DinokitError, match="1 rows with NaN or inf values \\(first: row 3\\)"):
        kmeans(x, 2)
    with pytest.raises(DinokitError, match="init_centroids must have shape \\(2, 4\\)"):
        kmeans(np.ones((10, 4)), 2, init_centroids=np.zeros((3, 4)))


# hierarchical_kmeans


def check_level(level, n_items, k):
    assert level.centroids.shape[0] == k and level.assignment.shape == (n_items,)
    members = level.members()
    assert len(members) == k
    everything = np.concatenate(members)
    assert np.array_equal(np.sort(everything), np.arange(n_items))  # each item in exactly one cluster
    for cluster, items in enumerate(members):
        assert (level.assignment[items] == cluster).all()
        assert (np.diff(level.distances[items]) >= 0).all()  # closest first


def test_hierarchical_kmeans_levels():
    x, _, _ = blobs([100, 80, 60, 40, 20], [1.0] * 5, seed=2)
    levels = hierarchical_kmeans(x, [30, 8, 3], n_resamples=[2, 1, 0], sample_size=[4, 2, 1], seed=0)
    assert len(levels) == 3
    for level, n_items, k in zip(levels, [300, 30, 8], [30, 8, 3], strict=True):
        check_level(level, n_items, k)
    # level 2 clusters the centroids of level 1: its distances are to those
    diff = levels[0].centroids - levels[1].centroids[levels[1].assignment]
    assert np.allclose(levels[1].distances, (diff**2).sum(axis=1), rtol=1e-4, atol=1e-4)
    # each item is assigned to its nearest centroid
    distances = ((x[:, None] - levels[0].centroids[None]) ** 2).sum(-1)
    assert np.allclose(distances.min(axis=1), levels[0].distances, rtol=1e-4, atol=1e-4)
    again = hierarchical_kmeans(x, [30, 8, 3], n_resamples=[2, 1, 0], sample_size=[4, 2, 1], seed=0)
    for a, b in zip(levels, again, strict=True):
        assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.assignment, b.assignment)
    random_strategy = hierarchical_kmeans(x, [30, 8], n_resamples=2, sample_size=4, strategy="random", seed=0)
    check_level(random_strategy[1], 30, 8)
    # the strategy picks other resampled sets (4 random members, not the 4 closest): other centroids
    closest = hierarchical_kmeans(x, [30, 8], n_resamples=2, sample_size=4, strategy="closest", seed=0)
    assert not np.array_equal(random_strategy[0].centroids, closest[0].centroids)
    # init and iterations reach every k-means run: other starts, or fewer Lloyd steps, give other centroids
    for other in (dict(init="random"), dict(iterations=1)):
        changed = hierarchical_kmeans(x, [30, 8], n_resamples=2, sample_size=4, strategy="closest", seed=0, **other)
        assert not np.array_equal(changed[0].centroids, closest[0].centroids), other


def test_hierarchical_kmeans_assigns_each_level_once_per_k_means(monkeypatch):
    # one nearest-centroid pass over a level's items per k-means run (the first and each resample), not a
    # second one inside kmeans whose result was dropped: at N = 1M, k = 100k each pass is ~10 minutes
    import dinokit.curation.kmeans as kmeans_module

    calls = []
    original = kmeans_module._nearest

    def counting(x, centroids, distances=True, centre=True):
        if distances:  # the Lloyd iterations' own assignments need no distances
            calls.append(len(x))
        return original(x, centroids, distances, centre)

    monkeypatch.setattr(kmeans_module, "_nearest", counting)
    x, _, _ = blobs([100, 80, 60], [1.0] * 3, seed=2)
    levels = hierarchical_kmeans(x, [30, 8], n_resamples=[2, 1], sample_size=[4, 2], seed=0)
    assert calls == [240] * 3 + [30] * 2
    monkeypatch.undo()
    again = hierarchical_kmeans(x, [30, 8], n_resamples=[2, 1], sample_size=[4, 2], seed=0)
    for a, b in zip(levels, again, strict=True):
        assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.assignment, b.assignment)


def test_hierarchical_kmeans_with_fewer_distinct_items_than_clusters():
    # 3 distinct rows, k = 5: some clusters stay empty, and the resampled set is topped up to k items
    x = np.repeat(np.eye(3, 4, dtype=np.float32), [10, 6, 4], axis=0)
    levels = hierarchical_kmeans(x, [5, 2], n_resamples=2, sample_size=1, seed=0)
    check_level(levels[0], 20, 5)
    check_level(levels[1], 5, 2)
    assert np.allclose(levels[0].distances, 0, atol=1e-6)  # every row sits on a centroid


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resampling_moves_centroids_out_of_the_dense_blob(seed):
    x, _, centres = imbalanced(seed)

    def outcome(n_resamples):
        centroids = hierarchical_kmeans(x, [10], n_resamples=n_resamples, sample_size=10, seed=seed)[0].centroids
        nearest_blob = ((centroids[:, None] - centres[None]) ** 2).sum(-1).argmin(axis=1)
        return int((nearest_blob == 0).sum()), len(set(nearest_blob.tolist()))

    plain_dense, plain_covered = outcome(0)
    resampled_dense, resampled_covered = outcome(10)
    assert plain_dense >= 3  # plain k-means hoards centroids in the 2000-point blob (3 to 5 of 10 here)
    assert resampled_dense <= 2  # resampling (10 closest per cluster) spreads them over the small blobs
    assert resampled_covered > plain_covered


def test_hierarchical_kmeans_errors():
    x = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    with pytest.raises(DinokitError, match=r"level 2 has 50 items \(the level-1 clusters\) but n_clusters\[1\] = 80"):
        hierarchical_kmeans(x, [50, 80])
    with pytest.raises(DinokitError, match="level 1 has 100 data points but n_clusters\\[0\\] = 101: ask for at"):
        hierarchical_kmeans(x, [101])
    with pytest.raises(DinokitError, match="n_resamples has 1 values but n_clusters has 2 levels"):
        hierarchical_kmeans(x, [10, 2], n_resamples=[1])
    with pytest.raises(DinokitError, match="sample_size has 3 values but n_clusters has 2 levels"):
        hierarchical_kmeans(x, [10, 2], sample_size=[1, 2, 3])
    with pytest.raises(DinokitError, match="strategy must be one of closest, random, got 'nearest'"):
        hierarchical_kmeans(x, [10], strategy="nearest")
    with pytest.raises(DinokitError, match=r"n_clusters\[1\] must be a whole number >= 1, got 2\.5"):
        hierarchical_kmeans(x, [10, 2.5])  # not truncated to 2
    with pytest.raises(DinokitError, match=r"sample_size\[0\] must be a whole number >= 0, got True"):
        hierarchical_kmeans(x, [10], sample_size=[True])
    x[7] = np.inf
    with pytest.raises(DinokitError, match="row 7"):
        hierarchical_kmeans(x, [10])


# hierarchical_sampling


@pytest.fixture(scope="module")
def imbalanced_levels():
    x, labels, _ = imbalanced(0)
    return x, labels, hierarchical_kmeans(x, [40, 8], seed=0)


def test_hierarchical_sampling_quotas(imbalanced_levels):
    x, labels, levels = imbalanced_levels
    for strategy in ("random", "closest"):
        selected = hierarchical_sampling(levels, 300, strategy=strategy, seed=4)
        assert selected.dtype == np.int64 and len(selected) == 300
        assert len(np.unique(selected)) == 300 and (np.diff(selected) > 0).all()
        # per top-level cluster, the counts are balanced_quotas of their sizes, with the same first draw
        sizes = cluster_sizes(levels)
        assert sizes[1].sum() == len(x) and sizes[0].sum() == len(x)
        expected = balanced_quotas(sizes[1], 300, np.random.default_rng(4))
        top_cluster = levels[1].assignment[levels[0].assignment[selected]]
        assert np.array_equal(np.bincount(top_cluster, minlength=8), expected)
    # balanced: the dense blob holds 2000 of 2180 points but gets at most its water-filling share
    # (a uniform sample would take 2000 / 2180 of its points from it); the small blobs are taken whole
    per_blob = np.bincount(labels[hierarchical_sampling(levels, 300, seed=0)], minlength=10)
    assert per_blob[0] <= balanced_quotas(np.bincount(labels), 300, np.random.default_rng(0))[0] == 120
    assert (per_blob[1:] == 20).all()
    assert np.array_equal(hierarchical_sampling(levels, len(x), seed=1), np.arange(len(x)))
    assert np.array_equal(hierarchical_sampling(levels, 300, seed=4), hierarchical_sampling(levels, 300, seed=4))


def test_hierarchical_sampling_closest_by_hand():
    # level 1: cluster 0 = points 0..3 around (0, 0), cluster 1 = points 4..5 around (10, 0); level 2: one cluster
    x = np.array([[3, 0], [1, 0], [-2, 0], [0, 0.5], [10, 0], [11, 0]], dtype=np.float32)
    centroids = np.array([[0, 0], [10, 0]], dtype=np.float32)
    level1 = Level(centroids, np.array([0, 0, 0, 0, 1, 1]), ((x - centroids[[0, 0, 0, 0, 1, 1]]) ** 2).sum(1))
    level2 = Level(np.array([[5, 0]], dtype=np.float32), np.array([0, 0]), np.array([25, 25], dtype=np.float32))
    assert [m.tolist() for m in level1.members()] == [[3, 1, 2, 0], [4, 5]]
    # 5 points: quotas 3 (cluster 0) and 2 (cluster 1); the 3 closest of cluster 0 are 3, 1, 2
    assert hierarchical_sampling([level1, level2], 5, strategy="closest").tolist() == [1, 2, 3, 4, 5]
    # 4 points: quotas 2 and 2; the 2 closest of cluster 0 are 3 and 1
    assert hierarchical_sampling([level1, level2], 4, strategy="closest").tolist() == [1, 3, 4, 5]
    random_picks = {tuple(hierarchical_sampling([level1], 4, seed=s).tolist()) for s in range(30)}
    assert len(random_picks) > 1 and all(pick[2:] == (4, 5) for pick in random_picks)


def test_hierarchical_sampling_errors(imbalanced_levels):
    _, _, levels = imbalanced_levels
    with pytest.raises(DinokitError, match="target_size must be between 1 and 2180 \\(the number of data points\\)"):
        hierarchical_sampling(levels, 2181)
    with pytest.raises(DinokitError, match="got 0"):
        hierarchical_sampling(levels, 0)
    with pytest.raises(DinokitError, match=r"target_size must be a whole number >= 0, got 10\.5"):
        hierarchical_sampling(levels, 10.5)
    with pytest.raises(DinokitError, match="strategy must be one of random, closest"):
        hierarchical_sampling(levels, 10, strategy="first")
    with pytest.raises(DinokitError, match="level 3 assigns 40 items but level 2 has 8 clusters"):
        hierarchical_sampling([levels[0], levels[1], levels[1]], 10)
    with pytest.raises(DinokitError, match="level 2 assigns 2180 items but level 1 has 8 clusters"):
        hierarchical_sampling([levels[1], levels[0]], 10)


def test_vectors_that_would_crash_faiss_are_errors():
    # faiss kills the process (SIGFPE on 0 dimensions, an uncaught C++ exception on overflowing distances)
    with pytest.raises(DinokitError, match=r"x must be a non-empty \(N, D\) array of vectors, got shape \(5, 0\)"):
        kmeans(np.zeros((5, 0), np.float32), 2)
    with pytest.raises(DinokitError, match=r"x must be a non-empty"):
        hierarchical_kmeans(np.zeros((5, 0), np.float32), [2])
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    x[[6, 9]] *= 1e20
    with pytest.raises(DinokitError, match=r"x has 2 rows too large for float32 distances \(first: row 6, norm 1"):
        kmeans(x, 3)


def test_an_empty_cluster_takes_half_of_a_big_one():
    """faiss's rule: a centroid that no row chose is moved next to a big cluster's (a factor 1 +- 1/1024 in
    alternating coordinates), and the next iterations share that cluster between the two."""
    x, labels, _ = blobs([100, 100], [0.5, 0.5], distance=20.0, seed=1)
    far = np.full((1, 8), 1e3, dtype=np.float32)  # a start no row is nearest to
    start = np.concatenate([x[[0, 150]], far])
    centroids, assignment = kmeans(x, 3, init_centroids=start, iterations=10)
    assert np.bincount(assignment, minlength=3).min() > 0  # every cluster holds rows
    assert np.abs(centroids).max() < 100  # the far centroid came back to the data
    blobs_of_cluster = {c: set(labels[assignment == c].tolist()) for c in range(3)}
    assert all(len(b) == 1 for b in blobs_of_cluster.values())  # one blob is split in two, none is mixed


def test_split_big_clusters_follows_faiss_rule():
    import torch

    from dinokit.curation.kmeans import _split_big_clusters

    centroids = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [0.0, 0.0, 0.0]])
    _split_big_clusters(centroids, np.array([1, 7, 0]), np.random.default_rng(0))  # only cluster 1 can give
    e = 1 / 1024
    expected = [[1.0, 2.0, 3.0], [4 * (1 - e), 5 * (1 + e), 6 * (1 - e)], [4 * (1 + e), 5 * (1 - e), 6 * (1 + e)]]
    torch.testing.assert_close(centroids, torch.tensor(expected), rtol=0, atol=1e-6)
    lone = torch.ones(2, 2)
    _split_big_clusters(lone, np.array([1, 0]), np.random.default_rng(0))  # nothing to split: left as it is
    assert torch.equal(lone, torch.ones(2, 2))


def test_products_run_in_full_float32_and_the_device_is_checked():
    import torch

    x, _, _ = blobs([50, 50], [0.5, 0.5], seed=0)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 on a GPU: the process's choice, given back after
    try:
        levels = hierarchical_kmeans(x, [4, 2], n_resamples=1, sample_size=5, device="cpu")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    again = hierarchical_kmeans(x, [4, 2], n_resamples=1, sample_size=5, device="auto")
    assert all(np.array_equal(a.assignment, b.assignment) for a, b in zip(levels, again, strict=True))
    if not torch.cuda.is_available():
        with pytest.raises(DinokitError, match="CUDA is not available here"):
            kmeans(x, 2, device="cuda")
    with pytest.raises(DinokitError, match="device=gpu is not a device name"):
        nearest_centroid(x, x[:2], device="gpu")


def test_lloyd_iterations_stop_at_a_fixed_point_with_the_same_result(monkeypatch):
    import dinokit.curation.kmeans as kmeans_module

    x, labels, _ = blobs([60, 40, 80], [1.0] * 3, distance=8.0, seed=4)
    start = x[[0, 1, 2]]  # three rows of blob 0: the centroids have to travel
    passes = []
    original = kmeans_module._nearest

    def counting(rows, centroids, distances=True, centre=True):
        passes.append(distances)
        return original(rows, centroids, distances, centre)

    monkeypatch.setattr(kmeans_module, "_nearest", counting)
    centroids, assignment = kmeans(x, 3, init_centroids=start, iterations=500)
    lloyd = passes.count(False) - 1  # the last pass without distances is kmeans' final assignment
    assert 2 < lloyd < 50  # stopped at the fixed point: the pass that changed nothing is the last
    assert same_partition(assignment, labels)
    # exactly the centroids of lloyd - 1 full iterations (the last pass only found nothing to move)
    again, _ = kmeans(x, 3, init_centroids=start, iterations=lloyd - 1)
    assert np.array_equal(again, centroids)
    fewer, _ = kmeans(x, 3, init_centroids=start, iterations=lloyd - 2)
    assert not np.array_equal(fewer, centroids)
