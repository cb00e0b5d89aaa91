"""Pixel-wise knowledge distillation (Hinton KD applied per pixel), the KD term RDD runs in both stages.

Pure torch; no Lightning or Hydra. The weight ``lambda_kd`` is applied by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rdd_lightning.losses._precision import fp32_scope

__all__ = ["pixel_kd_loss"]


def pixel_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 * mean over the B*h*w pixels of KL(softmax(zt/T) || softmax(zs/T))`` on the main heads.

    Args:
        student_logits: ``[B, C, hs, ws]`` student scores ``zs`` (any floating dtype, differentiable). If
            ``(hs, ws)`` differs from the teacher's ``(h, w)`` they are resized bilinearly
            (``align_corners=True``) to the teacher's resolution.
        teacher_logits: ``[B, C, h, w]`` teacher scores ``zt``; treated as constants (detached).
        temperature: softmax temperature ``T > 0`` (default 1).

    Returns:
        0-dim float32 loss in nats (times ``T^2``), computed in float32 with autocast disabled. Every pixel
        counts (there is no ignore mask at logit resolution).
    """
    if student_logits.dim() != 4 or teacher_logits.dim() != 4:
        raise ValueError(
            f"pixel_kd_loss expects [B, C, h, w] logits; got student {tuple(student_logits.shape)}, "
            f"teacher {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[:2] != teacher_logits.shape[:2]:
        raise ValueError(
            f"student and teacher logits must agree in batch size and classes; got student "
            f"{tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    with fp32_scope(student_logits.device):
        zs = student_logits.float()
        zt = teacher_logits.detach().float()
        if zs.shape[-2:] != zt.shape[-2:]:
            zs = F.interpolate(zs, size=zt.shape[-2:], mode="bilinear", align_corners=True)
        log_ps = torch.log_softmax(zs / temperature, dim=1)
        log_pt = torch.log_softmax(zt / temperature, dim=1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)  # [B, h, w]
        return kl.mean() * (temperature * temperature)
