"""The classification commands: `dinokit eval knn` and `dinokit eval linear`.

Both read a labelled `root/<class>/*` folder or a `path,label` CSV for train and val, take features
from the cache (`dinokit.eval.cache`: extracted once per model, files and transform), print a table
with the protocol beside it, and write a JSON file of results into `out`.
"""

import json
from pathlib import Path

import numpy as np
import torch

from dinokit.data.images import decode_min_side
from dinokit.errors import DinokitError, require
from dinokit.eval.common import (
    labelled_features,
    make_transform,
    prepare_backbone,
    protocol_record,
    read_splits,
    resolve_cache,
)
from dinokit.eval.heads import head_metadata, save_head
from dinokit.eval.knn import DEFAULT_KS, few_shot_indices, few_shot_ks, knn_classify, topk_accuracy
from dinokit.eval.linear import LEARNING_RATES, ProbeSplit, head_grid, linear_classifier, linear_probe
from dinokit.io import (
    prepare_output,
    refuse_other_outputs,
    refuse_output_over_inputs,
    sync,
    write_json,
    write_text,
)
from dinokit.runtime import resolve_device

# k-NN and the linear probes share one cache entry: the normed CLS of the last (up to) 4 blocks and the
# mean of the last block's patch tokens. The final CLS used by k-NN is the last of those blocks.
CLASSIFICATION_KINDS = ("layers", "patch_mean")


def last_blocks(model, n: int = 4) -> tuple[int, ...]:
    depth = len(model.blocks)
    return tuple(range(max(0, depth - n), depth))


def knn_accuracies(
    bank, bank_labels: np.ndarray, queries, query_labels: np.ndarray, num_classes: int, ks, temperature, device="cpu"
) -> dict:
    """{"top1": {"k": %}, "top5": {"k": %}} of weighted k-NN."""
    labels = torch.as_tensor(bank_labels)
    scores = knn_classify(bank, labels, torch.as_tensor(queries), num_classes, ks, temperature, device=device)
    labels = torch.as_tensor(query_labels)
    return {
        "top1": {str(k): topk_accuracy(scores[k], labels, 1) for k in ks},
        "top5": {str(k): topk_accuracy(scores[k], labels, 5) for k in ks},
    }


def summarise_tries(tries: list[dict]) -> dict:
    """Mean top-1 / top-5 per k over few-shot draws, with the top-1 standard deviation."""
    ks = list(tries[0]["top1"])
    summary = {m: {k: float(np.mean([t[m][k] for t in tries])) for k in ks} for m in ("top1", "top5")}
    summary["top1_std"] = {k: float(np.std([t["top1"][k] for t in tries])) for k in ks}
    summary["tries"] = len(tries)
    return summary


def print_knn_table(result: dict, title: str) -> None:
    print(title)
    print(f"{'k':>6} {'top-1':>8} {'top-5':>8}")
    for k in result["top1"]:
        print(f"{k:>6} {result['top1'][k]:>8.2f} {result['top5'][k]:>8.2f}")


def eval_knn(
    model: str,
    train: str,
    val: str,
    out: str = "out/eval-knn",
    ks: list[int] = list(DEFAULT_KS),  # noqa: B006 (never mutated; shown in --help)
    temperature: float = 0.07,
    few_shot: list[int] | None = None,
    few_shot_tries: int = 5,
    image_size: int = 224,
    resize_policy: str = "center_crop",
    reduced_decode: bool = True,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    precision: str = "bf16",
    cache: str = "auto",
    seed: int = 0,
) -> str:
    """Weighted k-NN on L2-normalised CLS features (cosine, softmax(s/T) votes): writes out/knn.json.

    model: a weights file / folder, a pretraining run folder, a released name or random:<arch>.
    train, val: labelled `<class>/<images>` folders or `path,label` CSVs (val uses train's classes and
    shares no image with train).
    ks, temperature: the DINO / DINOv2 protocol (10, 20, 100, 200; 0.07). few_shot: e.g. [1, 5, 10]
    images per class drawn from train, `few_shot_tries` draws each (mean and std reported); as the
    official few-shot k-NN, n per class votes with the ks not above n, and k = n.
    precision: of feature extraction (bf16 | fp32); the search itself is exact fp32.
    reduced_decode: large JPEGs decoded at 1/2, 1/4 or 1/8 scale, never below twice the resize
    (`ReducedJpegDecode`); false decodes them whole, as the official evaluation.
    cache: auto | none | a folder for the feature cache.
    """
    if not ks or min(ks) < 1:
        raise DinokitError(f"ks must be positive integers, got {ks}")
    if not temperature > 0:
        raise DinokitError(
            f"temperature must be > 0 (votes are softmax(s/T); the protocol's is 0.07), got {temperature}"
        )
    if few_shot and min(few_shot) < 1:
        raise DinokitError(f"few_shot must be positive numbers of images per class, e.g. [1, 5, 10]; got {few_shot}")
    if few_shot and few_shot_tries < 1:
        raise DinokitError(f"few_shot_tries must be >= 1 (draws per few_shot size), got {few_shot_tries}")
    out = str(prepare_output(out, folder=True, create=False))  # before the features; "~/knn" expanded
    refuse_other_outputs(out, ("knn.json", "linear.json"), "dinokit eval")
    train_split, val_split, _ = read_splits(train, val)  # a missing val fails before train's features
    backbone = prepare_backbone(model, device, seed)
    from dinokit.data.transforms import check_model_input_size  # torchvision: not for `--help`

    check_model_input_size(backbone.model, image_size)
    transform = make_transform(image_size, resize_policy, reduced_decode)
    cache_dir = resolve_cache(cache)
    kw = dict(cache=cache_dir, batch_size=batch_size, num_workers=num_workers, precision=precision)
    layers = last_blocks(backbone.model)
    tr = labelled_features(backbone, train_split, transform, CLASSIFICATION_KINDS, layers, **kw)
    va = labelled_features(backbone, val_split, transform, CLASSIFICATION_KINDS, layers, **kw)
    num_classes = len(tr.class_names)
    bank = [shard[:, -1] for shard in tr.features.shards["layers"]]  # memory-mapped when cached: read in chunks
    queries = va.features.array("layers")[:, -1]

    dev = resolve_device(device)
    result = knn_accuracies(bank, tr.labels, queries, va.labels, num_classes, ks, temperature, dev)
    protocol = protocol_record(
        backbone,
        transform,
        image_size,
        precision,
        features="CLS token after the final norm, L2-normalised",
        similarity="cosine",
        voting="weights softmax(s/T) over the max-k neighbours, summed per class for each k",
        ks=list(ks),
        temperature=temperature,
        metric="top-1 / top-5 accuracy in percent (micro average)",
        train=str(train),
        val=str(val),
        train_images=len(tr.labels),
        val_images=len(va.labels),
        train_bad_files=tr.bad,
        val_bad_files=va.bad,
        num_classes=num_classes,
        feature_cache=tr.features.key if cache_dir else None,
        # a k beyond the bank votes with every train image: its accuracy is that of k = train_images
        ks_above_bank=[k for k in ks if k > len(tr.labels)],
    )
    record = {**result, "protocol": protocol}

    if few_shot:
        record["few_shot"] = {}
        protocol["few_shot_ks"] = {str(n): few_shot_ks(ks, n) for n in few_shot}
        for n in few_shot:
            tries = []
            for t in range(few_shot_tries):
                picked = few_shot_indices(tr.labels, n, seed + t)
                sub_bank = tr.features.rows("layers", picked)[:, -1]
                args = (queries, va.labels, num_classes, few_shot_ks(ks, n), temperature, dev)
                tries.append(knn_accuracies(sub_bank, tr.labels[picked], *args))
            record["few_shot"][str(n)] = summarise_tries(tries)

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "knn.json", record)
    title = (
        f"k-NN (T={temperature}) {backbone.description}: bank {len(tr.labels)} ({train}), "
        f"{len(va.labels)} queries ({val}), {num_classes} classes\n"
        f"transform: {protocol['transform']}"
    )
    print_knn_table(result, title)
    if protocol["ks_above_bank"]:
        above = ", ".join(map(str, protocol["ks_above_bank"]))
        print(f"note: k = {above} exceed the {len(tr.labels)} train images: those vote with all of them")
    for n, r in record.get("few_shot", {}).items():
        print_knn_table(r, f"few-shot: {n} per class, mean of {few_shot_tries} draws")
    return str(out_dir / "knn.json")


def eval_linear(
    model: str,
    train: str,
    val: str,
    out: str = "out/eval-linear",
    selection: str | None = None,
    selection_fraction: float = 0.1,
    method: str = "sgd",
    n_last_blocks: list[int] = [1, 4],  # noqa: B006 (never mutated; shown in --help)
    avgpool: list[bool] = [False, True],  # noqa: B006
    learning_rates: list[float] = list(LEARNING_RATES),  # noqa: B006
    epochs: int = 10,
    train_batch_size: int = 128,
    logreg_values: int = 45,
    refit: bool = True,
    image_size: int = 224,
    resize_policy: str = "center_crop",
    reduced_decode: bool = True,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    precision: str = "bf16",
    cache: str = "auto",
    seed: int = 0,
) -> str:
    """Linear probe on frozen features: a grid of heads chosen on a selection split, val reported once.

    val: the split that is reported (e.g. ImageNet val), evaluated once with the chosen head; it must
    share no image with train or selection.
    selection: a labelled split to choose the head on; by default `selection_fraction` of each train
    class is held out for it, and the chosen configuration is then retrained on all of train (refit).
    method: sgd (the DINOv2 grid: n_last_blocks x avgpool x learning_rates, trained at once, SGD +
    cosine schedule for `epochs`) or logreg (L2 logistic regression on the final CLS, `logreg_values`
    values of C in 1e-6..1e5). Writes out/linear.json and out/linear_head.safetensors, the chosen
    head, which `dinokit predict classification head=...` applies to new images (decoded as its
    features were). reduced_decode: as `dinokit eval knn`'s (false: JPEGs decoded whole, as the official
    evaluation).
    """
    if method not in ("sgd", "logreg"):
        raise DinokitError(f"method must be sgd or logreg, got {method!r}")
    if not n_last_blocks or min(n_last_blocks) < 1:
        raise DinokitError(f"n_last_blocks must be >= 1, got {n_last_blocks}")
    checks = [  # an empty grid would fall back to the default one, unrecorded; epochs=0 would report untrained heads
        (
            learning_rates and min(learning_rates) > 0,
            f"learning_rates must be a non-empty list of positive rates, got {learning_rates}",
        ),
        (avgpool, f"avgpool must be a non-empty list of true / false, got {avgpool}"),
        (epochs >= 1, f"epochs must be >= 1, got {epochs}"),
        (train_batch_size >= 1, f"train_batch_size must be >= 1, got {train_batch_size}"),
        (
            method != "logreg" or logreg_values >= 1,
            f"logreg_values must be >= 1 (values of C swept over 1e-6..1e5; the protocol's is 45), got {logreg_values}",
        ),
        (
            selection is not None or 0 < selection_fraction < 1,
            f"selection_fraction must be between 0 and 1 (held out of each class), got {selection_fraction}",
        ),
    ]
    require(checks)
    # each value once, as the grid and its record hold it
    n_last_blocks, avgpool, learning_rates = (list(dict.fromkeys(v)) for v in (n_last_blocks, avgpool, learning_rates))
    out = str(prepare_output(out, folder=True, create=False))  # before the features; "~/knn" expanded
    refuse_other_outputs(out, ("knn.json", "linear.json"), "dinokit eval")
    train_split, val_split, selection_split = read_splits(train, val, selection)
    dev = resolve_device(device)
    backbone = prepare_backbone(model, device, seed)
    from dinokit.data.transforms import check_model_input_size  # torchvision: not for `--help`

    check_model_input_size(backbone.model, image_size)
    transform = make_transform(image_size, resize_policy, reduced_decode)
    cache_dir = resolve_cache(cache)
    kw = dict(cache=cache_dir, batch_size=batch_size, num_workers=num_workers, precision=precision)
    layers = last_blocks(backbone.model)
    if max(n_last_blocks) > len(layers):
        print(f"note: n_last_blocks {n_last_blocks} capped at {len(layers)} (the cached blocks: at most the last 4)")
        n_last_blocks = sorted({min(n, len(layers)) for n in n_last_blocks})
    tr = labelled_features(backbone, train_split, transform, CLASSIFICATION_KINDS, layers, **kw)
    te = labelled_features(backbone, val_split, transform, CLASSIFICATION_KINDS, layers, **kw)
    se = None
    if selection_split is not None:
        se = labelled_features(backbone, selection_split, transform, CLASSIFICATION_KINDS, layers, **kw)
    num_classes = len(tr.class_names)

    def split(lf, name):
        return ProbeSplit(lf.features, np.arange(len(lf.labels)), lf.labels, name)

    results, final = linear_probe(
        split(tr, f"train {train}"),
        split(te, f"val {val}"),
        num_classes,
        selection=split(se, f"selection {selection}") if se else None,
        selection_fraction=selection_fraction,
        method=method,
        configs=head_grid(tuple(n_last_blocks), tuple(avgpool), tuple(learning_rates)),
        epochs=epochs,
        batch_size=train_batch_size,
        logreg_values=logreg_values,
        refit=refit,
        seed=seed,
        device=dev,
    )
    protocol = protocol_record(
        backbone,
        transform,
        image_size,
        precision,
        features="normed CLS of the last n blocks (+ mean of the last block's patch tokens), as DINOv2",
        method=method,
        grid={"n_last_blocks": list(n_last_blocks), "avgpool": list(avgpool), "learning_rates": list(learning_rates)}
        if method == "sgd"
        else {"C": f"10^linspace(-6, 5, {logreg_values})"},
        optimiser="SGD momentum 0.9, wd 0, cosine to 0, lr x batch/256, init N(0, 0.01)"
        if method == "sgd"
        else "lbfgs",
        **({"epochs": epochs, "train_batch_size": train_batch_size} if method == "sgd" else {}),
        augmentation="none (features of the eval transform, cached)",
        train=str(train),
        val=str(val),
        train_images=len(tr.labels),
        val_images=len(te.labels),
        train_bad_files=tr.bad,
        val_bad_files=te.bad,
        classes=tr.class_names,
        seed=seed,
    )
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sel = results["selected"]
    n, avg = (sel["n_last_blocks"], sel["avgpool"]) if method == "sgd" else (1, False)
    meta = head_metadata(
        backbone,
        image_size,
        layers[-n:],
        True,
        seed,
        task="classification",
        resize_policy=resize_policy,
        reduced_decode=decode_min_side(transform) is not None,
        n_last_blocks=n,
        avgpool=avg,
        classes=tr.class_names,
        method=method,
        selected=sel,
    )
    # an earlier run's result goes first: a run stopped before its own never leaves it beside this head
    (out_dir / "linear.json").unlink(missing_ok=True)
    sync(out_dir)
    save_head(out_dir / "linear_head.safetensors", linear_classifier(final, sel, num_classes), meta)
    write_json(out_dir / "linear.json", {**results, "protocol": protocol})  # last: the result's record
    print(f"linear probe ({method}) {backbone.description}; transform: {protocol['transform']}")
    print(f"chosen on {results['selection']['split']}: {sel} ")
    print(f"{'split':<10} {'top-1':>8} {'top-5':>8}")
    print(f"{'selection':<10} {sel['selection_top1']:>8.2f} {'':>8}")
    print(f"{'val':<10} {results['top1']:>8.2f} {results['top5']:>8.2f}   <- reported (evaluated once)")
    return str(out_dir / "linear.json")


# --------------------------------------------------------------------------------------- new images
PREDICTION_FORMATS = (".csv", ".json")


@torch.no_grad()
def predict_classification(
    head: str,
    images: str,
    out: str = "out/predict-classification/predictions.csv",
    k: int = 5,
    model: str | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    precision: str = "bf16",
) -> str:
    """Apply a saved classifier to new images: the k most probable classes of each, as CSV or JSON.

    head: a classification head file, `linear_head.safetensors` of `dinokit eval linear` or
    `classifier.safetensors` of `dinokit finetune` (or the out folder holding it); its backbone,
    transform and classes come with it. Or a released DINOv2 ImageNet-1k linear head: a name such as
    dinov2_vits14_linear4_head / dinov2_vitb14_reg_linear_head (downloaded once, with its backbone) or
    its .pth file, or a whole released classifier's state dict (backbone.* and linear_head.*) (model= its
    backbone, unless the file keeps its released name).
    images: an image, a folder (recursive) or a list file. model: where the head's backbone is now, if
    it moved (its weights must be the ones the head was trained on). out: .csv (path, class,
    probability, then class_2, probability_2, ... class_k, probability_k) or .json ([{"path": ...,
    "predictions": [{"class": ..., "probability": ...}, ...]}, ...]); an existing file is replaced only
    if it is such a predictions file (an earlier run's), never another. Unreadable images are skipped
    and counted. Returns the path of `out`.
    """
    from dinokit.data.images import check_readable, list_images
    from dinokit.eval.heads import (
        backbone_for_head,
        head_inputs,
        is_released_head,
        load_head_file,
        official_linear_head,
    )
    from dinokit.eval.linear import classifier_logits

    if not isinstance(k, int) or k < 1:
        raise DinokitError(f"k must be a positive number of classes to list per image, got {k}")
    out_path = Path(out).expanduser()
    if out_path.suffix.lower() not in PREDICTION_FORMATS:
        raise DinokitError(f"out={out} must end in .csv or .json (the format of the predictions file)")
    prepare_output(out_path, example="predictions.csv", create=False)
    refuse_output_over_inputs(out_path, "predict classification", images=images)  # out= the list of images
    refuse_replacing_other_file(out_path)
    if is_released_head(head, "classification"):
        state, meta, backbone = official_linear_head(head, model, device)
    else:
        head_file = head_in_folder(head)
        state, meta = load_head_file(head_file, "classification")
        backbone = backbone_for_head(meta, model, device, head_file)
    classes = meta["classes"]
    dev = next(backbone.model.parameters()).device
    weight, bias = state["weight"].to(dev), state["bias"].to(dev)
    paths = list_images(images)
    check_readable(paths, images)
    # decoded as the head's training images were: heads written before the reduced decode, and the
    # released ones (the official transform), saw JPEGs decoded whole
    transform = make_transform(meta["image_size"], meta["resize_policy"], meta.get("reduced_decode", False))
    which = ("layers", "patch_mean") if meta["avgpool"] else ("layers",)
    k = min(k, len(classes))
    rows, bad = [], []
    loader = dict(batch_size=batch_size, num_workers=num_workers, precision=precision)
    for good, feats, bad_batch in head_inputs(backbone, paths, meta, which, transform, **loader):
        bad += bad_batch
        if not feats:
            continue
        logits = classifier_logits(
            weight,
            bias,
            feats["layers"].to(dev),
            feats["patch_mean"].to(dev) if meta["avgpool"] else None,
            meta["n_last_blocks"],
            meta["avgpool"],
        )
        probs, top = logits.float().softmax(dim=-1).topk(k, dim=-1)
        for i, p, t in zip(good.tolist(), probs.cpu().tolist(), top.cpu().tolist(), strict=True):
            predictions = [{"class": classes[c], "probability": round(q, 6)} for c, q in zip(t, p, strict=True)]
            # absolute, as embed and index search record paths: the CSV read as a list (train=, data=) takes
            # relative paths relative to its own folder, not to the folder predict ran in
            rows.append({"path": str(paths[i].absolute()), "predictions": predictions})
    write_predictions(out_path, rows, k)
    print(prediction_table(rows))
    if bad:
        print(f"skipped {len(bad)} unreadable image(s), e.g. {paths[bad[0]]}")
    print(f"{len(rows)} predictions written to {out_path} (head {head}, {len(classes)} classes)")
    return str(out_path)


HEAD_FILES = ("linear_head.safetensors", "classifier.safetensors")  # eval linear's, finetune's


def head_in_folder(head: str) -> Path:
    """`head` itself, or the classification head file in the out folder `head`."""
    path = Path(head).expanduser()
    if not path.is_dir():
        return path
    found = [path / name for name in HEAD_FILES if (path / name).is_file()]
    if len(found) != 1:
        what = "no" if not found else "two"
        raise DinokitError(
            f"head={head} is a folder with {what} classification head files ({' or '.join(HEAD_FILES)}): "
            "pass the head file itself"
        )
    return found[0]


def refuse_replacing_other_file(path: Path) -> None:
    """A DinokitError, before any work, where `path` exists but is not a predictions file as
    `write_predictions` writes them (a CSV headed prediction_columns(k) or a JSON list of {"path": ...,
    "predictions": ...}): a file of the user's (data.csv, results.json) would be replaced."""
    if not path.is_file():
        return
    with open(path, "rb") as f:
        start = f.read(2**20).decode("utf-8", errors="replace")  # a record holds k predictions: far less
    if path.suffix.lower() == ".json":
        records = start[1:].lstrip() if start.startswith("[") else ""  # the list's records, or its end
        ours = records.startswith("]") or first_record_keys(records) == {"path", "predictions"}
    else:
        columns = start.partition("\n")[0].rstrip("\r").split(",")  # path, then k class / probability pairs
        ours = len(columns) >= 3 and columns == prediction_columns(len(columns) // 2)
    if not ours:
        raise DinokitError(
            f"out={path} exists and is not a predictions file of dinokit predict classification, so no such run "
            "wrote it, and this one would replace it: pass another out= (or remove the file)"
        )


def prediction_columns(k: int) -> list[str]:
    """The header of a predictions CSV: path, class, probability, class_2, probability_2, ... up to k."""
    suffixes = ["", *(f"_{rank}" for rank in range(2, k + 1))]
    return ["path", *(f"{name}{suffix}" for suffix in suffixes for name in ("class", "probability"))]


def first_record_keys(text: str) -> set[str] | None:
    """The keys of the JSON object that `text` begins with (None where it begins with none, whole)."""
    try:
        record, _ = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None
    return set(record) if isinstance(record, dict) else None


def write_predictions(path: Path, rows: list[dict], k: int) -> None:
    """`rows` ({"path", "predictions": [{"class", "probability"}, ...]}) as JSON, or as CSV with one
    line per image: path, class, probability, class_2, probability_2, ..."""
    import csv
    import io

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        write_json(path, rows)
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(prediction_columns(k))
    for row in rows:
        writer.writerow([row["path"], *(v for p in row["predictions"] for v in (p["class"], p["probability"]))])
    write_text(path, buffer.getvalue())


def prediction_table(rows: list[dict], limit: int = 20) -> str:
    """The first `limit` rows as a table: image, top class, its probability."""
    lines = [f"{'image':<48} {'class':<24} {'prob':>6}"]
    for row in rows[:limit]:
        best = row["predictions"][0]
        lines.append(f"{row['path'][-48:]:<48} {best['class'][:24]:<24} {best['probability']:>6.3f}")
    if len(rows) > limit:
        lines.append(f"... and {len(rows) - limit} more")
    return "\n".join(lines)
