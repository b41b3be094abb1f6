"""Training augmentation of supervised fine-tuning (torchvision transforms v2), as the BEiT / MAE /
DeiT recipes: RandomResizedCrop (bicubic) + horizontal flip (+ RandAugment) per image, MixUp / CutMix
per batch. Evaluation uses the eval commands' transform (`dinokit.data.transforms.eval_transform`)."""

import torch
from torchvision.transforms import v2

from dinokit.data.images import ReducedJpegDecode, crops_min_side
from dinokit.data.transforms import normalize


def train_transform(
    image_size: int, crop_scale: tuple[float, float] = (0.08, 1.0), rand_augment: int = 0, reduced_decode: bool = False
) -> v2.Compose:
    """PIL image -> normalised (3, image_size, image_size): a random crop of `crop_scale` of the area
    (aspect 3/4..4/3) resized bicubic, a flip with probability 0.5, then RandAugment (2 operations at
    `rand_augment` magnitude of 31) if it is > 0. `reduced_decode`: first a `ReducedJpegDecode` at the
    smallest size no crop upsamples (`crops_min_side`), applied by the dataset that opens the files."""
    decode = [ReducedJpegDecode(crops_min_side([(image_size, crop_scale)]))] if reduced_decode else []
    steps = [
        *decode,
        v2.RandomResizedCrop(
            image_size, scale=tuple(crop_scale), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
        ),
        v2.RandomHorizontalFlip(),
    ]
    if rand_augment > 0:
        steps.append(v2.RandAugment(num_ops=2, magnitude=rand_augment, interpolation=v2.InterpolationMode.BICUBIC))
    return v2.Compose([*steps, normalize()])


class SoftTargets:
    """(images (B, 3, H, W), labels (B,)) -> (images, soft targets (B, C)): one-hot labels mixed by
    MixUp (alpha `mixup`) or CutMix (alpha `cutmix`), one of the two per batch when both are on, then
    label smoothing (target x (1 - s) + s / C, as timm's mixup does). Random draws come from torch's
    global generator (checkpointed with the run, so a resumed run mixes the same batches)."""

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, smoothing: float = 0.0) -> None:
        self.num_classes, self.smoothing = num_classes, smoothing
        mixers = []
        if mixup > 0:
            mixers.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        if cutmix > 0:
            mixers.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        self.mix = None if not mixers else mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mix is not None and len(labels) > 1:  # a batch of one has no other image to mix with
            images, targets = self.mix(images, labels)
        else:
            targets = torch.nn.functional.one_hot(labels, self.num_classes).to(images.dtype)
        return images, targets * (1.0 - self.smoothing) + self.smoothing / self.num_classes

    def __repr__(self) -> str:
        return f"SoftTargets(mix={self.mix!r}, label_smoothing={self.smoothing})"
