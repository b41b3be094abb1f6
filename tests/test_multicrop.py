"""Multi-crop augmentation, the unlabelled dataset (bad and tiny files) and the sample stream."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from dinokit.data.augmentations import GaussianBlurPIL, MultiCropAugmentation
from dinokit.data.unlabelled import MultiCropDataset, StreamBatchSampler


def blur_probabilities(compose: v2.Compose) -> list[float]:
    return [
        t.p
        for t in compose.transforms
        if isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.GaussianBlur | GaussianBlurPIL)
    ]


def photo(size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_crops_shapes_and_dtype():
    aug = MultiCropAugmentation(32, 16, global_crops_number=2, local_crops_number=3)
    out = aug(photo())
    assert [tuple(c.shape) for c in out["global_crops"]] == [(3, 32, 32)] * 2
    assert [tuple(c.shape) for c in out["local_crops"]] == [(3, 16, 16)] * 3
    assert all(c.dtype == torch.uint8 for c in out["global_crops"] + out["local_crops"])


def test_blur_probabilities_intended_and_as_released():
    intended = MultiCropAugmentation(32, 16)
    assert blur_probabilities(intended.global_first) == [1.0]
    assert blur_probabilities(intended.global_other) == [0.1]
    assert blur_probabilities(intended.local) == [0.5]
    released = MultiCropAugmentation(32, 16, blur_as_released=True)  # the official code's inversion
    assert blur_probabilities(released.global_first) == []  # p = 0: never blurred
    assert blur_probabilities(released.global_other) == [pytest.approx(0.9)]
    assert blur_probabilities(released.local) == [0.5]
    solarize = [t for t in intended.global_other.transforms if isinstance(t, v2.RandomSolarize)]
    assert len(solarize) == 1 and solarize[0].p == 0.2
    assert not any(isinstance(t, v2.RandomSolarize) for t in intended.global_first.transforms)


def test_a_blur_kernel_wider_than_a_crop_is_narrowed_to_the_crop():
    """blur_kernel_size=9 (the default) on 4 px local crops: torchvision's reflect padding needs the
    kernel's radius below the side, and the per-image path raised a bare RuntimeError mid-run where
    the batched path narrows the kernel to 2 * (side - 1) + 1; both narrow it now."""
    aug = MultiCropAugmentation(8, 4, local_crops_number=2, blur_probabilities=(1.0, 1.0, 1.0), blur_kernel_size=9)
    out = aug(photo())
    assert [c.shape for c in out["global_crops"]] == [(3, 8, 8)] * 2
    assert [c.shape for c in out["local_crops"]] == [(3, 4, 4)] * 2
    blurs = [t.transforms[0] for t in aug.local.transforms if isinstance(t, v2.RandomApply)]
    assert [list(b.kernel_size) for b in blurs if isinstance(b, v2.GaussianBlur)] == [[7, 7]]


def test_pil_blur_smooths_and_matches_tensor_path():
    image = Image.fromarray(((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8)).convert("RGB")
    blur = GaussianBlurPIL((1.5, 1.5))
    out = np.asarray(blur(image)).astype(float)
    assert out.std() < 0.2 * np.asarray(image).astype(float).std()  # a checkerboard is nearly flat
    tensor = blur(v2.functional.pil_to_tensor(image)).float()
    assert abs(tensor.mean().item() - out.mean()) < 3.0


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (200, 7)])
def test_tiny_and_thin_images_give_full_size_crops(size):
    out = MultiCropAugmentation(32, 16, local_crops_number=2)(photo(size))
    assert out["global_crops"][0].shape == (3, 32, 32) and out["local_crops"][1].shape == (3, 16, 16)


def write_mixed_folder(root) -> tuple[list, list]:
    """Good images of many modes and bad files; returns (good paths, bad paths)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    good = []
    for name, image in [
        ("rgb.jpg", Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))),
        ("gray.png", Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8))),
        ("rgba.png", Image.fromarray(rng.integers(0, 255, (20, 24, 4), dtype=np.uint8))),
        ("deep.png", Image.fromarray(rng.integers(0, 65535, (20, 24), dtype=np.uint16))),
        ("palette.png", Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).convert("P")),
        ("tiny.png", Image.fromarray(rng.integers(0, 255, (2, 2, 3), dtype=np.uint8))),
    ]:
        image.save(root / name)
        good.append(root / name)
    bad = [root / "empty.jpg", root / "text.png", root / "truncated.png"]
    bad[0].write_bytes(b"")
    bad[1].write_text("not an image")
    bad[2].write_bytes((root / "gray.png").read_bytes()[:40])
    return good, bad


def test_dataset_skips_bad_files_and_is_deterministic(tmp_path):
    good, bad = write_mixed_folder(tmp_path / "images")
    paths = good + bad
    dataset = MultiCropDataset(paths, MultiCropAugmentation(16, 8, local_crops_number=1), seed=3)
    for i in range(len(paths)):
        crops, index, position = dataset[(i, 100 + i)]
        assert (index, position) == (i, 100 + i)
        assert (crops is None) == (paths[i] in bad)
    a, _, _ = dataset[(0, 5)]
    b, _, _ = dataset[(0, 5)]
    c, _, _ = dataset[(0, 6)]
    assert torch.equal(a["global_crops"][0], b["global_crops"][0])  # position -> same augmentation
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])
    state = torch.get_rng_state()
    dataset[(1, 7)]
    assert torch.equal(state, torch.get_rng_state())  # the process's own RNG is untouched


def test_stream_sampler_partitions_passes_and_resumes():
    n, batch, world = 10, 3, 2
    streams = [StreamBatchSampler(n, batch, rank, world, seed=1) for rank in range(world)]
    batches = [list(itertools.islice(iter(s), 5)) for s in streams]
    positions = sorted(p for rank in batches for b in rank for _, p in b)
    assert positions == list(range(5 * batch * world))  # every position once, ranks interleaved per batch
    first_pass = [i for rank in batches for b in rank for i, p in b if p < n]
    assert sorted(first_pass) == list(range(n))  # a pass is a permutation
    second_pass = [i for rank in batches for b in rank for i, p in b if n <= p < 2 * n]
    assert sorted(second_pass) == list(range(n))
    assert first_pass != second_pass
    resumed = StreamBatchSampler(n, batch, 1, world, seed=1, start=2 * batch * world)
    assert list(itertools.islice(iter(resumed), 3)) == batches[1][2:5]
    single = StreamBatchSampler(n, batch * world, 0, 1, seed=1)  # one process with the global batch
    assert [p for b in itertools.islice(iter(single), 5) for _, p in b] == positions


def test_pretraining_decodes_large_jpegs_at_a_scale_no_crop_upsamples(tmp_path):
    """reduced_decode (default): the per-image dataset decodes a large JPEG at 1/2, 1/4 or 1/8 scale
    whose short side stays >= crops_min_side, where the smallest region any RandomResizedCrop may read
    (area scale[0], aspect 3/4..4/3) still has >= the crop's size pixels a side."""
    import math

    from dinokit.data.images import crops_min_side
    from dinokit.train.build import build_augmentation
    from dinokit.train.config import resolve_config

    # by hand: 98 / sqrt(0.05 * 3/4) = 506.07 -> 507; 224 / sqrt(0.32 * 3/4) = 457.2; 2 x 224 = 448
    assert crops_min_side([(224, (0.32, 1.0)), (98, (0.05, 0.32))]) == 507
    assert crops_min_side([(224, (0.32, 1.0))]) == 458
    assert crops_min_side([(16, (0.9, 1.0))]) == 32  # twice the crop
    side = crops_min_side([(98, (0.05, 0.32))])
    assert math.sqrt(0.05 * side * side * 3 / 4) >= 98 > math.sqrt(0.05 * (side - 1) ** 2 * 3 / 4)

    official = build_augmentation(resolve_config("dinov2_vits14", {}))
    assert official.decode_min_side == 507 and "ReducedJpegDecode(min_side=507)" in repr(official)
    assert build_augmentation(resolve_config("dinov2_vits14", {"reduced_decode": False})).decode_min_side is None
    assert build_augmentation(resolve_config("dinov2_vits14", {"local_crops_number": 0})).decode_min_side == 458

    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)).save(photo)
    seen = []

    class Recorder:  # a multi-crop transform that records the decoded size it is given
        def __init__(self, decode_min_side: int | None) -> None:
            self.decode_min_side = decode_min_side

        def __call__(self, image) -> dict:
            seen.append(image.size)
            return {}

    MultiCropDataset([photo], Recorder(official.decode_min_side))[(0, 0)]
    MultiCropDataset([photo], Recorder(None))[(0, 0)]
    assert seen == [(1000, 750), (4000, 3000)]  # 1/4 scale (1/8: 375 < 507); whole without a min side
