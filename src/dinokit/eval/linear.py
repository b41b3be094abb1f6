"""Linear probes on frozen, cached features: the DINOv2 grid of linear heads trained at once, and a
regularised logistic regression.

Classifier input (`dinov2/eval/linear.py: create_linear_input`), from the normed outputs of the
backbone's blocks:
    x = cat(CLS of the last n blocks)            n in {1, 4}
    x = cat(x, mean of the last block's patches)  if avgpool
Grid: every (n, avgpool) pair times 13 learning rates (1e-5 ... 0.1, each scaled by batch/256) gives
52 `nn.Linear` heads (init N(0, 0.01), bias 0) trained together on the same batches: SGD, momentum
0.9, no weight decay, cosine annealing to 0, the sum of the heads' cross-entropies as the loss.

Selection is honest (the official script picks the best of its 52 heads on the split it reports):
the heads are compared on a selection split, by default 10% of each train class carved out (the
official logistic regression carves 10% of train at random, not per class), then the chosen
configuration is retrained on the whole train set and the test split is evaluated once, with that
head alone.

Deliberate differences from the official `dinov2/eval/linear.py`, besides the selection:
- no augmentation: the heads train on cached features of the eval transform (Resize 256, CenterCrop
  224), computed once; the official script runs the backbone on a fresh RandomResizedCrop 224 + flip
  of every image at every step, which features once cannot hold;
- `epochs` are passes over train (the last batch smaller); the official 10 "epochs" are 10 x 1250
  iterations of 128 images per GPU (10 ImageNet epochs on 8 GPUs), with drop_last;
- learning rates are scaled by this process's batch / 256; the official by the global batch / 256
  (x 4 on its 8 GPUs), a factor the 13-value grid spans.

Logistic regression (`method="logreg"`, as `dinov2/eval/log_regression.py` with scikit-learn in
place of cuML, whose C means the same since cuML PR #2494, 2020): L2-regularised multinomial regression on the
final CLS, C swept over 10^linspace(-6, 5, 45), chosen on the selection split, refitted on train with
that C. Differences: its features are the linear probe's cached ones (Resize 256, CenterCrop 224), the
official one's Resize 224, CenterCrop 224 (`make_classification_eval_transform(resize_size=224)`);
lbfgs stops at a gradient tolerance of 1e-6 (cuML's 1e-12), warm-started from the previous C.
"""

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dinokit.errors import DinokitError
from dinokit.eval.cache import Features
from dinokit.eval.knn import topk_accuracy
from dinokit.runtime import keeps_global_rng

LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
SMALL_STEP_FLOPS = 5e7  # below this per head and step, one CPU thread beats several (no thread wake-ups)
LOGREG_C_POWERS = (-6.0, 5.0)  # C in 10^linspace(-6, 5, n)
LOGREG_TOL = 1e-6  # lbfgs gradient tolerance (cuML's 1e-12 makes scikit-learn run to max_iter every time)


@dataclass(frozen=True)
class HeadConfig:
    """One linear head of the grid: its input (last n blocks' CLS, + patch mean) and learning rate."""

    n_last_blocks: int
    avgpool: bool
    lr: float

    @property
    def name(self) -> str:
        lr = str(self.lr).replace(".", "_")  # module names cannot hold dots
        return f"blocks{self.n_last_blocks}_{'avgpool' if self.avgpool else 'cls'}_lr{lr}"

    def input_dim(self, embed_dim: int) -> int:
        return embed_dim * (self.n_last_blocks + int(self.avgpool))


def head_grid(n_last_blocks=(1, 4), avgpool=(False, True), learning_rates=LEARNING_RATES) -> list[HeadConfig]:
    """Every (n, avgpool, lr) once (a repeated value would put one head in two optimizer groups)."""
    return list(dict.fromkeys(HeadConfig(n, p, lr) for n in n_last_blocks for p in avgpool for lr in learning_rates))


def linear_input(block_cls: torch.Tensor, patch_mean: torch.Tensor, n_last_blocks: int, avgpool: bool) -> torch.Tensor:
    """(B, n*D [+ D]) classifier input from block_cls (B, L, D), CLS of the last L blocks (oldest
    first), and patch_mean (B, D), the mean of the last block's patch tokens."""
    x = block_cls[:, -n_last_blocks:].flatten(1)
    return torch.cat([x, patch_mean], dim=1) if avgpool else x


@dataclass
class ProbeSplit:
    """Rows of a feature cache (kinds "layers" and "patch_mean") with their labels, named."""

    features: Features
    rows: np.ndarray
    labels: np.ndarray
    name: str

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = self.rows[positions]
        block_cls = torch.from_numpy(self.features.rows("layers", rows)).float()
        patch_mean = torch.from_numpy(self.features.rows("patch_mean", rows)).float()
        return block_cls, patch_mean, torch.from_numpy(self.labels[positions]).long()

    def subset(self, positions: np.ndarray, name: str) -> "ProbeSplit":
        return ProbeSplit(self.features, self.rows[positions], self.labels[positions], name)

    def batches(self, size: int, order: np.ndarray | None = None):
        order = np.arange(len(self)) if order is None else order
        for start in range(0, len(order), size):
            yield self.batch(order[start : start + size])


def carve_selection(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit positions, selection positions): `fraction` of each class (at least one image of every
    class that has two or more) held out for selection, at random (seeded)."""
    rng = np.random.default_rng(seed)
    fit, select = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.nonzero(labels == c)[0])
        n = min(len(members) - 1, max(1, round(fraction * len(members)))) if len(members) > 1 else 0
        select.append(members[:n])
        fit.append(members[n:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(select))


class LinearHeads(nn.Module):
    """The grid of linear heads (official `AllClassifiers`): forward gives {name: logits}."""

    def __init__(self, configs: list[HeadConfig], embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.configs = {c.name: c for c in configs}
        self.heads = nn.ModuleDict({c.name: nn.Linear(c.input_dim(embed_dim), num_classes) for c in configs})
        for head in self.heads.values():
            nn.init.normal_(head.weight, mean=0.0, std=0.01)
            nn.init.zeros_(head.bias)

    def only(self, name: str) -> "LinearHeads":
        """A grid holding just the head `name` (same weights)."""
        config = self.configs[name]
        head = self.heads[name]
        single = LinearHeads([config], head.in_features // (config.n_last_blocks + config.avgpool), head.out_features)
        single.heads[name].load_state_dict(head.state_dict())
        return single.to(head.weight.device).eval()

    def forward(self, block_cls: torch.Tensor, patch_mean: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs = {}
        out = {}
        for name, head in self.heads.items():
            c = self.configs[name]
            key = (c.n_last_blocks, c.avgpool)
            if key not in inputs:
                inputs[key] = linear_input(block_cls, patch_mean, c.n_last_blocks, c.avgpool)
            out[name] = head(inputs[key])
        return out


@contextlib.contextmanager
def threads_for(step_flops: float, device):
    """Run tiny CPU steps on one thread: waking a thread pool for a 10 microsecond matmul costs more than
    the matmul, and on a busy machine (other processes on the cores) it can cost 100x."""
    if torch.device(device).type != "cpu" or step_flops >= SMALL_STEP_FLOPS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@keeps_global_rng
def train_heads(
    split: ProbeSplit,
    configs: list[HeadConfig],
    num_classes: int,
    epochs: int = 10,
    batch_size: int = 128,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> LinearHeads:
    """Train every head of `configs` at once on `split` (see the module docstring for the recipe)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    embed_dim = split.features.shards["patch_mean"][0].shape[-1]
    heads = LinearHeads(configs, embed_dim, num_classes).to(device)
    groups = [{"params": heads.heads[c.name].parameters(), "lr": c.lr * batch_size / 256.0} for c in configs]
    optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=0.0)
    steps = epochs * math.ceil(len(split) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=0.0)
    rng = np.random.default_rng(seed)
    bar = tqdm(total=steps, desc="linear heads", unit="step", disable=not progress, leave=False)
    widest = max(h.in_features for h in heads.heads.values())
    with threads_for(6 * batch_size * widest * num_classes, device):
        for _ in range(epochs):
            for block_cls, patch_mean, labels in split.batches(batch_size, rng.permutation(len(split))):
                logits = heads(block_cls.to(device), patch_mean.to(device))
                labels = labels.to(device)
                loss = sum(F.cross_entropy(v, labels) for v in logits.values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
    bar.close()
    return heads.eval()


@torch.no_grad()
def evaluate_heads(heads: LinearHeads, split: ProbeSplit, batch_size: int = 1024) -> dict[str, dict[str, float]]:
    """{head name: {"top1": %, "top5": %}} on `split`."""
    device = next(heads.parameters()).device
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in heads.heads}
    labels = []
    for block_cls, patch_mean, y in split.batches(batch_size):
        for name, logits in heads(block_cls.to(device), patch_mean.to(device)).items():
            scores[name].append(logits.float().cpu())
        labels.append(y)
    y = torch.cat(labels)
    return {
        name: {"top1": topk_accuracy(torch.cat(s), y, 1), "top5": topk_accuracy(torch.cat(s), y, 5)}
        for name, s in scores.items()
    }


def best_head(results: dict[str, dict[str, float]]) -> str:
    """The head with the highest top-1 (ties: the first in grid order)."""
    return max(results, key=lambda name: results[name]["top1"])


# ---------------------------------------------------------------------------------- logistic regression
def logreg_inputs(split: ProbeSplit) -> tuple[np.ndarray, np.ndarray]:
    """(final-norm CLS as float64, labels): the official logistic regression's input."""
    cls = split.features.rows("layers", split.rows)[:, -1]
    return cls.astype(np.float64), split.labels


def fit_logreg(x: np.ndarray, y: np.ndarray, C: float, max_iter: int = 1000, model=None):
    """L2-regularised multinomial logistic regression (scikit-learn, lbfgs). Passing the previous
    `model` warm-starts from its weights (a sweep over increasing C converges much faster)."""
    from sklearn.linear_model import LogisticRegression

    model = model or LogisticRegression(max_iter=max_iter, tol=LOGREG_TOL, warm_start=True)
    model.set_params(C=C)
    return model.fit(x, y)


def logreg_scores(model, x: np.ndarray, y: np.ndarray, num_classes: int) -> dict[str, float]:
    probs = np.zeros((len(x), num_classes))
    probs[:, model.classes_] = model.predict_proba(x)
    scores, labels = torch.from_numpy(probs), torch.from_numpy(y)
    return {"top1": topk_accuracy(scores, labels, 1), "top5": topk_accuracy(scores, labels, 5)}


def sweep_logreg(
    fit: ProbeSplit, select: ProbeSplit, num_classes: int, n_values: int = 45, max_iter: int = 1000
) -> tuple[float, dict[str, dict[str, float]]]:
    """(best C, {C: scores on `select`}), C swept upwards over 10^linspace(-6, 5, n_values)."""
    x_fit, y_fit = logreg_inputs(fit)
    x_sel, y_sel = logreg_inputs(select)
    model = None
    results, values = {}, {}
    for C in np.logspace(*LOGREG_C_POWERS, n_values).tolist():
        model = fit_logreg(x_fit, y_fit, C, max_iter, model)
        results[f"{C:.6g}"] = logreg_scores(model, x_sel, y_sel, num_classes)
        values[f"{C:.6g}"] = C  # the key is rounded to 6 digits: the refit takes the C itself
    return values[best_head(results)], results


# ---------------------------------------------------------------------------------- the chosen head
def linear_classifier(final, selected: dict, num_classes: int) -> dict[str, torch.Tensor]:
    """{"weight": (C, D_in), "bias": (C,)} of the chosen head, applied as softmax(linear_input W^T + b).

    sgd: the chosen `nn.Linear` of the grid. logreg: scikit-learn's model on the final CLS, whose
    probabilities are softmax(x W^T + b) (multinomial); a binary model's sigmoid(x w + b) is the softmax
    of the logits (0, x w + b). A class the model never saw gets bias -inf (probability 0, as
    `logreg_scores` gives it)."""
    if isinstance(final, LinearHeads):
        head = final.heads[selected["head"]]
        return {"weight": head.weight.detach().float().cpu(), "bias": head.bias.detach().float().cpu()}
    coef, intercept = np.asarray(final.coef_, np.float64), np.asarray(final.intercept_, np.float64)
    if coef.shape[0] == 1:  # binary
        coef, intercept = np.concatenate([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    weight = torch.zeros(num_classes, coef.shape[1])
    bias = torch.full((num_classes,), float("-inf"))
    weight[final.classes_] = torch.from_numpy(coef).float()
    bias[final.classes_] = torch.from_numpy(intercept).float()
    return {"weight": weight, "bias": bias}


def classifier_logits(
    weight: torch.Tensor,
    bias: torch.Tensor,
    block_cls: torch.Tensor,
    patch_mean: torch.Tensor | None,
    n_last_blocks: int,
    avgpool: bool,
) -> torch.Tensor:
    """(B, C) logits of a saved classifier (`linear_classifier`) on block_cls (B, L, D) / patch_mean (B, D)."""
    return F.linear(linear_input(block_cls, patch_mean, n_last_blocks, avgpool), weight, bias)


# ---------------------------------------------------------------------------------- the protocol
def linear_probe(
    train: ProbeSplit,
    test: ProbeSplit,
    num_classes: int,
    selection: ProbeSplit | None = None,
    selection_fraction: float = 0.1,
    method: str = "sgd",
    configs: list[HeadConfig] | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    logreg_values: int = 45,
    logreg_max_iter: int = 1000,
    refit: bool = True,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[dict, LinearHeads | object]:
    """Choose on the selection split, refit on train, report `test` once: (results, final model).

    1. selection = `selection`, or `selection_fraction` of train carved out (heads then fit on the rest);
    2. every head / C is scored on the selection split, and the best top-1 is chosen;
    3. with a carved split and `refit`, the chosen configuration is retrained on all of train;
    4. the test split is evaluated once, with the chosen head only.
    """
    if method not in ("sgd", "logreg"):
        raise ValueError(f"method must be 'sgd' or 'logreg', got {method!r}")
    carved = selection is None
    if carved:
        fit_pos, select_pos = carve_selection(train.labels, selection_fraction, seed)
        if len(select_pos) == 0:
            raise DinokitError(
                f"train has no class with two or more images ({len(train.labels)} images), so no "
                "selection split can be carved from it: pass a labelled selection split (selection=...) "
                "or give train at least two images of a class"
            )
        fit = train.subset(fit_pos, f"train minus selection ({len(fit_pos)} images)")
        selection = train.subset(select_pos, f"{selection_fraction:g} of train per class, seed {seed}")
    else:
        fit = train
    refit = refit and carved
    final_split = train if refit else fit

    if method == "sgd":
        configs = configs or head_grid()
        heads = train_heads(fit, configs, num_classes, epochs, batch_size, seed, device, progress)
        on_selection = evaluate_heads(heads, selection)
        chosen = best_head(on_selection)
        config = heads.configs[chosen]
        final = (
            train_heads(train, [config], num_classes, epochs, batch_size, seed, device, progress)
            if refit
            else heads.only(chosen)
        )
        on_test = evaluate_heads(final, test)[chosen]
        selected = {"n_last_blocks": config.n_last_blocks, "avgpool": config.avgpool, "lr": config.lr, "head": chosen}
    else:
        best_c, on_selection = sweep_logreg(fit, selection, num_classes, logreg_values, logreg_max_iter)
        chosen = f"{best_c:.6g}"
        final = fit_logreg(*logreg_inputs(final_split), best_c, logreg_max_iter)
        on_test = logreg_scores(final, *logreg_inputs(test), num_classes)
        selected = {"C": best_c, "features": "CLS of the last block (final norm)"}
    results = {
        "top1": on_test["top1"],
        "top5": on_test["top5"],
        "selected": {**selected, "selection_top1": on_selection[chosen]["top1"]},
        "selection": {"split": selection.name, "images": len(selection), "scores": on_selection},
        "final_fit_on": f"{final_split.name} ({len(final_split)} images)",
        "reported_on": f"{test.name} ({len(test)} images), evaluated once",
    }
    return results, final
