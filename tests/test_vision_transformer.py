import math

import pytest
import torch
import torch.nn.functional as F

from dinokit.errors import DinokitError
from dinokit.models import (
    ARCHITECTURES,
    VisionTransformer,
    attention_to_patches,
    count_parameters,
    create_model,
    snap_to_patch_multiple,
)
from dinokit.models.layers.ffn import SwiGLUFFN
from tests.conftest import aten_op_names, aten_op_outputs, perturb_scales_and_norms

RELEASED = {
    "dinov2_vits14": 22_056_576,
    "dinov2_vitb14": 86_580_480,
    "dinov2_vitl14": 304_368_640,
    "dinov2_vitg14": 1_136_480_768,
    "dinov2_vits14_reg": 22_058_112,
    "dinov2_vitb14_reg": 86_583_552,
    "dinov2_vitl14_reg": 304_372_736,
    "dinov2_vitg14_reg": 1_136_486_912,
    # DINO v1 (facebookresearch/dino deit_small / vit_base): no mask token, no LayerScale, 224 grid.
    "dino_vits16": 21_665_664,
    "dino_vitb16": 85_798_656,
}


def tiny(**kw) -> VisionTransformer:
    cfg = dict(img_size=28, patch_size=7, embed_dim=32, depth=3, num_heads=2, init_values=1.0)
    return perturb_scales_and_norms(VisionTransformer(**{**cfg, **kw})).eval()


@pytest.mark.parametrize("name", list(RELEASED))
def test_parameter_counts_equal_released_models(name):
    with torch.device("meta"):
        assert count_parameters(create_model(name)) == RELEASED[name]


def test_every_named_architecture_builds_with_its_table_entry():
    for name, cfg in ARCHITECTURES.items():
        with torch.device("meta"):
            m = create_model(name)
        assert m.pos_embed.shape[1] == 1 + (cfg.img_size // cfg.patch_size) ** 2
        assert (m.register_tokens is not None) == (cfg.num_register_tokens > 0)


def test_create_model_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="dinov2_vits14"):
        create_model("dinov2_vits41")
    with pytest.raises(TypeError, match=r"[Uu]nknown"):
        create_model("dinov2_vits14", bogus=1)


def test_forward_features_keys_shapes_and_register_order():
    m = tiny(num_register_tokens=3)
    x = torch.randn(2, 3, 28, 42)  # non-square: 4 x 6 patches
    with torch.no_grad():
        out = m.forward_features(x)
        cls = m(x)
    assert set(out) == {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks"}
    assert out["x_norm_clstoken"].shape == (2, 32)
    assert out["x_norm_regtokens"].shape == (2, 3, 32)
    assert out["x_norm_patchtokens"].shape == (2, 24, 32)
    assert out["x_prenorm"].shape == (2, 1 + 3 + 24, 32)
    assert torch.equal(cls, out["x_norm_clstoken"])
    normed = m.norm(out["x_prenorm"])
    assert torch.allclose(normed[:, 1:4], out["x_norm_regtokens"])
    # registers sit between CLS and patches and carry no position embedding
    tokens = m.prepare_tokens(x)
    assert torch.equal(tokens[:, 1:4], m.register_tokens.expand(2, -1, -1))


def test_is_training_returns_the_dict():
    m = tiny()
    out = m(torch.randn(1, 3, 28, 28), is_training=True)
    assert isinstance(out, dict) and "x_norm_patchtokens" in out


def test_mask_token_replaces_patches_before_the_position_embedding():
    m = tiny()
    x = torch.randn(2, 3, 28, 28)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [0, 5]] = True
    tokens = m.prepare_tokens(x, masks)
    pos = m.interpolate_pos_encoding(16, 28, 28)
    expected = m.mask_token + pos[0, 1:][[0, 5]]
    assert torch.allclose(tokens[0, 1:][[0, 5]], expected)
    unmasked = m.prepare_tokens(x)
    assert torch.equal(tokens[1], unmasked[1])
    assert torch.equal(tokens[0, 2:6], unmasked[0, 2:6])
    out = m.forward_features(x, masks=masks)
    assert out["masks"] is masks


def test_list_input_gives_one_dict_per_crop_size():
    m = tiny()
    outs = m.forward_features([torch.randn(2, 3, 28, 28), torch.randn(4, 3, 14, 14)])
    assert [o["x_norm_patchtokens"].shape[:2] for o in outs] == [(2, 16), (4, 4)]


def test_input_not_a_multiple_of_the_patch_size_names_the_sizes_that_work():
    m = tiny()
    with pytest.raises(ValueError, match=r"30x33.*28x28 \(crop\) or 35x35 \(pad\)"):
        m(torch.randn(1, 3, 30, 33))


def test_an_input_that_is_not_a_batch_of_rgb_images_says_what_is_expected():
    """One image (3, H, W) failed with 'not enough values to unpack', a grayscale batch in conv2d."""
    m = tiny()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(3, 28, 28\).*unsqueeze\(0\)"):
        m(torch.randn(3, 28, 28))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(2, 1, 28, 28\)"):
        m.forward_features(torch.randn(2, 1, 28, 28))


def test_snap_to_patch_multiple_crops_centered_and_pads_symmetrically():
    x = torch.arange(30 * 33, dtype=torch.float32).reshape(1, 1, 30, 33)
    cropped = snap_to_patch_multiple(x, 7, "crop")
    assert cropped.shape[-2:] == (28, 28)
    assert cropped[0, 0, 0, 0] == x[0, 0, 1, 2]  # (30-28)//2 = 1 row, (33-28)//2 = 2 columns
    padded = snap_to_patch_multiple(x, 7, "pad")
    assert padded.shape[-2:] == (35, 35)
    assert padded[0, 0, 2, 1] == x[0, 0, 0, 0]  # 5 rows -> 2 top, 3 bottom; 2 columns -> 1 left, 1 right
    assert padded[0, 0, :2].abs().sum() == 0
    m = tiny()
    assert m(snap_to_patch_multiple(torch.randn(1, 3, 30, 33), 7)).shape == (1, 32)


def test_pos_embed_interpolation_matches_the_official_formula():
    """scale_factor (h0 + 0.1) / M with offset; size (h0, w0) without; identity at the native grid."""
    for offset, antialias in ((0.1, False), (0.0, True)):
        m = tiny(interpolate_offset=offset, interpolate_antialias=antialias)
        assert m.interpolate_pos_encoding(16, 28, 28) is m.pos_embed
        grid = m.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
        if offset:
            ref = F.interpolate(grid, scale_factor=((6 + 0.1) / 4, (3 + 0.1) / 4), mode="bicubic")
        else:
            ref = F.interpolate(grid, size=(6, 3), mode="bicubic", antialias=True)
        ref = ref.permute(0, 2, 3, 1).reshape(1, 18, 32)
        got = m.interpolate_pos_encoding(18, 42, 21)
        assert torch.equal(got[:, 0], m.pos_embed[:, 0])
        assert torch.allclose(got[:, 1:], ref, atol=1e-6)
    # the offset really changes the result (this is why HF's Dinov2Model differs off-grid)
    a = tiny(interpolate_offset=0.1).interpolate_pos_encoding(36, 42, 42)
    b = tiny(interpolate_offset=0.0).interpolate_pos_encoding(36, 42, 42)
    assert (a - b).abs().max() > 1e-3


def test_get_intermediate_layers_int_list_reshape_classtoken_norm():
    m = tiny(num_register_tokens=2)
    x = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        tokens = m.prepare_tokens(x)
        per_block = []
        for blk in m.blocks:
            tokens = blk(tokens)
            per_block.append(tokens)
        last2 = m.get_intermediate_layers(x, n=2)
        assert len(last2) == 2
        assert torch.allclose(last2[0], m.norm(per_block[1])[:, 3:], atol=1e-6)
        assert torch.allclose(last2[1], m.forward_features(x)["x_norm_patchtokens"], atol=1e-6)
        chosen = m.get_intermediate_layers(x, n=[0, 2], norm=False, return_class_token=True)
        assert torch.allclose(chosen[0][0], per_block[0][:, 3:], atol=1e-6)
        assert torch.allclose(chosen[1][1], per_block[2][:, 0], atol=1e-6)
        maps = m.get_intermediate_layers(x, n=1, reshape=True)
        assert maps[0].shape == (2, 32, 4, 6)
        assert torch.allclose(maps[0].flatten(2).transpose(1, 2), last2[1], atol=1e-6)
    with pytest.raises(DinokitError, match=r"block indices must lie in -3\.\.2 for a 3-block model"):
        m.get_intermediate_layers(x, n=[5])


def test_get_intermediate_layers_rejects_more_blocks_than_the_model_has():
    """n=int asks for the last n blocks; n > depth used to return duplicated blocks."""
    m = tiny()  # 3 blocks
    x = torch.randn(1, 3, 28, 28)
    for n in (4, 6, 0, -1):
        with pytest.raises(DinokitError, match=r"3-block model.*1 <= n <= 3"):
            m.get_intermediate_layers(x, n=n)
    with torch.no_grad():
        all3 = m.get_intermediate_layers(x, n=3)
        assert len(all3) == 3
        chosen = m.get_intermediate_layers(x, n=[-3, 1, -1])
    assert [torch.equal(a, b) for a, b in zip(chosen, (all3[0], all3[1], all3[2]), strict=True)] == [True] * 3


def test_attention_maps_work_with_registers_and_match_the_sdpa_path():
    m = tiny(num_register_tokens=4)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        attn = m.get_last_selfattention(x)
        assert attn.shape == (2, 2, 1 + 4 + 16, 1 + 4 + 16)
        assert torch.allclose(attn.sum(-1), torch.ones(2, 2, 21), atol=1e-5)
        parts = attention_to_patches(attn, 4)
        assert parts["cls_to_patches"].shape == (2, 2, 16)
        assert parts["cls_to_registers"].shape == (2, 2, 4)
        assert torch.allclose(
            parts["cls_to_patches"].sum(-1) + parts["cls_to_registers"].sum(-1) + attn[:, :, 0, 0], torch.ones(2, 2)
        )
        # the explicit path computes the same block output as SDPA
        tokens = m.prepare_tokens(x)
        for blk in m.blocks[:-1]:
            tokens = blk(tokens)
        explicit, _ = m.blocks[-1].forward_with_attention(tokens)
        assert torch.allclose(explicit, m.blocks[-1](tokens), atol=1e-5)
        first = m.get_selfattention(x, block=0)
        assert not torch.allclose(first, attn)


def test_eval_is_deterministic_and_training_drops_paths():
    m = tiny(drop_path_rate=0.5, depth=4)
    assert [b.drop_path_rate for b in m.blocks] == pytest.approx([0, 0.5 / 3, 1 / 3, 0.5])
    x = torch.randn(8, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
        m.train()
        a, b = m(x), m(x)
    assert not torch.allclose(a, b)
    uniform = tiny(drop_path_rate=0.3, drop_path_uniform=True, depth=4)
    assert [b.drop_path_rate for b in uniform.blocks] == [0.3] * 4


def test_stochastic_depth_adds_a_rescaled_residual_to_a_subset():
    from dinokit.models.layers import drop_add_residual

    x = torch.zeros(10, 1, 1)
    out = drop_add_residual(x, lambda t: torch.ones_like(t), 0.5)
    kept = (out != 0).flatten()
    assert kept.sum() == 5  # max(int(10 * 0.5), 1) samples
    assert torch.allclose(out.flatten()[kept], torch.full((5,), 2.0))  # scaled by 10 / 5
    assert torch.equal(drop_add_residual(x, lambda t: t + 1, 0.0), torch.ones(10, 1, 1))


def test_stochastic_depth_at_small_rates_drops_each_sample_with_that_rate():
    """At p <= 0.1 (the official Block's DropPath range) a batch of 8 loses 1% of its samples at
    p = 0.01, not the subset path's at-least-one (12.5%); kept branches are scaled by 1 / (1 - p)."""
    from dinokit.models.layers import drop_add_residual

    torch.manual_seed(0)
    x = torch.zeros(8, 1, 1)
    outs = torch.stack([drop_add_residual(x, lambda t: torch.ones_like(t), 0.01) for _ in range(4000)])
    dropped = (outs == 0).double().mean().item()
    assert 0.006 < dropped < 0.014  # 32000 draws: the standard error is 0.0006
    assert torch.allclose(outs[outs != 0], torch.tensor(1 / 0.99))
    at_limit = drop_add_residual(torch.zeros(1000, 1, 1), lambda t: torch.ones_like(t), 0.1)
    assert at_limit.unique().tolist() == [0.0, pytest.approx(1 / 0.9)]  # per sample, not a subset


def test_stochastic_depth_at_small_rates_runs_the_branch_on_the_kept_samples_only():
    """On a CPU, DropPath's branch sees only the samples its Bernoulli draw keeps, and the result is
    x + branch(x) * m / (1 - p) with the same draws; gradients reach only the kept samples' branch."""
    from dinokit.models.layers import drop_add_residual

    x = torch.randn(16, 5, 4, requires_grad=True)
    w = torch.randn(4, 4, requires_grad=True)
    seen = []

    def branch(t):
        seen.append(t.shape[0])
        return t @ w

    torch.manual_seed(3)
    out = drop_add_residual(x, branch, 0.1)
    torch.manual_seed(3)
    m = torch.empty(16, 1, 1).bernoulli_(0.9)
    assert 0 < m.sum() < 16  # this seed drops some samples and keeps others
    assert seen == [int(m.sum())]
    expected = x + (x @ w) * m / 0.9
    torch.testing.assert_close(out, expected)
    grad_w, grad_x = torch.autograd.grad(out.square().sum(), (w, x))
    expected_w, expected_x = torch.autograd.grad(expected.square().sum(), (w, x))
    torch.testing.assert_close(grad_w, expected_w)
    torch.testing.assert_close(grad_x, expected_x)
    # one sample: kept, scaled by 1 / (1 - p); dropped, x itself (the branch times m = 0: the test below)
    one, outcomes = torch.ones(1, 2, 4), set()
    for seed in range(60):
        torch.manual_seed(seed)
        kept = bool(torch.empty(1).bernoulli_(0.9))
        torch.manual_seed(seed)
        out = drop_add_residual(one, branch, 0.1)
        outcomes.add(kept)
        if kept:
            torch.testing.assert_close(out, one + (one @ w).detach() / 0.9)
        else:
            assert torch.equal(out, one)
    assert outcomes == {False, True}


def test_stochastic_depth_that_drops_every_sample_still_gives_the_branch_zero_gradients():
    """Per-sample DropPath multiplies the branch by m = 0 where it drops every sample of the batch, so its
    parameters get zero gradients. Skipping the branch left them None: DDP (which pretrain uses without
    find_unused_parameters) then fails the next step ('Expected to have finished reduction'), and AdamW
    skips those parameters (no weight decay, no momentum) where it would step them."""
    from dinokit.models.layers import drop_add_residual

    branch = torch.nn.Linear(4, 4)
    x = torch.randn(2, 3, 4, requires_grad=True)
    seed = next(s for s in range(1000) if torch.manual_seed(s) and torch.empty(2, 1, 1).bernoulli_(0.9).sum() == 0)
    torch.manual_seed(seed)
    out = drop_add_residual(x, branch, 0.1)
    assert torch.equal(out, x)
    out.square().sum().backward()
    assert branch.weight.grad is not None and branch.bias.grad is not None
    assert not branch.weight.grad.any() and not branch.bias.grad.any()
    torch.testing.assert_close(x.grad, 2 * x.detach())


def test_adding_the_branch_rows_back_keeps_only_their_indices_for_the_backward():
    """AddRows is torch.index_add (value and gradients: gradcheck in fp64) without keeping the rows it
    adds, which autograd's index_add keeps (one branch output per block and branch)."""
    from dinokit.models.layers.stochastic_depth import AddRows

    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([4, 0, 2])
    assert torch.equal(AddRows.apply(x, idx, rows, 1.7), torch.index_add(x, 0, idx, rows, alpha=1.7))
    assert torch.autograd.gradcheck(lambda x, rows: AddRows.apply(x, idx, rows, 1.7), (x, rows))

    def saved_shapes(add) -> list:
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            add(x, rows * 1.0)  # rows * 1.0: a non-leaf, as a branch output is
        return shapes

    assert saved_shapes(lambda x, r: AddRows.apply(x, idx, r, 1.7)) == [(3,)]
    assert (3, 3, 4) in saved_shapes(lambda x, r: torch.index_add(x, 0, idx, r, alpha=1.7))


def test_adding_the_branch_rows_back_makes_their_gradient_as_one_array():
    """AddRows's backward scales the rows' gradient in place where index_select makes it: grad[idx] *
    alpha made a second array of their size (a branch output's, per block and branch)."""
    from dinokit.models.layers.stochastic_depth import AddRows

    x = torch.randn(6, 3, 4, requires_grad=True)
    rows = torch.randn(3, 3, 4, requires_grad=True)
    idx = torch.tensor([4, 0, 2])
    out = AddRows.apply(x, idx, rows, 1.7)
    grad = torch.randn(6, 3, 4)
    ops = aten_op_outputs(lambda: out.backward(grad))
    made = [
        name for name, outputs in ops if ((3, 3, 4), torch.float32) in outputs and not name.split(".")[0].endswith("_")
    ]
    assert made == ["index_select.default"], made
    torch.testing.assert_close(rows.grad, grad[idx] * 1.7, atol=0, rtol=0)
    torch.testing.assert_close(x.grad, grad, atol=0, rtol=0)


@pytest.mark.parametrize("rate", [0.1, 0.5])  # per-sample DropPath, and the subset path
def test_stochastic_depth_takes_the_kept_rows_with_a_backward_that_adds_them_without_index_put(rate):
    """The branch's input rows come through index_select, whose backward is index_add into zeros:
    x[idx]'s backward, index_put(accumulate=True), is 4-5x slower on a CPU for the same values."""
    from dinokit.models.layers import drop_add_residual

    x = torch.randn(16, 5, 4, requires_grad=True)
    w = torch.randn(4, 4)
    torch.manual_seed(3)  # this seed keeps some samples and drops others at either rate
    out = drop_add_residual(x, lambda t: t @ w, rate)
    kept = (out != x).any(dim=(1, 2))
    assert 0 < kept.sum() < 16
    names = aten_op_names(lambda: out.square().sum().backward())
    assert any(name.startswith("index_add") for name in names)
    assert not any(name.startswith("index_put") for name in names), names
    scale = 16 / kept.sum() if rate > 0.1 else 1 / (1 - rate)
    expected = 2 * out.detach() + kept[:, None, None] * (2 * out.detach() * scale) @ w.T
    torch.testing.assert_close(x.grad, expected)


def test_cpu_inference_slices_give_the_same_result_as_one_pass():
    m = tiny()
    x = torch.randn(9, 3, 28, 28)
    with torch.no_grad():
        m.cpu_inference_tokens = 17 * 2  # 2 images per slice
        sliced = m.forward_features(x)["x_norm_patchtokens"]
        layers = m.get_intermediate_layers(x, n=2)
        m.cpu_inference_tokens = 10**9
        whole = m.forward_features(x)["x_norm_patchtokens"]
        layers_whole = m.get_intermediate_layers(x, n=2)
    assert torch.allclose(sliced, whole, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(layers, layers_whole, strict=True))


def test_bf16_autocast_agrees_with_fp32():
    m = create_model("vit_micro_p4").eval()
    perturb_scales_and_norms(m, 0.1)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(x)
    assert F.cosine_similarity(ref, low.float()).min() > 0.999


def test_swiglu_block_width_follows_the_official_rule():
    with torch.device("meta"):
        g = create_model("dinov2_vitg14")
    assert g.blocks[0].mlp.w12.weight.shape == (8192, 1536)
    assert g.blocks[0].mlp.w3.weight.shape == (1536, 4096)


def test_models_without_mask_token_reject_masks():
    m = tiny(mask_token=False)
    with pytest.raises(ValueError, match="mask token"):
        m.forward_features(torch.randn(1, 3, 28, 28), masks=torch.ones(1, 16, dtype=torch.bool))


def test_official_init():
    m = create_model("dinov2_vits14")
    assert m.mask_token.abs().sum() == 0
    assert m.cls_token.std() < 1e-5
    assert math.isclose(m.pos_embed.std().item(), 0.02, rel_tol=0.1)
    assert m.blocks[0].attn.qkv.bias.abs().sum() == 0


def test_dinokit_error_is_an_exception():
    assert issubclass(DinokitError, Exception)


@pytest.mark.parametrize("amx", [False, True])
def test_cpu_bf16_attention_matches_sdpa(monkeypatch, amx):
    """In bf16 on CPU, training takes the matmul attention path, and so does inference on CPUs without
    AMX tiles (with them, SDPA: the faster forward there); it computes what SDPA computes, in values
    and gradients (against SDPA in fp32)."""
    from dinokit.models.layers import attention as attention_module
    from dinokit.models.layers.attention import Attention, matmul_attention, use_matmul_attention

    monkeypatch.setattr(attention_module, "cpu_has_amx", lambda: amx)
    q = torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)
    assert use_matmul_attention(q) and use_matmul_attention(q.detach()) is not amx
    assert not use_matmul_attention(q.detach().half()) and not use_matmul_attention(q.float())  # fp16: SDPA
    torch.manual_seed(0)
    attention = Attention(32, 4)
    for tokens in (17, 40):  # rows under 32 tokens take the fp32-cast softmax, longer ones the bf16 one
        x = torch.randn(3, tokens, 32, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = attention(x)
        fast.float().sum().backward()
        fast_grad, x.grad = x.grad.clone(), None
        reference = attention(x)  # fp32: the SDPA path
        reference.sum().backward()
        torch.testing.assert_close(fast.float(), reference, atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(fast_grad, x.grad, atol=3e-2, rtol=3e-2)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # inference
            inference = attention(x).float()
        if amx:  # SDPA: bf16 rounding apart
            torch.testing.assert_close(inference, reference.detach(), atol=3e-2, rtol=3e-2)
        else:  # the same path, the same values
            torch.testing.assert_close(inference, fast.float(), atol=0, rtol=0)
        # the function itself, in fp32 where nothing is rounded: SDPA's values (heads of 8, scale 8^-0.5)
        q, k, v = torch.randn(3, 2, 4, tokens, 8).unbind(0)
        torch.testing.assert_close(matmul_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # SDPA, and the matmul path
def test_attention_backward_stacks_the_qkv_gradients_without_another_copy(precision):
    """The q, k, v gradients are stacked into the qkv projection's output layout in one copy: no
    clone after the stack (a (B, N, 3D) copy per block, 45 ms of a 5-6 s fp32 ViT-S/14 step). The
    values and gradients are those of the permuted layout, bit for bit."""
    from dinokit.models.layers.attention import Attention

    torch.manual_seed(0)
    attention = Attention(32, 4)
    x = torch.randn(3, 40, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = attention(x)
    names = aten_op_names(lambda: out.float().square().sum().backward())
    after_stack = names[names.index("stack.default") + 1 :]
    assert "stack.default" not in after_stack and "clone.default" not in after_stack, names
    if precision == "fp32":
        x_ref = x.detach().clone().requires_grad_()
        q, k, v = attention.qkv(x_ref).view(3, 40, 3, 4, 8).permute(2, 0, 3, 1, 4)
        expected = attention.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 40, 32))
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
        expected.square().sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, atol=0, rtol=0)


def test_cpu_inference_slices_suit_the_cpu(monkeypatch):
    """A model built on a CPU with AMX tiles runs inference in slices of 4096 tokens, elsewhere of 1024
    (the faster size on each, bench/inference.py)."""
    from dinokit.models import vision_transformer

    for amx, tokens in ((False, 1024), (True, 4096)):
        monkeypatch.setattr(vision_transformer, "cpu_has_amx", lambda amx=amx: amx)
        assert tiny().cpu_inference_tokens == tokens


def test_gelu_linear_gradients_equal_the_separate_ops():
    """GeluLinear keeps gelu's input instead of its output and recomputes it in the backward: the
    gradients are exactly those of F.gelu followed by F.linear (checked in float64)."""
    from dinokit.models.layers.ffn import GeluLinear

    torch.manual_seed(0)
    h = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(GeluLinear.apply, (h, weight, bias))
    assert torch.autograd.gradcheck(GeluLinear.apply, (h, weight, None))


def plain_block(block, x: torch.Tensor) -> torch.Tensor:
    """A LayerScale block computed op by op as its docstring writes it, from its own submodules:
    x + ls1(proj(attention(norm1(x)))), then + ls2(fc2(gelu(fc1(norm2(.))))) or + ls2(swiglu(norm2(.)))."""
    from dinokit.models.layers.attention import matmul_attention, use_matmul_attention

    attn, mlp = block.attn, block.mlp
    h = block.norm1(x)
    b, n, d = h.shape
    q, k, v = attn.qkv(h).reshape(b, n, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
    out = matmul_attention(q, k, v) if use_matmul_attention(q) else F.scaled_dot_product_attention(q, k, v)
    y = x + block.ls1(attn.proj(out.transpose(1, 2).reshape(b, n, d)))
    if isinstance(mlp, SwiGLUFFN):
        x1, x2 = mlp.w12(block.norm2(y)).chunk(2, dim=-1)
        return y + block.ls2(mlp.w3(F.silu(x1) * x2))
    return y + block.ls2(mlp.fc2(F.gelu(mlp.fc1(block.norm2(y)))))


def output_and_grads(block, forward, x: torch.Tensor, precision: str):
    """forward(x)'s output and the gradients of x and of every block parameter for sum(out^2)."""
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = forward(x)
    out.float().square().sum().backward()
    grads = [x.grad] + [p.grad for p in block.parameters()]
    block.zero_grad(set_to_none=True)
    return out.float(), grads


def layer_scale_block(ffn_layer: str = "mlp"):
    from dinokit.models.layers.block import Block

    torch.manual_seed(0)
    block = Block(32, 4, init_values=0.5, ffn_layer=ffn_layer)
    with torch.no_grad():
        for p in block.parameters():  # LayerScale gains and norms away from their init
            p.add_(0.1 * torch.randn_like(p))
    return block


@pytest.mark.parametrize("ffn_layer", ["mlp", "swiglu"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_block_path_computes_the_plain_block(precision, ffn_layer):
    """With gradients on, a block folds LayerScale into proj / fc2 and recomputes GELU in the backward.
    Its output and every gradient are those of the plain ops in fp32: to rounding in fp32, and in bf16
    autocast as close as the plain ops' own bf16 gradients are (0.1-0.5% in norm here, each gradient
    in fp32 as before). SwiGLU blocks (ViT-g) fold their LayerScale into w3."""
    block = layer_scale_block(ffn_layer)
    x = torch.randn(3, 40, 32)
    out, grads = output_and_grads(block, block, x, precision)
    ref, ref_grads = output_and_grads(block, lambda x: plain_block(block, x), x, "fp32")
    if precision == "fp32":
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert ((out - ref).norm() / ref.norm()).item() < 0.01
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.float32
        if precision == "fp32":
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
        assert ((g - r).norm() / r.norm()).item() < 0.01


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward while `fn()` runs."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_training_blocks_keep_neither_the_gelu_output_nor_the_layer_scale_inputs():
    """Per block, the training path saves GELU's (N, hidden) output and both LayerScale inputs (N, D)
    fewer than the plain ops. It keeps instead the two folded weights (D x D for proj, D x hidden for
    fc2) and the two biases (D each), which the gains' gradients read."""
    block = layer_scale_block()
    x = torch.randn(3, 17, 32, requires_grad=True)
    tokens, dim, hidden, fp32 = 3 * 17, 32, 128, 4
    saved = saved_bytes(lambda: block(x))
    plain = saved_bytes(lambda: plain_block(block, x))
    assert plain - saved == fp32 * (tokens * (hidden + 2 * dim) - (dim * dim + dim * hidden + 2 * dim))
    with torch.no_grad():  # without gradients the block runs as written: bit for bit the plain ops
        assert torch.equal(block(x), plain_block(block, x))


@pytest.mark.parametrize("init_values", [0.5, None])  # DINOv2 (LayerScale) and DINO v1 (none)
@pytest.mark.parametrize("grad", [True, False])
def test_the_residual_stream_stays_fp32_under_autocast(init_values, grad):
    """As in the official models, where concatenating the CLS token promotes the bf16 patch embedding:
    every block reads and writes fp32 tokens under bf16 autocast, so the residual adds accumulate in
    fp32, with or without LayerScale, in training and inference."""
    m = tiny(init_values=init_values).train(grad)
    dtypes = []
    for module in [*m.blocks, m.norm]:
        module.register_forward_hook(lambda mod, args, out: dtypes.append((args[0].dtype, out.dtype)))
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        m.forward_features(torch.randn(2, 3, 28, 28))
    assert dtypes == [(torch.float32, torch.float32)] * (len(m.blocks) + 1)


# ---------------------------------------------------------------------------------------------- checkpointing
def drop_path_vit(rate: float, ffn_layer: str = "mlp", depth: int = 4) -> VisionTransformer:
    """A training ViT with stochastic depth `rate` in every block (DINOv2's uniform rates)."""
    m = tiny(img_size=16, patch_size=2, depth=depth, init_values=0.5, ffn_layer=ffn_layer)
    m.set_drop_path(rate, uniform=True)
    return m.train()


def loss_and_grads(model: VisionTransformer, x: torch.Tensor, precision: str = "fp32", seed: int = 1):
    """A scalar of the CLS and patch outputs, and the gradients of every parameter, the drop-path draws
    seeded with `seed`."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model.forward_features(x)
    loss = out["x_norm_clstoken"].float().pow(2).sum() + out["x_norm_patchtokens"].float().sin().sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# 0.05: each sample's branch dropped apart (on a CPU the kept samples picked: the branch on fewer rows);
# 0.3: the branch on a random subset of the batch (the official `drop_add_residual_stochastic_depth`)
@pytest.mark.parametrize("rate", [0.05, 0.3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16 on a CPU: the matmul attention path
@pytest.mark.parametrize("ffn_layer", ["mlp", "swiglu"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(rate, precision, ffn_layer):
    """The blocks recomputed in the backward draw the same drop-path samples as in the forward
    (checkpoint restores the RNG state): the loss and every gradient are those without it, and the
    drop path did drop (another seed gives another loss)."""
    model = drop_path_vit(rate, ffn_layer)
    x = torch.randn(8, 3, 16, 16)
    loss, grads = loss_and_grads(model, x, precision)
    model.set_activation_checkpointing(True)
    checkpointed_loss, checkpointed = loss_and_grads(model, x, precision)
    torch.testing.assert_close(checkpointed_loss, loss, rtol=1e-6, atol=0)
    assert checkpointed.keys() == grads.keys() and len(grads) == len(list(model.parameters())) - 1  # no mask token
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    assert loss_and_grads(model, x, precision, seed=2)[0] != loss


def test_activation_checkpointing_saves_only_each_blocks_input():
    """Counted by autograd's saved-tensor hooks (the bytes of the distinct storages saved): with
    checkpointing a 4-block ViT keeps what is saved outside its blocks, and the checkpoints hold each
    block's input (B, N, D): under a quarter of what it saves without. The state-dict keys and
    module names stay those of the plain model (no wrapper modules)."""
    model = drop_path_vit(0.1)
    x = torch.randn(8, 3, 16, 16)
    keys, names = list(model.state_dict()), [n for n, _ in model.named_modules()]
    plain = saved_bytes(lambda: model.forward_features(x))
    model.set_activation_checkpointing(True)
    checkpointed = saved_bytes(lambda: model.forward_features(x))
    block_inputs = len(model.blocks) * 8 * (1 + 8 * 8) * 32 * 4  # B x (CLS + 8 x 8 patches) x D, fp32
    assert checkpointed + block_inputs < plain / 4
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_modules()] == names


def test_activation_checkpointing_inside_compiled_blocks():
    """As the trainer's compile=true: each block compiled on its own (`block.compile`), which traces
    the checkpoint in its forward. aot_eager runs dynamo and AOT autograd's partitioner as inductor
    gets them (inductor needs minutes of C++ compiling; its own run is in docs/benchmarks.md): the
    loss and gradients are those of the eager, uncheckpointed blocks, with drop path."""
    model = drop_path_vit(0.3, depth=2)
    x = torch.randn(8, 3, 16, 16)
    loss, grads = loss_and_grads(model, x)
    model.set_activation_checkpointing(True)
    for block in model.blocks:
        block.compile(backend="aot_eager", dynamic=False)
    compiled_loss, compiled = loss_and_grads(model, x)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-5, atol=1e-6, msg=name)
