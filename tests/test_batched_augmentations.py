"""Batched multi-crop augmentation: each tensor op equals torchvision's per-image op, and the crop
boxes follow RandomResizedCrop's distribution."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from dinokit.data.batched_augmentations import (
    BatchedMultiCrop,
    adjust_hue,
    blend,
    color_jitter,
    gaussian_blur,
    grayscale,
    random_resized_boxes,
    resized_crops,
)


@pytest.fixture
def images():
    return torch.rand(6, 3, 20, 24, generator=torch.Generator().manual_seed(0))


def test_colour_ops_equal_torchvision_per_image(images):
    factors = torch.tensor([0.6, 1.0, 1.3, 0.0, 1.4, 0.9])
    hues = torch.tensor([-0.1, 0.0, 0.05, 0.5, -0.5, 0.3])
    brightness = blend(images, torch.zeros_like(images), factors)
    contrast = blend(images, grayscale(images).mean(dim=(1, 2, 3), keepdim=True), factors)
    saturation = blend(images, grayscale(images), factors)
    hue = adjust_hue(images, hues)
    for i, (f, h) in enumerate(zip(factors.tolist(), hues.tolist(), strict=True)):
        torch.testing.assert_close(brightness[i], TF.adjust_brightness(images[i], f))
        torch.testing.assert_close(contrast[i], TF.adjust_contrast(images[i], f))
        torch.testing.assert_close(saturation[i], TF.adjust_saturation(images[i], f))
        torch.testing.assert_close(hue[i], TF.adjust_hue(images[i], h), atol=1e-5, rtol=0)
    torch.testing.assert_close(grayscale(images)[2], TF.rgb_to_grayscale(images[2]))


def test_hue_of_gray_and_primaries():
    x = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.0, 0.0, 1.0]]).view(3, 3, 1, 1)
    out = adjust_hue(x, torch.tensor([1 / 3, 0.25, 1 / 3])).view(3, 3)
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.5], [1.0, 0.0, 0.0]]))


def test_colour_jitter_with_zero_strength_is_identity(images):
    out = color_jitter(images, (0.0, 0.0, 0.0, 0.0), torch.Generator().manual_seed(1))
    assert torch.equal(out, images)


def test_blur_equals_torchvision(images):
    sigma = torch.tensor([0.5, 1.0, 2.0, 0.1, 1.5, 0.8])
    out = gaussian_blur(images, sigma, 9)
    for i, s in enumerate(sigma.tolist()):
        torch.testing.assert_close(out[i], TF.gaussian_blur(images[i], [9, 9], [s, s]), atol=1e-6, rtol=0)


def test_crops_equal_slicing_pooling_and_bilinear_resize(images):
    box = torch.tensor([[4.0, 2.0, 14.0, 12.0]])
    same = resized_crops(images, torch.tensor([3]), box, 10)  # a 10 x 10 box at 10 px: the pixels
    torch.testing.assert_close(same[0], images[3, :, 2:12, 4:14])
    half = resized_crops(images, torch.tensor([1]), torch.tensor([[2.0, 0.0, 22.0, 20.0]]), 10)
    torch.testing.assert_close(half[0], F.avg_pool2d(images[1:2, :, 0:20, 2:22], 2)[0])
    double = resized_crops(images, torch.tensor([3]), box, 20)
    expected = F.interpolate(images[3:4, :, 2:12, 4:14], size=20, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(double[0, :, 1:-1, 1:-1], expected[:, 1:-1, 1:-1])  # inside: same bilinear


def test_boxes_follow_random_resized_crop():
    g = torch.Generator().manual_seed(0)
    boxes = random_resized_boxes(4000, 32, 48, (0.2, 0.8), g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert boxes[:, :2].min() >= 0 and boxes[:, 2].max() <= 48 and boxes[:, 3].max() <= 32
    assert torch.equal(boxes, boxes.round())
    fraction = w * h / (32 * 48)
    assert fraction.min() > 0.15 and fraction.max() < 0.85  # rounding moves the area a little
    assert (w / h).min() > 0.69 and (w / h).max() < 1.45  # 3/4 to 4/3, up to rounding
    # torchvision's sampler on the same problem: the same mean area fraction
    crop = v2.RandomResizedCrop(8, scale=(0.2, 0.8))
    torch.manual_seed(0)
    tv = [crop.make_params([torch.zeros(3, 32, 48)]) for _ in range(4000)]
    tv_fraction = torch.tensor([p["height"] * p["width"] / (32 * 48) for p in tv])
    assert abs(float(fraction.mean() - tv_fraction.mean())) < 0.01


def test_boxes_fall_back_to_the_central_crop():
    g = torch.Generator().manual_seed(0)
    boxes = random_resized_boxes(5, 10, 100, (0.99, 1.0), g)  # a 10 x 100 image: no 3/4-4/3 box fits
    torch.testing.assert_close(boxes, torch.tensor([[43.0, 0.0, 56.0, 10.0]]).expand(5, 4))


def test_multicrop_shapes_order_and_determinism():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = BatchedMultiCrop(32, 16, 2, 3, (0.3, 1.0), (0.05, 0.3), blur_kernel_size=0)
    g, loc = aug(images, torch.Generator().manual_seed(5))
    assert g.shape == (8, 3, 32, 32) and loc.shape == (12, 3, 16, 16) and g.dtype == loc.dtype == torch.uint8
    g2, loc2 = aug(images, torch.Generator().manual_seed(5))
    assert torch.equal(g, g2) and torch.equal(loc, loc2)
    # crop-major: with crops covering the whole image and no colour change, crop c of image i is image i
    plain = BatchedMultiCrop(
        32,
        16,
        2,
        0,
        (1.0, 1.0),
        (0.05, 0.3),
        (0, 0, 0),
        solarize_probability=0,
        color_jitter_probability=0,
        grayscale_probability=0,
    )
    g, loc = plain(images, torch.Generator().manual_seed(0))
    assert loc is None
    for c in range(2):
        for i in range(4):
            assert torch.equal(g[c * 4 + i], images[i]) or torch.equal(g[c * 4 + i], images[i].flip(-1))


def test_solarize_inverts_bright_pixels_only():
    images = torch.tensor([0, 100, 128, 255], dtype=torch.uint8).view(1, 1, 1, 4).expand(1, 3, 4, 4).contiguous()
    aug = BatchedMultiCrop(
        4,
        4,
        2,
        0,
        (1.0, 1.0),
        (1.0, 1.0),
        (0, 0, 0),
        solarize_probability=1.0,
        color_jitter_probability=0,
        grayscale_probability=0,
    )
    g, _ = aug(images, torch.Generator().manual_seed(0))
    row = g[1, 0, 0]
    expected = torch.tensor([0, 100, 127, 0], dtype=torch.uint8)
    assert torch.equal(row, expected) or torch.equal(row, expected.flip(0))
    assert torch.equal(g[0, 0, 0], images[0, 0, 0]) or torch.equal(g[0, 0, 0], images[0, 0, 0].flip(0))


def test_decode_to_memory_resizes_center_crops_and_lists_bad_files(tmp_path, monkeypatch):
    from PIL import Image

    from dinokit.data.unlabelled import decode_to_memory
    from dinokit.errors import DinokitError

    wide = torch.zeros(3, 8, 16, dtype=torch.uint8)
    wide[:, :, 4:12] = 200  # the central square is bright, the sides dark
    Image.fromarray(wide.permute(1, 2, 0).numpy()).save(tmp_path / "wide.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    paths = [tmp_path / "wide.png", tmp_path / "broken.jpg"]
    images, bad = decode_to_memory(paths, 8)
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.uint8 and bad == [1]
    assert torch.equal(images[0], wide[:, :, 4:12]) and images[1].sum() == 0
    monkeypatch.setattr("os.sysconf", lambda name: 1024 if name == "SC_PHYS_PAGES" else 4096)  # 4 MiB
    with pytest.raises(DinokitError, match="augmentation=per_image"):
        decode_to_memory(paths * 200, 64)
