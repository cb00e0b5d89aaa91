"""Shape checks and resizing shared by the distillation losses (private helpers)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def check_map(name: str, x: Tensor) -> None:
    """Raise ``ValueError`` unless ``x`` is a floating ``[B, C, h, w]`` tensor."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor [B, C, h, w]; got {x.dtype} {tuple(x.shape)}")


def check_pair(student: Tensor, teacher: Tensor, *, same_channels: bool, what: str = "maps") -> None:
    """Check a student/teacher pair of ``[B, C, h, w]`` maps: same batch size and, if asked, same channels."""
    check_map(f"student {what}", student)
    check_map(f"teacher {what}", teacher)
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher {what} must have the same batch size; got student "
            f"{tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    if same_channels and student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"student and teacher {what} must have the same number of channels; got student "
            f"{tuple(student.shape)}, teacher {tuple(teacher.shape)}. Map the student's channels to the "
            f"teacher's with rdd_lightning.losses.FeatureConnector first."
        )


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize (``align_corners=True``) of ``[B, C, h, w]`` to ``size``; ``x`` itself if equal."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def labels_at(target: Tensor, size: Sequence[int]) -> Tensor:
    """Labels ``[B, H, W]`` brought to ``size`` by nearest-neighbour sampling, as ``int64 [B, h, w]``.

    The same sampling as ``F.interpolate(mode="nearest")`` on the label map, which is what the public
    segmentation-KD code uses to put labels at feature resolution.
    """
    if target.dim() != 3 or target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"target must be integer labels [B, H, W]; got {target.dtype} {tuple(target.shape)}")
    size = (int(size[0]), int(size[1]))
    if tuple(target.shape[-2:]) == size:
        return target.long()
    return F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0].long()
