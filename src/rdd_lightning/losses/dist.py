"""DIST (Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

DIST replaces KL matching of probabilities by matching their *relations* with a Pearson correlation, which
tolerates the larger gap to a strong teacher. For segmentation every pixel is an instance: the logits
``[B, C, h, w]`` become ``N = B*h*w`` rows of ``C`` class scores, ``P = softmax(z / T)`` row-wise, and

    rho(u, v)  = <u - mean(u), v - mean(v)> / (||u - mean(u)|| * ||v - mean(v)|| + 1e-8)
    L_inter    = 1 - mean over the N pixels n of rho(P_s[n, :], P_t[n, :])     (inter-class relation)
    L_intra    = 1 - mean over the C classes c of rho(P_s[:, c], P_t[:, c])    (intra-class relation)
    L_dist     = T^2 * (beta * L_inter + gamma * L_intra)

Default recipe: ``beta = gamma = 1``, ``T = 1`` — the authors' segmentation code (``hunto/DIST_KD``,
``segmentation/``) uses the softmax without temperature, ``DIST()`` with ``beta = gamma = 1``, in place of the
pixel KD term with weight 1 on the main logits plus ``0.4 x`` the same loss on the auxiliary logits. With
``T = 1`` the ``T^2`` factor of the classification formulation is 1, so both formulations agree.

Deliberate differences from the published code: a student map at another resolution is resized bilinearly
(``align_corners=True``) to the teacher's first (the published code assumes equal sizes); the aux-head term
(``0.4 x``) is the objective's to add, by calling :func:`dist_loss` on the aux logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rdd_lightning.losses._precision import fp32_scope
from rdd_lightning.losses._shapes import check_pair, resize

__all__ = ["dist_loss", "inter_class_relation", "intra_class_relation", "pearson_correlation"]

_EPS = 1e-8


def pearson_correlation(x: Tensor, y: Tensor, *, dim: int = -1) -> Tensor:
    """Pearson correlation of ``x`` and ``y`` along ``dim`` (``1e-8`` added to the norm product).

    Args:
        x, y: tensors of the same shape.
        dim: the dimension correlated over.

    Returns:
        correlations in ``[-1, 1]`` with ``dim`` removed, in the inputs' dtype.
    """
    xc = x - x.mean(dim=dim, keepdim=True)
    yc = y - y.mean(dim=dim, keepdim=True)
    return (xc * yc).sum(dim=dim) / (xc.norm(dim=dim) * yc.norm(dim=dim) + _EPS)


def inter_class_relation(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """``1 - mean_n rho(P_s[n, :], P_t[n, :])`` over the rows of ``[N, C]`` probabilities (0-dim)."""
    return 1.0 - pearson_correlation(student_probs, teacher_probs, dim=1).mean()


def intra_class_relation(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """``1 - mean_c rho(P_s[:, c], P_t[:, c])`` over the columns of ``[N, C]`` probabilities (0-dim)."""
    return 1.0 - pearson_correlation(student_probs, teacher_probs, dim=0).mean()


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
) -> Tensor:
    """DIST loss ``T^2 * (beta * L_inter + gamma * L_intra)`` of per-pixel class probabilities.

    Args:
        student_logits: ``[B, C, hs, ws]`` student scores (differentiable); resized bilinearly
            (``align_corners=True``) to the teacher's ``(h, w)`` if they differ.
        teacher_logits: ``[B, C, h, w]`` teacher scores (detached).
        beta: weight of the inter-class (per-pixel) relation term (1).
        gamma: weight of the intra-class (per-class, across all ``B*h*w`` pixels) relation term (1).
        temperature: softmax temperature ``T > 0`` (1 in the published segmentation code).

    Returns:
        0-dim float32 loss (unitless, in ``[0, 2 * T^2 * (beta + gamma)]``), float32 with autocast off. Zero
        when student and teacher probabilities are equal up to per-row / per-column affine maps.
    """
    check_pair(student_logits, teacher_logits, same_channels=True, what="logits")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    num_classes = teacher_logits.shape[1]
    with fp32_scope(student_logits.device):
        zs = resize(student_logits.float(), teacher_logits.shape[-2:])
        zt = teacher_logits.detach().float()
        ps = torch.softmax(zs.movedim(1, -1).reshape(-1, num_classes) / temperature, dim=1)  # [N, C]
        pt = torch.softmax(zt.movedim(1, -1).reshape(-1, num_classes) / temperature, dim=1)
        loss = beta * inter_class_relation(ps, pt) + gamma * intra_class_relation(ps, pt)
        return loss * (temperature * temperature)
