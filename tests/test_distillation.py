"""Distillation of a smaller student from a finished run's frozen teacher (`distill_from=`)."""

import pytest
import torch
import yaml
from pretrain_helpers import TINY, finished_run, run, run_torchrun

import dinokit
from dinokit.errors import DinokitError
from dinokit.losses import DINOHead, IBOTPatchLoss
from dinokit.models import export_model
from dinokit.models.vision_transformer import VisionTransformer, ViTConfig
from dinokit.train.checkpoint import list_checkpoints, load_checkpoint
from dinokit.train.distillation import every_patch
from dinokit.train.metrics_log import read_metrics
from dinokit.train.self_distillation import SelfDistillation, Student


def narrow_backbone(path, patch_size: int = 2) -> str:
    """A 16-wide, 1-block student (the teacher is vit_nano_p2: 32 wide, 2 blocks) as a dinokit file."""
    torch.manual_seed(3)
    config = ViTConfig(img_size=16, patch_size=patch_size, embed_dim=16, depth=1, num_heads=2, init_values=None)
    return export_model(VisionTransformer(config), path, format="dinokit")


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A finished 4-iteration DINOv2 run (DINO + iBOT + KoLeo, EMA centering) of vit_nano_p2."""
    return finished_run(tmp_path_factory.mktemp("distil"), "teacher")


def test_a_narrower_student_learns_from_the_frozen_teacher_and_its_ema_is_exported(teacher_run, tmp_path, capsys):
    data, teacher = teacher_run
    teacher_checkpoint = list_checkpoints(teacher / "checkpoints")[-1]
    before = teacher_checkpoint.read_bytes()
    init = narrow_backbone(tmp_path / "narrow.safetensors")
    out = tmp_path / "student"
    summary = run(
        data, out, max_iterations=4, distill_from=str(teacher), init=init, head_prototypes=999, drop_path_rate=0.2
    )
    printed = capsys.readouterr().out
    assert "distilling from the frozen teacher" in printed and "head_prototypes=999 -> 64" in printed
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["distill_from"] == str(teacher) and config["head_prototypes"] == 64  # the teacher's
    assert config["drop_path_rate"] == 0.0 and config["objective"] == "dinov2"
    rows = read_metrics(out / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor([r["dino_loss"], r["ibot_loss"], r["koleo_loss"]])).all() for r in rows)
    checkpoint = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert checkpoint["distill_teacher_hash"] and not any("frozen" in k for k in checkpoint["model"])
    assert checkpoint["model"]["student.dino_head.mlp.0.weight"].shape == (32, 16)  # teacher's hidden 32, width 16
    # the exported model is the student's EMA, of the student's architecture
    exported = dinokit.load_model(summary["backbone"])
    assert exported.embed_dim == 16 and len(exported.blocks) == 1
    for name, value in exported.state_dict().items():
        assert torch.equal(value, checkpoint["model"][f"teacher.backbone.{name}"]), name
    trained = checkpoint["model"]["student.backbone.blocks.0.attn.qkv.weight"]
    assert not torch.equal(trained, dinokit.load_model(init).state_dict()["blocks.0.attn.qkv.weight"])
    assert teacher_checkpoint.read_bytes() == before  # the teacher run is only read


def test_the_targets_are_the_frozen_teachers_on_every_unmasked_patch():
    """teacher_outputs(teacher=frozen) is the frozen net's head on its CLS and on all patches; the
    student sees whole crops (no mask token) and iBOT weighs each image as one."""
    torch.manual_seed(0)

    def net(width):
        config = ViTConfig(img_size=8, patch_size=2, embed_dim=width, depth=1, num_heads=2, mask_token=False)
        return Student(VisionTransformer(config), DINOHead(width, 10, 8, 4, 2))

    frozen, model = (
        net(16),
        SelfDistillation(
            net(8).backbone,
            head_prototypes=10,
            head_hidden_dim=8,
            head_bottleneck_dim=4,
            head_nlayers=2,
            masked_inputs=False,
        ),
    )
    crops = torch.randn(4, 3, 8, 8)
    masks, weights = every_patch(crops, 2)
    assert masks.shape == (4, 16) and masks.all() and torch.allclose(weights.view(4, 16).sum(1), torch.ones(4))
    targets = model.teacher_outputs(crops, masks, frozen)
    features = frozen.backbone.forward_features(crops)
    assert torch.allclose(targets["cls_logits"], frozen.dino_head(features["x_norm_clstoken"]))
    assert torch.allclose(targets["patch_logits"], frozen.dino_head(features["x_norm_patchtokens"].flatten(0, 1)))
    student = model.student(crops, None, masks, mask_inputs=False)
    whole = model.student.backbone.forward_features(crops)["x_norm_patchtokens"].flatten(0, 1)
    assert torch.allclose(student["patch_logits"], model.student.dino_head(whole), atol=1e-6)
    # iBOT with these weights: the mean over images of each image's mean cross-entropy over its patches
    q = torch.softmax(targets["patch_logits"], -1)
    loss = IBOTPatchLoss(0.1)(student["patch_logits"], q, weights, 4)
    per_patch = -(q * torch.log_softmax(student["patch_logits"] / 0.1, -1)).sum(-1)
    assert loss.item() == pytest.approx(per_patch.view(4, 16).mean(1).mean().item(), rel=1e-6)


def test_a_resumed_distillation_is_exact_and_refuses_another_teacher(teacher_run, tmp_path):
    data, teacher = teacher_run
    keys = dict(distill_from=str(teacher), epochs=2.0)  # 8 iterations over 32 images of 8
    run(data, tmp_path / "full", max_iterations=8, **keys)
    run(data, tmp_path / "split", max_iterations=4, **keys)
    run(data, tmp_path / "split", max_iterations=8, resume=True, **keys)
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "checkpoint_00000008.pt")["model"]
    split = load_checkpoint(tmp_path / "split" / "checkpoints" / "checkpoint_00000008.pt")["model"]
    assert all(torch.equal(full[k], split[k]) for k in full)
    other = tmp_path / "other_teacher"
    run(data, other, max_iterations=2)
    (tmp_path / "split" / "config.yaml").write_text(
        (tmp_path / "split" / "config.yaml").read_text().replace(str(teacher), str(other))
    )
    with pytest.raises(DinokitError, match="now holds another teacher than the one this run started with"):
        run(data, tmp_path / "split", max_iterations=10, resume=True, epochs=2.0)


def test_a_teacher_without_heads_or_with_other_patches_is_refused(teacher_run, tmp_path):
    data, teacher = teacher_run
    backbone = narrow_backbone(tmp_path / "b.safetensors")
    with pytest.raises(DinokitError, match=r"it needs the run's heads.*freeze_backbone=1\.0"):
        run(data, tmp_path / "a", max_iterations=1, distill_from=backbone)
    with pytest.raises(DinokitError, match="not found"):
        run(data, tmp_path / "b", max_iterations=1, distill_from=str(tmp_path / "missing"))
    wide_patches = narrow_backbone(tmp_path / "p4.safetensors", patch_size=4)
    with pytest.raises(DinokitError, match="the teacher's patch size is 2, the student's 4"):
        run(data, tmp_path / "c", max_iterations=1, distill_from=str(teacher), init=wide_patches)


def test_a_checkpoint_without_its_backbone_config_gives_the_same_frozen_teacher(teacher_run, tmp_path):
    """Checkpoints written before backbone_config was saved: the architecture comes from the weights."""
    from dinokit.train.checkpoint import read_run
    from dinokit.train.config import resolve_config
    from dinokit.train.distillation import frozen_teacher

    _, teacher = teacher_run
    checkpoint = load_checkpoint(list_checkpoints(teacher / "checkpoints")[-1])
    del checkpoint["backbone_config"]
    old = tmp_path / "checkpoint_00000004.pt"
    torch.save(checkpoint, old)
    cfg = resolve_config(None, {k: v for k, v in TINY.items() if k != "preset"})
    new_net, old_net = (frozen_teacher(read_run(p, "distill_from"), cfg) for p in (teacher, old))
    assert old_net.backbone.config == new_net.backbone.config
    assert all(torch.equal(v, old_net.state_dict()[k]) for k, v in new_net.state_dict().items())


def test_torchrun_distils_on_two_processes(teacher_run, tmp_path):
    """DDP: the student's wrapper takes the unmasked-patches call, each process holds the frozen teacher."""
    data, teacher = teacher_run
    out = tmp_path / "run"
    keys = {**TINY, "max_iterations": 4, "batch_size": 4, "distill_from": teacher}
    args = ["-m", "dinokit", "pretrain", f"data={data}", f"out={out}"] + [f"{k}={v}" for k, v in keys.items()]
    result = run_torchrun(args, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) x batch 4 = 8" in result.stdout and "distilling from the frozen teacher" in result.stdout
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["iteration"] == 4 and all(torch.isfinite(torch.tensor(r["ibot_loss"])) for r in rows)
    assert dinokit.load_model(out / "backbone.safetensors").embed_dim == 32
