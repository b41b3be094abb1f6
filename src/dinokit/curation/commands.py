"""`dinokit curate dedup|cluster|sample|retrieve`: data curation over `dinokit embed` output.

Each step reads embeddings (one vector per image, L2-normalised: cosine similarity) and writes a folder
whose `*.txt` lists of image paths feed the next step or training (`dinokit pretrain data=out/kept.txt`):
  dedup     kept.txt, removed.json, similarity.png, duplicates.png
  cluster   clusters.safetensors (centroids and assignments per level), paths.txt, cluster_sizes.png
  sample    selected.txt, sampled_sizes.png
  retrieve  selected.txt, retrieved.json, retrieved.png
and curation.json (the step, its inputs, settings and counts). A step's folder is written whole or not
at all (a temporary folder swapped in), and replaces the output of an earlier curation step there; a
folder holding anything else is refused.
"""

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from dinokit.curation.kmeans import Level, hierarchical_kmeans
from dinokit.curation.retrieval_sampling import seed_cluster_samples, seed_neighbours
from dinokit.curation.sampling import cluster_sizes, hierarchical_sampling
from dinokit.data.images import plain_path, read_list_file
from dinokit.errors import DinokitError
from dinokit.features.store import MANIFEST
from dinokit.io import (
    atomic_folder,
    atomic_write,
    prepare_output,
    read_json,
    refuse_output_over_inputs,
    write_json,
    write_text,
)
from dinokit.maps.render import contact_sheet, save_figure
from dinokit.retrieval.commands import embedding_differences, read_vectors, refuse_changed_images
from dinokit.retrieval.index import INDEX_META, FeatureIndex, check_listable, first_occurrences, normalise, read_paths
from dinokit.runtime import resolve_device

SUMMARY = "curation.json"
EMBED_KEYS = ("model", "image_size", "resize_policy", "precision")  # settings that `dinokit embed` takes as keys
CLUSTERS = "clusters.safetensors"


# ------------------------------------------------------------------------------------------- dedup
def dedup(
    features: str,
    out: str,
    threshold: float = 0.95,
    reference: str | None = None,
    feature: str = "cls",
    num_examples: int = 8,
    device: str = "auto",
) -> dict:
    """Remove near-duplicate images from an embedded collection (and copies of a reference set).

    With `reference`, the images that near-duplicate another set (e.g. the test split you will
    evaluate on) go too.
    features: a `dinokit embed` folder. out: a folder for kept.txt (the kept images, one path per line,
    in the embedding's order), removed.json ([{"path", "duplicate_of", "score", "reason"}], reason
    "duplicate" or "reference"), similarity.png (each image's highest cosine to another image, with the
    threshold), duplicates.png (if anything was removed: the largest groups, each the kept image, or
    the reference image, then up to 8 images removed as its copies; half the rows for copies of the
    reference set when there are both) and curation.json. threshold: images whose cosine is >=
    threshold are duplicates, and chains of them form one group, of which the first image is kept; the
    right value depends on the model, so check it on the two PNGs. reference: a `dinokit embed` folder
    embedded like `features`. feature: cls or patch_mean. num_examples: rows (groups) shown in
    duplicates.png (0: no duplicates.png). device: where the similarities are computed (auto: a GPU
    if there is one; the search grows as the square of the number of images).
    """
    from dinokit.curation.dedup import deduplicate  # scipy: only where it runs, not for `--help`

    require_examples(num_examples, "duplicates.png")
    dev = resolve_device(device)
    if reference is not None and Path(reference).expanduser().resolve() == Path(features).expanduser().resolve():
        raise DinokitError(
            "reference= is the features= embedding itself, so every image would be removed as a copy of itself: "
            "pass the embedding of the set to keep out (e.g. your test split), or leave reference= out"
        )
    vectors, paths, embedding = read_unique_vectors(features, feature, "features")
    ref_vectors, ref_paths = None, []
    if reference is not None:
        ref_vectors, ref_paths, ref_embedding = read_unique_vectors(reference, feature, "reference")
        require_same_embedding(embedding, ref_embedding, features, reference)
    with output_folder(out, features=features, reference=reference) as tmp:
        result = deduplicate(vectors, threshold, reference=ref_vectors, device=dev)
        removed = np.flatnonzero(~np.isnan(result.score))
        records = [
            {
                "path": paths[i],
                "duplicate_of": ref_paths[result.reference_match[i]]
                if result.duplicate_of[i] < 0
                else paths[result.duplicate_of[i]],
                "score": round(float(result.score[i]), 6),
                "reason": "reference" if result.duplicate_of[i] < 0 else "duplicate",
            }
            for i in removed.tolist()
        ]
        write_paths(tmp / "kept.txt", [paths[i] for i in result.keep.tolist()])
        write_json(tmp / "removed.json", records)
        similarity_histogram(result.nearest, threshold, tmp / "similarity.png")
        groups: dict[tuple[str, str], list[tuple[str, float]]] = {}  # (reason, kept or reference image): removed
        for r in records:
            groups.setdefault((r["reason"], r["duplicate_of"]), []).append((r["path"], r["score"]))
        if num_examples > 0 and groups:  # the largest groups; half the rows for reference copies if both kinds
            by_kind = {
                kind: sorted((g for g in groups.items() if g[0][0] == kind), key=lambda g: -len(g[1]))
                for kind in ("duplicate", "reference")
            }
            n_ref = min(len(by_kind["reference"]), num_examples // 2 if by_kind["duplicate"] else num_examples)
            n_dup = min(len(by_kind["duplicate"]), num_examples - n_ref)
            n_ref = min(len(by_kind["reference"]), num_examples - n_dup)
            largest = by_kind["duplicate"][:n_dup] + by_kind["reference"][:n_ref]
            labels = ["reference" if reason == "reference" else "kept" for (reason, _), _ in largest]
            contact_sheet([(g, hits[:8]) for (_, g), hits in largest], tmp / "duplicates.png", first_labels=labels)
        summary = {
            "step": "dedup",
            "features": str(Path(features).absolute()),
            "feature": feature,
            "threshold": threshold,
            "reference": str(Path(reference).absolute()) if reference else None,
            "images": len(paths),
            "kept": len(result.keep),
            "removed_duplicates": sum(r["reason"] == "duplicate" for r in records),
            "removed_reference": sum(r["reason"] == "reference" for r in records),
            "groups": sum(reason == "duplicate" for reason, _ in groups),  # groups of 2 or more images
            "embedding": embedding,
        }
        write_json(tmp / SUMMARY, summary)
    print(
        f"{summary['images']} images: kept {summary['kept']}, removed {summary['removed_duplicates']} near-duplicates "
        f"(in {summary['groups']} groups) and {summary['removed_reference']} near-duplicates of the reference "
        f"set (cosine >= {threshold}); written to {out}"
    )
    return without_embedding(summary)


def similarity_histogram(nearest: np.ndarray, threshold: float, path: Path) -> None:
    """PNG: histogram of each image's highest cosine to another image, the threshold marked."""
    from matplotlib.figure import Figure  # not for `--help`

    from dinokit.curation.dedup import TOLERANCE

    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    # a cosine is at most 1: identical vectors whose float32 cosine rounds above it go in the top bin
    values = np.minimum(nearest[np.isfinite(nearest)], np.float32(1))
    ax.hist(values, bins=100, range=(min(float(values.min(initial=1.0)), threshold) - 0.01, 1.0), color="#4477aa")
    count = int((values >= np.float32(threshold - TOLERANCE)).sum())  # as deduplicate compares (float32 rounding)
    label = f"threshold {threshold}: {count} images have a near-duplicate (one per group is kept)"
    ax.axvline(threshold, color="#cc3311", label=label)
    if len(values):  # a single image has no nearest other image: an empty histogram, not log-scaled
        ax.set_yscale("log")
    ax.set_xlabel("cosine similarity to the nearest other image")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    save_figure(path, fig)


# ----------------------------------------------------------------------------------------- cluster
def cluster(
    features: str,
    out: str,
    n_clusters: list[int] | int,
    n_resamples: int | list[int] = 10,
    sample_size: int | list[int] | None = None,
    strategy: str = "closest",
    iterations: int = 50,
    subset: str | None = None,
    feature: str = "cls",
    seed: int = 0,
    device: str = "auto",
) -> dict:
    """Hierarchical k-means with resampling of an embedded collection (ssl-data-curation, DINOv3's data).

    features: a `dinokit embed` folder. n_clusters: clusters per level, e.g. [1000, 100]: level 1
    clusters the images, each further level the centroids of the one below. n_resamples (per level, or
    one for all): times each level's centroids are re-fitted on the `sample_size` members closest to
    each of them (strategy closest; or random members), which spreads the centroids evenly over the
    concepts instead of crowding dense ones; sample_size defaults to half the level's average cluster
    size (a level whose sample_size is 1 is not resampled, as in ssl-data-curation). iterations: Lloyd
    iterations per k-means. subset: a list of image paths to cluster instead of all (e.g. `dinokit
    curate dedup`'s kept.txt). out: a folder for clusters.safetensors (per level l: level<l>.centroids,
    level<l>.assignment (the cluster of each of its items: the images at level 1, the level l-1 clusters
    at level l > 1), level<l>.distances (squared L2 to its centroid)), paths.txt (the images, in level
    1's item order), cluster_sizes.png (images per cluster, per level) and curation.json. `dinokit
    curate sample` draws a balanced subset from it; `dinokit curate retrieve clusters=` draws from
    seeds' clusters. device: where the k-means runs (auto: a GPU if there is one); the same seed gives
    the same clusters on the same device.
    """
    n_clusters = [n_clusters] if isinstance(n_clusters, int | np.integer) else list(n_clusters)  # one level
    if not n_clusters:
        raise DinokitError("n_clusters must list at least one level, e.g. n_clusters=[100] or [1000,100]")
    dev = resolve_device(device)
    vectors, paths, embedding = read_unique_vectors(features, feature, "features")
    if subset is not None:
        vectors, paths = select_subset(vectors, paths, subset, features)
    if sample_size is None:  # half the average cluster size of each level (at least 1)
        counts = [len(paths), *n_clusters[:-1]]
        sample_size = [max(1, n // (2 * max(k, 1))) for n, k in zip(counts, n_clusters, strict=True)]
    with output_folder(out, features=features, subset=subset) as tmp:
        levels = hierarchical_kmeans(
            vectors,
            n_clusters,
            n_resamples,
            sample_size,
            strategy=strategy,
            iterations=iterations,
            seed=seed,
            device=dev,
        )
        arrays = {}
        for number, level in enumerate(levels, start=1):
            arrays[f"level{number}.centroids"] = level.centroids
            arrays[f"level{number}.assignment"] = level.assignment
            arrays[f"level{number}.distances"] = level.distances
        atomic_write(tmp / CLUSTERS, lambda t: save_numpy(arrays, t))
        write_paths(tmp / "paths.txt", paths)
        sizes = cluster_sizes(levels)
        cluster_size_plot(sizes, tmp / "cluster_sizes.png")
        summary = {
            "step": "cluster",
            "features": str(Path(features).absolute()),
            "feature": feature,
            "subset": str(Path(subset).absolute()) if subset else None,
            "n_clusters": list(n_clusters),
            "n_resamples": n_resamples,
            "sample_size": sample_size,
            "strategy": strategy,
            "iterations": iterations,
            "seed": seed,
            "device": str(dev),
            "images": len(paths),
            "levels": [
                {
                    "clusters": len(s),
                    "images_per_cluster": {"min": int(s.min()), "median": float(np.median(s)), "max": int(s.max())},
                }
                for s in sizes
            ],
            "embedding": embedding,
        }
        write_json(tmp / SUMMARY, summary)
    spread = ", ".join(
        f"level {i}: {len(n)} clusters of {n.min()}-{n.max()} images" for i, n in enumerate(sizes, start=1)
    )
    print(f"clustered {len(paths)} images ({spread}); written to {out}")
    return without_embedding(summary)


def read_clusters(folder: str | Path) -> tuple[list[Level], list[str], dict]:
    """(levels, image paths, curation.json) of a `dinokit curate cluster` folder."""
    folder = Path(folder)
    meta = (
        read_json(folder / SUMMARY, f"run `dinokit curate cluster ... out={folder}` again")
        if (folder / SUMMARY).is_file()
        else {}
    )
    if meta.get("step") != "cluster":
        raise DinokitError(f"{folder} is not the output of `dinokit curate cluster` (no clusters in it): cluster first")
    try:
        arrays = load_numpy(str(folder / CLUSTERS))
        levels = [
            Level(arrays[f"level{n}.centroids"], arrays[f"level{n}.assignment"], arrays[f"level{n}.distances"])
            for n in range(1, len(meta["n_clusters"]) + 1)
        ]
        paths = read_paths(folder / "paths.txt")
    except Exception as e:  # missing, truncated or foreign files (safetensors raises its own error type)
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        raise DinokitError(
            f"{folder}: a file of the clusters is missing or damaged ({reason}): "
            f"run `dinokit curate cluster ... out={folder}` again"
        ) from None
    if len(paths) != len(levels[0].assignment):
        raise DinokitError(f"{folder}: paths.txt and the clusters disagree; run `dinokit curate cluster` again")
    return levels, paths, meta


def select_subset(vectors: np.ndarray, paths: list[str], subset: str, features: str) -> tuple[np.ndarray, list[str]]:
    """The rows of the images listed in the text file `subset`, in the embedding's order (`subset_rows`)."""
    keep = subset_rows(paths, subset, features)
    return vectors[keep], [paths[i] for i in keep]


def subset_rows(paths: list[str], subset: str, features: str) -> list[int]:
    """The positions in `paths` (of the embedding or index `features`) of the images listed in the text
    file `subset`, ascending. It is read as `dinokit embed data=` reads a list (one path per line, or
    `path,label`; relative paths are relative to its folder; `#` comments skipped)."""
    listing = Path(subset).expanduser()
    if listing.is_dir():
        lists = [f"subset={listing / name}" for name in ("kept.txt", "selected.txt") if (listing / name).is_file()]
        example = " or ".join(lists) or "e.g. subset=dedup/kept.txt"
        raise DinokitError(f"subset={subset} is a folder, not a list of image paths: pass the list in it ({example})")
    if not listing.is_file():
        raise DinokitError(
            f"subset={subset}: no such file; pass a text file of image paths, one per line "
            "(e.g. `dinokit curate dedup`'s kept.txt)"
        )
    try:
        listed = read_list_file(listing)  # as `dinokit embed data=` reads a list: the same path strings
    except DinokitError:
        raise DinokitError(
            f"subset={subset} is not a text file of image paths: pass a list such as `dinokit curate dedup`'s kept.txt"
        ) from None
    wanted = {str(plain_path(path.absolute())) for path, _ in listed}  # as embed spells its paths
    if not wanted:
        raise DinokitError(f"subset={subset} lists no images: pass a list of image paths, one per line")
    keep = [i for i, p in enumerate(paths) if p in wanted]
    missing = len(wanted) - len(keep)
    if missing:
        example = next(iter(wanted - {paths[i] for i in keep}))
        raise DinokitError(
            f"{missing} of the {len(wanted)} images listed in {subset} are not in the embedding {features} "
            f"(e.g. {example}): pass a list made from this embedding (e.g. `dinokit curate dedup`'s kept.txt)"
        )
    return keep


def cluster_size_plot(sizes: list[np.ndarray], path: Path) -> None:
    """PNG: each level's clusters by number of images, largest first (a flat curve is a balanced clustering)."""
    from matplotlib.figure import Figure  # not for `--help`

    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    for number, s in enumerate(sizes, start=1):
        ax.plot(np.arange(1, len(s) + 1), np.sort(s)[::-1], label=f"level {number} ({len(s)} clusters)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cluster rank")
    ax.set_ylabel("images in the cluster")
    ax.legend(fontsize=8)
    save_figure(path, fig)


# ------------------------------------------------------------------------------------------ sample
def sample(clusters: str, out: str, target_size: int, strategy: str = "random", seed: int = 0) -> dict:
    """Draw a balanced subset of `target_size` images from a `dinokit curate cluster` folder.

    Hierarchical sampling: each top-level cluster gets an equal share (a small one all its images),
    and so on recursively down the levels; level-1 clusters give their images at random, or those
    closest to the centroid with strategy=closest. out: a folder for selected.txt (in the embedding's
    order), sampled_sizes.png (images per top-level cluster before and after) and curation.json.
    """
    levels, paths, meta = read_clusters(clusters)
    with output_folder(out, clusters=clusters) as tmp:
        selected = hierarchical_sampling(levels, target_size, strategy=strategy, seed=seed)
        write_paths(tmp / "selected.txt", [paths[i] for i in selected.tolist()])
        before = cluster_sizes(levels)[-1]
        top = levels[0].assignment[selected]
        for level in levels[1:]:
            top = level.assignment[top]
        after = np.bincount(top, minlength=len(before))
        order = np.argsort(-before, kind="stable")
        from matplotlib.figure import Figure  # not for `--help`

        fig = Figure(figsize=(6, 3.5), layout="constrained")
        ax = fig.subplots()
        ax.plot(np.arange(1, len(before) + 1), before[order], label="all images")
        ax.plot(np.arange(1, len(before) + 1), after[order], label=f"selected ({target_size})")
        ax.set_yscale("log")
        ax.set_xlabel(f"top-level cluster (level {len(levels)}), largest first")
        ax.set_ylabel("images")
        ax.legend(fontsize=8)
        save_figure(tmp / "sampled_sizes.png", fig)
        summary = {
            "step": "sample",
            "clusters": str(Path(clusters).absolute()),
            "target_size": target_size,
            "strategy": strategy,
            "seed": seed,
            "images": len(paths),
            "selected": len(selected),
            "top_level_clusters": {
                "before_max": int(before.max()),
                "after_max": int(after.max()),
                "after_min": int(after.min()),
            },
            "embedding": meta["embedding"],
        }
        write_json(tmp / SUMMARY, summary)
    print(
        f"selected {len(selected)} of {len(paths)} images, at most {int(after.max())} per top-level cluster "
        f"(before: up to {int(before.max())}); written to {out}"
    )
    return without_embedding(summary)


# ---------------------------------------------------------------------------------------- retrieve
def retrieve(
    seeds: str,
    out: str,
    pool: str | None = None,
    clusters: str | None = None,
    subset: str | None = None,
    per_seed: int = 4,
    min_score: float | None = None,
    feature: str = "cls",
    seed: int = 0,
    num_examples: int = 8,
) -> dict:
    """Retrieval-based sampling (DINOv2's LVD-142M): select the pool images closest to a curated seed set.

    seeds: a `dinokit embed` folder of the curated images, embedded like the pool. Then one of: pool: a
    `dinokit embed` folder of the uncurated images, or an index folder over them (`dinokit index build`;
    for millions of images an ivf or hnsw one): each seed image takes its `per_seed` nearest pool images
    (cosine >= min_score, if given), the paper's choice for large seed sets. clusters: a `dinokit curate
    cluster` folder of the pool: each seed image takes `per_seed` pool images drawn at random (`seed`)
    from the pool cluster nearest to it, the choice for small seed sets. subset (with pool=, an embed or
    an index folder): a list of the pool images to search (e.g. `dinokit curate dedup`'s kept.txt), so
    that images deduplication removed, copies of the evaluation set included, do not come back; a
    cluster folder holds only the images it clustered already. out: a folder for selected.txt (the
    union, in the pool's order), retrieved.json ([{"seed": path, "hits": [{"path", "score"}, ...]},
    ...], with clusters [{"seed": path, "cluster": c, "hits": [{"path"}, ...]}, ...]: the images drawn
    from a cluster are listed under its first seed), retrieved.png (the first `num_examples` seeds that
    brought images in, each with up to 8 of them; 0: no retrieved.png) and curation.json.
    """
    if (pool is None) == (clusters is None):
        raise DinokitError(
            "pass either pool= (a `dinokit embed` or index folder: each seed takes its nearest pool images) or "
            "clusters= (a `dinokit curate cluster` folder: each seed takes images of its pool cluster), not both"
        )
    if clusters is not None and min_score is not None:
        raise DinokitError("min_score applies to pool= (nearest neighbours); images drawn from clusters have no score")
    if subset is not None and clusters is not None:
        raise DinokitError(
            "subset= applies to pool=; clusters= draws only from the images it clustered (cluster with subset= instead)"
        )
    if min_score is not None and not -1 <= min_score <= 1:
        raise DinokitError(
            f"min_score must be a cosine in [-1, 1] (e.g. 0.5; hits below it are dropped), got {min_score}"
        )
    require_examples(num_examples, "retrieved.png")
    seed_vectors, seed_paths, seed_embedding = read_unique_vectors(seeds, feature, "seeds")
    allowed = None  # pool ids that may be retrieved (an index pool with subset=); None: all
    if clusters is not None:
        levels, pool_paths, meta = read_clusters(clusters)
        if meta.get("feature", feature) != feature:
            raise DinokitError(
                f"the clusters {clusters} were fitted on {meta['feature']} vectors and the seeds' {feature} vectors "
                f"cannot be matched to their centroids: pass feature={meta['feature']}"
            )
        require_same_embedding(meta["embedding"], seed_embedding, clusters, seeds)
        rng = np.random.default_rng(seed)
        seed_clusters, drawn = seed_cluster_samples(
            levels[0].centroids, levels[0].assignment, seed_vectors, per_seed, rng
        )
        first_seed = {}  # each cluster's images are listed under the first seed that chose it
        for s, c in enumerate(seed_clusters.tolist()):
            first_seed.setdefault(c, s)
        hits = [
            [(j, None) for j in drawn[c].tolist()] if first_seed[c] == s else []
            for s, c in enumerate(seed_clusters.tolist())
        ]
        record = [
            {"seed": p, "cluster": c, "hits": [{"path": pool_paths[j]} for j, _ in row]}
            for p, c, row in zip(seed_paths, seed_clusters.tolist(), hits, strict=True)
        ]
    else:
        index, allowed = pool_index(pool, feature, seed_embedding, seeds, subset)
        pool_paths = index.paths
        hits = seed_neighbours(index, seed_vectors, per_seed, min_score, allowed=allowed)
        record = [
            {"seed": p, "hits": [{"path": pool_paths[j], "score": round(s, 6)} for j, s in row]}
            for p, row in zip(seed_paths, hits, strict=True)
        ]
    selected = sorted({j for row in hits for j, _ in row})
    with output_folder(out, seeds=seeds, pool=pool, clusters=clusters, subset=subset) as tmp:
        write_paths(tmp / "selected.txt", [pool_paths[j] for j in selected])
        write_json(tmp / "retrieved.json", record)
        rows = [(p, [(pool_paths[j], s) for j, s in row[:8]]) for p, row in zip(seed_paths, hits, strict=True) if row]
        if num_examples > 0 and rows:
            contact_sheet(rows[:num_examples], tmp / "retrieved.png", first_labels=["seed"] * len(rows[:num_examples]))
        summary = {
            "step": "retrieve",
            "seeds": str(Path(seeds).absolute()),
            "pool": str(Path(pool).absolute()) if pool else None,
            "clusters": str(Path(clusters).absolute()) if clusters else None,
            "subset": str(Path(subset).absolute()) if subset else None,
            "feature": feature,
            "per_seed": per_seed,
            "min_score": min_score,
            "seed": seed,
            "pool_images": len(pool_paths) if allowed is None else int(allowed.sum()),  # the subset's
            "seed_images": len(seed_paths),
            "selected": len(selected),
            "embedding": seed_embedding,
        }
        write_json(tmp / SUMMARY, summary)
    how = "from the pool clusters of the seeds" if clusters else "nearest to the seeds"
    print(
        f"selected {len(selected)} of {len(pool_paths)} pool images {how} ({len(seed_paths)} seed images); "
        f"written to {out}"
    )
    return without_embedding(summary)


def pool_index(
    pool: str, feature: str, seeds_embedding: dict, seeds: str, subset: str | None = None
) -> tuple[FeatureIndex, np.ndarray | None]:
    """A search index over the pool and which of its ids may be retrieved ((N,) bool; None: all): the
    index folder itself (with `subset`, the ids of the images listed in it), or an exact one built over
    a `dinokit embed` folder (over the images listed in `subset` only, if given); refused if the pool
    was embedded unlike the seeds."""
    if (Path(pool) / INDEX_META).is_file():
        index = FeatureIndex.load(pool)
        if index.meta["feature"] != feature:
            raise DinokitError(
                f"the index {pool} holds {index.meta['feature']} vectors: pass feature={index.meta['feature']}"
            )
        require_same_embedding(index.meta["embedding"], seeds_embedding, pool, seeds)
        fix = "embed them again (the same `dinokit embed`) and build the index anew"
        refuse_changed_images(pool, index.paths, index.stamps, fix)
        allowed = None
        if subset is not None:  # e.g. dedup's kept.txt: copies of the evaluation set must not come back
            allowed = np.zeros(len(index.paths), dtype=bool)
            allowed[subset_rows(index.paths, subset, pool)] = True
        return index, allowed
    vectors, paths, embedding = read_unique_vectors(pool, feature, "pool", index_ok=True)
    require_same_embedding(embedding, seeds_embedding, pool, seeds)
    if subset is not None:
        vectors, paths = select_subset(vectors, paths, subset, pool)
    return FeatureIndex.create(vectors, paths, {}, kind="flat"), None


# ----------------------------------------------------------------------------------------- shared
def read_unique_vectors(
    features: str, feature: str, key: str = "features", index_ok: bool = False
) -> tuple[np.ndarray, list[str], dict]:
    """(L2-normalised vectors (N, D), paths, embedding settings) of a `dinokit embed` folder, given as
    `key`= (index_ok: the key also takes an index folder, which the caller read itself); an image that
    the embedding lists twice is kept once (its first vector). Normalised in place: one N x D array."""
    require_embedding_folder(features, key, index_ok)
    vectors, paths, embedding = read_vectors(features, feature)
    check_listable(paths)  # the step's lists hold them
    keep = first_occurrences(paths)
    if len(keep) < len(paths):
        vectors, paths = vectors[keep], [paths[i] for i in keep]
    return normalise(vectors, in_place=True), paths, embedding


def require_examples(num_examples: int, picture: str) -> None:
    if num_examples < 0:
        raise DinokitError(
            f"num_examples must be 0 (no {picture}) or more (rows shown in {picture}), got {num_examples}"
        )


def require_embedding_folder(folder: str, key: str, index_ok: bool = False) -> None:
    """Refuse, naming what it is instead, a path given as `key`= that is not a `dinokit embed` folder:
    a missing path, a file, a curation step's folder or an index folder. An embed folder without its
    manifest (an unfinished run) is left to `read_vectors`, which says how to finish it."""
    path = Path(folder).expanduser()
    expected = "a `dinokit embed` folder" + (" or an index folder (`dinokit index build`)" if index_ok else "")
    if not path.exists():
        raise DinokitError(f"{key}={folder}: no such folder; pass {expected}")
    if not path.is_dir():
        raise DinokitError(
            f"{key}={folder} is a file, not a `dinokit embed` folder: embed its images first "
            f"(`dinokit embed model=... data={folder} out=...`) and pass that folder as {key}="
        )
    if (path / MANIFEST).is_file():
        return
    if (path / SUMMARY).is_file():
        meta = read_json(path / SUMMARY, "it is not a `dinokit embed` folder either")
        step = meta.get("step", "?") if isinstance(meta, dict) else "?"
        source = next((meta[k] for k in ("features", "seeds") if isinstance(meta, dict) and meta.get(k)), None)
        made_from = f" ({source})" if source else ""
        raise DinokitError(
            f"{key}={folder} is the output of `dinokit curate {step}`, not {expected}: pass the `dinokit embed` "
            f"folder it was made from{made_from}"
        )
    if (path / INDEX_META).is_file():
        meta = read_json(path / INDEX_META, "it is not a `dinokit embed` folder either")
        sources = meta.get("sources") if isinstance(meta, dict) else None
        made_from = f" ({', '.join(sources)})" if sources else ""
        raise DinokitError(
            f"{key}={folder} is an index folder (`dinokit index build`), not a `dinokit embed` folder (only "
            "`dinokit curate retrieve pool=` takes an index): "
            f"pass the `dinokit embed` folder it was built from{made_from}"
        )


def require_same_embedding(a: dict, b: dict, a_name: str, b_name: str) -> None:
    """Refuse to compare vectors of two embeddings made differently (other weights, size or transform).
    The model's path may differ where both record the same weights hash (the same weights, moved)."""
    same_weights = a.get("weights_hash") is not None and a.get("weights_hash") == b.get("weights_hash")
    changed = [k for k in embedding_differences(a, b) if not (k == "model" and same_weights)]
    if changed:
        values = "".join(f"; {k}: {b.get(k)} in {b_name}, {a.get(k)} in {a_name}" for k in changed if k in EMBED_KEYS)
        args = " ".join(
            f"{k}={json.dumps(a[k], separators=(',', ':')) if isinstance(a[k], list) else a[k]}"
            for k in EMBED_KEYS
            if k in changed and a.get(k) is not None
        )
        raise DinokitError(
            f"{a_name} and {b_name} were embedded differently ({', '.join(changed)} differ{values}), so their "
            f"vectors are not comparable: embed {b_name}'s images again with the same model and settings"
            + (f" (`dinokit embed ... {args}`)" if args else "")
        )


def without_embedding(summary: dict) -> dict:
    """A step's summary as returned (and printed as JSON by the CLI): the embedding settings, long and
    already in curation.json, left out."""
    return {k: v for k, v in summary.items() if k != "embedding"}


def write_paths(path: Path, paths: list[str]) -> None:
    """A list of image paths, one per line (what `dinokit pretrain data=` and `dinokit embed data=` read)."""
    write_text(path, "".join(p + "\n" for p in paths))  # as lists are read


@contextlib.contextmanager
def output_folder(out: str, **inputs: str | None) -> Iterator[Path]:
    """A temporary folder to fill, swapped in for `out` whole when the block succeeds, so a reader
    never sees files of two runs. `out` may be new, empty, or the output of an earlier curation
    step (which it replaces); a folder holding anything else is refused, as it may hold your files,
    and so is one of the step's `inputs` (key: path) or a folder holding one, which it would replace."""
    path = prepare_output(out, folder=True, create=False)
    refuse_output_over_inputs(out, "this step", **inputs)
    if path.is_dir() and any(path.iterdir()) and not (path / SUMMARY).is_file():
        raise DinokitError(
            f"{path} already holds files and is not the output of a `dinokit curate` step (no {SUMMARY}); "
            "pass a new or empty folder as out="
        )
    with atomic_folder(path, replace=True) as tmp:
        yield tmp
