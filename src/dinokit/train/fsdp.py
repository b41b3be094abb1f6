"""FSDP2 for self-distillation (`fsdp=true` under torchrun): shard the student and the EMA teacher,
free the teacher's gathered parameters after its forward, reach the local shards for the EMA update."""

import warnings

import torch

from dinokit import distributed as dist
from dinokit.train.self_distillation import SelfDistillation


def shard_fsdp(model: SelfDistillation) -> None:
    """FSDP2: shard every block, the backbone (forward_features is its entry point), each head, and
    the student as root."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # outputs such as x_norm_clstoken are views; nothing modifies them in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = dist.device_mesh(next(model.parameters()).device)  # released when the process group is left
    for net in (model.student, model.teacher):
        for block in net.backbone.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(net.backbone, mesh=mesh)
        register_fsdp_forward_method(net.backbone, "forward_features")
        for head in net.heads().values():
            fully_shard(head, mesh=mesh)
    fully_shard(model.student, mesh=mesh)


def reshard_teacher(model: SelfDistillation) -> None:
    """Free the teacher's gathered parameters after its forward. Its backbone and heads are FSDP2
    roots with no backward, and a root keeps its unsharded parameters after forward: without this the
    next forward would reuse them, stale, while the EMA update writes to the shards."""
    for module in (model.teacher.backbone, *model.teacher.heads().values()):
        module.reshard()


def local_tensors(params) -> list[torch.Tensor]:
    """Local shards of (possibly FSDP2 / DTensor) parameters."""
    return [p.to_local() if hasattr(p, "to_local") else p for p in params]
