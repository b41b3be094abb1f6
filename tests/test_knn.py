import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinokit.data.labelled import read_labelled
from dinokit.errors import DinokitError
from dinokit.eval.knn import knn_classify, knn_neighbours, knn_scores, topk_accuracy


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
    with pytest.raises(DinokitError, match="not in the reference class list"):
        read_labelled(tmp_path / "list.csv", classes=["cat"])
    with pytest.raises(DinokitError, match="no labelled images"):
        read_labelled(tmp_path / "train" / "cat")
