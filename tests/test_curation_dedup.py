import numpy as np
import pytest
import torch

from dinokit.curation import dedup as dedup_module
from dinokit.curation.dedup import TOLERANCE, deduplicate, near_duplicate_pairs
from dinokit.errors import DinokitError
from dinokit.retrieval.index import normalise


def at_angles(degrees) -> np.ndarray:
    """2-D unit vectors at the given angles: cos(u, v) = cos(angle difference)."""
    r = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(r), np.sin(r)], axis=1).astype(np.float32)


def cosd(degrees: float) -> float:
    return float(np.cos(np.deg2rad(degrees)))


@pytest.fixture(scope="module")
def planted():
    """500 random 16-D vectors, 80 of them noisy copies of others (some copies of copies: chains)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16)).astype(np.float32)
    targets = rng.choice(np.arange(100, 500), size=80, replace=False)
    sources = rng.integers(0, 100, size=80)
    sources[40:] = targets[:40]  # copies of copies
    for t, s in zip(targets, sources, strict=True):
        x[t] = x[s] + 0.15 * rng.normal(size=16).astype(np.float32)
    return x


def brute_pairs(x, threshold):
    xn = normalise(x)
    s = xn @ xn.T
    i, j = np.triu_indices(len(x), 1)
    hit = s[i, j] >= np.float32(threshold - TOLERANCE)
    return i[hit], j[hit], s[i, j][hit]


def brute_nearest(x):
    xn = normalise(x)
    s = xn @ xn.T
    np.fill_diagonal(s, -np.inf)
    return s.max(axis=1)


def brute_groups(n, i, j, skip):
    """duplicate_of by a plain union-find whose roots are the lowest index; items in `skip` get -1."""
    parent = list(range(n))

    def root(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for a, b in zip(i.tolist(), j.tolist(), strict=True):
        if a in skip or b in skip:
            continue
        ra, rb = root(a), root(b)
        parent[max(ra, rb)] = min(ra, rb)
    return np.array([-1 if a in skip else root(a) for a in range(n)])


def test_hand_built_chain_and_groups():
    # c 30°, f 180°, a 0°, b 15°, d 90°, e 100°: a~b and b~c (cos 15°), d~e (cos 10°), cos(a, c) = cos 30° < 0.95
    x = at_angles([30, 180, 0, 15, 90, 100])
    i, j, cos = near_duplicate_pairs(x, 0.95)
    assert i.tolist() == [0, 2, 4] and j.tolist() == [3, 3, 5]
    np.testing.assert_allclose(cos, [cosd(15), cosd(15), cosd(10)], atol=1e-6)

    result = deduplicate(x, 0.95)
    assert result.keep.tolist() == [0, 1, 4]
    assert result.duplicate_of.tolist() == [0, 1, 0, 0, 4, 4]  # a joins c's group through b
    assert result.removed.tolist() == [2, 3, 5]
    expected_score = [np.nan, np.nan, cosd(30), cosd(15), np.nan, cosd(10)]  # a: cos to the kept c, below 0.95
    np.testing.assert_allclose(result.score, expected_score, atol=1e-6)
    np.testing.assert_allclose(result.nearest, [cosd(15), cosd(80), cosd(15), cosd(15), cosd(10), cosd(10)], atol=1e-6)
    assert result.reference_match.tolist() == [-1] * 6
    assert result.keep.dtype == result.duplicate_of.dtype == result.reference_match.dtype == np.int64
    assert result.score.dtype == result.nearest.dtype == np.float32


def test_threshold_boundary_counts_a_pair_at_the_threshold():
    # (1, 0) and (3, 4) / 5: float32 cosine 0.6 to within one ulp (6e-8), far inside TOLERANCE (1e-5)
    x = np.array([[1, 0], [3, 4]], dtype=np.float32)
    _, _, cos = near_duplicate_pairs(x, 0.6)
    assert len(cos) == 1 and abs(float(cos[0]) - 0.6) < 1e-7
    assert len(near_duplicate_pairs(x, 0.6 + TOLERANCE / 2)[0]) == 1  # within the float32 allowance
    assert len(near_duplicate_pairs(x, float(cos[0]) + TOLERANCE)[0]) == 1  # cosine == threshold - TOLERANCE
    assert len(near_duplicate_pairs(x, 0.6 + 2 * TOLERANCE)[0]) == 0
    assert deduplicate(x, 0.6).keep.tolist() == [0]
    assert deduplicate(x, 0.6 + 2 * TOLERANCE).keep.tolist() == [0, 1]
    at_cut = deduplicate(x[:1], float(cos[0]) + TOLERANCE, reference=x[1:])
    assert at_cut.reference_match.tolist() == [0] and at_cut.score[0] == cos[0]


def test_pairs_and_nearest_equal_brute_force_with_small_chunks(planted):
    i, j, cos = near_duplicate_pairs(planted, 0.9, chunk_size=37)
    bi, bj, bcos = brute_pairs(planted, 0.9)
    assert len(bi) >= 80  # the planted copies, at least
    np.testing.assert_array_equal(i, bi)  # brute force is in (i, j) order too
    np.testing.assert_array_equal(j, bj)
    np.testing.assert_allclose(cos, bcos, atol=1e-6)
    np.testing.assert_allclose(deduplicate(planted, 0.9, chunk_size=37).nearest, brute_nearest(planted), atol=1e-6)


def test_groups_equal_a_union_find_over_brute_force_pairs(planted):
    result = deduplicate(planted, 0.9, chunk_size=37)
    bi, bj, _ = brute_pairs(planted, 0.9)
    expected = brute_groups(len(planted), bi, bj, skip=set())
    np.testing.assert_array_equal(result.duplicate_of, expected)
    assert len(result.removed) >= 80  # each planted copy adds one edge to a forest
    xn = normalise(planted)
    removed = result.removed
    np.testing.assert_allclose(result.score[removed], np.sum(xn[removed] * xn[expected[removed]], axis=1), atol=1e-6)


def test_reference_removals_equal_brute_force_and_are_left_out_of_the_groups(planted):
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(60, 16)).astype(np.float32)
    copied = rng.choice(500, size=25, replace=False)
    reference[:25] = planted[copied] + 0.1 * rng.normal(size=(25, 16)).astype(np.float32)
    result = deduplicate(planted, 0.9, reference=reference, chunk_size=37)

    s = normalise(planted) @ normalise(reference).T
    best, match = s.max(axis=1), s.argmax(axis=1)
    hit = best >= np.float32(0.9 - TOLERANCE)
    assert hit[copied].sum() >= 20
    np.testing.assert_array_equal(result.reference_match, np.where(hit, match, -1))
    np.testing.assert_allclose(result.score[hit], best[hit], atol=1e-6)
    assert (result.duplicate_of[hit] == -1).all()

    bi, bj, _ = brute_pairs(planted, 0.9)
    expected = brute_groups(len(planted), bi, bj, skip=set(np.flatnonzero(hit).tolist()))
    np.testing.assert_array_equal(result.duplicate_of, expected)


def test_an_item_removed_for_the_reference_does_not_chain_others():
    # a ~ m ~ c (cos 15°), cos(a, c) = cos 30°; r ~ m (cos 15°) but cos(a, r) = cos(c, r) = cos²15° = 0.933 < 0.95
    t = np.deg2rad(15)
    a, m, c = [np.cos(t), np.sin(t), 0], [1, 0, 0], [np.cos(t), -np.sin(t), 0]
    x = np.array([a, m, c], dtype=np.float32)
    r = np.array([[0, 1, 0], [np.cos(t), 0, np.sin(t)], [np.cos(t), 0, np.sin(t)]], dtype=np.float32)

    alone = deduplicate(x, 0.95)
    assert alone.keep.tolist() == [0] and alone.duplicate_of.tolist() == [0, 0, 0]

    for chunk_size in (1, 2048):  # reference rows 1 and 2 are equal: the first is the match, in a block or across
        result = deduplicate(x, 0.95, reference=r, chunk_size=chunk_size)
        assert result.keep.tolist() == [0, 2]
        assert result.duplicate_of.tolist() == [0, -1, 2]
        assert result.reference_match.tolist() == [-1, 1, -1]
        np.testing.assert_allclose(result.score, [np.nan, cosd(15), np.nan], atol=1e-6)


def test_identical_vectors_are_caught_at_threshold_one():
    rng = np.random.default_rng(2)
    for dim in (384, 1536):
        base = np.abs(rng.normal(size=(4, dim))).astype(np.float32)  # non-negative: the largest float32 rounding
        x = np.concatenate([base, base * 3.7, base[::-1] * 0.01])  # rows 4-7 copy 0-3, rows 8-11 copy 3-0
        result = deduplicate(x, 1.0)
        assert result.keep.tolist() == [0, 1, 2, 3]
        assert result.duplicate_of.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 3, 2, 1, 0]
        assert (np.abs(result.score[4:] - 1) < TOLERANCE).all()
        assert len(near_duplicate_pairs(x, 1.0)[0]) == 4 * 3  # the 3 pairs within each of 4 groups of 3


def test_a_single_item():
    result = deduplicate(np.ones((1, 8)), 0.9, reference=np.ones((2, 8)) * [[1], [-1]])
    assert result.keep.tolist() == [] and result.duplicate_of.tolist() == [-1]
    assert result.reference_match.tolist() == [0] and np.isnan(result.nearest).all()
    alone = deduplicate(np.ones((1, 8)), 0.9)
    assert alone.keep.tolist() == [0] and alone.duplicate_of.tolist() == [0]
    assert np.isnan(alone.score).all() and np.isnan(alone.nearest).all()
    i, j, cos = near_duplicate_pairs(np.ones((1, 8)), 0.9)
    assert len(i) == len(j) == len(cos) == 0 and i.dtype == np.int64 and cos.dtype == np.float32


def test_no_duplicates_keeps_everything():
    x = np.eye(6, dtype=np.float32) + 0.1  # pairwise cosine (2 * 0.11 + 4 * 0.01) / (1.21 + 5 * 0.01) = 0.206
    result = deduplicate(x, 0.5, reference=-np.eye(6))
    assert result.keep.tolist() == list(range(6)) and result.removed.tolist() == []
    assert result.duplicate_of.tolist() == list(range(6)) and np.isnan(result.score).all()
    np.testing.assert_allclose(result.nearest, np.full(6, 0.26 / 1.26), atol=1e-6)


def test_invariants_determinism_and_chunk_size_independence(planted):
    rng = np.random.default_rng(3)
    reference = np.concatenate([planted[:10] + 0.05, rng.normal(size=(20, 16))]).astype(np.float32)
    runs = [deduplicate(planted, 0.85, reference=reference, chunk_size=c) for c in (37, 37, 128, 2048)]
    r = runs[0]
    assert (np.diff(r.keep) > 0).all()
    assert (r.duplicate_of[r.keep] == r.keep).all()
    removed = r.removed
    assert len(removed) > 0 and len(r.keep) + len(removed) == len(planted)
    in_pool = removed[r.duplicate_of[removed] >= 0]
    assert np.isin(r.duplicate_of[in_pool], r.keep).all() and (r.duplicate_of[in_pool] < in_pool).all()
    assert ((r.duplicate_of == -1) == (r.reference_match >= 0)).all()
    assert (np.isnan(r.score) == (r.duplicate_of == np.arange(len(planted)))).all()
    for other in runs[1:]:
        for field in ("keep", "duplicate_of", "reference_match"):
            np.testing.assert_array_equal(getattr(other, field), getattr(r, field))
        np.testing.assert_allclose(other.score, r.score, atol=1e-6)
        np.testing.assert_allclose(other.nearest, r.nearest, atol=1e-6)
    np.testing.assert_array_equal(runs[1].score, r.score)  # same chunks: bit for bit
    np.testing.assert_array_equal(runs[1].nearest, r.nearest)


@pytest.mark.parametrize("threshold", [0, -0.5, 1.5, float("nan")])
def test_threshold_out_of_range_is_an_error(threshold):
    with pytest.raises(DinokitError, match=r"threshold must be in \(0, 1\]"):
        deduplicate(np.eye(3), threshold)
    with pytest.raises(DinokitError, match=r"threshold must be in \(0, 1\]"):
        near_duplicate_pairs(np.eye(3), threshold)


def test_bad_vectors_are_errors_that_say_which_rows():
    x = np.eye(6, dtype=np.float32)
    x[3, 1], x[5, 0] = np.nan, np.inf
    with pytest.raises(DinokitError, match=r"x has 2 row\(s\) with NaN or infinite values \(the first is row 3\)"):
        deduplicate(x)
    x = np.eye(6, dtype=np.float32)
    x[4] = 0
    with pytest.raises(DinokitError, match=r"x has 1 row\(s\) of zeros.*first is row 4"):
        deduplicate(x)
    with pytest.raises(DinokitError, match=r"reference has 1 row\(s\) with NaN.*first is row 0"):
        deduplicate(np.eye(3), reference=[[np.nan, 0, 0]])
    with pytest.raises(DinokitError, match=r"reference has dimension 8 but x has 16: embed both with the same model"):
        deduplicate(np.eye(16), reference=np.eye(8))
    with pytest.raises(DinokitError, match=r"x must be a 2-D array .* at least one row, got shape \(0, 4\)"):
        deduplicate(np.zeros((0, 4)))
    with pytest.raises(DinokitError, match=r"x must be a 2-D array .* got shape \(5,\)"):
        near_duplicate_pairs(np.ones(5), 0.9)
    with pytest.raises(DinokitError, match=r"chunk_size must be a whole number >= 1"):
        deduplicate(np.eye(3), chunk_size=0)


def test_a_large_group_of_copies_does_not_hold_all_its_pairs_in_memory():
    # 6,000 noisy copies of one vector: 18 million pairs (360 MB as i, j, cos), but deduplicate only needs
    # which items are linked, so its memory stays near a block of chunk_size^2 cosines and a few N arrays
    import tracemalloc

    rng = np.random.default_rng(0)
    x = (np.ones(32) + 0.01 * rng.normal(size=(6000, 32))).astype(np.float32)
    tracemalloc.start()
    try:
        result = deduplicate(x, 0.95, chunk_size=256)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.keep.tolist() == [0] and (result.duplicate_of == 0).all()
    assert peak < 40e6, f"peak {peak / 1e6:.0f} MB"


def test_groups_stay_exact_when_the_pairs_are_folded(planted):
    # threshold 0.3 on 500 random 16-D vectors: ~10,000 pairs, folded many times at chunk_size 8 (every 500 pairs)
    rng = np.random.default_rng(4)
    reference = rng.normal(size=(30, 16)).astype(np.float32)
    for chunk_size in (8, 2048):
        result = deduplicate(planted, 0.3, reference=reference, chunk_size=chunk_size)
        bi, bj, _ = brute_pairs(planted, 0.3)
        assert len(bi) > 20 * len(planted)
        skip = set(np.flatnonzero(result.reference_match >= 0).tolist())
        assert 0 < len(skip) < len(planted)
        np.testing.assert_array_equal(result.duplicate_of, brute_groups(len(planted), bi, bj, skip=skip))


def test_rows_too_large_to_normalise_are_not_called_zeros():
    # float32 squared norm of 1e20 * x overflows: faiss.normalize_L2 then zeroes the row
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    x[2] *= 1e20
    with pytest.raises(DinokitError, match=r"x has 1 row\(s\) too large to normalise in float32 \(the first is row 2"):
        deduplicate(x)
    # an empty reference is allowed as a (0, D) array; the message for other shapes does not ask for a row
    assert deduplicate(x[:2], reference=np.zeros((0, 4))).keep.tolist() == [0, 1]
    with pytest.raises(DinokitError, match=r"reference must be a 2-D array of shape \(rows, dimension\), got shape"):
        deduplicate(x[:2], reference=np.zeros(4))


def test_products_run_in_full_float32_whatever_the_process_chose(planted, monkeypatch):
    """TF32 (precision "high" on a GPU) would round the cosines to 10 bits: dedup sets "highest" for its
    products and gives the process its setting back."""
    seen = []
    real_scan = dedup_module._scan

    def scan(*args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(dedup_module, "_scan", scan)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        near_duplicate_pairs(planted, 0.9)
        deduplicate(planted, 0.9)
        assert seen == ["highest", "highest"]
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_device_is_checked_and_cpu_and_auto_agree_here(planted):
    on_cpu = deduplicate(planted, 0.85, device="cpu")
    np.testing.assert_array_equal(deduplicate(planted, 0.85, device="auto").keep, on_cpu.keep)
    if not torch.cuda.is_available():
        with pytest.raises(DinokitError, match="CUDA is not available here; use device=cpu or auto"):
            deduplicate(planted, 0.85, device="cuda")
    with pytest.raises(DinokitError, match="device=gpu is not a device name"):
        near_duplicate_pairs(planted, 0.85, device="gpu")
