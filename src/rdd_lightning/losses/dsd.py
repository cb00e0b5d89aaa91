"""Double similarity distillation (DSD; Feng, Sun, Diao, Li, Gao, "Double Similarity Distillation for Semantic
Image Segmentation", IEEE TIP 30, 2021).

Two similarity terms, no learnable parameters:

* **Pixel-wise similarity (PSD)** from *residual attention maps* across several layers. Each layer's map is
  turned into an L2-normalised spatial attention vector (the AT map: channel mean of ``f^2``, flattened); for
  every pair of layers ``m > n`` the residual ``r_{mn} = normalise(a_m - a_n)`` describes how the spatial
  focus changes between them, and the student's residuals are matched to the teacher's:

      L_psd = mean over the P layer pairs of  mean over B*h*w of (r^s_{mn} - r^t_{mn})^2

* **Category-wise similarity (CSD)** from the logits: after a ``2x2`` average pooling, each class map is made
  a distribution over positions with a spatial softmax at temperature ``tau = 4``; the ``C x C``
  class-correlation matrix ``G = P P^T`` is matched with a squared error:

      L_csd = mean over B*C*C of (G^s - G^t)^2

Default recipe of this research line (the CIRKD code's DSD, ``--lambda-psd 1000 --lambda-csd 10``, no pixel
KD): ``DSD = pixel 1000 + category 10``. The layers of the PSD in that code are ``[aux logits, feature before
the classifier, main logits]`` of each network (all at 1/8 resolution); CSD uses the main logits. The RDD
paper's integration table reports DSD 74.42 -> DSD+RDD 75.72.

Deliberate differences from the published code: all attention maps are resized bilinearly
(``align_corners=True``) to the teacher's first layer's resolution before normalisation, so layers (and
networks) of different resolutions can be combined (the published code needs equal sizes); the student's
logits are likewise resized to the teacher's before CSD. The objective forms the PSD list as the published
code, ``[aux logits, decoder feature, logits]`` (without the aux logits when a network has no aux head).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rdd_lightning.losses._precision import fp32_scope
from rdd_lightning.losses._shapes import check_map, check_pair, resize

__all__ = ["category_similarity", "category_similarity_loss", "pixel_similarity_loss", "residual_attention"]


def residual_attention(features: Sequence[Tensor], size: Sequence[int]) -> list[Tensor]:
    """Normalised residual attention vectors of every layer pair ``(n, m)``, ``n < m``, in that order.

    Args:
        features: ``L >= 2`` maps ``[B, C_l, h_l, w_l]`` (any channels); their attention maps
            ``mean_c f^2`` are resized bilinearly (``align_corners=True``) to ``size``.
        size: common ``(h, w)``.

    Returns:
        ``L * (L - 1) / 2`` float32 tensors ``[B, h*w]`` with unit L2 norm per image (0 where two layers'
        attention vectors coincide), differentiable.
    """
    if len(features) < 2:
        raise ValueError(f"pixel similarity needs at least 2 layers; got {len(features)}")
    for index, feature in enumerate(features):
        check_map(f"features[{index}]", feature)
    with fp32_scope(features[0].device):
        attention = []
        for feature in features:
            a = resize(feature.float().pow(2).mean(dim=1, keepdim=True), size).flatten(1)
            attention.append(F.normalize(a, dim=1))
        return [
            F.normalize(attention[m] - attention[n], dim=1)
            for n in range(len(attention) - 1)
            for m in range(n + 1, len(attention))
        ]


def pixel_similarity_loss(student_features: Sequence[Tensor], teacher_features: Sequence[Tensor]) -> Tensor:
    """PSD: mean over layer pairs of the mean squared difference of the residual attention vectors.

    Args:
        student_features: ``L >= 2`` student maps ``[B, C_l, h_l, w_l]`` (differentiable), e.g.
            ``[aux logits, feature, logits]``.
        teacher_features: the teacher's ``L`` maps in the same order (detached); channels may differ from the
            student's. The common resolution is the teacher's first map's.

    Returns:
        0-dim float32 loss (unitless), float32 with autocast off. Zero when every student map equals the
        teacher's.
    """
    if len(student_features) != len(teacher_features):
        raise ValueError(
            f"student and teacher need the same number of layers; got {len(student_features)} and "
            f"{len(teacher_features)}"
        )
    for s, t in zip(student_features, teacher_features, strict=True):
        check_pair(s, t, same_channels=False, what="features")
    size = teacher_features[0].shape[-2:]
    with fp32_scope(teacher_features[0].device):
        r_s = residual_attention(list(student_features), size)
        r_t = residual_attention([t.detach() for t in teacher_features], size)
        pairs = [(s - t).pow(2).mean() for s, t in zip(r_s, r_t, strict=True)]
        return torch.stack(pairs).mean()


def category_similarity(logits: Tensor, *, temperature: float = 4.0, pool_size: int = 2) -> Tensor:
    """Class-correlation matrix ``G = P P^T`` of spatially-softmaxed, average-pooled logits.

    Args:
        logits: ``[B, C, h, w]`` scores, any floating dtype.
        temperature: spatial-softmax temperature ``tau > 0`` (4).
        pool_size: side of the average-pool window (stride = size, ``ceil_mode=True``; 1 = no pooling).

    Returns:
        ``[B, C, C]`` float32 matrix with entries in ``[0, 1]`` (differentiable; autocast off).
    """
    check_map("logits", logits)
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if int(pool_size) < 1:
        raise ValueError(f"pool_size={pool_size!r} must be an integer >= 1")
    with fp32_scope(logits.device):
        z = logits.float()
        if pool_size > 1:
            z = F.avg_pool2d(z, kernel_size=pool_size, stride=pool_size, ceil_mode=True)
        p = torch.softmax(z.flatten(2) / temperature, dim=-1)  # [B, C, N]
        return p @ p.transpose(1, 2)


def category_similarity_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 4.0, pool_size: int = 2
) -> Tensor:
    """CSD: mean squared difference of the student's and the teacher's class-correlation matrices.

    Args:
        student_logits: ``[B, C, hs, ws]`` student scores (differentiable); resized bilinearly
            (``align_corners=True``) to the teacher's ``(h, w)`` if they differ.
        teacher_logits: ``[B, C, h, w]`` teacher scores (detached).
        temperature, pool_size: see :func:`category_similarity` (4 and 2, as published).

    Returns:
        0-dim float32 loss (unitless), averaged over the ``B*C*C`` entries. Zero when the logits are equal.
    """
    check_pair(student_logits, teacher_logits, same_channels=True, what="logits")
    with fp32_scope(student_logits.device):
        zs = resize(student_logits.float(), teacher_logits.shape[-2:])
        g_s = category_similarity(zs, temperature=temperature, pool_size=pool_size)
        g_t = category_similarity(teacher_logits.detach(), temperature=temperature, pool_size=pool_size)
        return (g_s - g_t).pow(2).mean()
