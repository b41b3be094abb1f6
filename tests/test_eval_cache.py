import errno
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit.data.transforms import eval_transform
from dinokit.errors import DinokitError
from dinokit.eval import cache as cache_module
from dinokit.eval.backbone import load_backbone, weights_hash
from dinokit.eval.cache import cached_features
from dinokit.features.extract import compute_features

KW = dict(batch_size=2, num_workers=0, precision="fp32", progress=False)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        p = tmp_path / "img" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    (tmp_path / "img" / "bad.png").write_bytes(b"not an image")
    return [*paths[:3], tmp_path / "img" / "bad.png", *paths[3:]]


@pytest.fixture
def count_extractions(monkeypatch):
    calls = []
    real = cache_module.iter_features

    def counting(model, paths, *args, **kwargs):
        calls.append(len(paths))
        return real(model, paths, *args, **kwargs)

    monkeypatch.setattr(cache_module, "iter_features", counting)
    return calls


def interrupt_shard(monkeypatch, writer: str, first: int):
    """Make cache_module.<writer> (_write_shard, _assemble_shard) raise KeyboardInterrupt on the shard of
    images from `first`; returns the real one."""
    real = getattr(cache_module, writer)

    def interrupted(folder, model, paths, start, *args):
        if start == first:
            raise KeyboardInterrupt
        return real(folder, model, paths, start, *args)

    monkeypatch.setattr(cache_module, writer, interrupted)
    return real


def test_cache_reuses_and_invalidates_when_it_must(images, tmp_path, count_extractions):
    model = dinokit.create_model("vit_nano_p2").eval()
    t16 = eval_transform(16)
    which = ("cls", "patch_mean")
    first = cached_features(model, images, t16, which, cache_dir=tmp_path / "c", **KW)
    assert first.bad == [3] and first.kept.tolist() == [0, 1, 2, 4, 5] and not first.reused
    assert count_extractions == [6]

    again = cached_features(model, images, t16, which, cache_dir=tmp_path / "c", **KW)
    assert again.reused and again.key == first.key and count_extractions == [6]
    assert np.array_equal(again.array("cls"), first.array("cls")) and again.bad == [3]

    in_memory = cached_features(model, images, t16, which, cache_dir=None, **KW)
    assert np.array_equal(in_memory.array("cls"), first.array("cls")) and in_memory.key == first.key

    def recomputed(**change) -> bool:
        before = len(count_extractions)
        args = dict(model=model, paths=images, transform=t16, which=which) | change
        f = cached_features(
            args.pop("model"),
            args.pop("paths"),
            args.pop("transform"),
            args.pop("which"),
            cache_dir=tmp_path / "c",
            **KW,
        )
        return len(count_extractions) > before and f.key != first.key

    assert recomputed(transform=eval_transform(16, "resize"))  # same size, another transform
    assert recomputed(transform=eval_transform(32))  # another resolution
    assert recomputed(which=("cls",))  # other feature kinds
    changed = dinokit.create_model("vit_nano_p2").eval()
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.blocks[0].mlp.fc1.weight[0, 0] += 1e-3  # one weight changed
    assert weights_hash(changed) != weights_hash(model)
    assert recomputed(model=changed)
    os.utime(images[0], ns=(1, 1))  # a file replaced or touched
    assert recomputed()
    assert not recomputed(which=("patch_mean", "cls"))  # kind order does not matter: already cached


def test_interrupted_extraction_resumes_at_the_missing_shard(images, tmp_path, monkeypatch, count_extractions):
    model = dinokit.create_model("vit_nano_p2").eval()
    t = eval_transform(16)
    real = interrupt_shard(monkeypatch, "_write_shard", 2)
    with pytest.raises(KeyboardInterrupt):
        cached_features(model, images, t, ("cls",), cache_dir=tmp_path / "c", shard_size=2, **KW)
    entry = next((tmp_path / "c").iterdir())
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "shard-00000"]  # no partial shard left
    monkeypatch.setattr(cache_module, "_write_shard", real)
    count_extractions.clear()
    resumed = cached_features(model, images, t, ("cls",), cache_dir=tmp_path / "c", shard_size=2, **KW)
    assert count_extractions == [2, 2]  # shards 1 and 2 only
    whole = cached_features(model, images, t, ("cls",), cache_dir=None, **KW)
    assert np.array_equal(resumed.array("cls"), whole.array("cls")) and resumed.bad == [3]
    assert np.array_equal(resumed.rows("cls", np.array([4, 0, 2])), whole.array("cls")[[4, 0, 2]])


def test_a_full_disk_is_an_error_naming_the_file_not_a_sigbus(images, tmp_path, monkeypatch):
    """Features are written through memory maps of sparse files: on a full disk the process died of
    SIGBUS with no message. The space is allocated first, so a full disk is an OSError."""

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
    model = dinokit.create_model("vit_nano_p2").eval()
    with pytest.raises(OSError) as failed:
        cached_features(model, images, eval_transform(16), ("cls",), cache_dir=tmp_path / "c", **KW)
    assert failed.value.errno == errno.ENOSPC and failed.value.filename.endswith("cls.npy")
    entry = next((tmp_path / "c").iterdir())
    assert [p.name for p in entry.iterdir()] == ["meta.json"]  # no shard, whole or partial


def test_per_block_patch_tokens_match_get_intermediate_layers():
    model = dinokit.create_model("vit_micro_p4").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for norm in (True, False):
            f = compute_features(model, x, ("layers", "layer_patch_tokens", "cls"), layers=[1, 3], norm=norm)
            ref = model.get_intermediate_layers(x, n=[1, 3], return_class_token=True, norm=norm)
            for j, (patches, cls) in enumerate(ref):
                assert torch.equal(f["layer_patch_tokens"][:, j], patches) and torch.equal(f["layers"][:, j], cls)
            assert torch.allclose(f["cls"], model.forward_features(x)["x_norm_clstoken"], atol=1e-6)


def test_random_backbones_are_seeded_and_flagged():
    a, desc = load_backbone("random:vit_nano_p2", seed=3)
    b, _ = load_backbone("vit_nano_p2", seed=3)
    c, _ = load_backbone("random:vit_nano_p2", seed=4)
    assert "RANDOM" in desc and weights_hash(a) == weights_hash(b) != weights_hash(c)
    with pytest.raises(dinokit.DinokitError, match="unknown architecture"):
        load_backbone("random:vit_huge")


@pytest.mark.parametrize("damaged", ["meta.json", "shard-00000/rows.json"])
def test_a_damaged_cache_entry_is_an_error_naming_it_and_the_fix(images, tmp_path, damaged):
    """The cache's meta.json and rows.json were read with json.loads: a damaged one ended in a bare
    JSONDecodeError traceback. Removing the entry, as the error says, extracts the features again."""
    model = dinokit.create_model("vit_nano_p2").eval()
    first = cached_features(model, images, eval_transform(16), ("cls",), cache_dir=tmp_path / "c", **KW)
    (first.location / damaged).write_text('{"kept": [0, 1')
    with pytest.raises(DinokitError, match=rf"is not valid JSON.*remove the cache entry {first.location}"):
        cached_features(model, images, eval_transform(16), ("cls",), cache_dir=tmp_path / "c", **KW)
    shutil.rmtree(first.location)
    again = cached_features(model, images, eval_transform(16), ("cls",), cache_dir=tmp_path / "c", **KW)
    assert not again.reused and np.array_equal(again.array("cls"), first.array("cls"))


# ------------------------------------------------------------------ a changed image list reuses a donor entry
def draw_image(path, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)


def same_features(a, b) -> bool:
    """Same kept and bad files, same storage dtypes, the same rows: bit for bit, but patch tokens to float16
    rounding (the extractor's patch tokens of an image vary in their last bits with the batch it is in)."""
    return (
        a.kept.tolist() == b.kept.tolist()
        and a.bad == b.bad
        and all(a.array(k).dtype == b.array(k).dtype for k in a.shards)
        and all(
            np.allclose(a.array(k), b.array(k), rtol=1e-3, atol=1e-3)
            if k == "patch_tokens"
            else np.array_equal(a.array(k), b.array(k))
            for k in a.shards
        )
    )


def test_an_added_image_is_the_only_one_extracted(images, tmp_path, count_extractions):
    """An image added to a split made a new entry, extracted whole; now the other files' rows (and the bad
    file's mark, which is not read again) come from the entry of the list before, and the shards are
    those of a fresh extraction into an empty cache."""
    model = dinokit.create_model("vit_nano_p2").eval()
    t, which = eval_transform(16), ("cls", "patch_tokens")  # float32 and float16 storage
    cached_features(model, images, t, which, cache_dir=tmp_path / "c", shard_size=2, **KW)
    added = tmp_path / "img" / "added.png"
    draw_image(added, 9)
    grown = [*images[:2], added, *images[2:]]  # between two shards' files of the donor
    count_extractions.clear()
    reused = cached_features(model, grown, t, which, cache_dir=tmp_path / "c", shard_size=2, **KW)
    assert count_extractions == [1] and reused.extracted == 1 and not reused.reused
    fresh = cached_features(model, grown, t, which, cache_dir=tmp_path / "empty", shard_size=2, **KW)
    assert same_features(reused, fresh) and reused.bad == [4] and len(reused) == 6
    assert len(list((tmp_path / "c").iterdir())) == 2  # the donor entry stays
    assert not list((tmp_path / "c").rglob("fresh"))


def test_a_replaced_image_is_the_only_one_extracted_again(images, tmp_path, count_extractions):
    model = dinokit.create_model("vit_nano_p2").eval()
    t = eval_transform(16)
    first = cached_features(model, images, t, ("cls",), cache_dir=tmp_path / "c", **KW)
    before = images[4].stat()
    draw_image(images[4], 77)  # same name and size, another picture, written later
    os.utime(images[4], ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    count_extractions.clear()
    again = cached_features(model, images, t, ("cls",), cache_dir=tmp_path / "c", **KW)
    assert count_extractions == [1] and again.key != first.key
    fresh = cached_features(model, images, t, ("cls",), cache_dir=None, **KW)
    assert same_features(again, fresh) and not np.array_equal(again.array("cls")[3], first.array("cls")[3])


def test_a_removed_image_extracts_nothing(images, tmp_path, count_extractions):
    model = dinokit.create_model("vit_nano_p2").eval()
    t = eval_transform(16)
    cached_features(model, images, t, ("cls",), cache_dir=tmp_path / "c", shard_size=4, **KW)
    count_extractions.clear()
    shrunk = cached_features(model, images[1:], t, ("cls",), cache_dir=tmp_path / "c", shard_size=4, **KW)
    assert count_extractions == [] and shrunk.reused and shrunk.extracted == 0
    fresh = cached_features(model, images[1:], t, ("cls",), cache_dir=tmp_path / "empty", shard_size=4, **KW)
    assert same_features(shrunk, fresh) and shrunk.bad == [2]


@pytest.mark.parametrize("change", ["transform", "precision", "kinds"])
def test_features_of_another_transform_precision_or_kinds_are_not_reused(images, tmp_path, count_extractions, change):
    model = dinokit.create_model("vit_nano_p2").eval()
    cached_features(model, images[1:], eval_transform(16), ("cls",), cache_dir=tmp_path / "c", **KW)
    count_extractions.clear()
    t = eval_transform(16, "resize") if change == "transform" else eval_transform(16)
    kw = KW | {"precision": "bf16"} if change == "precision" else KW
    which = ("cls", "patch_mean") if change == "kinds" else ("cls",)
    cached_features(model, images, t, which, cache_dir=tmp_path / "c", **kw)
    assert count_extractions == [6]


def test_an_interrupted_assembly_resumes_at_the_missing_shard(images, tmp_path, monkeypatch, count_extractions):
    model = dinokit.create_model("vit_nano_p2").eval()
    t = eval_transform(16)
    cached_features(model, images[1:], t, ("cls",), cache_dir=tmp_path / "c", shard_size=2, **KW)
    real = interrupt_shard(monkeypatch, "_assemble_shard", 2)
    count_extractions.clear()
    with pytest.raises(KeyboardInterrupt):
        cached_features(model, images, t, ("cls",), cache_dir=tmp_path / "c", shard_size=2, **KW)
    assert count_extractions == [1]  # images[0], into shard 0
    monkeypatch.setattr(cache_module, "_assemble_shard", real)
    resumed = cached_features(model, images, t, ("cls",), cache_dir=tmp_path / "c", shard_size=2, **KW)
    assert count_extractions == [1] and resumed.extracted == 0  # shards 1 and 2 wholly from the donor
    assert not list((tmp_path / "c").rglob(".*"))  # no temporary folder left
    fresh = cached_features(model, images, t, ("cls",), cache_dir=None, **KW)
    assert same_features(resumed, fresh)
