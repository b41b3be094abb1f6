"""The Python API as a notebook user meets it: what a model and the helpers take, what they return, and
that a call leaves the notebook's global state (threads, flags, random streams, logging, cwd) as it was."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit.errors import DinokitError, ModelInputError


@pytest.fixture(scope="module")
def micro():
    """A 4-block, 96-dim ViT with 4 px patches (32 px native), random init, in eval mode."""
    torch.manual_seed(0)
    return dinokit.create_model("vit_micro_p4").eval()


def photo(size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


WRONG_INPUTS = {
    "a PIL image": (lambda: photo(), ["PIL.Image.Image", "dinokit.eval_transform(size"]),
    "a numpy HWC array": (lambda: np.asarray(photo()), ["numpy.ndarray", "dinokit.eval_transform(size"]),
    "uint8 pixels": (
        lambda: torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
        ["torch.uint8", "dinokit.data.transforms.normalize()(images)"],
    ),
    "one image without the batch dimension": (lambda: torch.randn(3, 32, 32), ["images.unsqueeze(0)"]),
    "channels last (B, H, W, C)": (lambda: torch.randn(2, 32, 32, 3), ["images.permute(0, 3, 1, 2)"]),
    "grayscale": (lambda: torch.randn(2, 1, 32, 32), ["3 channels", "convert('RGB')"]),
    "a size off the patch grid": (lambda: torch.randn(1, 3, 30, 30), ["28x28 (crop) or 32x32 (pad)"]),
    "another device": (lambda: torch.randn(1, 3, 32, 32, device="meta"), ["on meta", "model on cpu", ".to("]),
}


@pytest.mark.parametrize("call", ["forward", "forward_features", "get_intermediate_layers", "get_last_selfattention"])
@pytest.mark.parametrize("kind", list(WRONG_INPUTS))
def test_inputs_a_model_cannot_take_are_named_with_their_fix(micro, kind, call):
    make, fragments = WRONG_INPUTS[kind]
    with pytest.raises(ModelInputError) as err:
        getattr(micro, call)(make())
    assert isinstance(err.value, DinokitError) and isinstance(err.value, ValueError)  # what callers catch
    for fragment in fragments:
        assert fragment in str(err.value)


def test_float_images_of_another_dtype_are_cast_to_the_weights_dtype(micro):
    """As transformers' Dinov2Model: model.half() / .bfloat16() take float32 images, a float32 model
    takes float64 or bf16 ones (the official model fails with a dtype mismatch in its convolution)."""
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        reference = micro(x)
        assert torch.equal(micro(x.double()), reference)
        assert torch.equal(micro(x.bfloat16()), micro(x.bfloat16().float()))
        for dtype in (torch.float16, torch.bfloat16):
            low = dinokit.create_model("vit_micro_p4").eval()
            low.load_state_dict(micro.state_dict())
            low.to(dtype)
            out = low(x)
            assert out.dtype == dtype and torch.equal(out, low(x.to(dtype)))


def test_grad_mode_memory_format_and_compile_give_the_same_features(micro):
    x = torch.randn(3, 3, 32, 36)
    with torch.no_grad():
        reference = micro.forward_features(x)["x_norm_patchtokens"]
    with_grad = micro.forward_features(x.requires_grad_())["x_norm_patchtokens"]
    assert with_grad.requires_grad
    torch.testing.assert_close(with_grad.detach(), reference, rtol=0, atol=1e-5)
    channels_last = dinokit.create_model("vit_micro_p4").eval()
    channels_last.load_state_dict(micro.state_dict())
    channels_last.to(memory_format=torch.channels_last)
    compiled = torch.compile(micro, backend="eager")  # inductor needs a compiler; the graph capture is ours
    with torch.no_grad():
        out = channels_last.forward_features(x.detach().to(memory_format=torch.channels_last))
        torch.testing.assert_close(out["x_norm_patchtokens"], reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(compiled(x.detach()), micro(x.detach()), rtol=0, atol=1e-6)


def test_eval_transform_takes_numpy_photos_and_pil_images_of_any_mode_as_rgb():
    """A numpy (H, W, 3) uint8 array went through torchvision's v2 steps unresized and uncropped (48 x 40
    stayed 48 x 40); a grayscale PIL image gave one channel, which the model then refused."""
    transform = dinokit.eval_transform(32, patch_size=4)
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    reference = transform(rgb)
    assert reference.shape == (3, 32, 32)
    assert torch.equal(transform(np.asarray(rgb)), reference)
    gray = rgb.convert("L")
    assert torch.equal(transform(gray), transform(gray.convert("RGB")))
    assert torch.equal(transform(np.asarray(gray)), transform(gray.convert("RGB")))
    with pytest.raises(DinokitError, match=r"uint8 \(H, W\) or \(H, W, 3\) array, got float64"):
        transform(np.asarray(rgb) / 255.0)


def test_finetune_takes_pathlib_paths_as_every_other_command(tmp_path):
    """dinokit.finetune(model=Path(...)) failed with 'bad value for model: Object of type PosixPath is
    not JSON serializable' (pretrain, embed, index, eval and predict took Paths)."""
    from dinokit.data.synthetic import write_classification_set

    write_classification_set(tmp_path, per_class=2, size=16, seed=0, split="train")
    write_classification_set(tmp_path, per_class=1, size=16, seed=1, split="val")
    weights = dinokit.export_model(dinokit.create_model("vit_nano_p2"), tmp_path / "nano.safetensors")
    keys = dict(image_size=16, epochs=1, batch_size=8, num_workers=0, progress=False, device="cpu")
    out = tmp_path / "ft"
    dinokit.finetune(model=Path(weights), train=tmp_path / "train", val=tmp_path / "val", out=out, **keys)
    assert (out / "classifier.safetensors").is_file()
