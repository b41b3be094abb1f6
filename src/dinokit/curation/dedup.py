"""Near-duplicate detection on image embeddings: the deduplication step of the DINOv2 paper's data curation.

Given N embeddings x (N, D) of an uncurated pool, and optionally M embeddings of a reference set (e.g. the
test split you will evaluate on, embedded by the same model), this computes:
  * the near-duplicate pairs of the pool: i < j with cos(x_i, x_j) >= threshold;
  * the groups: connected components of the graph of those pairs, so chains count (a ~ b and b ~ c put
    a, b, c in one group even when cos(a, c) < threshold);
  * which items to keep: the first item (lowest index) of every group, and every item without duplicates.

Rules:
  * Vectors are L2-normalised first (`dinokit.curation.vectors.unit_rows`): inner product = cosine.
  * Two items are near-duplicates when their float32 cosine >= threshold - TOLERANCE. TOLERANCE (1e-5)
    covers float32 rounding: the computed cosine of a vector with itself was as low as 1 - 1.9e-6
    (D = 384 to 1536, non-negative features), so threshold 1.0 still catches identical vectors, and a pair
    exactly at the threshold counts. It moves the threshold by 1e-5, far below its precision.
  * With a reference set, the order is: first every pool item whose cosine to some reference item is
    >= threshold (- TOLERANCE) is removed (its reason: the reference); then the remaining items are grouped
    among themselves. Items removed for the reference take no part in the grouping, so they neither keep
    nor link anything (a chain a ~ m ~ c through a reference-removed m does not join a and c).
  * A removed item's score is the cosine to its group's kept item, computed directly; in a chain it can
    be below the threshold (a ~ b ~ c keeps a and removes c with score cos(a, c)). For a reference removal
    it is the cosine to the nearest reference item.

The pool is compared with itself in blocks of chunk_size x chunk_size over the upper triangle (each pair
once), so memory stays at a few chunk_size^2 floats and never N x N; one pass gives both the pairs above
the threshold and each item's highest cosine to another item (for a histogram to choose the threshold).
`deduplicate` keeps only which items are linked, not every pair: a group of g copies has g (g - 1) / 2
pairs (50,000 copies of a placeholder image: 1.25 billion), so each time max(N, chunk_size^2) more
pairs are found they are folded into one edge per linked item to its group's first item (the same groups);
`near_duplicate_pairs` returns every pair, so its output grows with their number.
The products are exact float32 matrix products in torch, on `device` (a GPU too; TF32 kept off): N =
50,000 x 384 took about 6 s on 2 CPU cores (bench/curation.py, with numpy's BLAS then), where faiss
(IndexFlatIP) took 7.0 s for a range_search over the same upper triangle (11.7 s over all N x N) and
12.7 s more for the highest cosines (a k = 2 search), which a range
search does not give (a throwaway comparison when this module was written, not kept in bench/).
"""

from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse import coo_matrix  # scipy: installed with scikit-learn
from scipy.sparse.csgraph import connected_components

from dinokit.curation.vectors import on_device, unit_rows, whole_number
from dinokit.errors import DinokitError
from dinokit.runtime import exact_float32_products, resolve_device

CPU = torch.device("cpu")

TOLERANCE = 1e-5  # float32 rounding allowance on cosines (see the module docstring)


@dataclass
class Deduplication:
    """The outcome of `deduplicate` over N pool items (indices are rows of the pool, in input order)."""

    keep: np.ndarray  # (K,) int64: the kept items, ascending
    # (N,) int64: the item itself if kept; for a removed item its group's kept item, -1 if removed for the reference
    duplicate_of: np.ndarray
    # (N,) float32: cosine of a removed item to its duplicate_of item (to the nearest reference item for a
    # reference removal); nan if kept
    score: np.ndarray
    reference_match: np.ndarray  # (N,) int64: the nearest reference item if its cosine is >= threshold, else -1
    nearest: np.ndarray  # (N,) float32: each item's highest cosine to any other pool item (nan if N == 1)

    @property
    def removed(self) -> np.ndarray:
        """(N - K,) int64: the removed items, ascending."""
        return np.flatnonzero(self.duplicate_of != np.arange(len(self.duplicate_of)))


def near_duplicate_pairs(
    x, threshold: float, chunk_size: int = 2048, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs (i, j), i < j, of rows of x (N, D) whose cosine >= threshold (- TOLERANCE), sorted by
    (i, j), with their cosines: (i (P,) int64, j (P,) int64, cos (P,) float32). A low threshold can give
    up to N (N - 1) / 2 pairs. device: where the products run (cpu, cuda, auto, ...)."""
    cut = _cut(threshold)
    xn = unit_rows(x, "x")
    with exact_float32_products():
        i, j, cos, _ = _scan(xn, cut, _chunk(chunk_size), device=resolve_device(device))
    return i, j, cos


def deduplicate(
    x, threshold: float = 0.95, reference=None, chunk_size: int = 2048, device: str | torch.device = "cpu"
) -> Deduplication:
    """Keep the first item of every group of near-duplicates in x (N, D), after removing the items that
    near-duplicate some row of reference (M, D) if given; rules in the module docstring. chunk_size: rows
    compared at a time (memory: a block or two of chunk_size^2 float32 cosines, 16 MB each at 2048; 2048
    was the fastest of 1024 to 8192 on 50,000 x 384); the result does not depend on it. device: where
    the products run (cpu, cuda, auto, ...; x and reference are copied there whole)."""
    cut = _cut(threshold)
    chunk = _chunk(chunk_size)
    dev = resolve_device(device)
    xn = unit_rows(x, "x")
    n = len(xn)

    score = np.full(n, np.nan, dtype=np.float32)
    reference_match = np.full(n, -1, dtype=np.int64)
    if reference is not None:
        ref = unit_rows(reference, "reference", allow_empty=True)
        if ref.shape[1] != xn.shape[1]:
            raise DinokitError(
                f"reference has dimension {ref.shape[1]} but x has {xn.shape[1]}: "
                "embed both with the same model and feature"
            )
        with exact_float32_products():
            best, match = _best_matches(xn, ref, chunk, dev)
        hit = best >= cut
        reference_match[hit] = match[hit]
        score[hit] = best[hit]
    by_reference = reference_match >= 0

    # groups among the items left: reference removals have no edges, so each is its own component
    with exact_float32_products():
        i, j, _, nearest = _scan(xn, cut, chunk, skip=by_reference, links_only=True, device=dev)
    duplicate_of = _first_of_group(i, j, n)
    duplicate_of[by_reference] = -1

    copies = np.flatnonzero(duplicate_of >= 0)
    copies = copies[duplicate_of[copies] != copies]
    score[copies] = np.einsum("ij,ij->i", xn[copies], xn[duplicate_of[copies]])
    keep = np.flatnonzero(duplicate_of == np.arange(n))
    return Deduplication(keep, duplicate_of, score, reference_match, nearest)


# ----------------------------------------------------------------------------------------- helpers
def _cut(threshold) -> np.float32:
    """The float32 value cosines are compared with (>=): threshold - TOLERANCE."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise DinokitError(f"threshold must be a number in (0, 1], e.g. 0.95, got {threshold!r}") from None
    if not 0 < t <= 1:
        raise DinokitError(
            f"threshold must be in (0, 1] (a cosine similarity; e.g. 0.95, higher removes fewer images), got {t}"
        )
    return np.float32(t - TOLERANCE)


def _chunk(chunk_size) -> int:
    return whole_number(chunk_size, "chunk_size", low=1)  # rows compared at a time


def _first_of_group(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """(n,) int64: for each of n items, the lowest item of its connected component in the graph of edges (i, j)."""
    graph = coo_matrix((np.ones(len(i), dtype=bool), (i, j)), shape=(n, n))  # bool: repeated edges stay True
    _, labels = connected_components(graph, directed=False)
    first = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n, dtype=np.int64))
    return first[labels]


def _scan(
    x: np.ndarray,
    cut: np.float32,
    chunk: int,
    skip: np.ndarray | None = None,
    links_only: bool = False,
    device: torch.device = CPU,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Over normalised x (N, D), block by block on the upper triangle: the pairs i < j with cosine >= cut
    (sorted by (i, j)) and their cosines, and each row's highest cosine to another row (nan if N == 1).
    skip (N,) bool: rows left out of the pairs (not of the highest cosines). links_only: instead of every
    pair, edges i < j with the same connected components (folded to one per linked item each time
    max(N, chunk^2) more pairs are found), and no cosines: memory O(N + chunk^2) however many pairs.
    The products, maxima and threshold run on `device`; only the pairs found come back to the CPU."""
    n = len(x)
    cut = float(cut)  # a Python number: compared in float32 with the float32 cosines on any device
    xt = on_device(x, device)
    nearest = torch.full((n,), -torch.inf, device=device)
    found_i, found_j, found_cos = [], [], []
    found, fold_every = 0, max(n, chunk * chunk)
    fold_at = fold_every
    products = torch.empty(min(chunk, n) ** 2, device=device)  # one buffer for every block (no page faults)
    for a in range(0, n, chunk):
        rows = xt[a : a + chunk]
        for b in range(a, n, chunk):
            cols = xt[b : b + chunk]
            s = torch.mm(rows, cols.T, out=products[: len(rows) * len(cols)].view(len(rows), len(cols)))
            if b == a:
                s.fill_diagonal_(-torch.inf)  # not a pair with itself; the block is symmetric
            row_max = s.amax(dim=1)
            torch.maximum(nearest[a : a + len(rows)], row_max, out=nearest[a : a + len(rows)])
            if b != a:
                torch.maximum(nearest[b : b + s.shape[1]], s.amax(dim=0), out=nearest[b : b + s.shape[1]])
            hit_rows = torch.nonzero(row_max >= cut)[:, 0]  # usually few: look at those rows only
            if len(hit_rows):
                sub = s[hit_rows]
                r, c = torch.nonzero(sub >= cut, as_tuple=True)
                cos = sub[r, c].cpu().numpy()
                i, j = a + hit_rows[r].cpu().numpy(), b + c.cpu().numpy()
                upper = i < j  # the diagonal block holds each pair twice
                if skip is not None:
                    upper &= ~skip[i] & ~skip[j]
                found_i.append(i[upper])
                found_j.append(j[upper])
                found += int(upper.sum())
                if not links_only:
                    found_cos.append(cos[upper])
                elif found > fold_at:  # fold the pairs into one edge per linked item, to its group's first
                    i, j = np.concatenate(found_i), np.concatenate(found_j)
                    linked = np.zeros(n, dtype=bool)  # a mask, not np.union1d: its hash of 2P ids took half the time
                    linked[i], linked[j] = True, True
                    linked = np.flatnonzero(linked)
                    first = _first_of_group(i, j, n)[linked]
                    linked_to = linked != first
                    found_i, found_j = [first[linked_to]], [linked[linked_to]]
                    found = len(found_i[0])
                    fold_at = found + fold_every  # each fold takes in fold_every new pairs: O(1) per pair
    nearest = nearest.cpu().numpy()
    if n == 1:
        nearest[:] = np.nan
    i = np.concatenate(found_i).astype(np.int64) if found_i else np.zeros(0, dtype=np.int64)
    j = np.concatenate(found_j).astype(np.int64) if found_j else np.zeros(0, dtype=np.int64)
    cos = np.concatenate(found_cos).astype(np.float32) if found_cos else np.zeros(0, dtype=np.float32)
    order = np.lexsort((j, i))
    return i[order], j[order], cos[order] if not links_only else cos, nearest


def _best_matches(
    x: np.ndarray, ref: np.ndarray, chunk: int, device: torch.device = CPU
) -> tuple[np.ndarray, np.ndarray]:
    """For each row of normalised x (N, D): the highest cosine to a row of normalised ref (M, D) and the
    index of that row (the lowest among ties); -inf and -1 if M == 0. Products on `device`."""
    rt = on_device(ref, device, "the reference vectors")  # before x: refused before any copy if too large
    xt = on_device(x, device)
    best = torch.full((len(x),), -torch.inf, device=device)
    match = torch.full((len(x),), -1, dtype=torch.long, device=device)
    for a in range(0, len(x), chunk):
        rows, rows_best, rows_match = xt[a : a + chunk], best[a : a + chunk], match[a : a + chunk]  # views
        for b in range(0, len(rt), chunk):
            top, arg = (rows @ rt[b : b + chunk].T).max(dim=1)
            better = top > rows_best  # strictly: an earlier block wins ties
            rows_best[better] = top[better]
            rows_match[better] = b + arg[better]
    return best.cpu().numpy(), match.cpu().numpy()
