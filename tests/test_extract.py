import os
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit.data.transforms import eval_transform
from dinokit.errors import DinokitError
from dinokit.features.extract import compute_features, extract_features, image_loader
from dinokit.runtime import autocast, resolve_device


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    (tmp_path / "bad.jpg").write_bytes(b"broken")
    return [*paths[:2], tmp_path / "bad.jpg", *paths[2:]]


def test_loader_workers_leave_stop_signals_to_the_main_process(images):
    """A Ctrl-C or SIGTERM to the whole process group (a terminal, torchrun) reaches the loader's workers
    too; they ignore it, so the main process decides (a pretraining run's k-NN monitor: finish the step,
    save a checkpoint) and the batches still come."""
    loader = image_loader(images, eval_transform(32), batch_size=1, num_workers=1, device=torch.device("cpu"))
    batches = iter(loader)
    first = next(batches)
    (worker,) = batches._workers
    for stop in (signal.SIGTERM, signal.SIGINT):
        os.kill(worker.pid, stop)
    time.sleep(0.5)
    assert worker.is_alive()
    rest = list(batches)
    assert [i for _, good, _ in [first, *rest] for i in good] == [0, 1, 3, 4, 5]


def test_extract_features_in_order_with_bad_files_skipped(images):
    model = dinokit.create_model("vit_micro_p4").eval()
    t = eval_transform(32)
    feats, kept, bad = extract_features(
        model,
        images,
        t,
        which=("cls", "patch_mean", "patch_tokens", "layers"),
        layers=[1, 3],
        batch_size=2,
        num_workers=0,
        precision="fp32",
        progress=False,
    )
    assert kept == [0, 1, 3, 4, 5] and bad == [2]
    assert feats["cls"].shape == (5, 96) and feats["patch_tokens"].shape == (5, 64, 96)
    assert feats["layers"].shape == (5, 2, 96)
    x = torch.stack([t(dinokit.data.images.open_rgb(images[i])) for i in kept])
    with torch.no_grad():
        ref = model.forward_features(x)
    assert torch.allclose(feats["cls"], ref["x_norm_clstoken"], atol=1e-5)
    assert torch.allclose(feats["patch_mean"], ref["x_norm_patchtokens"].mean(1), atol=1e-5)
    assert torch.allclose(feats["layers"][:, 1], ref["x_norm_clstoken"], atol=1e-5)


def test_bf16_features_agree_with_fp32(images):
    model = dinokit.create_model("vit_micro_p4").eval()
    kw = dict(batch_size=4, num_workers=0, progress=False)
    a, _, _ = extract_features(model, images, eval_transform(32), precision="fp32", **kw)
    b, _, _ = extract_features(model, images, eval_transform(32), precision="bf16", **kw)
    assert torch.nn.functional.cosine_similarity(a["cls"], b["cls"]).min() > 0.999


def test_bad_requests():
    model = dinokit.create_model("vit_nano_p2")
    with pytest.raises(DinokitError, match="unknown feature kinds"):
        compute_features(model, torch.randn(1, 3, 16, 16), which=("clss",))
    with pytest.raises(DinokitError, match="layers="):
        compute_features(model, torch.randn(1, 3, 16, 16), which=("layers",))
    with pytest.raises(DinokitError, match="precision"):
        autocast(torch.device("cpu"), "fp16")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(DinokitError, match="CUDA is not available"):
            resolve_device("cuda")


def test_a_batch_the_device_has_no_memory_for_is_run_in_halves_with_the_same_features(images, memory_fits):
    """Batches of 4 paths: 3 readable images, then 2; the device fits 2. The first batch is halved (2 + 1)
    and 2 kept for the rest, with one warning; features, order and bad files are a plain run's."""
    model = dinokit.create_model("vit_micro_p4", depth=2).eval()
    kw = dict(which=("cls", "patch_tokens"), batch_size=4, num_workers=0, precision="fp32", progress=False)
    plain, plain_kept, plain_bad = extract_features(model, images, eval_transform(32), **kw)
    tried = memory_fits(2)
    with pytest.warns(UserWarning) as warned:
        feats, kept, bad = extract_features(model, images, eval_transform(32), **kw)
    assert [str(w.message) for w in warned] == [
        "out of memory on cpu at batch_size=4: the features are computed 2 images at a time from here on "
        "(pass batch_size=2 next time)"
    ]
    assert tried == [3, 2, 1, 2]
    assert kept == plain_kept == [0, 1, 3, 4, 5] and bad == plain_bad == [2]
    for kind in plain:
        torch.testing.assert_close(feats[kind], plain[kind])
