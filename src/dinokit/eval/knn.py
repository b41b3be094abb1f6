"""Weighted k-NN classification on L2-normalised features, as the DINO / DINOv2 evaluations.

For a query q with neighbours j = 1..K (cosine similarity s_j, labels y_j, K = max k):
    w_j = softmax_j(s_j / T)          (T = 0.07)
    score_k(c) = sum_{j <= k} w_j [y_j = c]
The prediction for each k is the argmax of score_k. Normalising over the K neighbours rather than
exp(s/T) (DINO v1) does not change any argmax. The bank is processed in chunks, so its size is bounded
only by disk/RAM for the features themselves, not by a (queries x bank) similarity matrix.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

DEFAULT_KS = (10, 20, 100, 200)


@torch.no_grad()
def knn_neighbours(
    bank: torch.Tensor, queries: torch.Tensor, k: int, bank_chunk: int = 65536, query_chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities and bank indices (Q, k) of each query; inputs (N, D) and (Q, D)."""
    bank = F.normalize(bank.float(), dim=-1)
    queries = F.normalize(queries.float(), dim=-1)
    k = min(k, bank.shape[0])
    sims_out, idx_out = [], []
    for q in queries.split(query_chunk):
        best_s = torch.full((q.shape[0], 0), float("-inf"))
        best_i = torch.empty((q.shape[0], 0), dtype=torch.long)
        for start in range(0, bank.shape[0], bank_chunk):
            s = q @ bank[start : start + bank_chunk].T
            top_s, top_i = s.topk(min(k, s.shape[1]), dim=1)
            cand_s = torch.cat([best_s, top_s], dim=1)
            cand_i = torch.cat([best_i, top_i + start], dim=1)
            best_s, order = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
            best_i = cand_i.gather(1, order)
        sims_out.append(best_s)
        idx_out.append(best_i)
    return torch.cat(sims_out), torch.cat(idx_out)


def knn_scores(
    neighbour_sims: torch.Tensor,
    neighbour_labels: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
) -> dict[int, torch.Tensor]:
    """Class scores (Q, C) for each k from the neighbours of each query (sorted by similarity)."""
    weights = (neighbour_sims / temperature).softmax(dim=1)
    votes = F.one_hot(neighbour_labels, num_classes).float() * weights.unsqueeze(-1)  # (Q, K, C)
    cumulative = votes.cumsum(dim=1)
    return {k: cumulative[:, min(k, neighbour_sims.shape[1]) - 1] for k in ks}


def knn_classify(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
) -> dict[int, torch.Tensor]:
    """{k: class scores (Q, C)} of weighted k-NN; predictions are `scores[k].argmax(1)`."""
    num_classes = num_classes or int(bank_labels.max()) + 1
    sims, idx = knn_neighbours(bank, queries, max(ks))
    return knn_scores(sims, bank_labels[idx], num_classes, ks, temperature)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Percent of queries whose label is among the k highest scores (micro average)."""
    k = min(k, scores.shape[1])
    hits = (scores.topk(k, dim=1).indices == labels.unsqueeze(1)).any(dim=1)
    return 100.0 * hits.float().mean().item()
