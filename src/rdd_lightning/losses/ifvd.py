"""Intra-class feature variation distillation (IFVD; Wang, Zhou, Fu, He, Yang, Zhang, "Intra-class Feature
Variation Distillation for Semantic Segmentation", ECCV 2020).

For each image, each class ``k`` present in the labels (brought to the feature resolution by nearest sampling)
gets a prototype, the mean feature of its pixels; each pixel's *intra-class feature variation* is the cosine
similarity between its feature and its class prototype. The student's variation map is matched to the
teacher's with a mean squared error:

    proto_{b,k} = sum_{i: y_i = k} f_{b,i} / (#{i: y_i = k} + 1e-6)
    m_{b,i}     = cos(f_{b,i}, proto_{b, y_i})     (m = 1 where y_i is void, i.e. not in [0, K))
    L_ifv       = mean over the B*h*w pixels of (m^s - m^t)^2

Prototypes are per image (not per batch), as in the authors' and the CIRKD code. The maps are channel-free,
so student and teacher channels may differ.

Default recipe of this research line (CIRKD's ``train_kd.py``): ``IFVD = KD 1 + adversarial 0.001 + IFV 20``
on the feature map before the classifier; the adversarial term is
:func:`rdd_lightning.losses.skd.generator_loss`.

Deliberate differences from the published code: each network's variation map is computed at its own feature
resolution (labels sampled to each), and the student's map is then resized bilinearly (``align_corners=True``)
to the teacher's if the two differ (the published code assumes equal sizes); prototypes are formed with one
batched one-hot product instead of a loop over the classes (same values). The objective distils the decoder
output before the classifier, as the published recipe (``SegOutput.decoder_features``;
``distillation.feature=encoder``: the encoder's last stage).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rdd_lightning.losses._precision import fp32_scope
from rdd_lightning.losses._shapes import check_map, check_pair, labels_at, resize

__all__ = ["class_prototype_similarity", "ifv_loss"]

_PROTOTYPE_EPS = 1e-6


def class_prototype_similarity(feature: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Cosine similarity of every pixel's feature to its class prototype in the same image.

    Args:
        feature: ``[B, C, h, w]`` feature map, any floating dtype (differentiable; the prototypes are too).
        labels: ``int [B, h, w]`` labels at the feature resolution; values outside ``[0, num_classes)`` (void)
            use the pixel's own feature as its "prototype" (similarity 1, or 0 for an all-zero feature).
        num_classes: ``K``.

    Returns:
        ``[B, h, w]`` float32 similarities in ``[-1, 1]`` (autocast off).
    """
    check_map("feature", feature)
    if labels.shape != (feature.shape[0], *feature.shape[-2:]):
        raise ValueError(f"labels {tuple(labels.shape)} must be [B, h, w] of feature {tuple(feature.shape)}")
    with fp32_scope(feature.device):
        f = feature.float().flatten(2)  # [B, C, N]
        y = labels.flatten(1).long()  # [B, N]
        is_class = (y >= 0) & (y < num_classes)
        safe = torch.where(is_class, y, 0)
        one_hot = F.one_hot(safe, num_classes).to(f.dtype) * is_class[..., None]  # [B, N, K]
        sums = f @ one_hot  # [B, C, K]
        prototypes = sums / (one_hot.sum(dim=1)[:, None, :] + _PROTOTYPE_EPS)
        per_pixel = torch.gather(prototypes, 2, safe[:, None, :].expand(-1, f.shape[1], -1))  # [B, C, N]
        per_pixel = torch.where(is_class[:, None, :], per_pixel, f)
        return F.cosine_similarity(f, per_pixel, dim=1).view(labels.shape)


def ifv_loss(
    student_feature: Tensor,
    teacher_feature: Tensor,
    target: Tensor,
    num_classes: int,
) -> Tensor:
    """IFV loss: mean squared difference of the student's and the teacher's prototype-similarity maps.

    Args:
        student_feature: ``[B, Cs, hs, ws]`` student feature (differentiable).
        teacher_feature: ``[B, Ct, h, w]`` teacher feature (detached); ``Ct`` may differ from ``Cs``.
        target: ``int [B, H, W]`` labels at any resolution, void = any value outside ``[0, num_classes)``
            (255); sampled (nearest) to each feature's resolution.
        num_classes: ``K``.

    Returns:
        0-dim float32 loss (unitless), averaged over the teacher's ``B*h*w`` pixels (void pixels count with a
        zero difference, as published). Zero when the student equals the teacher.
    """
    check_pair(student_feature, teacher_feature, same_channels=False, what="features")
    size_t = teacher_feature.shape[-2:]
    with fp32_scope(student_feature.device):
        m_t = class_prototype_similarity(teacher_feature.detach(), labels_at(target, size_t), num_classes)
        m_s = class_prototype_similarity(
            student_feature, labels_at(target, student_feature.shape[-2:]), num_classes
        )
        m_s = resize(m_s[:, None], size_t)[:, 0]
        return (m_s - m_t).pow(2).mean()
