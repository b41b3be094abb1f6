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
    real = cache_module._write_shard

    def crash_on_second(folder, model, paths, first, *args):
        if first == 2:
            raise KeyboardInterrupt
        return real(folder, model, paths, first, *args)

    monkeypatch.setattr(cache_module, "_write_shard", crash_on_second)
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
