import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinokit.data.labelled import read_labelled
from dinokit.errors import DinokitError
from dinokit.eval.knn import _row_topk, knn_classify, knn_neighbours, knn_scores, topk_accuracy


def brute_force(bank, labels, queries, k, T, C):
    b, q = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    preds = []
    for row in q:
        s = b @ row
        order = sorted(range(len(s)), key=lambda j: -s[j].item())[:k]
        votes = [0.0] * C
        for j in order:
            votes[labels[j]] += float(np.exp(s[j].item() / T))  # DINO v1 weighting
        preds.append(int(np.argmax(votes)))
    return torch.tensor(preds)


def test_knn_matches_brute_force_and_chunking_changes_nothing():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 16, generator=g), torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 5, (300,), generator=g)
    scores = knn_classify(bank, labels, queries, num_classes=5, ks=(1, 10, 20))
    for k in (1, 10, 20):
        assert torch.equal(scores[k].argmax(1), brute_force(bank, labels, queries, k, 0.07, 5))
    s1, i1 = knn_neighbours(bank, queries, 20)
    s2, i2 = knn_neighbours(bank, queries, 20, bank_chunk=7, query_chunk=3)
    assert torch.allclose(s1, s2) and torch.equal(i1, i2)


@pytest.mark.parametrize("n", [640, 653])  # 16 slices of 40 columns, and 13 columns beyond them
def test_screened_row_topk_equals_topk(n):
    """_row_topk reads a wide row as 16 slices and keeps the m positions of highest maximum: the same
    values as topk, and the same columns where the m-th value is not tied, wherever the largest sit."""
    g = torch.Generator().manual_seed(n)
    m, w = 6, n // 16
    s = torch.randn(8, n, generator=g)
    s[1, torch.arange(m) * w + 3] = 10 + torch.arange(m, dtype=torch.float)  # all at one position
    s[2, 16 * w :] = 20  # in the columns beyond the slices (all of them when n = 653)
    s[3, :m] = 30  # side by side in one slice
    s[4] = torch.randint(0, 4, (n,), generator=g).float()  # every value tied many times
    s[5, [0, w, 2 * w]] = 40  # three at one position, the rest anywhere
    values, columns = _row_topk(s, m)
    expected = s.topk(m, dim=1)
    assert torch.equal(values, expected.values)
    assert torch.equal(s.gather(1, columns), values) and all(len(set(row.tolist())) == m for row in columns)
    untied = expected.values[:, m - 1] > s.sort(dim=1, descending=True).values[:, m]
    assert untied.sum() >= 6  # every row but the tied ones (row 4, and row 2 when n = 653)
    assert torch.equal(columns[untied].sort(1).values, expected.indices[untied].sort(1).values)


def test_weights_by_hand():
    sims = torch.tensor([[0.9, 0.5, 0.1]])
    labels = torch.tensor([[1, 0, 0]])
    scores = knn_scores(sims, labels, num_classes=2, ks=(1, 3), temperature=0.1)
    w = torch.tensor([0.9, 0.5, 0.1]).div(0.1).softmax(0)
    assert torch.allclose(scores[1], torch.tensor([[0.0, w[0].item()]]))
    assert torch.allclose(scores[3], torch.tensor([[w[1] + w[2], w[0]]]))
    assert topk_accuracy(scores[3], torch.tensor([1])) == 100.0
    assert topk_accuracy(torch.tensor([[0.1, 0.5, 0.2], [0.9, 0.0, 0.3]]), torch.tensor([2, 2]), k=2) == 100.0
    assert topk_accuracy(torch.tensor([[0.1, 0.5, 0.2], [0.9, 0.0, 0.3]]), torch.tensor([2, 2]), k=1) == 0.0


def test_k_larger_than_the_bank():
    scores = knn_classify(torch.eye(3), torch.tensor([0, 1, 2]), torch.eye(3), ks=(1, 200))
    assert torch.equal(scores[200].argmax(1), torch.tensor([0, 1, 2]))


def test_read_labelled_folder_and_csv(tmp_path):
    for cls, n in (("cat", 2), ("dog", 1)):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (4, 4)).save(tmp_path / "train" / cls / f"{i}.png")
    paths, labels, names = read_labelled(tmp_path / "train")
    assert names == ["cat", "dog"] and labels == [0, 0, 1] and len(paths) == 3
    (tmp_path / "list.csv").write_text("path,label\ntrain/dog/0.png,dog\ntrain/cat/1.png,cat\n")
    paths, labels, names = read_labelled(tmp_path / "list.csv", classes=["cat", "dog"])
    assert labels == [1, 0] and paths[0] == tmp_path / "train/dog/0.png"
    with pytest.raises(DinokitError, match="labels that are no class of the reference split"):
        read_labelled(tmp_path / "list.csv", classes=["cat"])
    with pytest.raises(DinokitError, match="no labelled images"):
        read_labelled(tmp_path / "train" / "cat")


def test_a_csv_header_with_other_column_names_is_not_a_line(tmp_path):
    (tmp_path / "cat").mkdir()
    for i in range(2):
        Image.new("RGB", (4, 4)).save(tmp_path / "cat" / f"{i}.png")
    for header in ("image,label", "img,species", "file,Class"):
        (tmp_path / "list.csv").write_text(f"{header}\ncat/0.png,cat\ncat/1.png,dog\n")
        paths, labels, names = read_labelled(tmp_path / "list.csv")
        assert names == ["cat", "dog"] and labels == [0, 1], header  # no phantom class, no bad file
        assert paths == [tmp_path / "cat" / "0.png", tmp_path / "cat" / "1.png"]
    # an existing image whose class is named "label" is a line, not a header
    (tmp_path / "list.csv").write_text("cat/0.png,label\ncat/1.png,cat\n")
    assert read_labelled(tmp_path / "list.csv")[2] == ["cat", "label"]
    # a missing image on a later line stays a line (a bad file, counted when read)
    (tmp_path / "list.csv").write_text("cat/0.png,cat\nmissing.png,label\n")
    assert read_labelled(tmp_path / "list.csv")[1] == [0, 1]


def clustered(n, q, d=16, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g)
    labels = torch.randint(0, classes, (n + q,), generator=g)
    x = centers[labels] + 0.8 * torch.randn(n + q, d, generator=g)
    return x[:n], labels[:n], x[n:], labels[n:]


def test_bank_as_numpy_shards_or_memmap_gives_the_same_neighbours(tmp_path):
    bank, _, queries, _ = clustered(500, 60)
    s_ref, i_ref = knn_neighbours(bank, queries, 50)
    shards = [bank[:123].numpy(), bank[123:400].numpy(), bank[400:]]  # arrays and tensors mixed
    np.save(tmp_path / "b.npy", bank.numpy())
    memmap = np.load(tmp_path / "b.npy", mmap_mode="r")
    for source in (shards, memmap, [memmap[:250], memmap[250:]]):
        s, i = knn_neighbours(source, queries, 50, bank_chunk=64, query_chunk=16)
        assert torch.equal(i, i_ref) and torch.allclose(s, s_ref)


def test_weighted_voting_equivalences():
    bank, labels, queries, _ = clustered(400, 80, classes=4)
    scores = knn_classify(bank, labels, queries, 4, ks=(1, 20, 400))
    sims, idx = knn_neighbours(bank, queries, 400)
    # k = 1 is the nearest neighbour's label
    assert torch.equal(scores[1].argmax(1), labels[idx[:, 0]])
    # the softmax weights of all K neighbours sum to one
    assert torch.allclose(scores[400].sum(1), torch.ones(80))
    # a huge temperature makes every weight equal: majority vote of the 20 nearest (ties: lowest class)
    flat = knn_classify(bank, labels, queries, 4, ks=(20,), temperature=1e6)[20]
    counts = torch.stack([(labels[idx[:, :20]] == c).sum(1) for c in range(4)], dim=1)
    assert torch.equal(flat.argmax(1), counts.argmax(1))
    # softmax over K vs DINO v1's exp(s/T): same argmax for every k (checked by the brute force above too)
    raw = F.one_hot(labels[idx[:, :20]], 4).float() * (sims[:, :20] / 0.07).exp().unsqueeze(-1)
    assert torch.equal(scores[20].argmax(1), raw.sum(1).argmax(1))


def test_matches_scikit_learn_with_the_same_weighting():
    sklearn = pytest.importorskip("sklearn.neighbors")
    bank, labels, queries, _ = clustered(600, 100, d=32, classes=6)
    T = 0.07
    clf = sklearn.KNeighborsClassifier(
        n_neighbors=20, algorithm="brute", metric="cosine", weights=lambda d: np.exp((1 - d) / T)
    ).fit(bank.numpy(), labels.numpy())
    ours = knn_classify(bank, labels, queries, 6, ks=(20,), temperature=T)[20].argmax(1)
    assert np.array_equal(ours.numpy(), clf.predict(queries.numpy()))


def test_few_shot_draws():
    from dinokit.eval.knn import few_shot_indices

    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    a = few_shot_indices(labels, 5, seed=0)
    assert np.bincount(labels[a]).tolist() == [5, 3, 5] and np.all(np.diff(a) > 0)
    assert np.array_equal(a, few_shot_indices(labels, 5, seed=0))
    assert not np.array_equal(a, few_shot_indices(labels, 5, seed=1))
