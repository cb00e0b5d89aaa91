"""The plain supervised task loss: cross-entropy of the main head plus a weighted auxiliary head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rdd_lightning.losses._precision import fp32_scope


def segmentation_ce_loss(
    logits: Tensor,
    aux_logits: Tensor | None,
    target: Tensor,
    *,
    aux_weight: float = 0.4,
    ignore_index: int = 255,
    class_weight: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """``CE(up(logits), y) + aux_weight * CE(up(aux_logits), y)``, each averaged over valid pixels.

    Args:
        logits: ``[B, C, h, w]`` main-head logits at any resolution.
        aux_logits: ``[B, C, h', w']`` auxiliary logits or ``None`` (no aux term).
        target: ``int64 [B, H, W]`` labels, ``ignore_index`` for void.
        class_weight: optional ``C`` per-class weights (PyTorch's weighted mean).

    Returns:
        0-dim float32 loss in nats. Computed in float32 with autocast off; bilinear upsampling with
        ``align_corners=True`` to the label size, as the RDD losses do. An all-void batch gives 0, not NaN.
    """
    size = target.shape[-2:]
    weight = (
        None
        if class_weight is None
        else torch.as_tensor(class_weight, dtype=torch.float32, device=logits.device)
    )
    with fp32_scope(logits.device):
        loss = logits.new_zeros((), dtype=torch.float32)
        for head, scale in ((logits, 1.0), (aux_logits, aux_weight)):
            if head is None or scale == 0:
                continue
            up = F.interpolate(head.float(), size=size, mode="bilinear", align_corners=True)
            ce = F.cross_entropy(up, target, weight=weight, ignore_index=ignore_index, reduction="sum")
            if weight is None:
                denom = (target != ignore_index).sum()
            else:
                valid = target != ignore_index
                denom = weight[target[valid]].sum()
            loss = loss + scale * ce / denom.clamp_min(1)
    return loss
