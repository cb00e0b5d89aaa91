"""Attention transfer (AT; Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

The spatial attention map of a feature ``f [B, C, h, w]`` is the channel mean of ``|f|^p`` (``p = 2``),
flattened and L2-normalised per image; the student's map is pulled towards the teacher's:

    a(f)_b = vec( mean_c |f_{b,c}|^p ),   q(f)_b = a(f)_b / ||a(f)_b||_2
    L_at = mean over the B*h*w entries of ( q(s) - q(t) )^2

The paper writes the ``p``-norm of the difference; the authors' public code (and the segmentation KD
codebases, e.g. CIRKD's ``CriterionAT``) use the mean squared difference above, which is what this module
computes. Channel counts of student and teacher need not match (the map is a channel mean), so AT needs no
connector.

Default recipe of this research line: ``KD 1 + AT 1e4`` on the feature map before the classifier (CIRKD's
``train_kd.py``); the RDD paper's integration table reports AT 76.21 -> AT+RDD 77.11.

Deliberate differences from the published code: a student map at another resolution is resized bilinearly
(``align_corners=True``) to the teacher's *after* the channel mean (the attention map, not the feature, is
resized; the published code assumes equal sizes). The objective distils the decoder output before the
classifier, as the published recipe (``SegOutput.decoder_features``; ``distillation.feature=encoder``: the
encoder's last stage).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from rdd_lightning.losses._precision import fp32_scope
from rdd_lightning.losses._shapes import check_map, check_pair, resize

__all__ = ["attention_map", "attention_transfer_loss"]


def attention_map(feature: Tensor, *, p: float = 2.0) -> Tensor:
    """Un-normalised spatial attention ``mean_c |f_c|^p`` of a feature map.

    Args:
        feature: ``[B, C, h, w]`` feature map, any floating dtype.
        p: exponent (2 in the paper's experiments and the public code).

    Returns:
        ``[B, 1, h, w]`` float32 map (differentiable), computed with autocast off.
    """
    check_map("feature", feature)
    with fp32_scope(feature.device):
        return feature.float().abs().pow(p).mean(dim=1, keepdim=True)


def attention_transfer_loss(student_feature: Tensor, teacher_feature: Tensor, *, p: float = 2.0) -> Tensor:
    """AT loss: mean squared difference of the L2-normalised attention maps.

    Args:
        student_feature: ``[B, Cs, hs, ws]`` student feature (differentiable). Its attention map is resized
            bilinearly (``align_corners=True``) to the teacher's ``(h, w)`` if the sizes differ.
        teacher_feature: ``[B, Ct, h, w]`` teacher feature (detached); ``Ct`` may differ from ``Cs``.
        p: attention exponent (2).

    Returns:
        0-dim float32 loss (unitless; the maps have unit L2 norm), averaged over the ``B*h*w`` map entries.
        Zero when the two attention maps are proportional.
    """
    check_pair(student_feature, teacher_feature, same_channels=False, what="features")
    with fp32_scope(student_feature.device):
        a_s = resize(attention_map(student_feature, p=p), teacher_feature.shape[-2:]).flatten(1)
        a_t = attention_map(teacher_feature.detach(), p=p).flatten(1)
        diff = F.normalize(a_s, dim=1) - F.normalize(a_t, dim=1)
        return diff.pow(2).mean()
