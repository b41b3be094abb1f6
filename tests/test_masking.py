"""Block masking and the multi-crop collate."""

import numpy as np
import pytest
import torch

from dinokit.data.collate import MultiCropCollate, stratified_masks
from dinokit.data.masking import MaskingGenerator


class ScriptedRNG:
    """Returns prepared uniform draws, in call order, to make the masks exact."""

    def __init__(self, draws):
        self.draws = [np.asarray(d, dtype=float) for d in draws]

    def random(self, n):
        value = self.draws.pop(0)
        assert value.shape == (n,)
        return value


def test_one_block_by_hand():
    gen = MaskingGenerator(4, min_num_patches=4, max_num_patches=8, attempts=1)
    # area = 4 (low = high = 4), aspect = exp(0) = 1 -> 2 x 2, top = int(0 * 3) = 0, left = int(0.99 * 3) = 2
    mask = gen(4, ScriptedRNG([[0.3], [0.5], [0.0], [0.99]]))
    expected = np.zeros((4, 4), dtype=bool)
    expected[0:2, 2:4] = True
    np.testing.assert_array_equal(mask, expected)


def test_second_block_fills_the_remainder_by_hand():
    gen = MaskingGenerator(4, min_num_patches=4, max_num_patches=8, attempts=1)
    aspect_2 = (np.log(2) - np.log(0.3)) / (np.log(1 / 0.3) - np.log(0.3))  # u giving aspect 2
    draws = [[0.3], [0.5], [0.0], [0.99]]  # first block: rows 0-1, columns 2-3
    # second: max_new = 2, area = 4 + (2 - 4) * 1 = 2, aspect 2 -> h = 2, w = 1; top int(0.5 * 3) = 1, left 0
    draws += [[1.0], [aspect_2], [0.5], [0.0]]
    mask = gen(6, ScriptedRNG(draws))
    expected = np.zeros((4, 4), dtype=bool)
    expected[0:2, 2:4] = True
    expected[1:3, 0:1] = True
    np.testing.assert_array_equal(mask, expected)
    assert mask.sum() == 6


def test_blocks_never_exceed_the_target_or_the_block_limit():
    gen = MaskingGenerator(16, max_num_patches=128)
    rng = np.random.default_rng(0)
    for target in (0, 1, 5, 26, 77, 128):
        counts = [gen(target, rng).sum() for _ in range(20)]
        assert max(counts) <= target
        if target >= 26:
            assert np.mean(counts) > 0.8 * target  # nearly always reaches the target


def test_stratified_masks_ratios():
    gen = MaskingGenerator(16, max_num_patches=128)
    rng = np.random.default_rng(1)
    masks = stratified_masks(8, gen, rng, (0.1, 0.5), 0.5)
    assert masks.shape == (8, 256) and masks.dtype == torch.bool
    counts = sorted(masks.sum(dim=1).tolist())
    assert counts[:4] == [0, 0, 0, 0]  # half the images unmasked
    upper = [int(256 * r) for r in np.linspace(0.1, 0.5, 5)[1:]]  # strata (0.1-0.2), (0.2-0.3), ...
    assert all(c <= u for c, u in zip(counts[4:], upper, strict=True))
    assert all(c >= 0.5 * int(256 * lo) for c, lo in zip(counts[4:], (0.1, 0.2, 0.3, 0.4), strict=True))


def test_collate_is_crop_major_with_mask_weights():
    items = []
    for i in range(3):
        crops = {
            "global_crops": [torch.full((3, 8, 8), 10 * i + c, dtype=torch.uint8) for c in range(2)],
            "local_crops": [torch.full((3, 4, 4), 100 + i, dtype=torch.uint8)],
        }
        items.append((crops, i, 40 + i))
    items.append((None, 7, 43))  # an unreadable file
    collate = MultiCropCollate(MaskingGenerator(4, max_num_patches=8), (0.1, 0.5), 0.5, seed=0)
    batch = collate(items)
    assert batch.bad == [7] and batch.indices.tolist() == [0, 1, 2]
    assert batch.global_crops[:, 0, 0, 0].tolist() == [0, 10, 20, 1, 11, 21]  # crop 0 of each image, then crop 1
    assert batch.local_crops.shape == (3, 3, 4, 4) and batch.global_crops.dtype == torch.uint8
    per_image = batch.masks.sum(dim=1)
    assert (per_image > 0).sum() <= 3
    expected = torch.cat([torch.full((int(n),), 1.0 / int(n)) for n in per_image if n > 0])
    torch.testing.assert_close(batch.mask_weights, expected)
    again = collate(items)  # masks depend only on (seed, stream position)
    assert torch.equal(again.masks, batch.masks)
    moved = batch.to(torch.device("cpu"))
    assert moved.global_crops.dtype == torch.float32
    assert moved.global_crops[0, 0, 0, 0].item() == pytest.approx(-0.485 / 0.229, rel=1e-6)


def test_masks_are_cheap_next_to_a_training_step():
    """Masks for one batch of the official ViT-S/14 recipe (64 images: 128 global crops of 16 x 16
    patches) cost under 10% of one training step of a far smaller model (cpu32's 96-wide 4-block ViT,
    batch 64 of 2 x 32 + 2 x 16 px crops), let alone of the ViT-S/14 step they serve, so mask
    generation cannot starve training."""
    import time

    from dinokit.runtime import autocast
    from dinokit.train.build import build_model
    from dinokit.train.config import resolve_config

    def best_seconds(fn, repeats):  # the fastest run: other load on the machine only adds time
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    generator = MaskingGenerator(16, max_num_patches=128)
    rng = np.random.default_rng(0)
    mask_time = best_seconds(lambda: stratified_masks(128, generator, rng), 9)

    cfg = resolve_config("cpu32", {"global_crops_size": 32, "local_crops_size": 16})
    model = build_model(cfg).train()
    b = cfg.batch_size
    global_crops = torch.randn(2 * b, 3, cfg.global_crops_size, cfg.global_crops_size)
    local_crops = torch.randn(cfg.local_crops_number * b, 3, cfg.local_crops_size, cfg.local_crops_size)

    def step():
        with autocast(torch.device("cpu"), "bf16"):
            teacher = model.teacher_outputs(global_crops, None)
            targets = model.teacher_probabilities(teacher, 0.07)
            loss = model.losses(model.student(global_crops, local_crops), targets, 2)["loss"]
        loss.backward()

    step()
    step_time = best_seconds(step, 3)
    assert mask_time < 0.10 * step_time, (mask_time, step_time)
