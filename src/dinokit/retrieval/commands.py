"""`dinokit index build` and `dinokit index search`: image retrieval over `dinokit embed` output."""

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dinokit.data.images import check_readable, list_images
from dinokit.errors import DinokitError
from dinokit.eval.backbone import weights_hash
from dinokit.features.extract import extract_features
from dinokit.features.store import (
    EMBEDDING_KEYS,
    MANIFEST,
    read_manifest,
    read_shard,
    read_shard_index,
    read_shard_stamps,
)
from dinokit.io import (
    file_stamps,
    folder_lock,
    prepare_output,
    refuse_inputs_as_outputs,
    refuse_other_outputs,
    write_json,
)
from dinokit.models import load_model
from dinokit.runtime import resolve_device

if TYPE_CHECKING:  # faiss and matplotlib are imported by the functions that use them: `--help` needs neither
    from dinokit.retrieval.index import FeatureIndex

VECTOR_FEATURES = ("cls", "patch_mean")
SHEET_QUERIES = 32  # queries drawn into index search's sheet= by default (146 px of height each)


def build_index(
    features: str,
    out: str,
    feature: str = "cls",
    kind: str | None = None,
    add: bool = False,
    nlist: int | None = None,
    pq_m: int | None = None,
    pq_bits: int | None = None,
    hnsw_m: int | None = None,
) -> dict:
    """Build a faiss index over a `dinokit embed` folder (cosine similarity), or add to one.

    features: the embed output folder. out: the index folder. feature: cls or patch_mean (must be in
    the embedding). kind: flat (exact, default), ivf, hnsw, pq or ivfpq (see dinokit.retrieval.index;
    nlist defaults to 4 sqrt(N), at most N / 39: faiss's 39 training points per cell; pq_m 16, pq_bits
    8, hnsw_m 32). add: add the images of `features` to the existing index `out` (images already
    indexed are skipped, under any spelling of their path; refused where one was replaced since it was
    indexed, as its old vector would stay), which keeps the structure it was built with (kind and its options are for
    building: given with add=true, they must be the index's own); the embedding settings must match.
    An image listed twice is indexed once; the summary counts the images skipped. The embedding is read a
    shard at a time (ivf / pq kinds: once to train on at most 256 vectors per centroid, once to add), so
    memory holds the index, not every vector.
    """
    from dinokit.retrieval.index import INDEX_META, FeatureIndex, built_options, check_listable

    features, out = str(Path(features).expanduser()), str(Path(out).expanduser())  # "~/emb" from Python
    structure = {"kind": kind, "nlist": nlist, "pq_m": pq_m, "pq_bits": pq_bits, "hnsw_m": hnsw_m}
    given = {key: value for key, value in structure.items() if value is not None}
    prepare_output(out, folder=True, create=False)
    refuse_other_outputs(out, ("index.json",), "dinokit index build")
    manifest = vector_manifest(features, feature)
    paths, stamps = embedded_files(features, manifest)
    check_listable(paths)  # before the index is built
    embedding = embedding_settings(manifest)

    def blocks() -> Iterator[np.ndarray]:  # a shard at a time: never all N x D floats in memory
        return (chunk.float().numpy() for chunk, _ in vector_shards(features, manifest, feature))

    # one writer at a time: two adds would both write generation g + 1 (one add lost, or one's vectors
    # listed with the other's paths); the second waits and adds to the first's result
    with folder_lock(out, "an index"):
        exists = (Path(out) / INDEX_META).exists()
        if exists and not add:
            raise DinokitError(f"{out} already holds an index; pass add=true to add to it, or choose a new out=")
        if add and exists:
            index = FeatureIndex.load(out)
            own = built_options(index.meta)
            ignored = {key: value for key, value in given.items() if own.get(key) != value}  # its own: fine
            if ignored:
                raise DinokitError(
                    f"{out} is a {index.meta['kind']} index ({index.meta['factory']}) and add=true adds to it as "
                    f"it was built, so {', '.join(f'{k}={v}' for k, v in ignored.items())} would be ignored: leave "
                    "them out to add, or build a new index with them"
                )
            changed = embedding_differences(index.meta["embedding"], embedding)
            if changed or index.meta["feature"] != feature:
                raise DinokitError(
                    f"{features} was embedded differently from the index {out} ({', '.join(changed) or 'feature'} "
                    "differ); queries could not match both. Build a separate index."
                )
            replaced = index.changed_since_indexed(paths, stamps)
            if replaced:
                raise DinokitError(
                    f"{len(replaced)} image(s) of {features} changed since they were indexed in {out} (first: "
                    f"{replaced[0]}): add=true keeps indexed images as they are, so their old vectors would stay. "
                    "Build the index anew (a new out=) from an embedding of every image"
                )
            added = index.add_blocks(paths, blocks, stamps)
            source = str(Path(features).absolute())
            if source not in index.meta["sources"]:  # the same embedding again: extended since (new images)
                index.meta["sources"].append(source)
        else:
            meta = {"feature": feature, "embedding": embedding, "sources": [str(Path(features).absolute())]}
            options = {key: value for key, value in given.items() if key != "kind"}
            index = FeatureIndex.create_from_blocks(paths, blocks, meta, kind=kind or "flat", stamps=stamps, **options)
            added = len(index.paths)
        index.save(out)
    return {
        "index": str(out),
        "factory": index.meta["factory"],
        "added": added,
        "skipped": len(paths) - added,  # already indexed, or listed twice in the embedding
        "total": len(index.paths),
    }


def embedded_files(features: str | Path, manifest: dict) -> tuple[list[str], np.ndarray]:
    """The image paths of a `dinokit embed` folder in row order, and (N, 2) int64 their [size, mtime ns]
    when they were embedded (-1 for shards that did not record them)."""
    paths, stamps = [], []
    for shard in manifest["shards"]:
        file = Path(features).expanduser() / shard["file"]
        shard_paths = read_shard_index(file)[0]
        recorded = read_shard_stamps(file)
        paths += shard_paths
        stamps += recorded[: len(shard_paths)] if recorded is not None else [[-1, -1]] * len(shard_paths)
    return paths, np.asarray(stamps, dtype=np.int64).reshape(-1, 2)


def read_vectors(features: str | Path, feature: str = "cls") -> tuple[np.ndarray, list[str], dict]:
    """One vector per image from a `dinokit embed` folder: (vectors (N, D) float32, as stored, not
    normalised; image paths; the embedding settings that queries must share, EMBEDDING_KEYS). The shards
    are read one at a time into one (N, D) array: memory N x D float32 and one shard, not the stored
    shards, their concatenation and its float32 copy at once."""
    manifest = vector_manifest(features, feature)
    count = sum(int(shard["count"]) for shard in manifest["shards"])
    disagree = DinokitError(
        f"{features}: its shards and {MANIFEST} disagree on the number of images (the folder was changed "
        "after `dinokit embed` finished): embed the images again into a new folder"
    )
    vectors, paths = None, []
    for chunk, chunk_paths in vector_shards(features, manifest, feature):
        if vectors is None:
            vectors = np.empty((count, chunk.shape[1]), dtype=np.float32)
        if len(paths) + len(chunk) > count:
            raise disagree
        # converted while copied: no float32 temporary per shard (freed temporaries grew the heap to 1.7 N x D)
        torch.from_numpy(vectors[len(paths) : len(paths) + len(chunk)]).copy_(chunk)
        paths += chunk_paths
    if len(paths) != count:
        raise disagree
    if vectors is None:  # no images
        vectors = np.zeros((0, manifest.get("feature_shapes", {}).get(feature, [1])[0]), dtype=np.float32)
    return vectors, paths, embedding_settings(manifest)


def embedding_settings(manifest: dict) -> dict:
    """The settings of an embedding (from its manifest) that vectors compared with its own must share."""
    return {k: manifest.get(k) for k in EMBEDDING_KEYS}


def vector_manifest(features: str | Path, feature: str) -> dict:
    """The manifest of a `dinokit embed` folder, after checking that `feature` is one vector per image,
    that the folder holds it, and that no image there was changed since it was embedded
    (`refuse_changed_images`)."""
    if feature not in VECTOR_FEATURES:
        raise DinokitError(
            f"feature must be one of {', '.join(VECTOR_FEATURES)} (one vector per image), got {feature!r}"
        )
    manifest = read_manifest(features)
    if feature not in manifest["features"]:
        usable = [f for f in VECTOR_FEATURES if f in manifest["features"]]
        fix = f"pass feature={usable[0]}, or " if usable else ""
        raise DinokitError(
            f"{features} holds no {feature} vectors (it has {', '.join(manifest['features'])}): "
            f"{fix}embed again with features=[{feature}]"
        )
    refuse_changed_images(features, *embedded_files(features, manifest))
    return manifest


def refuse_changed_images(
    features: str | Path,
    paths: list[str],
    stamps: np.ndarray,
    fix: str = "run the same `dinokit embed` again, which computes only their shards again",
) -> None:
    """A DinokitError where an image of the embedding (or index) `features` is there with another size or
    mtime than when it was embedded (`stamps` (N, 2), [size, mtime ns]; replaced under its name): its
    vector would be of the old image. Images not there (an embedding read on another machine) and
    stamps not recorded (-1) are not checked."""
    now = np.asarray(file_stamps(paths), dtype=np.int64).reshape(-1, 2)
    changed = np.flatnonzero((stamps[:, 0] >= 0) & (now[:, 0] >= 0) & (stamps != now).any(axis=1))
    if len(changed):
        raise DinokitError(
            f"{len(changed)} image(s) of {features} changed since they were embedded (first: {paths[changed[0]]}): "
            f"their vectors are of the old images; {fix}"
        )


def vector_shards(features: str | Path, manifest: dict, feature: str) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """The shards of a `dinokit embed` folder one at a time, in image order: (vectors (n, D) as stored,
    in the stored dtype, not normalised; their n image paths)."""
    for shard in manifest["shards"]:
        path = Path(features).expanduser() / shard["file"]  # as read_manifest found the folder
        feats, paths = read_shard(path, [feature])
        if feature not in feats or len(feats[feature]) != len(paths):
            raise DinokitError(f"{path} is damaged (its {feature} rows and paths disagree): embed the images again")
        yield feats[feature], paths


def embedding_differences(a: dict, b: dict) -> list[str]:
    """The embedding settings (EMBEDDING_KEYS) in which two embeddings differ: vectors of embeddings
    that differ are not comparable. The model's path may differ where both record the same weights
    hash (the same weights, moved or copied)."""
    same_weights = a.get("weights_hash") is not None and a.get("weights_hash") == b.get("weights_hash")
    return [k for k in EMBEDDING_KEYS if a.get(k) != b.get(k) and not (k == "model" and same_weights)]


def search_index(
    index: "str | FeatureIndex",
    query: str | list[str],
    k: int = 10,
    nprobe: int | None = None,
    ef_search: int | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str = "auto",
    model: str | None = None,
) -> list[dict]:
    """[{"query": path, "hits": [{"path": ..., "score": cosine}, ...]}, ...] for every readable query
    image (an image, a folder, a list file, or a list of paths), embedded with the index's own model,
    transform and precision. `model` loads those weights from another path (they must be the same
    weights). Unreadable queries are reported on stderr and left out."""
    from dinokit.retrieval.index import FeatureIndex

    if k < 1:
        raise DinokitError(f"k must be a positive number of hits, got {k}")
    idx = index if isinstance(index, FeatureIndex) else FeatureIndex.load(index)
    found = [p for q in ([query] if isinstance(query, str | Path) else query) for p in list_images(q)]
    queries = [str(p.absolute()) for p in found]
    check_readable(queries, query if isinstance(query, str | Path) else "the query images")
    vectors, kept = embed_like_index(idx.meta, queries, batch_size, num_workers, device, model)
    for i in sorted(set(range(len(queries))) - set(kept)):
        print(f"dinokit: skipped unreadable query {queries[i]}", file=sys.stderr)
    scores, ids = idx.search(vectors, k, nprobe=nprobe, ef_search=ef_search)
    return [
        {
            "query": queries[q],
            "hits": [
                {"path": idx.paths[j], "score": float(s)} for s, j in zip(scores[row], ids[row], strict=True) if j >= 0
            ],
        }
        for row, q in enumerate(kept)
    ]


def index_search(
    index: str,
    query: str,
    k: int = 10,
    out: str | None = None,
    sheet: str | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str = "auto",
    model: str | None = None,
    num_examples: int = SHEET_QUERIES,
) -> None:
    """Find the k most similar indexed images to each query image; print them as a table.

    index: an index folder (`dinokit index build`). query: an image, a folder or a list file; it is
    embedded with the index's own model, transform and precision. out: also write the hits as JSON,
    [{"query": path, "hits": [{"path": ..., "score": ...}, ...]}, ...]. sheet: also write a PNG
    contact sheet (each query, then its hits with scores). num_examples: the queries the sheet shows,
    the first ones (a row is 146 px high: a sheet of 1,000 queries was 146,000 px, drawn at a 3 GB
    peak, too large for Pillow to open). nprobe (ivf: cells visited, default
    ceil(sqrt(nlist))) / ef_search (hnsw): search effort (more = closer to exact, slower). model:
    where the index's model now is, if its weights file moved (default: the path recorded in the
    index); the weights must be the ones it was built with.
    """
    from dinokit.maps.render import contact_sheet

    if sheet and not (isinstance(num_examples, int) and num_examples >= 1):
        raise DinokitError(f"num_examples is the number of queries sheet= shows, >= 1 (e.g. 32), got {num_examples!r}")
    if out:  # checked before any work, "~/..." expanded
        out = str(prepare_output(out, example="hits.json", create=False))
    if sheet:
        sheet = str(prepare_output(sheet, example="hits.png", create=False, suffix=".png"))
    if out or sheet:
        refuse_inputs_as_outputs({"out": out, "sheet": sheet}, list_images(query))
    results = search_index(index, query, k, nprobe, ef_search, batch_size, num_workers, device, model)
    print(format_table(results))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json(out, results)
        print(f"hits written to {out}")
    if sheet:
        shown = results[:num_examples]
        contact_sheet([(r["query"], [(h["path"], h["score"]) for h in r["hits"]]) for r in shown], sheet)
        which = f" (the first {len(shown)} of {len(results)} queries: num_examples=)" if shown != results else ""
        print(f"contact sheet written to {sheet}{which}")


def embed_like_index(
    meta: dict, paths: list[str], batch_size: int, num_workers: int, device: str, source: str | None = None
):
    """(normalised query vectors (Q, D), indices of the readable queries), embedded exactly as the index:
    with its model, loaded from `source` (default: the path the index records), transform and precision."""
    emb = meta["embedding"]
    if source is None and Path(emb["model"]).is_absolute() and not Path(emb["model"]).exists():
        raise DinokitError(
            f"the index's model {emb['model']} (where it was when the images were embedded) is not there any "
            "more: pass model=PATH, where the same weights are now"
        )
    source = source or emb["model"]
    model = load_model(source, device=resolve_device(device))
    check_index_model(model, emb, source)
    # indexes embedded before ReducedJpegDecode decode whole (and before the transform was recorded: None)
    reduced = "ReducedJpegDecode" in (emb.get("transform") or "")
    from dinokit.data.transforms import eval_transform  # torchvision: not for index build or curation

    transform = eval_transform(tuple(emb["image_size"]), emb["resize_policy"], reduced_decode=reduced)
    feats, kept, _ = extract_features(
        model,
        paths,
        transform,
        which=(meta["feature"],),
        batch_size=batch_size,
        num_workers=num_workers,
        precision=emb["precision"],
        progress=False,
    )
    return np.asarray(feats[meta["feature"]].numpy(), dtype=np.float32), kept


def check_index_model(model, emb: dict, source: str) -> None:
    """Refuse a model whose architecture or weights differ from those the index was embedded with."""
    fix = (
        "Rebuild the index (`dinokit embed` then `dinokit index build`) with this model, or pass the "
        "original weights with model=PATH."
    )
    if model.config.to_dict() != emb["architecture"]:
        raise DinokitError(
            f"the model at {source} is not the one the index was built with (its architecture changed). {fix}"
        )
    if emb.get("weights_hash") is None:
        print(
            f"dinokit: the index records no weights hash (built before dinokit recorded one), so {source} cannot "
            "be checked to be the model it was built with; rebuild the index to enable the check",
            file=sys.stderr,
        )
    elif weights_hash(model) != emb["weights_hash"]:
        raise DinokitError(
            f"the model file {source} changed since the index was built (its weights differ), so queries would "
            f"not be embedded like the indexed images. {fix}"
        )


def format_table(results: list[dict]) -> str:
    """Hits as text: one block per query, rank / score / path."""
    lines = []
    for r in results:
        lines += [f"query: {r['query']}", f"  {'rank':>4}  {'score':>7}  path"]
        lines += [f"  {i + 1:>4}  {h['score']:>7.4f}  {h['path']}" for i, h in enumerate(r["hits"])]
    return "\n".join(lines)
