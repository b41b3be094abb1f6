import math

import pytest
import torch
import torch.nn.functional as F

from dinokit.eval.depth import LinearDepthHead, SigLoss, depth_blocks
from dinokit.eval.metrics import confusion_matrix, depth_errors, mean_depth_errors, segmentation_scores


def test_miou_and_pixel_accuracy_by_hand():
    pred = torch.tensor([[0, 1, 3], [1, 1, 0]])
    target = torch.tensor([[0, 1, 255], [0, 255, 0]])
    cm = confusion_matrix(pred, target, num_classes=4, ignore_index=255)
    # labelled pixels: (t0,p0) (t1,p1) (t0,p1) (t0,p0); the two 255 pixels are ignored
    assert cm.tolist() == [[2, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    s = segmentation_scores(cm)
    # IoU0 = 2 / (2 + 0 + 1) ; IoU1 = 1 / (1 + 1 + 0) ; classes 2 and 3 absent everywhere -> excluded
    assert s["iou"][0] == pytest.approx(200 / 3) and s["iou"][1] == pytest.approx(50.0)
    assert s["iou"][2] is None and s["iou"][3] is None
    assert s["miou"] == pytest.approx((200 / 3 + 50) / 2) and s["pixel_accuracy"] == pytest.approx(75.0)
    # a class predicted but never true counts with IoU 0
    s = segmentation_scores(confusion_matrix(torch.tensor([2, 0]), torch.tensor([0, 0]), 3))
    assert s["iou"] == [50.0, None, 0.0] and s["miou"] == pytest.approx(25.0)


def test_an_ignore_index_inside_the_class_range_is_no_class():
    # ignore_index=0 with classes 1..2; confusion_matrix(pred, target): rows = truth, columns = prediction
    cm = confusion_matrix(torch.tensor([1, 1, 0, 2, 2]), torch.tensor([0, 1, 1, 2, 2]), 3, ignore_index=0)
    # the truth-0 pixel is ignored; (t1,p1) (t1,p0) (t2,p2) (t2,p2)
    assert cm.tolist() == [[0, 0, 0], [1, 1, 0], [0, 0, 2]]
    s = segmentation_scores(cm, ignore_index=0)
    # IoU1 = 1 / (1 + 0 + 1) ; IoU2 = 2 / 2 ; class 0 is the ignore label, not a class with IoU 0
    assert s["iou"] == [None, 50.0, 100.0] and s["miou"] == pytest.approx(75.0)
    assert s["pixel_accuracy"] == pytest.approx(75.0)  # the pixel predicted 0 is still wrong
    assert segmentation_scores(cm)["miou"] == pytest.approx(50.0)  # without it, class 0 counts
    assert segmentation_scores(cm, ignore_index=255)["miou"] == pytest.approx(50.0)  # out of range: no effect


def test_depth_errors_by_hand():
    pred = torch.tensor([2.0, 4.0, 1.0, 100.0, 3.0])
    gt = torch.tensor([1.0, 4.0, 2.0, 0.0, 50.0])  # gt 0 is no measurement, 50 is beyond max_depth
    e = depth_errors(pred, gt, min_depth=1e-3, max_depth=10.0)
    assert e["rmse"] == pytest.approx(math.sqrt(2 / 3))  # (1 + 0 + 1) / 3
    assert e["abs_rel"] == pytest.approx((1 / 1 + 0 + 1 / 2) / 3)
    assert e["delta1"] == pytest.approx(100 / 3)  # ratios 2, 1, 2: only the middle one < 1.25
    other = depth_errors(torch.tensor([3.0]), torch.tensor([2.0]), 1e-3, 10.0)
    mean = mean_depth_errors([e, None, other])  # averaged over images with valid pixels
    assert mean["rmse"] == pytest.approx((math.sqrt(2 / 3) + 1.0) / 2) and mean["images"] == 2
    assert depth_errors(pred, torch.zeros(5), 1e-3, 10.0) is None


def test_sigloss_by_hand_and_its_scale_invariance():
    pred = torch.tensor([[2.0, 4.0, 8.0, 5.0]])
    gt = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last pixel has no measurement
    # g = ln2 * [1, 2, 3]: mean 2 ln2, unbiased variance ln2^2 -> sqrt(ln2^2 + 0.15 * 4 ln2^2)
    assert SigLoss(eps=0.0)(pred, gt).item() == pytest.approx(math.log(2) * math.sqrt(1.6), rel=1e-6)
    assert SigLoss(eps=0.0, lam=0.0)(3.7 * pred, gt).item() == pytest.approx(math.log(2), rel=1e-6)
    assert SigLoss(max_depth=0.5)(pred, gt).item() == 0.0  # no valid pixel left: zero loss, no NaN
    default = SigLoss()(pred, gt).item()
    g = torch.log(torch.tensor([2.0, 4.0, 8.0]) + 1e-3) - math.log(1 + 1e-3)
    assert default == pytest.approx(math.sqrt(g.var().item() + 0.15 * g.mean().item() ** 2), rel=1e-6)


def test_linear_depth_head_matches_the_reference_order_and_uses_the_depth_range():
    torch.manual_seed(0)
    head = LinearDepthHead(embed_dim=6, num_layers=2, min_depth=0.5, max_depth=12.0)
    tokens, cls = torch.randn(2, 2, 9, 6), torch.randn(2, 2, 6)
    out = head(tokens, cls, (3, 3))
    assert out.shape == (2, 1, 12, 12) and out.min() >= 0.5 and out.max() <= 12.0
    # the reference: per block cat(patch map, broadcast CLS), upsample x4, 1x1 conv, (relu + 0.1) / sum
    maps = [
        torch.cat([tokens[:, i].transpose(1, 2).reshape(2, 6, 3, 3), cls[:, i, :, None, None].expand(2, 6, 3, 3)], 1)
        for i in range(2)
    ]
    x = F.interpolate(torch.cat(maps, 1), scale_factor=4, mode="bilinear", align_corners=False)
    p = torch.relu(head.conv(x)) + 0.1
    p = p / p.sum(1, keepdim=True)
    reference = torch.einsum("bkhw,k->bhw", p, torch.linspace(0.5, 12.0, 256)).unsqueeze(1)
    assert torch.allclose(out, reference, atol=1e-5)
    with torch.no_grad():  # uniform bin probabilities give the middle of the range
        head.conv.weight.zero_()
        head.conv.bias.zero_()
    assert torch.allclose(head(tokens, cls, (3, 3)), torch.full((2, 1, 12, 12), (0.5 + 12.0) / 2))


def test_reference_depth_blocks():
    assert depth_blocks(12, 4) == (2, 5, 8, 11) and depth_blocks(24, 4) == (4, 11, 17, 23)
    assert depth_blocks(40, 4) == (9, 19, 29, 39) and depth_blocks(12, 1) == (11,)
    assert depth_blocks(4, 4) == (0, 1, 2, 3) and depth_blocks(2, 4) == (0, 1)
