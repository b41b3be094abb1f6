"""The GPU path (skipped without CUDA; run by bench/cuda_checks.sh on a lent GPU machine): the same
network as on the CPU, the feature maps and segmentation of a model on the GPU, and a pretraining
run that learns, checkpoints and resumes there."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import perturb_scales_and_norms
from PIL import Image
from pretrain_helpers import TINY, tiny_images

import dinokit
from dinokit.maps.attention import attention_maps
from dinokit.maps.commands import segment, visualize_attention, visualize_pca, visualize_similarity
from dinokit.maps.pca import patch_features
from dinokit.train.checkpoint import load_checkpoint
from dinokit.train.metrics_log import read_metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_vit_on_cuda_computes_what_it_computes_on_cpu():
    torch.manual_seed(0)
    model = perturb_scales_and_norms(dinokit.create_model("dinov2_vits14_reg"), 0.1).eval()
    x = torch.randn(2, 3, 224, 168)  # non-square
    with torch.inference_mode():
        reference = model.forward_features(x)
        model.cuda()
        fp32 = model.forward_features(x.cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model.forward_features(x.cuda())
    for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
        torch.testing.assert_close(fp32[key].cpu(), reference[key], rtol=1e-4, atol=1e-4)
    cosine = F.cosine_similarity(bf16["x_norm_clstoken"].float().cpu(), reference["x_norm_clstoken"])
    assert cosine.min() > 0.999


def test_maps_and_segment_with_a_cuda_model(tmp_path):
    check_maps_on("cuda", tmp_path)


def check_maps_on(device: str, tmp_path) -> None:
    """The map functions and picture commands with the model on `device` give the CPU's arrays."""
    model = perturb_scales_and_norms(dinokit.create_model("vit_micro_p4", depth=2, num_register_tokens=2)).eval()
    weights = dinokit.export_model(model, tmp_path / "m.safetensors")
    x = torch.randn(3, 16, 24)
    on_cpu = attention_maps(model, x)
    features_cpu = patch_features(model, [x])[0]
    model.to(device)
    on_device = attention_maps(model, x.to(device))
    for key, value in on_cpu.items():
        assert np.allclose(on_device[key], value, atol=1e-4), key
    assert np.allclose(patch_features(model, [x.to(device)])[0], features_cpu, atol=1e-4)

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    mask = np.zeros((32, 48), dtype=np.uint8)
    mask[8:24, 12:36] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    photo, common = str(tmp_path / "photo.png"), {"model": str(weights), "image_size": 16, "device": device}
    visualize_attention(photo, str(tmp_path / "a.png"), **common)
    visualize_pca(photo, str(tmp_path / "p.png"), **common)
    similar = visualize_similarity(photo, 20, 10, str(tmp_path / "s.png"), **common)
    assert similar["max"] == pytest.approx(1, abs=1e-4)  # the chosen patch matches itself
    result = segment(photo, str(tmp_path / "mask.png"), photo, out=str(tmp_path / "seg"), **common)
    reference = segment(
        photo, str(tmp_path / "mask.png"), photo, out=str(tmp_path / "cpu"), **common | {"device": "cpu"}
    )
    assert result["results"][0]["foreground"] == pytest.approx(reference["results"][0]["foreground"], abs=0.02)
    for name in ("a.png", "p.png", "s.png"):
        assert Image.open(tmp_path / name).format == "PNG"


def test_pretraining_on_cuda_learns_and_resumes(tmp_path):
    data = tiny_images(tmp_path / "data")
    keys = {**TINY, "device": "cuda", "lr": 0.005, "centering": "sinkhorn_knopp", "teacher_temp_start": 0.04}
    keys.update(teacher_temp=0.04, epochs=10.0, log_every=4)

    def run(out, **more):
        return dinokit.pretrain(data=str(data), out=str(tmp_path / out), **{**keys, **more})

    summary = run("full", max_iterations=80, epochs=20.0)
    losses = [row["dino_loss"] for row in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    assert summary["iterations"] == 80 and sum(losses[-5:]) / 5 < 0.9 * losses[0], losses
    # the teacher backbone written by a GPU run loads on the CPU, equal to the checkpoint's
    backbone = dinokit.load_model(tmp_path / "full" / "backbone.safetensors", device="cpu")
    teacher = load_checkpoint(tmp_path / "full" / "checkpoints" / "checkpoint_00000080.pt")["model"]
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, teacher[f"teacher.backbone.{name}"].cpu()), name

    # 20 + 20 iterations with a restart, in fp32: the same run up to the GPU's non-deterministic
    # kernels (atomic adds), which the CPU's exact-resume tests do not have; the difference must be
    # far smaller than what the last 20 iterations changed
    run("full32", max_iterations=40, precision="fp32")
    run("split", max_iterations=20, precision="fp32")
    halfway = flat_teacher(tmp_path / "split" / "checkpoints" / "checkpoint_00000020.pt")
    run("split", max_iterations=40, precision="fp32", resume=True)
    full = flat_teacher(tmp_path / "full32" / "checkpoints" / "checkpoint_00000040.pt")
    resumed = flat_teacher(tmp_path / "split" / "checkpoints" / "checkpoint_00000040.pt")
    moved, resume_error = (full - halfway).norm().item(), (resumed - full).norm().item()
    print(f"last 20 iterations moved the teacher by {moved:.3e}; resume differs by {resume_error:.3e}")
    assert resume_error <= 0.05 * moved


def test_distillation_and_continuation_on_cuda(tmp_path):
    """A run on the GPU, then a student distilled from it and a run continued from it, both on the GPU
    (the frozen teacher, every-patch masks and the loaded state on the run's device)."""
    data = tiny_images(tmp_path / "data")
    keys = {**TINY, "device": "cuda"}
    dinokit.pretrain(data=str(data), out=str(tmp_path / "teacher"), **keys, max_iterations=4)
    for key, out in (("distill_from", "student"), ("continue_from", "continued")):
        summary = dinokit.pretrain(
            data=str(data), out=str(tmp_path / out), **keys, max_iterations=4, **{key: str(tmp_path / "teacher")}
        )
        rows = read_metrics(tmp_path / out / "metrics.jsonl")
        assert summary["iterations"] == 4 and all(np.isfinite(r["loss"]) for r in rows)


def test_finetune_on_cuda_learns_and_writes_a_head(tmp_path):
    from dinokit.data.synthetic import write_classification_set
    from dinokit.train.finetune import finetune

    write_classification_set(tmp_path, per_class=12, size=16, seed=0, split="train")
    write_classification_set(tmp_path, per_class=4, size=16, seed=1, split="val")
    result = finetune(
        model="random:vit_nano_p2",
        train=str(tmp_path / "train"),
        val=str(tmp_path / "val"),
        out=str(tmp_path / "ft"),
        image_size=16,
        epochs=3,
        batch_size=16,
        num_workers=0,
        device="cuda",
        progress=False,
    )
    assert (tmp_path / "ft" / "classifier.safetensors").exists() and result.endswith("finetune.json")


def flat_teacher(checkpoint) -> torch.Tensor:
    state = load_checkpoint(checkpoint)["model"]
    return torch.cat([v.float().flatten().cpu() for k, v in sorted(state.items()) if k.startswith("teacher.")])


def test_dedup_on_cuda_finds_what_it_finds_on_cpu():
    from dinokit.curation.dedup import deduplicate

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 64)).astype(np.float32)
    x[2000:] = x[:1000] + 0.2 * rng.normal(size=(1000, 64)).astype(np.float32)  # near-copies of the first 1000
    reference = x[:50] + 0.01
    on_cpu = deduplicate(x, 0.95, reference=reference, chunk_size=512, device="cpu")
    on_gpu = deduplicate(x, 0.95, reference=reference, chunk_size=512, device="cuda")
    assert len(on_cpu.removed) > 500
    for field in ("keep", "duplicate_of", "reference_match"):
        np.testing.assert_array_equal(getattr(on_gpu, field), getattr(on_cpu, field))
    np.testing.assert_allclose(on_gpu.nearest, on_cpu.nearest, atol=1e-5)


def test_kmeans_on_cuda_finds_what_it_finds_on_cpu():
    from dinokit.curation.kmeans import hierarchical_kmeans, kmeans, kmeans_plus_plus

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 64)) * 10
    labels = rng.integers(0, 20, 4000)
    x = (centres[labels] + rng.normal(size=(4000, 64))).astype(np.float32)
    start = kmeans_plus_plus(x, 20, np.random.default_rng(1), device="cuda")
    np.testing.assert_array_equal(start, kmeans_plus_plus(x, 20, np.random.default_rng(1), device="cpu"))
    on_gpu = kmeans(x, 20, init_centroids=start, iterations=10, device="cuda")
    on_cpu = kmeans(x, 20, init_centroids=start, iterations=10, device="cpu")
    np.testing.assert_array_equal(on_gpu[1], on_cpu[1])
    np.testing.assert_allclose(on_gpu[0], on_cpu[0], atol=1e-4)
    levels = hierarchical_kmeans(x, [40, 20], n_resamples=2, sample_size=20, device="cuda")
    assert [len(level.centroids) for level in levels] == [40, 20] and len(levels[0].assignment) == 4000


def test_released_dense_heads_with_a_cuda_model(tmp_path):
    tf32 = torch.backends.cudnn.allow_tf32  # on by default for convolutions: the DPT head's would differ by ~1e-3
    torch.backends.cudnn.allow_tf32 = False
    try:
        check_released_heads_on("cuda", tmp_path)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def check_released_heads_on(device: str, tmp_path) -> None:
    """A released-format DPT depth head and ms segmentation head with the model on `device` give the CPU's
    depths (fp32, 1e-3 m) and classes (99% of the pixels; a class can flip where two nearly tie)."""
    from test_released_depth import official_dpt, save_released
    from test_released_segmentation import official_head_file

    torch.manual_seed(0)
    net = perturb_scales_and_norms(dinokit.create_model("vit_micro_p4")).eval()
    weights = str(dinokit.export_model(net, tmp_path / "micro.safetensors"))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (11, 14, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    depth_file = save_released(tmp_path / "my_nyu_dpt_head.pth", official_dpt({"net": net, "images": tmp_path}))
    official_head_file(tmp_path / "my_ade20k_ms_head.pth", 4 * 96, 5)
    settings = dict(scales=[1.0, 1.5], image_size=16, precision="fp32")
    for image in ("a.png", "b.png"):
        depths = [
            dinokit.load_released_depth_head(str(depth_file), weights, where, precision="fp32").predict(
                tmp_path / image
            )
            for where in ("cpu", device)
        ]
        assert np.abs(depths[0] - depths[1]).max() < 1e-3
        segmenter = dinokit.load_released_segmentation_head
        masks = [
            segmenter(str(tmp_path / "my_ade20k_ms_head.pth"), weights, where).predict(tmp_path / image, **settings)
            for where in ("cpu", device)
        ]
        assert masks[0].shape == masks[1].shape == Image.open(tmp_path / image).size[::-1]
        assert (masks[0] == masks[1]).mean() >= 0.99
