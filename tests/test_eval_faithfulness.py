"""dinokit's evaluation protocols against independent re-implementations of the official computations
(`dinov2/eval/knn.py`, `dinov2/eval/linear.py`, `dinov2/eval/log_regression.py`, the depth heads and
SigLoss, mmseg's mIoU), written here from the formulas of /work/shared/reference/dinov2-official.md
section 7 and the official code's order of operations, on small tensors. Where dinokit deliberately
departs from the official code (its known bugs), the test pins dinokit's behaviour and says why."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinokit.eval.cache import Features
from dinokit.eval.knn import knn_classify, knn_neighbours, topk_accuracy
from dinokit.eval.linear import ProbeSplit, linear_probe


# ----------------------------------------------------------------------------------------- k-NN
def official_knn_probas(bank, bank_labels, queries, nb_knn, T, num_classes):
    """`KnnModule.forward` of one process: cosine similarities of L2-normalised features, the top max_k,
    softmax(s / T) over them, one_hot(labels) weighted and summed over the first k, for each k."""
    train = F.normalize(bank.double(), dim=1)
    test = F.normalize(queries.double(), dim=1)
    sims = test @ train.T
    topk_sims, idx = sims.topk(max(nb_knn), dim=1, largest=True, sorted=True)
    labels = bank_labels[idx]
    weights = torch.softmax(topk_sims / T, dim=1)
    votes = F.one_hot(labels, num_classes).double() * weights[:, :, None]
    return {k: votes[:, :k].sum(1) for k in nb_knn}


def test_knn_scores_are_the_official_probas_for_every_k():
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(400, 12, generator=g), torch.randn(60, 12, generator=g)
    labels = torch.randint(0, 7, (400,), generator=g)
    ks = (10, 20, 100, 200)
    ours = knn_classify(bank, labels, queries, 7, ks, 0.07, bank_chunk=33, query_chunk=16)
    ref = official_knn_probas(bank, labels, queries, ks, 0.07, 7)
    for k in ks:
        assert torch.allclose(ours[k].double(), ref[k], atol=1e-5)
        assert torch.equal(ours[k].argmax(1), ref[k].argmax(1))


def test_a_class_no_neighbour_voted_for_is_never_a_top5_hit():
    """The official top-5 (torchmetrics' topk over the vote sums) fills the five places with classes of
    zero votes when the neighbours name fewer than five classes, and counts the truth among them as a
    hit: which ones depends on how topk breaks ties (the class order, the device). dinokit counts a
    class in the top k only if every class tied with it fits there too, so a class without votes never is."""
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2]])
    labels = torch.tensor([7, 7, 3])
    scores = knn_classify(bank, labels, torch.tensor([[1.0, 0.0]]), num_classes=10, ks=(3,))[3]
    for truth in range(10):
        expected = 100.0 if truth in (3, 7) else 0.0
        assert topk_accuracy(scores, torch.tensor([truth]), 5) == expected, truth
    # top-1 of two classes tied exactly: neither is counted (the official result followed the class order)
    tied = torch.tensor([[0.5, 0.5, 0.0]])
    assert topk_accuracy(tied, torch.tensor([0]), 1) == topk_accuracy(tied, torch.tensor([1]), 1) == 0.0
    assert topk_accuracy(tied, torch.tensor([1]), 2) == 100.0
    # k at or above the number of classes: every label is in it
    assert topk_accuracy(tied, torch.tensor([2]), 5) == 100.0
    # a query class absent from the bank: no votes, no hit; one beyond the scores' classes: no hit either
    assert topk_accuracy(scores.expand(3, -1), torch.tensor([5, 12, -1]), 5) == 0.0


def reference_neighbours(bank, queries, k):
    """Top-k of each query by similarity, ties broken by the lower bank index (a stable full sort)."""
    sims = F.normalize(queries.float(), dim=1) @ F.normalize(bank.float(), dim=1).T
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
    return sims.gather(1, order), order


def test_chunked_neighbours_equal_the_unchunked_ones_with_tied_similarities():
    """Duplicate images in the bank give exactly tied similarities. Which of them enters the top k, and
    in what order, decided the votes of k's boundaries by how topk happened to break the tie, so bank
    and query chunk sizes changed the neighbours. Ties now go to the lower bank index, in every chunking."""
    # bank rows of one non-zero entry: each similarity is one product, exact however the matrix
    # products are blocked (a sum of two could round differently under a fused multiply-add)
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(40, 6)
    base[torch.arange(40), torch.randint(0, 6, (40,), generator=g)] = torch.randn(40, generator=g)
    bank = torch.cat([base, base[:15], base[:15]])  # rows 40..54 and 55..69 repeat rows 0..14
    queries = torch.cat([base[:15], torch.randn(10, 6, generator=g)])
    for k in (1, 2, 3, 5, 70):
        want_s, want_i = reference_neighbours(bank, queries, k)
        for bank_chunk, query_chunk in ((65536, 1024), (7, 3), (1, 1), (40, 25), (13, 2)):
            s, i = knn_neighbours(bank, queries, k, bank_chunk=bank_chunk, query_chunk=query_chunk)
            assert torch.equal(i, want_i), (k, bank_chunk, query_chunk)
            assert torch.allclose(s, want_s)


def test_few_shot_draws_take_n_of_each_class_without_repeats():
    from dinokit.eval.knn import few_shot_indices, few_shot_ks

    labels = np.array([0] * 5 + [1] * 2 + [2] * 9)
    picked = few_shot_indices(labels, 3, seed=4)
    assert np.bincount(labels[picked]).tolist() == [3, 2, 3]  # a class with fewer gives all it has
    assert len(set(picked.tolist())) == len(picked)
    assert few_shot_ks([10, 20, 100, 200], 5) == [5] and few_shot_ks([1, 10, 20], 10) == [1, 10]


# ----------------------------------------------------------------------------------------- linear
def probe_split(n: int, seed: int, name: str) -> "ProbeSplit":
    """Unbalanced classes (60 / 25 / 15%) told apart by the last block's CLS alone."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, n, p=[0.6, 0.25, 0.15])
    centers = np.random.default_rng(7).normal(0, 3, (3, 8))
    layers = rng.normal(0, 1, (n, 4, 8)).astype(np.float32)
    layers[:, -1] = centers[labels] + rng.normal(0, 0.3, (n, 8))
    patch_mean = rng.normal(0, 1, (n, 8)).astype(np.float32)
    return ProbeSplit(
        Features({"layers": [layers], "patch_mean": [patch_mean]}, np.arange(n), []), np.arange(n), labels, name
    )


def test_logreg_refits_with_the_swept_c_itself():
    """The official sweep (`log_regression.py: sweep_C_values`) refits with the C of the grid that won.
    dinokit keyed its results by C printed to 6 digits and refitted with that rounded number."""
    grid = np.logspace(-6, 5, 4)  # 1e-6, 10^-2.33, 10^1.33, 1e5: the first predicts the majority class only
    results, final = linear_probe(
        probe_split(300, 0, "train"), probe_split(60, 1, "test"), 3, method="logreg", logreg_values=4, progress=False
    )
    assert final.C in grid.tolist() and results["selected"]["C"] == final.C
    assert grid[0] != final.C  # the case the test is about: a C that 6 digits do not hold


def official_linear_inputs(model, images, n_last_blocks):
    """`ModelWithIntermediateLayers(model, 4)` then `create_linear_input`: the last 4 blocks' outputs
    through the final norm, CLS = token 0, patch tokens after the CLS and the registers; the CLS of the
    last n blocks concatenated oldest first, then (avgpool) the mean of the last block's patch tokens."""
    x = model.prepare_tokens(images)
    outputs = []
    for i, block in enumerate(model.blocks):
        x = block(x)
        if i >= len(model.blocks) - 4:
            outputs.append(model.norm(x))
    pairs = [(o[:, 1 + model.num_register_tokens :], o[:, 0]) for o in outputs]
    last = pairs[-n_last_blocks:]
    cls = torch.cat([c for _, c in last], dim=-1)
    return cls, torch.cat([cls, pairs[-1][0].mean(dim=1)], dim=-1)


@torch.no_grad()
def test_linear_probe_inputs_are_the_official_ones_on_a_model_with_registers():
    from conftest import perturb_scales_and_norms

    from dinokit.eval.classification import CLASSIFICATION_KINDS, last_blocks
    from dinokit.eval.linear import linear_input
    from dinokit.features.extract import compute_features
    from dinokit.models import create_model

    torch.manual_seed(0)
    model = perturb_scales_and_norms(create_model("vit_micro_p4", num_register_tokens=2)).eval()
    images = torch.randn(3, 3, 32, 32)
    feats = compute_features(model, images, CLASSIFICATION_KINDS, last_blocks(model))
    for n in (1, 4):
        cls_only, with_mean = official_linear_inputs(model, images, n)
        assert torch.allclose(linear_input(feats["layers"], feats["patch_mean"], n, False), cls_only, atol=1e-5)
        assert torch.allclose(linear_input(feats["layers"], feats["patch_mean"], n, True), with_mean, atol=1e-5)
    # k-NN's feature (the last of the cached blocks) is the final-norm CLS of `ModelWithNormalize`
    assert torch.allclose(feats["layers"][:, -1], model.forward_features(images)["x_norm_clstoken"], atol=1e-5)


# ----------------------------------------------------------------------------------------- dense metrics
def test_miou_is_accumulated_over_the_split_as_mmseg_not_averaged_over_images():
    """mmseg's `total_intersect_and_union` sums each class's intersection and union over every image
    of the split before dividing; a mean of per-image mIoUs is another (larger here) number."""
    from dinokit.eval.metrics import confusion_matrix, segmentation_scores

    g = torch.Generator().manual_seed(3)
    preds = [torch.randint(0, 4, (6, 7), generator=g) for _ in range(5)]
    truths = [torch.randint(0, 4, (6, 7), generator=g) for _ in range(5)]
    truths[0][:2] = 255  # ignored pixels
    truths[1][truths[1] == 3] = 0  # class 3 absent from one image
    intersect, union, labelled, correct = np.zeros(4), np.zeros(4), 0, 0
    for p, t in zip(preds, truths, strict=True):
        p, t = p.numpy(), t.numpy()
        keep = t != 255
        p, t = p[keep], t[keep]
        hit = p[p == t]
        area_i = np.bincount(hit, minlength=4)
        intersect += area_i
        union += np.bincount(p, minlength=4) + np.bincount(t, minlength=4) - area_i
        labelled, correct = labelled + len(t), correct + len(hit)
    total = sum(confusion_matrix(p, t, 4, 255) for p, t in zip(preds, truths, strict=True))
    scores = segmentation_scores(total, 255)
    assert scores["miou"] == pytest.approx(100 * np.nanmean(intersect / union))
    assert scores["pixel_accuracy"] == pytest.approx(100 * correct / labelled)
    # by hand: image 1 misses its one class-1 pixel (mIoU 37.5), image 2 is all right (100); over the split
    # IoU_0 = 3 / 4 and IoU_1 = 4 / 5: 77.5, where the mean of the images' mIoUs is 68.75
    one = confusion_matrix(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]), 2)
    two = confusion_matrix(torch.tensor([1, 1, 1, 1]), torch.tensor([1, 1, 1, 1]), 2)
    assert segmentation_scores(one)["miou"] == 37.5 and segmentation_scores(two)["miou"] == 100.0
    assert segmentation_scores(one + two)["miou"] == pytest.approx(77.5)


def test_linear_heads_train_as_the_official_loop(monkeypatch):
    """`dinov2/eval/linear.py`'s training, written out: every head's cross-entropy summed into one loss,
    SGD with momentum 0.9 (buffer = 0.9 buffer + grad, the first step's buffer = grad), no weight decay,
    each head's lr = base lr x batch / 256, cosine annealing lr_t = lr (1 + cos(pi t / T)) / 2 to 0 over
    the T steps, stepped after every batch. The initial weights are taken from dinokit's heads (N(0, 0.01),
    bias 0), the batch order from its seeded permutations."""
    import math

    from dinokit.eval import linear

    captured = {}

    class Capturing(linear.LinearHeads):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            captured.update({k: v.clone() for k, v in self.state_dict().items()})

    monkeypatch.setattr(linear, "LinearHeads", Capturing)
    split = probe_split(40, 0, "train")
    configs = [linear.HeadConfig(1, False, 0.5), linear.HeadConfig(4, True, 2.0)]
    batch, epochs = 16, 2
    trained = linear.train_heads(split, configs, 3, epochs=epochs, batch_size=batch, seed=5, progress=False)

    params = {
        c.name: [captured[f"heads.{c.name}.weight"].double(), captured[f"heads.{c.name}.bias"].double()]
        for c in configs
    }
    buffers = {name: [None, None] for name in params}
    steps = epochs * math.ceil(len(split) / batch)
    rng, t = np.random.default_rng(5), 0
    for _ in range(epochs):
        order = rng.permutation(len(split))
        for start in range(0, len(split), batch):
            block_cls, patch_mean, y = split.batch(order[start : start + batch])
            grads = {}
            for c in configs:
                w, b = (p.clone().requires_grad_(True) for p in params[c.name])
                x = block_cls[:, -c.n_last_blocks :].flatten(1).double()
                if c.avgpool:
                    x = torch.cat([x, patch_mean.double()], dim=1)
                F.cross_entropy(x @ w.T + b, y).backward()  # the sum's gradient w.r.t. one head is its own
                grads[c.name] = [w.grad, b.grad]
            factor = (1 + math.cos(math.pi * t / steps)) / 2
            for c in configs:
                lr = c.lr * batch / 256 * factor
                for j in range(2):
                    g = grads[c.name][j]
                    buffers[c.name][j] = g if buffers[c.name][j] is None else 0.9 * buffers[c.name][j] + g
                    params[c.name][j] = params[c.name][j] - lr * buffers[c.name][j]
            t += 1
    for c in configs:
        head = trained.heads[c.name]
        assert torch.allclose(head.weight.double(), params[c.name][0], atol=1e-5)
        assert torch.allclose(head.bias.double(), params[c.name][1], atol=1e-5)
