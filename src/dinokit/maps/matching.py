"""Patch matching between two images (the DINOv3 notebooks' dense and sparse matching) and the
best-match maps that show which regions of each image have a counterpart in the other (dinov2 #88;
a retrieval ranks by the CLS token, so these maps are a patch-level view of a match, not its cause).

Inputs are two grids of patch features, A (h1, w1, D) and B (h2, w2, D), as
`dinokit.maps.pca.patch_features` returns them. Patches are compared by cosine similarity,
S[i, j] = <a_i, b_j> / (|a_i| |b_j|), i over the h1*w1 patches of A and j over the h2*w2 of B in
row-major order. Patch i's nearest neighbour in B is argmax_j S[i, j]; a mutual nearest neighbour
pair (i, j) is one where each is the other's nearest neighbour.
"""

import numpy as np

from dinokit.errors import DinokitError


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """S (h1*w1, h2*w2): cosine similarity of every patch of A (h1, w1, D) to every patch of B (h2, w2, D)."""
    if a.ndim != 3 or b.ndim != 3 or a.shape[-1] != b.shape[-1]:
        raise DinokitError(
            f"patch features must be two (h, w, D) grids of the same D, got {a.shape} and {b.shape}: "
            "compute both with the same model (dinokit.maps.pca.patch_features)"
        )
    x = a.reshape(-1, a.shape[-1]).astype(np.float64)
    y = b.reshape(-1, b.shape[-1]).astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return x @ y.T


def best_match_similarity(
    a: np.ndarray, b: np.ndarray, similarity: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each patch's highest cosine to any patch of the other image: ((h1, w1) for A against B,
    (h2, w2) for B against A), i.e. max_j S[i, j] and max_i S[i, j]. High where a region of one
    image has a counterpart in the other.
    similarity: S = cosine_matrix(a, b) where it is already computed (it is not computed again)."""
    s = cosine_matrix(a, b) if similarity is None else checked_similarity(similarity, a, b)
    return s.max(axis=1).reshape(a.shape[:2]), s.max(axis=0).reshape(b.shape[:2])


def match_patches(
    a: np.ndarray,
    b: np.ndarray,
    mutual: bool = True,
    min_similarity: float | None = None,
    max_matches: int | None = None,
    ratio: float | None = None,
    foreground: tuple[np.ndarray, np.ndarray] | None = None,
    similarity: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Matched patch pairs between A (h1, w1, D) and B (h2, w2, D), strongest first.

    Each patch i of A is paired with its nearest neighbour j = argmax_j S[i, j] in B; with `mutual`
    only pairs where i is also j's nearest neighbour in A are kept (each patch in at most one pair).
    min_similarity: drop pairs with S[i, j] below it. ratio: Lowe's ratio test on the unit-vector
    distances d = sqrt(2 - 2 S): keep i only if d(best) < ratio * d(second best in B) (e.g. 0.8;
    drops ambiguous patches, such as those of repeated texture). foreground: bool masks ((h1, w1),
    (h2, w2)), e.g. `pca_rgb([a, b], foreground_threshold)["foreground"]`: only masked patches are
    searched and matched. max_matches: the sparse mode, at most this many pairs: greedily the
    strongest whose patches touch (are or are 8-neighbours of) no kept pair's patches, in A or in B,
    so that the pairs spread out; if that keeps fewer, the strongest of the others fill up.
    similarity: S = cosine_matrix(a, b) where it is already computed (it is not computed again).

    Returns a: (N, 2) int (row, col) in A, b: (N, 2) int (row, col) in B, similarity: (N,) float,
    sorted by descending similarity (ties: A's row-major order), and candidates: the number of pairs
    before max_matches (every pair that passes the other filters).
    """
    check_options(min_similarity, max_matches, ratio)
    s = cosine_matrix(a, b) if similarity is None else checked_similarity(similarity, a, b)
    rows, cols = np.arange(s.shape[0]), np.arange(s.shape[1])
    if foreground is not None:
        mask_a, mask_b = (np.asarray(m, dtype=bool) for m in foreground)
        if mask_a.shape != a.shape[:2] or mask_b.shape != b.shape[:2]:
            raise DinokitError(
                f"foreground masks {mask_a.shape} and {mask_b.shape} must be the patch grids {a.shape[:2]} "
                f"and {b.shape[:2]}"
            )
        rows, cols = np.flatnonzero(mask_a), np.flatnonzero(mask_b)
        s = s[np.ix_(rows, cols)]
    if s.size == 0:
        return pairs(np.zeros(0, int), np.zeros(0, int), np.zeros(0), a.shape[:2], b.shape[:2]) | {"candidates": 0}
    best = s.argmax(axis=1)  # A -> B, within the searched patches
    keep = np.ones(len(best), dtype=bool)
    if mutual:
        keep &= column_argmax(s)[best] == np.arange(len(best))
    sim = s[np.arange(len(best)), best]
    if min_similarity is not None:
        keep &= sim >= min_similarity
    if ratio is not None:
        keep &= passes_ratio_test(s, ratio)
    i, j, sim = rows[keep], cols[best[keep]], sim[keep]
    order = np.lexsort((i, -sim))  # descending similarity, ties by A's index
    i, j, sim = i[order], j[order], sim[order]
    candidates = len(i)
    if max_matches is not None:
        chosen = spread_strongest(i, j, a.shape[:2], b.shape[:2], int(max_matches))
        i, j, sim = i[chosen], j[chosen], sim[chosen]
    return pairs(i, j, sim, a.shape[:2], b.shape[:2]) | {"candidates": candidates}


def checked_similarity(similarity: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`similarity`, if it is the (h1*w1, h2*w2) matrix S of A and B's grids."""
    expected = (a.shape[0] * a.shape[1], b.shape[0] * b.shape[1])
    if similarity.shape != expected:
        raise DinokitError(
            f"similarity must be cosine_matrix(a, b), {expected[0]} x {expected[1]} for grids {a.shape[:2]} and "
            f"{b.shape[:2]}; got {similarity.shape}"
        )
    return similarity


def column_argmax(s: np.ndarray, block: int = 1024) -> np.ndarray:
    """(n_b,) s.argmax(axis=0) of S (n_a, n_b), in column blocks: numpy's argmax over axis 0 copies
    the whole matrix first."""
    return np.concatenate([s[:, k : k + block].argmax(axis=0) for k in range(0, s.shape[1], block)])


def passes_ratio_test(s: np.ndarray, ratio: float) -> np.ndarray:
    """(n_a,) bool: d1 < ratio * d2 per row of S (n_a, n_b), d1 and d2 the smallest and second
    smallest unit-vector distances sqrt(2 - 2 S); with one column there is no second: all pass."""
    if s.shape[1] < 2:
        return np.ones(s.shape[0], dtype=bool)
    # the two largest similarities, largest last; in row blocks, so that no copy of all of S is made
    top2 = np.concatenate([np.partition(s[k : k + 1024], -2, axis=1)[:, -2:].copy() for k in range(0, len(s), 1024)])
    d2, d1 = np.sqrt(np.maximum(2 - 2 * top2, 0)).T
    return d1 < ratio * d2


def spread_strongest(i: np.ndarray, j: np.ndarray, grid_a, grid_b, n: int) -> np.ndarray:
    """Indices (sorted ascending) of at most n of the pairs (i[k], j[k]) (flat patch indices, strongest
    first): greedily those whose patches touch no kept pair's, in A or in B, then the strongest others."""
    blocked_a, blocked_b = np.zeros(grid_a, dtype=bool), np.zeros(grid_b, dtype=bool)
    chosen = []
    ra, ca = np.unravel_index(i, grid_a)
    rb, cb = np.unravel_index(j, grid_b)
    for k in range(len(i)):
        if len(chosen) == n:
            break
        if blocked_a[ra[k], ca[k]] or blocked_b[rb[k], cb[k]]:
            continue
        chosen.append(k)
        blocked_a[max(ra[k] - 1, 0) : ra[k] + 2, max(ca[k] - 1, 0) : ca[k] + 2] = True
        blocked_b[max(rb[k] - 1, 0) : rb[k] + 2, max(cb[k] - 1, 0) : cb[k] + 2] = True
    taken = set(chosen)
    rest = [k for k in range(len(i)) if k not in taken]
    return np.sort(np.array(chosen + rest[: n - len(chosen)], dtype=int))


def pairs(i: np.ndarray, j: np.ndarray, sim: np.ndarray, grid_a, grid_b) -> dict[str, np.ndarray]:
    """Flat patch indices -> the (row, col) arrays `match_patches` returns."""
    return {
        "a": np.stack(np.unravel_index(i, grid_a), axis=1).astype(int).reshape(-1, 2),
        "b": np.stack(np.unravel_index(j, grid_b), axis=1).astype(int).reshape(-1, 2),
        "similarity": np.asarray(sim, dtype=np.float64),
    }


def check_options(min_similarity: float | None, max_matches: int | None, ratio: float | None) -> None:
    """DinokitError for options outside their range."""
    if max_matches is not None and (int(max_matches) != max_matches or max_matches < 1):
        raise DinokitError(f"max_matches must be a whole number >= 1 (or none: every match), got {max_matches}")
    if min_similarity is not None and not -1 <= min_similarity <= 1:
        raise DinokitError(f"min_similarity must be a cosine between -1 and 1 (e.g. 0.5), got {min_similarity}")
    if ratio is not None and not 0 < ratio <= 1:
        raise DinokitError(f"ratio (Lowe's test: best / second-best distance) must be in (0, 1], e.g. 0.8; got {ratio}")
