"""Student, EMA teacher and the losses of the `dino` and `dinov2` objectives.

    dino   (DINO v1):  L = L_dino
    dinov2 (DINOv2):   L = w_dino L_dino + w_ibot L_ibot + w_koleo sum_{global crops} KoLeo(student CLS)

L_dino averages the (student view, teacher view) pair matrix (`DINOLoss`); the teacher sees the
global crops unmasked, the student sees the global crops (masked, for iBOT) and the local crops.
Global and local crops go through the backbone as two plain batched forwards (no xFormers); the
CLS tokens of both and the masked patch tokens then go through the head in one call.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from dinokit.distributed import all_reduce_sum
from dinokit.losses import DINOHead, DINOLoss, EMACenter, IBOTPatchLoss, KoLeoLoss, sinkhorn_knopp
from dinokit.models.vision_transformer import VisionTransformer

OBJECTIVES = ("dino", "dinov2")
CENTERINGS = ("ema", "sinkhorn_knopp")


class Student(nn.Module):
    """Backbone + DINO head (+ a separate iBOT head, or None to share the DINO head).

    forward(global_crops (n_g B, 3, G, G), local_crops (n_l B, 3, L, L) or None, masks (n_g B, N) or
    None, mask_inputs) -> {"cls": backbone CLS of the global crops (n_g B, D), "cls_logits":
    ((n_g + n_l) B, K) crop-major, "patch_logits": (M, K') at the masked patches (absent without
    masks)}. mask_inputs=False keeps the patches whole (the mask token is not applied) and only picks
    the patches the head sees: distillation's iBOT on every patch.
    """

    def __init__(self, backbone: VisionTransformer, dino_head: DINOHead, ibot_head: DINOHead | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head

    def heads(self) -> dict[str, nn.Module]:
        heads = {"dino_head": self.dino_head}
        if self.ibot_head is not None:
            heads["ibot_head"] = self.ibot_head
        return heads

    def forward(
        self,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        mask_inputs: bool = True,
    ) -> dict[str, torch.Tensor]:
        crops = [global_crops] + ([local_crops] if local_crops is not None and len(local_crops) else [])
        input_masks = masks if mask_inputs else None
        features = self.backbone.forward_features(crops, masks=[input_masks] + [None] * (len(crops) - 1))
        cls = [f["x_norm_clstoken"] for f in features]
        out = {"cls": cls[0]}
        patches = features[0]["x_norm_patchtokens"][masks] if masks is not None else None
        if patches is not None and self.ibot_head is None:  # one head call for CLS and patch tokens
            logits = self.dino_head(torch.cat([*cls, patches]))
            n_cls = sum(len(c) for c in cls)
            # split, not two slices: its backward is one concatenation, where each slice's fills a
            # zero tensor of the whole (rows, prototypes) logits and the two are added (25 ms less
            # per step at the ViT-S/14 recipe's 685 x 65536 logits on a 2-core CPU)
            out["cls_logits"], out["patch_logits"] = logits.split([n_cls, len(patches)])
        else:
            out["cls_logits"] = self.dino_head(torch.cat(cls))
            if patches is not None:
                out["patch_logits"] = self.ibot_head(patches)
        return out


class SelfDistillation(nn.Module):
    """The student, its EMA teacher, centering state and losses of one objective."""

    def __init__(
        self,
        backbone: VisionTransformer,
        objective: str = "dinov2",
        head_prototypes: int = 65536,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        head_nlayers: int = 3,
        head_norm_last_layer: bool = False,
        ibot_separate_head: bool = False,
        ibot_prototypes: int = 65536,
        ibot_hidden_dim: int = 2048,
        ibot_bottleneck_dim: int = 256,
        centering: str = "ema",
        center_momentum: float = 0.9,
        student_temp: float = 0.1,
        dino_loss_weight: float = 1.0,
        ibot_loss_weight: float = 1.0,
        koleo_loss_weight: float = 0.1,
        masked_inputs: bool = True,
    ) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        self.objective = objective
        self.use_ibot = objective == "dinov2" and ibot_loss_weight > 0
        self.use_koleo = objective == "dinov2" and koleo_loss_weight > 0
        self.centering = centering
        self.weights = {"dino": dino_loss_weight, "ibot": ibot_loss_weight, "koleo": koleo_loss_weight}
        if self.use_ibot and masked_inputs and backbone.mask_token is None:
            raise ValueError("iBOT needs a backbone with a mask token (mask_token=True)")
        if not (self.use_ibot and masked_inputs) and backbone.mask_token is not None:
            backbone.mask_token.requires_grad_(False)  # unused: keep it out of the optimiser and DDP

        dim = backbone.embed_dim
        dino_head = DINOHead(
            dim, head_prototypes, head_hidden_dim, head_bottleneck_dim, head_nlayers, head_norm_last_layer
        )
        ibot_head = None
        if self.use_ibot and ibot_separate_head:
            ibot_head = DINOHead(
                dim, ibot_prototypes, ibot_hidden_dim, ibot_bottleneck_dim, head_nlayers, head_norm_last_layer
            )
        self.student = Student(backbone, dino_head, ibot_head)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()

        self.dino_center = EMACenter(head_prototypes, center_momentum)
        ibot_dim = ibot_prototypes if ibot_head is not None else head_prototypes
        self.ibot_center = EMACenter(ibot_dim, center_momentum) if self.use_ibot else None
        self.dino_loss = DINOLoss(student_temp)
        self.ibot_loss = IBOTPatchLoss(student_temp)
        self.koleo_loss = KoLeoLoss()

    def train(self, mode: bool = True) -> "SelfDistillation":
        super().train(mode)
        self.teacher.eval()  # the teacher never drops paths
        return self

    # ------------------------------------------------------------------------------------ teacher
    @torch.no_grad()
    def teacher_outputs(
        self, global_crops: torch.Tensor, masks: torch.Tensor | None, teacher: Student | None = None
    ) -> dict[str, torch.Tensor]:
        """Teacher logits of the global crops' CLS (n_g B, K) and of the masked patches (M, K'), from
        the EMA teacher or from `teacher` (a frozen one: distillation)."""
        teacher = teacher or self.teacher
        features = teacher.backbone.forward_features(global_crops)
        cls = features["x_norm_clstoken"]
        out = {"cls": cls}
        if self.use_ibot and masks is not None:
            patches = features["x_norm_patchtokens"][masks]
            if teacher.ibot_head is None:
                logits = teacher.dino_head(torch.cat([cls, patches]))
                out["cls_logits"], out["patch_logits"] = logits[: len(cls)], logits[len(cls) :]
            else:
                out["cls_logits"] = teacher.dino_head(cls)
                out["patch_logits"] = teacher.ibot_head(patches)
        else:
            out["cls_logits"] = teacher.dino_head(cls)
        return out

    @torch.no_grad()
    def teacher_probabilities(self, teacher: dict[str, torch.Tensor], temperature: float) -> dict[str, torch.Tensor]:
        """Centered teacher targets (float32): EMA centering or Sinkhorn-Knopp."""
        probs = {}
        for key, center in (("cls_logits", self.dino_center), ("patch_logits", self.ibot_center)):
            if key not in teacher:
                continue
            if self.centering == "sinkhorn_knopp":
                probs[key] = sinkhorn_knopp(teacher[key], temperature)
            else:
                probs[key] = center.probabilities(teacher[key], temperature)
        return probs

    @torch.no_grad()
    def center_statistics(self, teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What `update_centers` needs of this step's teacher logits: under EMA centering their row sums
        and counts (`EMACenter.row_sums`), under Sinkhorn-Knopp nothing. A step takes them before its
        backward and lets the logits (M x K, 80 MB in a DINOv2 ViT-S/14 step) go."""
        if self.centering != "ema":
            return {}
        return {key: EMACenter.row_sums(teacher[key]) for key in ("cls_logits", "patch_logits") if key in teacher}

    @torch.no_grad()
    def update_centers(self, statistics: dict[str, torch.Tensor]) -> None:
        """EMA center update with this step's `center_statistics` (after the step was accepted)."""
        if self.centering != "ema":
            return
        self.dino_center.update_from_row_sums(statistics["cls_logits"])
        if "patch_logits" in statistics:
            self.ibot_center.update_from_row_sums(statistics["patch_logits"])

    # ------------------------------------------------------------------------------------ losses
    def losses(
        self,
        student: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        num_global: int,
        mask_weights: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """{"dino", "ibot", "koleo" (unweighted parts that are on), "loss" (weighted total)}."""
        batch = targets["cls_logits"].shape[0] // num_global
        k = student["cls_logits"].shape[-1]
        parts = {
            "dino": self.dino_loss(
                student["cls_logits"].view(-1, batch, k), targets["cls_logits"].view(num_global, batch, k)
            )
        }
        total = self.weights["dino"] * parts["dino"]
        if self.use_ibot and "patch_logits" in student:
            parts["ibot"] = self.ibot_loss(
                student["patch_logits"], targets["patch_logits"], mask_weights, num_global * batch
            )
            total = total + self.weights["ibot"] * parts["ibot"]
        if self.use_koleo:
            parts["koleo"] = sum(self.koleo_loss(c) for c in student["cls"].chunk(num_global))
            total = total + self.weights["koleo"] * parts["koleo"]
        parts["loss"] = total
        return parts


@torch.no_grad()
def collapse_figures(teacher_probs: torch.Tensor, teacher_cls: torch.Tensor) -> dict[str, float]:
    """Health figures of one batch (reduced over processes):

    teacher_entropy: mean over samples of H(p_b) / log K, in [0, 1]: 0 = every sample one-hot;
    teacher_kl_uniform: KL(mean_b p_b || uniform) / log K, in [0, 1]: 1 = every sample on the same
        prototype (collapse); near 0 = prototypes used evenly;
    cls_spread: sqrt(mean_b ||z_b - mean z||^2) for the L2-normalised teacher CLS z_b, in [0, 1]:
        0 = all images give the same feature (collapse), ~1 = spread over the sphere.
    """
    p = teacher_probs.float()
    k = p.shape[-1]
    z = F.normalize(teacher_cls.float(), dim=-1)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)
    stats = all_reduce_sum(
        torch.cat([entropy.sum().reshape(1), p.sum(dim=0), z.sum(dim=0), p.new_tensor([len(p), len(z)])])
    )
    n_p, n_z = stats[-2], stats[-1]
    mean_p = stats[1 : 1 + k] / n_p
    mean_z = stats[1 + k : -2] / n_z
    deviation = all_reduce_sum((z - mean_z).pow(2).sum().reshape(1))
    log_k = torch.log(torch.tensor(float(k)))
    kl = (mean_p * (torch.log(mean_p.clamp_min(1e-30)) + log_k)).sum()
    return {
        "teacher_entropy": float(stats[0] / n_p / log_k),
        "teacher_kl_uniform": float(kl / log_k),
        "cls_spread": float(torch.sqrt(deviation / n_z)),
    }
