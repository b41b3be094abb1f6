import numpy as np
import pytest

from dinokit.eval import linear
from dinokit.eval.cache import Features
from dinokit.eval.linear import ProbeSplit, carve_selection, head_grid, linear_probe


def make_split(n, d=8, classes=3, where="patch_mean", seed=0, name="split", margin=3.0):
    """Features where only `where` ("patch_mean", or block index 0..3 of the CLS stack) carries the class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centers = np.random.default_rng(99).normal(0, 1, (classes, d)) * margin
    layers = rng.normal(0, 1, (n, 4, d)).astype(np.float32)
    patch_mean = rng.normal(0, 1, (n, d)).astype(np.float32)
    signal = (centers[labels] + rng.normal(0, 0.3, (n, d))).astype(np.float32)
    if where == "patch_mean":
        patch_mean = signal
    else:
        layers[:, where] = signal
    feats = Features({"layers": [layers], "patch_mean": [patch_mean]}, np.arange(n), [])
    return ProbeSplit(feats, np.arange(n), labels, name)


GRID = head_grid((1, 4), (False, True), (1e-3, 0.1))


@pytest.mark.parametrize(("where", "n_last_blocks", "avgpool"), [("patch_mean", None, True), (0, 4, None)])
def test_linear_probe_recovers_a_separable_problem_and_picks_the_input_that_carries_it(where, n_last_blocks, avgpool):
    train = make_split(400, where=where, seed=0, name="train")
    test = make_split(200, where=where, seed=1, name="test")
    results, _ = linear_probe(train, test, 3, configs=GRID, epochs=12, batch_size=64, progress=False)
    assert results["top1"] >= 98.0 and results["top5"] == 100.0
    chosen = results["selected"]
    if avgpool is not None:  # the signal is only in the patch mean: a CLS-only head is at chance
        assert chosen["avgpool"] is True
    if n_last_blocks is not None:  # only the 4th-last block's CLS: a 1-block head cannot see it
        assert chosen["n_last_blocks"] == 4
    assert len(results["selection"]["scores"]) == len(GRID)


@pytest.mark.parametrize("method", ["sgd", "logreg"])
def test_selection_never_touches_the_test_split(monkeypatch, method):
    train = make_split(300, seed=0, name="train")
    test = make_split(77, seed=1, name="test")  # 77 images: recognisable by size in the logreg path
    seen = []
    real_eval, real_scores = linear.evaluate_heads, linear.logreg_scores

    def recording_eval(heads, split, *a, **k):
        seen.append((split.name, sorted(heads.heads)))
        return real_eval(heads, split, *a, **k)

    def recording_scores(model, x, y, num_classes):
        seen.append(("test" if len(x) == 77 else "selection", [model.C]))
        return real_scores(model, x, y, num_classes)

    monkeypatch.setattr(linear, "evaluate_heads", recording_eval)
    monkeypatch.setattr(linear, "logreg_scores", recording_scores)
    results, _ = linear_probe(
        train, test, 3, method=method, configs=GRID, epochs=5, logreg_values=6, batch_size=32, progress=False
    )
    names = [name for name, _ in seen]
    assert names.count("test") == 1 and names[-1] == "test"  # the test split: once, and last
    assert all(name != "test" for name in names[:-1])
    assert len(seen[-1][1]) == 1  # ... with the chosen head / C alone
    if method == "sgd":
        assert len(seen[0][1]) == len(GRID) and seen[-1][1] == [results["selected"]["head"]]
    else:
        assert len(seen) == 7 and seen[-1][1] == [results["selected"]["C"]]
    assert "test" in results["reported_on"] and "evaluated once" in results["reported_on"]


def test_carved_selection_is_stratified_disjoint_and_seeded():
    labels = np.array([0] * 50 + [1] * 20 + [2] * 1)
    fit, select = carve_selection(labels, 0.1, seed=0)
    assert np.bincount(labels[select], minlength=3).tolist() == [5, 2, 0]
    assert set(fit).isdisjoint(select) and len(fit) + len(select) == len(labels)
    assert np.array_equal(select, carve_selection(labels, 0.1, seed=0)[1])
    assert not np.array_equal(select, carve_selection(labels, 0.1, seed=1)[1])


def test_official_grid_and_inputs():
    import torch

    grid = head_grid()
    assert len(grid) == 52 and len({c.name for c in grid}) == 52
    block_cls = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    patch_mean = -torch.ones(2, 3)
    x = linear.linear_input(block_cls, patch_mean, 4, True)
    assert x.shape == (2, 15) and torch.equal(x[:, :12], block_cls.flatten(1)) and torch.equal(x[:, 12:], patch_mean)
    assert torch.equal(linear.linear_input(block_cls, patch_mean, 1, False), block_cls[:, -1])


def test_a_train_split_of_one_image_per_class_asks_for_a_selection_split():
    from dinokit.errors import DinokitError

    train = make_split(3, classes=3)
    train.labels[:] = [0, 1, 2]  # one image per class: nothing can be held out for selection
    with pytest.raises(DinokitError, match=r"no class with two or more images .* \(selection=") as err:
        linear_probe(train, make_split(6, seed=1), 3, configs=GRID, epochs=1, progress=False)
    assert not isinstance(err.value, ValueError)
