import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from dinokit.data.transforms import ResizeKeepAspect, ResizeToCover, check_image_size, eval_transform
from dinokit.errors import DinokitError


def photo(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize(("h", "w"), [(300, 400), (400, 300), (32, 32), (97, 61)])
def test_cover_at_a_square_size_is_the_official_short_side_resize(h, w):
    im = photo(h, w)
    official = v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)(im)
    assert np.array_equal(np.asarray(ResizeToCover(256, 256)(im)), np.asarray(official))


def test_non_square_center_crop_covers_the_box_without_padding():
    im = Image.fromarray(np.full((300, 300, 3), 200, dtype=np.uint8))  # square photo, wide box
    x = eval_transform((112, 224))(im)
    assert x.shape == (3, 112, 224)
    assert torch.allclose(x[0], torch.full((112, 224), (200 / 255 - 0.485) / 0.229), atol=1e-5)  # no black border
    assert ResizeToCover(128, 256)(photo(300, 300)).size == (256, 256)  # PIL size is (w, h)
    assert ResizeToCover(128, 256)(photo(100, 400)).size == (512, 128)


def test_aspect_policy_keeps_the_shape_in_patch_multiples():
    t = ResizeKeepAspect(224, 14)
    assert t.output_size(480, 640) == (224, 294)  # 298.7 -> 21 patches
    assert t.output_size(640, 480) == (294, 224)
    assert t.output_size(500, 500) == (224, 224)
    assert t.output_size(10, 1000) == (224, 22400)
    assert eval_transform(56, "aspect", patch_size=14)(photo(100, 170)).shape == (3, 56, 98)
    with pytest.raises(DinokitError, match="short side"):
        eval_transform((56, 70), "aspect")
    with pytest.raises(DinokitError, match="resize_policy must be one of"):
        eval_transform(56, "stretch")


def test_check_image_size_names_the_nearest_valid_sizes():
    assert check_image_size([28, 42], 14) == (28, 42)
    with pytest.raises(DinokitError, match="use 224 or 238"):
        check_image_size(230, 14)


def test_check_image_size_refuses_sizes_below_one_patch_and_lists_that_are_not_a_pair():
    for size in (0, -16, [16, 0]):  # 0 "is not a multiple of the patch size 2; use 2 or 0"
        with pytest.raises(DinokitError, match=r"at least the patch size 2, and a multiple of it; use 2\b"):
            check_image_size(size, 2)
    for size in ([16], [16, 16, 16]):  # a ValueError traceback
        with pytest.raises(DinokitError, match=r"image_size must be one size or \[height, width\]"):
            check_image_size(size, 2)
