"""Heads and losses of self-distillation against values computed by hand on small tensors."""

import math
import warnings
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from dinokit.losses import DINOHead, DINOLoss, EMACenter, IBOTPatchLoss, KoLeoLoss, sinkhorn_knopp
from tests.conftest import aten_op_names, aten_op_outputs

LN = math.log


# ----------------------------------------------------------------------------------------- DINOHead
def test_dino_head_structure_and_forward_formula():
    head = DINOHead(8, 5, hidden_dim=16, bottleneck_dim=4, nlayers=3)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 16), (16, 16), (16, 4)]
    assert all(torch.all(m.bias == 0) for m in linears)
    g = head.last_layer.parametrizations.weight.original0
    v = head.last_layer.parametrizations.weight.original1
    assert g.shape == (5, 1) and torch.all(g == 1) and g.requires_grad
    with torch.no_grad():
        g.copy_(torch.tensor([[0.5], [1.0], [2.0], [1.5], [3.0]]))
    x = torch.randn(3, 8)
    h = F.normalize(head.mlp(x), dim=-1)
    w = g * v / v.norm(dim=1, keepdim=True)  # W_k = g_k v_k / ||v_k||
    torch.testing.assert_close(head(x), h @ w.T)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), g.squeeze(1))


def test_dino_head_norm_last_layer_freezes_gain_and_nlayers_1():
    head = DINOHead(8, 5, bottleneck_dim=4, nlayers=1, norm_last_layer=True)
    assert [type(m) for m in head.mlp] == [torch.nn.Linear]
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad
    names = {n for n, p in head.named_parameters() if p.requires_grad}
    assert names == {"mlp.0.weight", "mlp.0.bias", "last_layer.parametrizations.weight.original1"}


# ----------------------------------------------------------------------------------------- DINOLoss
def test_dino_loss_pair_matrix_by_hand():
    """3 student views (2 global, 1 local), 2 teacher views, B = 1, K = 2, student temperature 1."""
    student = torch.tensor([[[0.0, 0.0]], [[0.0, LN(3)]], [[LN(3), 0.0]]])  # p = (1/2,1/2), (1/4,3/4), (3/4,1/4)
    teacher = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]])
    loss = DINOLoss(student_temp=1.0)
    matrix = loss.pair_matrix(student, teacher)
    expected = torch.tensor(
        [[LN(2), LN(2)], [LN(4), 0.5 * LN(16 / 3)], [LN(4 / 3), 0.5 * LN(16 / 3)]], dtype=torch.float32
    )
    torch.testing.assert_close(matrix, expected)
    # same-view pairs (0, 0) and (1, 1) are skipped; the rest averaged
    expected_loss = (LN(2) + LN(4) + LN(4 / 3) + 0.5 * LN(16 / 3)) / 4
    assert loss(student, teacher).item() == pytest.approx(expected_loss, rel=1e-6)
    assert DINOLoss(1.0, ignore_same_view=False)(student, teacher).item() == pytest.approx(expected.mean().item())


def test_dino_loss_student_temperature_and_batch_mean():
    student = torch.tensor([[[0.0, 0.0], [0.0, 0.1 * LN(3)]], [[0.0, 0.0], [0.0, 0.0]]])  # B = 2
    teacher = torch.tensor([[[0.0, 1.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])
    # pair (1, 0): mean over b of -log p(1) = (ln 2 + ln 2) / 2; pair (0, 1): b=0 ln 2, b=1 -ln(3/4)
    loss = DINOLoss(student_temp=0.1)(student, teacher)
    assert loss.item() == pytest.approx((LN(2) + (LN(2) + LN(4 / 3)) / 2) / 2, rel=1e-6)


def test_dino_loss_equals_official_bookkeeping():
    """The official DINOv2 sum: local terms over 8 x 2 pairs + 2 x the mean over 2B swapped global rows,
    divided by n_g(n_g - 1) + n_g n_l = 18, is the mean over the valid pairs of the pair matrix."""
    torch.manual_seed(0)
    b, k, n_l = 3, 7, 8
    student = torch.randn(2 + n_l, b, k)
    teacher = torch.softmax(torch.randn(2, b, k), dim=-1)

    def ce(s, t):  # official DINOLoss.forward for one student / teacher chunk: -mean_b sum_k t log_softmax(s/0.1)
        return -(t * torch.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()

    local = sum(ce(student[2 + i], teacher[j]) for i in range(n_l) for j in range(2)) / 18
    swapped = torch.cat([teacher[1], teacher[0]])
    global_ = ce(torch.cat([student[0], student[1]]), swapped) * 2 / 18
    torch.testing.assert_close(DINOLoss(0.1)(student, teacher), local + global_)


def test_dino_loss_without_pairs_is_an_error():
    with pytest.raises(ValueError, match="no valid"):
        DINOLoss()(torch.zeros(1, 2, 3), torch.full((1, 2, 3), 1 / 3))


# ----------------------------------------------------------------------------------------- centering
def test_ema_center_update_and_probabilities():
    center = EMACenter(2, momentum=0.9)
    logits = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    torch.testing.assert_close(center.probabilities(logits, 1.0), torch.softmax(logits, -1))
    center.update(logits)  # c = 0.9 * 0 + 0.1 * mean = (0.2, 0.3)
    torch.testing.assert_close(center.center, torch.tensor([[0.2, 0.3]]))
    p = center.probabilities(torch.tensor([[1.0, 2.0]]), 0.5)  # softmax(((1, 2) - (0.2, 0.3)) / 0.5)
    assert p[0, 0].item() == pytest.approx(1 / (1 + math.exp(((2.0 - 0.3) - (1.0 - 0.2)) / 0.5)), rel=1e-6)
    center.update(torch.empty(0, 2))  # no rows: unchanged
    torch.testing.assert_close(center.center, torch.tensor([[0.2, 0.3]]))


def test_ema_center_counts_bf16_rows_exactly():
    """4900 bf16 rows of ones: the mean is exactly 1 (a bf16 row count would be 4896)."""
    center = EMACenter(1, momentum=0.0)
    center.update(torch.ones(4900, 1, dtype=torch.bfloat16))
    assert center.center.item() == 1.0


def test_ema_center_works_a_block_of_rows_at_a_time(monkeypatch):
    """Probabilities equal softmax((logits.float() - c) / t) bit for bit and the row sums the float32
    sums to rounding, over blocks of rows that do not divide the rows (7 rows, blocks of 3), with no
    float32 array of the logits' size but the probabilities: at 605 x 65536 the whole cast, difference
    and quotient were 160 MB each, and the row sums' cast another."""
    from dinokit.losses import ibot_loss

    monkeypatch.setattr(ibot_loss, "CHUNK_ELEMENTS", 3 * 50)
    torch.manual_seed(0)
    logits = (3 * torch.randn(7, 50)).bfloat16()
    center = EMACenter(50)
    center.center.copy_(torch.randn(1, 50))
    probs = center.probabilities(logits, 0.04)
    composed = torch.softmax((logits.float() - center.center) / 0.04, dim=-1)
    torch.testing.assert_close(probs, composed, atol=0, rtol=0)
    sums = EMACenter.row_sums(logits)
    torch.testing.assert_close(sums[:-1], logits.float().sum(dim=0))
    assert sums[-1].item() == 7 and sums.dtype == torch.float32
    for run in (lambda: center.probabilities(logits, 0.04), lambda: EMACenter.row_sums(logits)):
        whole = [name for name, outputs in aten_op_outputs(run) if ((7, 50), torch.float32) in outputs]
        assert whole in (["new_empty.default"], []), whole  # the probabilities; none for the sums


def sinkhorn_by_hand(logits: list[list[float]], n_iterations: int) -> list[list[Fraction]]:
    """Sinkhorn-Knopp in exact fractions on exp(logits) given as ratios (tau = 1)."""
    q = [[Fraction(v) for v in col] for col in zip(*logits, strict=True)]  # K x B, entries = exp(t)
    k, b = len(q), len(q[0])
    total = sum(sum(r) for r in q)
    q = [[v / total for v in r] for r in q]
    for _ in range(n_iterations):
        q = [[v / sum(r) / k for v in r] for r in q]
        cols = [sum(q[i][j] for i in range(k)) for j in range(b)]
        q = [[q[i][j] / cols[j] / b for j in range(b)] for i in range(k)]
    return [[q[i][j] * b for i in range(k)] for j in range(b)]  # B x K


def test_sinkhorn_knopp_one_iteration_by_hand():
    # exp(t) = [[1, 2], [1, 1]] (B = 2 samples, K = 2 prototypes); one iteration gives
    # rows: proto 0 (1/4, 1/4), proto 1 (1/3, 1/6) -> columns normalised: sample 0 (3/7, 4/7), sample 1 (3/5, 2/5)
    t = torch.tensor([[0.0, LN(2)], [0.0, 0.0]])
    torch.testing.assert_close(sinkhorn_knopp(t, 1.0, n_iterations=1), torch.tensor([[3 / 7, 4 / 7], [3 / 5, 2 / 5]]))
    exact = sinkhorn_by_hand([[1, 2], [1, 1]], 3)
    torch.testing.assert_close(sinkhorn_knopp(t, 1.0), torch.tensor([[float(v) for v in r] for r in exact]))


def test_sinkhorn_knopp_is_stable_at_large_logits_and_balances():
    t = torch.randn(16, 8) * 5 + 300.0  # exp(300 / 0.04) overflows without the max subtraction
    q = sinkhorn_knopp(t, 0.04)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(16))
    reference = sinkhorn_knopp(t - 300.0, 0.04)  # a constant shift changes nothing
    torch.testing.assert_close(q, reference)


# ----------------------------------------------------------------------------------------- iBOT
def test_ibot_loss_by_hand():
    # 4 global-crop images; image 0 has 2 masked patches, image 1 has 1, images 2 and 3 none
    student = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, LN(3)]])
    teacher = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.0, 1.0]])
    weights = torch.tensor([0.5, 0.5, 1.0])
    loss = IBOTPatchLoss(student_temp=1.0)(student, teacher, weights, num_images=4)
    assert loss.item() == pytest.approx((0.5 * LN(2) + 0.5 * LN(2) + LN(4 / 3)) / 4, rel=1e-6)


def composed_cross_entropy(x: torch.Tensor, q: torch.Tensor, temperature: float) -> torch.Tensor:
    """What soft_cross_entropy replaces: -(q * log_softmax(x.float() / t)).sum(-1)."""
    return -(q.float() * torch.log_softmax(x.float() / temperature, dim=-1)).sum(dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_cross_entropy_is_the_log_softmax_composition_block_by_block(monkeypatch, dtype):
    """The composition's values bit for bit and its gradients (logits' in their dtype, targets') to
    rounding, over blocks of rows that do not divide the rows (7 rows, blocks of 3), and no farther
    from float64 (within 2x its error, or 1e-6 of the largest value)."""
    from dinokit.losses import ibot_loss

    monkeypatch.setattr(ibot_loss, "CHUNK_ELEMENTS", 3 * 50)
    torch.manual_seed(0)
    x0 = (3 * torch.randn(7, 50)).to(dtype)
    q0 = torch.softmax(torch.randn(7, 50) / 0.2, dim=-1)
    w = torch.rand(7)
    results = {}
    for name, ce in (("fused", ibot_loss.soft_cross_entropy), ("composed", composed_cross_entropy)):
        x, q = x0.clone().requires_grad_(), q0.clone().requires_grad_()
        per_row = ce(x, q, 0.1)
        assert per_row.dtype == torch.float32 and per_row.shape == (7,)
        per_row.mul(w).sum().backward()
        assert x.grad.dtype == dtype
        results[name] = (per_row.detach(), x.grad.float(), q.grad)
    torch.testing.assert_close(results["fused"][0], results["composed"][0], atol=0, rtol=0)
    exact_x, exact_q = x0.double().requires_grad_(), q0.double().requires_grad_()
    exact = -(exact_q * torch.log_softmax(exact_x / 0.1, dim=-1)).sum(dim=-1)
    exact.mul(w.double()).sum().backward()
    for fused, composed, reference in zip(
        results["fused"], results["composed"], (exact, exact_x.grad, exact_q.grad), strict=True
    ):
        tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-5)
        torch.testing.assert_close(fused, composed, **tolerance)
        reference = reference.detach()
        error, composed_error = ((t.double() - reference).abs().max() for t in (fused, composed))
        assert error <= max(2 * composed_error, 1e-6 * reference.abs().max())


def test_soft_cross_entropy_forward_makes_two_float32_arrays_a_block(monkeypatch):
    """Each block of bf16 rows is cast to float32 (one array) and divided by the temperature in place,
    its log-probabilities (the other) multiplied by the targets in place: the quotient and the product
    were two more block-sized arrays to write and read again (7 rows, blocks of 3: 3 blocks)."""
    from dinokit.losses import ibot_loss

    monkeypatch.setattr(ibot_loss, "CHUNK_ELEMENTS", 3 * 50)
    x = (3 * torch.randn(7, 50)).bfloat16().requires_grad_()
    q = torch.softmax(torch.randn(7, 50), dim=-1)
    made = [
        name
        for name, outputs in aten_op_outputs(lambda: ibot_loss.soft_cross_entropy(x, q, 0.1))
        if not name.split(".")[0].endswith("_") and any(s[1:] == (50,) and d == torch.float32 for s, d in outputs)
    ]
    assert made == ["_to_copy.default", "_log_softmax.default"] * 3, made


def test_soft_cross_entropy_takes_its_exponentials_from_the_softmax_kernels():
    """No torch.exp or logsumexp: where most of a row's exponentials underflow (logits 3 x randn at
    t = 0.1) they made forward + backward at 605 x 65536 2.2x slower than the composition."""
    from dinokit.losses.ibot_loss import soft_cross_entropy

    x = (3 * torch.randn(5, 40)).to(torch.bfloat16).requires_grad_()
    q = torch.softmax(torch.randn(5, 40), dim=-1).requires_grad_()
    names = aten_op_names(lambda: soft_cross_entropy(x, q, 0.1).sum().backward())
    assert not [name for name in names if name.split(".")[0] in ("exp", "exp_", "logsumexp")], names
    assert "_softmax.default" in names and "_log_softmax.default" in names


def test_soft_cross_entropy_gradients_in_float64():
    from dinokit.losses.ibot_loss import soft_cross_entropy

    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    q = torch.rand(5, 9, dtype=torch.float64, requires_grad=True)  # rows need not sum to 1
    assert torch.autograd.gradcheck(lambda x, q: soft_cross_entropy(x, q, 0.3), (x, q))


def test_ibot_loss_keeps_no_float32_log_probabilities_for_its_backward():
    """The iBOT loss's backward keeps the bf16 logits, the targets and one value per row: composed, it
    kept the (M, K) float32 log-probabilities too (151 MB in a DINOv2 ViT-S/14 step)."""
    x = torch.randn(12, 40, dtype=torch.bfloat16, requires_grad=True)
    q = torch.softmax(torch.randn(12, 40), dim=-1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = IBOTPatchLoss()(x * 1.0, q, torch.full((12,), 0.25), num_images=3)
    big = [t for t in saved if t.numel() == x.numel() and t.untyped_storage().data_ptr() != q.data_ptr()]
    assert [t.dtype for t in big] == [torch.bfloat16], [(t.dtype, tuple(t.shape)) for t in big]
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


# ----------------------------------------------------------------------------------------- KoLeo
def test_koleo_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])  # z2 = (1, 1)/sqrt 2 is everyone's neighbour
    d = math.sqrt(2 - math.sqrt(2))
    assert KoLeoLoss()(x).item() == pytest.approx(-math.log(d), rel=1e-5)


def test_koleo_in_fp32_under_autocast_and_finite_for_duplicates():
    x = torch.ones(4, 8, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = KoLeoLoss()(x)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_koleo_single_sample_is_skipped_with_a_warning():
    x = torch.randn(1, 8, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = KoLeoLoss()(x)
    assert loss.item() == 0.0 and any("at least 2 samples" in str(w.message) for w in caught)
    loss.backward()  # still part of the graph


def test_student_log_probs_divides_in_place_only_on_its_own_copy():
    """bf16 logits: the float32 copy is divided in place, values and gradients as log_softmax(x.float() / t);
    float32 logits (no copy is made) are left untouched, also when they are a view of a split."""
    from dinokit.losses.dino_loss import student_log_probs

    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        x = (3 * torch.randn(4, 6)).to(dtype).requires_grad_()
        before = x.detach().clone()
        log_p = student_log_probs(x, 0.1)
        reference = torch.log_softmax(x.detach().float() / 0.1, dim=-1)
        assert log_p.dtype == torch.float32
        torch.testing.assert_close(log_p, reference, atol=0, rtol=0)
        assert torch.equal(x.detach(), before)
        weights = torch.randn(4, 6)
        (log_p * weights).sum().backward()
        x_ref = before.float().requires_grad_()
        (torch.log_softmax(x_ref / 0.1, dim=-1) * weights).sum().backward()
        torch.testing.assert_close(x.grad.float(), x_ref.grad.to(dtype).float(), atol=0, rtol=0)
    _, patches = torch.randn(5, 6, requires_grad=True).split([2, 3])  # views, as the student's logits
    student_log_probs(patches, 0.1).sum().backward()
