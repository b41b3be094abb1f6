"""Weighted k-NN classification on L2-normalised features, as the DINO / DINOv2 evaluations.

For a query q with neighbours j = 1..K (cosine similarity s_j, labels y_j, K = max k):
    w_j = softmax_j(s_j / T)          (T = 0.07)
    score_k(c) = sum_{j <= k} w_j [y_j = c]
The prediction for each k is the argmax of score_k. Normalising over the K neighbours rather than
exp(s/T) (DINO v1) does not change any argmax.

Memory is bounded by the chunk sizes, not by the bank: the bank (a tensor, a numpy array, a
memory-mapped array, or a list of such shards) is read chunk by chunk, once, while a running top-k of
every query is kept. `precision="bf16"` computes the similarities in bf16 (about twice as fast on
CPUs with AVX512-BF16 and on GPUs), re-scores the candidates in fp32 and certifies the result: a
query whose top-k could differ from the exact fp32 one is recomputed in fp32, so the neighbours are
the exact ones either way.
"""

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_KS = (10, 20, 100, 200)
# |bf16 similarity - exact similarity| for unit vectors: inputs rounded to bf16 (2 * 2^-8 relative, by
# Cauchy-Schwarz at most 2^-7 on a dot product of unit vectors), the bf16 output rounding (2^-8 of
# |s| <= 1), and the fp32 accumulation; 0.0125 covers all three with room to spare.
BF16_SIMILARITY_ERROR = 0.0125

BankLike = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]


def _shards(bank: BankLike) -> list:
    return [bank] if isinstance(bank, (torch.Tensor, np.ndarray)) else list(bank)


def _as_tensor(rows) -> torch.Tensor:
    return torch.from_numpy(np.array(rows)) if isinstance(rows, np.ndarray) else rows  # a copy: memmaps are read-only


def bank_size(bank: BankLike) -> int:
    return sum(len(s) for s in _shards(bank))


def bank_chunks(bank: BankLike, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, L2-normalised float32 rows) of at most `chunk` rows, over a tensor, an array
    (memory-mapped arrays are read chunk by chunk) or a list of such shards in order."""
    offset = 0
    for shard in _shards(bank):
        for start in range(0, len(shard), chunk):
            yield offset + start, F.normalize(_as_tensor(shard[start : start + chunk]).float(), dim=-1)
        offset += len(shard)


def bank_rows(bank: BankLike, indices: torch.Tensor) -> torch.Tensor:
    """L2-normalised float32 rows (*indices.shape, D) of a bank given as in `bank_chunks`."""
    shards = _shards(bank)
    flat = indices.reshape(-1)
    out = torch.empty(len(flat), shards[0].shape[1])
    offset = 0
    for shard in shards:
        pos = torch.nonzero((flat >= offset) & (flat < offset + len(shard))).flatten()
        if len(pos):
            local, order = (flat[pos] - offset).sort()  # sorted reads are kinder to memory-mapped files
            rows = shard[local.numpy()] if isinstance(shard, np.ndarray) else shard[local]
            out[pos[order]] = _as_tensor(rows).float()
        offset += len(shard)
    return F.normalize(out, dim=-1).reshape(*indices.shape, -1)


def _merge_topk(
    best_s: torch.Tensor, best_i: torch.Tensor, s: torch.Tensor, i: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    cand_s, cand_i = torch.cat([best_s, s], dim=1), torch.cat([best_i, i], dim=1)
    top_s, order = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
    return top_s, cand_i.gather(1, order)


def _chunked_topk(
    bank: BankLike, queries: torch.Tensor, k: int, bank_chunk: int, query_chunk: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k over bank chunks (outer loop: each bank row is read once)."""
    q_all = queries.to(dtype)
    best_s = torch.full((len(queries), 0), float("-inf"))
    best_i = torch.empty((len(queries), 0), dtype=torch.long)
    new_s, new_i = [], []
    for start, rows in bank_chunks(bank, bank_chunk):
        rows = rows.to(dtype)
        new_s.clear()
        new_i.clear()
        for q0 in range(0, len(queries), query_chunk):
            s = q_all[q0 : q0 + query_chunk] @ rows.T
            top_s, top_i = s.topk(min(k, s.shape[1]), dim=1)  # in the compute dtype: no full-size copy
            old = slice(q0, q0 + query_chunk)
            merged = _merge_topk(best_s[old], best_i[old], top_s.float(), top_i + start, k)
            new_s.append(merged[0])
            new_i.append(merged[1])
        best_s, best_i = torch.cat(new_s), torch.cat(new_i)
    return best_s, best_i


@torch.no_grad()
def knn_neighbours(
    bank: BankLike,
    queries: torch.Tensor,
    k: int,
    bank_chunk: int = 65536,
    query_chunk: int = 1024,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities and bank indices (Q, k), sorted, of each query.

    bank: (N, D) tensor or array, or a list of (N_i, D) shards (see `bank_chunks`); queries (Q, D).
    precision: 'fp32', or 'bf16' (fast candidates, exact fp32 result; see the module docstring).
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    queries = F.normalize(torch.as_tensor(queries).float(), dim=-1)
    n = bank_size(bank)
    k = min(k, n)
    if precision == "fp32":
        return _chunked_topk(bank, queries, k, bank_chunk, query_chunk, torch.float32)
    # bf16 candidates (k plus a margin), exact fp32 re-scoring, certification.
    margin = max(k, 32)
    cand_s16, cand_i = _chunked_topk(bank, queries, k + margin, bank_chunk, query_chunk, torch.bfloat16)
    sims, idx = [], []
    for q0 in range(0, len(queries), 256):
        rows = bank_rows(bank, cand_i[q0 : q0 + 256])  # (q, K', D)
        exact = torch.einsum("qkd,qd->qk", rows, queries[q0 : q0 + 256])
        top_s, order = exact.topk(k, dim=1)
        sims.append(top_s)
        idx.append(cand_i[q0 : q0 + 256].gather(1, order))
    sims, idx = torch.cat(sims), torch.cat(idx)
    if cand_i.shape[1] < n:  # rows outside the candidates have bf16 sim <= the last candidate's
        cut = cand_s16[:, -1] + BF16_SIMILARITY_ERROR
        unsure = torch.nonzero(sims[:, -1] <= cut).flatten()
        if len(unsure):
            s, i = _chunked_topk(bank, queries[unsure], k, bank_chunk, query_chunk, torch.float32)
            sims[unsure], idx[unsure] = s, i
    return sims, idx


def knn_scores(
    neighbour_sims: torch.Tensor,
    neighbour_labels: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
) -> dict[int, torch.Tensor]:
    """Class scores (Q, C) for each k from the neighbours of each query (sorted by similarity)."""
    weights = (neighbour_sims / temperature).softmax(dim=1)
    scores = {}
    done = 0
    running = torch.zeros(neighbour_sims.shape[0], num_classes)
    for k in sorted(set(ks)):  # accumulate votes k by k: memory (Q, C), not (Q, K, C)
        upto = min(k, neighbour_sims.shape[1])
        running.scatter_add_(1, neighbour_labels[:, done:upto], weights[:, done:upto])
        done = upto
        scores[k] = running.clone()
    return {k: scores[k] for k in ks}


def knn_classify(
    bank: BankLike,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    precision: str = "fp32",
    **chunks,
) -> dict[int, torch.Tensor]:
    """{k: class scores (Q, C)} of weighted k-NN; predictions are `scores[k].argmax(1)`.
    `chunks`: bank_chunk / query_chunk of `knn_neighbours`."""
    bank_labels = torch.as_tensor(bank_labels).long()
    num_classes = num_classes or int(bank_labels.max()) + 1
    sims, idx = knn_neighbours(bank, queries, max(ks), precision=precision, **chunks)
    return knn_scores(sims, bank_labels[idx], num_classes, ks, temperature)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Percent of queries whose label is among the k highest scores (micro average)."""
    k = min(k, scores.shape[1])
    hits = (scores.topk(k, dim=1).indices == torch.as_tensor(labels).unsqueeze(1)).any(dim=1)
    return 100.0 * hits.double().mean().item()


def few_shot_indices(labels: np.ndarray, n_per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of `n_per_class` random examples of each class (all of a class with fewer)."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        members = np.nonzero(labels == c)[0]
        picked.append(rng.choice(members, size=min(n_per_class, len(members)), replace=False))
    return np.sort(np.concatenate(picked))
