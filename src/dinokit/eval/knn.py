"""Weighted k-NN classification on L2-normalised features, as the DINO / DINOv2 evaluations.

For a query q with neighbours j = 1..K (cosine similarity s_j, labels y_j, K = max k):
    w_j = softmax_j(s_j / T)          (T = 0.07)
    score_k(c) = sum_{j <= k} w_j [y_j = c]
The prediction for each k is the argmax of score_k. Normalising over the K neighbours rather than
exp(s/T) (DINO v1) does not change any argmax.

Memory is bounded by the chunk sizes, not by the bank: the bank (a tensor, a numpy array, a
memory-mapped array, or a list of such shards) is read chunk by chunk, once, while a running top-k of
every query is kept. Similarities are exact fp32 dot products; equal ones (duplicate images, and
coincidences: 4 of 2,000 random queries against 20,000 rows had one within their top 200) are ordered
by bank index, the lower first, where topk's own order (which the official code keeps) depends on the
chunking and the device. Only the last bit of a product can still depend on the chunk shape (BLAS
blocking). (A bf16 search cannot rank real neighbours: the 20th and 52nd neighbours of a CIFAR-10
query are typically 0.01 apart in cosine, about the worst-case error of a bf16 dot product of unit
vectors; see docs/benchmarks.md.)
"""

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_KS = (10, 20, 100, 200)
TIED_ROWS = 64  # rows of a chunk sorted whole at once where their k-th place is tied
SCREEN_SLICES = 16  # a wide row's top-k is screened through the maxima of this many slices (_row_topk)
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


def _in_order(s: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates (similarities s, distinct bank indices i; (Q, m)) sorted by similarity, ties by index."""
    by_index = i.argsort(dim=1)
    s, i = s.gather(1, by_index), i.gather(1, by_index)
    order = s.sort(dim=1, descending=True, stable=True).indices
    return s.gather(1, order), i.gather(1, order)


def _row_topk(s: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The m largest values of each row of s (Q, n) and their columns: `s.topk(m, dim=1)`, the same values
    and, where the m-th value is not tied, the same columns, in fewer passes over a wide row on the CPU.

    The first 16 w columns (w = n // 16) are read as 16 slices of w, side by side; a position j (0..w-1)
    stands for the 16 columns j, w + j, ... Only the m positions of highest maximum over the slices can
    hold a row's m largest values: a value x at any other position has m positions above it whose
    maxima are >= x, so m values >= x are among theirs. topk over those 16 m candidates and the last
    n - 16 w columns then gives the row's m largest. The maxima are one vectorised pass over s where
    topk's own selection works through every value: 19 against 49 ms at 1024 x 50,000, m = 21, on
    the 2-core Intel Xeon of docs/benchmarks.md. Other devices, and rows under 64 m wide, run topk itself.
    """
    w = s.shape[1] // SCREEN_SLICES
    if s.device.type != "cpu" or w < 4 * m:
        return s.topk(m, dim=1)
    slices = s[:, : SCREEN_SLICES * w].unflatten(1, (SCREEN_SLICES, w))  # (Q, 16, w), a view
    positions = slices.amax(dim=1).topk(m, dim=1).indices  # (Q, m) in 0..w-1
    candidates = slices.gather(2, positions[:, None, :].expand(-1, SCREEN_SLICES, -1)).flatten(1)  # (Q, 16 m)
    values, at = torch.cat([candidates, s[:, SCREEN_SLICES * w :]], dim=1).topk(m, dim=1)
    screened = at < SCREEN_SLICES * m  # else one of the last columns
    columns = torch.where(
        screened, (at // m) * w + positions.gather(1, at % m), SCREEN_SLICES * w + (at - SCREEN_SLICES * m)
    )
    return values, columns


def _chunk_topk(s: torch.Tensor, k: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar of each row of a chunk's similarities s (Q, n), with their bank indices
    (start + column), sorted, ties to the lower index. Which columns topk returns is arbitrary only in
    a row whose k-th and (k+1)-th similarities are equal: those (rare) rows are redone by a stable
    sort of the whole row, TIED_ROWS at a time (bounded memory however many rows tie)."""
    n = s.shape[1]
    if k >= n:
        return _in_order(s, torch.arange(start, start + n, device=s.device).expand_as(s))
    top_s, top_i = _row_topk(s, k + 1)
    tied = torch.nonzero(top_s[:, k] == top_s[:, k - 1]).flatten()
    top_s, top_i = _in_order(top_s[:, :k], top_i[:, :k] + start)
    for rows in tied.split(TIED_ROWS):
        order = s[rows].sort(dim=1, descending=True, stable=True).indices[:, :k]
        top_s[rows], top_i[rows] = s[rows].gather(1, order), order + start
    return top_s, top_i


def _merge_topk(
    best_s: torch.Tensor, best_i: torch.Tensor, s: torch.Tensor, i: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of two sorted candidate lists, the first of lower bank indices: a stable sort keeps
    its entries before the second's equal ones, so ties stay with the lower index."""
    cand_s, cand_i = torch.cat([best_s, s], dim=1), torch.cat([best_i, i], dim=1)
    order = cand_s.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return cand_s.gather(1, order), cand_i.gather(1, order)


@torch.no_grad()
def knn_neighbours(
    bank: BankLike,
    queries: torch.Tensor,
    k: int,
    bank_chunk: int = 65536,
    query_chunk: int = 1024,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities and bank indices (Q, k), sorted, of each query (returned on the CPU).
    Equal similarities are ordered by bank index (the lower first), whatever the chunk sizes or device.

    bank: (N, D) tensor or array, or a list of (N_i, D) shards (see `bank_chunks`); queries (Q, D).
    The outer loop runs over bank chunks, so each bank row is read (and sent to `device`) once; memory
    is O(bank_chunk * D + query_chunk * bank_chunk + Q * k).
    """
    queries = F.normalize(_as_tensor(queries).float(), dim=-1).to(device)
    n = bank_size(bank)
    k = min(k, n)
    best_s = torch.full((len(queries), 0), float("-inf"), device=device)
    best_i = torch.empty((len(queries), 0), dtype=torch.long, device=device)
    # one buffer for every chunk's similarities: a fresh (query_chunk, bank_chunk) result each time
    # costs the CPU its page faults, 14% of the whole search at 10k x 50k (docs/benchmarks.md)
    products = torch.empty(min(query_chunk, len(queries)) * min(bank_chunk, n), device=device)
    for start, rows in bank_chunks(bank, bank_chunk):
        rows = rows.to(device)
        new_s, new_i = [], []
        for q0 in range(0, len(queries), query_chunk):
            chunk = queries[q0 : q0 + query_chunk]
            s = torch.mm(chunk, rows.T, out=products[: len(chunk) * len(rows)].view(len(chunk), len(rows)))
            top_s, top_i = _chunk_topk(s, k, start)
            old = slice(q0, q0 + query_chunk)
            merged = _merge_topk(best_s[old], best_i[old], top_s, top_i, k)
            new_s.append(merged[0])
            new_i.append(merged[1])
        best_s, best_i = torch.cat(new_s), torch.cat(new_i)
    return best_s.cpu(), best_i.cpu()


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
    **chunks,
) -> dict[int, torch.Tensor]:
    """{k: class scores (Q, C)} of weighted k-NN; predictions are `scores[k].argmax(1)`.
    `chunks`: bank_chunk / query_chunk / device of `knn_neighbours`."""
    bank_labels = torch.as_tensor(bank_labels).long()
    num_classes = num_classes or int(bank_labels.max()) + 1
    sims, idx = knn_neighbours(bank, queries, max(ks), **chunks)
    return knn_scores(sims, bank_labels[idx], num_classes, ks, temperature)


def knn_top1(
    model,
    data: dict,
    size: int,
    resize_policy: str = "resize",
    precision: str = "bf16",
    batch_size: int = 256,
    num_workers: int = 0,
) -> float:
    """Weighted k-NN top-1 (k = 20, T = 0.07) of data["test"] against data["train"] on the model's
    CLS features at `size` px (`eval_transform(size, resize_policy)`); data holds the paths
    ("train", "test"), their labels ("train_labels", "test_labels") and "classes". Unreadable files
    are left out of both sides. The DINO protocol of `dinokit eval knn`, without its feature cache."""
    from dinokit.data.transforms import eval_transform
    from dinokit.features.extract import extract_features

    transform = eval_transform(size, resize_policy)
    options = dict(batch_size=batch_size, num_workers=num_workers, precision=precision, progress=False)
    bank, kept_bank, _ = extract_features(model, data["train"], transform, **options)
    queries, kept_queries, _ = extract_features(model, data["test"], transform, **options)
    bank_labels = torch.tensor(data["train_labels"])[kept_bank]
    scores = knn_classify(bank["cls"], bank_labels, queries["cls"], len(data["classes"]), ks=(20,), temperature=0.07)
    return topk_accuracy(scores[20], torch.tensor(data["test_labels"])[kept_queries])


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Percent of queries whose label is among the k highest of its scores (Q, C) (micro average).

    Ties count against the label: it is in the top k only if every class scoring at least as high fits
    there too. So a class that no neighbour voted for (score 0) is never a k-NN top-5 hit, where the
    official top-5 (torchmetrics' topk) fills the places beyond the voted classes with zero-score classes
    in the order its topk breaks ties, and counts the truth among them."""
    labels = torch.as_tensor(labels).long().to(scores.device)
    known = (labels >= 0) & (labels < scores.shape[1])  # a label without a score column is no hit
    own = scores.gather(1, labels.clamp(0, scores.shape[1] - 1).unsqueeze(1))
    hits = known & ((scores >= own).sum(dim=1) <= k)
    return 100.0 * hits.double().mean().item()


def few_shot_ks(ks: Sequence[int], n_per_class: int) -> list[int]:
    """The ks of a few-shot bank of `n_per_class` images per class, as the official few-shot k-NN
    (`dinov2/eval/knn.py: create_module_dict`): those of `ks` not above n, and n itself."""
    return sorted({k for k in ks if k <= n_per_class} | {n_per_class})


def few_shot_indices(labels: np.ndarray, n_per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of `n_per_class` random examples of each class (all of a class with fewer)."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        members = np.nonzero(labels == c)[0]
        picked.append(rng.choice(members, size=min(n_per_class, len(members)), replace=False))
    return np.sort(np.concatenate(picked))
