"""Channel-wise distillation (CWD; Shu, Liu, Gao, Yan, Shen, "Channel-wise Knowledge Distillation for Dense
Prediction", ICCV 2021).

Each channel of a ``[B, C, h, w]`` map is turned into a distribution over its ``h*w`` positions with a spatial
softmax at temperature ``T``; the student matches the teacher channel by channel with a KL divergence:

    phi(x)_{b,c,i} = exp(x_{b,c,i} / T) / sum_j exp(x_{b,c,j} / T)
    L_cwd = T^2 / (B * C) * sum_{b,c} sum_i phi(t)_{b,c,i} * (log phi(t)_{b,c,i} - log phi(s)_{b,c,i})

i.e. the KL summed over positions, averaged over the ``B*C`` channel maps, times ``T^2`` — the paper's
normalisation and that of its public code (mmrazor's ``ChannelWiseDivergence`` and the CIRKD code's
``CriterionCWD(norm_type='channel', divergence='kl')``). It works on logits (``C`` = classes) and on feature
maps; for features whose channel counts differ the student goes through a
:class:`~rdd_lightning.losses.FeatureConnector` first.

Default recipe of this research line (CIRKD's ``train_kd.py``, whose CWD numbers the RDD paper quotes):
``KD 1 + adversarial 0.001 + CWD features 50 + CWD logits 3``, temperature ``T = 4`` for both CWD terms, on
the main logits and on the feature map before the classifier. The adversarial term is
:func:`rdd_lightning.losses.skd.generator_loss`.

Deliberate differences from the published code:

- The connector is ``1x1 conv + BN`` (:class:`FeatureConnector`); the CIRKD code uses a bare ``1x1`` conv.
- A student map at another resolution is resized bilinearly (``align_corners=True``) to the teacher's; the
  published code assumes equal sizes.
- ``log_softmax`` instead of ``log(softmax)`` (same value, no ``-inf`` where a probability underflows).

As in the published recipe, the objective distils the decoder output before the classifier
(``SegOutput.decoder_features``; ``distillation.feature=encoder``: the encoder's last stage).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rdd_lightning.losses._precision import fp32_scope
from rdd_lightning.losses._shapes import check_pair, resize

__all__ = ["channel_wise_divergence"]


def channel_wise_divergence(student: Tensor, teacher: Tensor, *, temperature: float = 4.0) -> Tensor:
    """CWD loss between a student and a teacher map with the same channels.

    Args:
        student: ``[B, C, hs, ws]`` student logits or (connector-mapped) features, differentiable; resized
            bilinearly (``align_corners=True``) to the teacher's ``(h, w)`` if it differs.
        teacher: ``[B, C, h, w]`` teacher map; treated as a constant (detached).
        temperature: spatial-softmax temperature ``T > 0`` (4 in the published recipe).

    Returns:
        0-dim float32 loss (nats times ``T^2``, averaged over the ``B*C`` channel maps), computed in float32
        with autocast off. Zero when the student equals the teacher.
    """
    check_pair(student, teacher, same_channels=True)
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    batch, channels = teacher.shape[:2]
    with fp32_scope(student.device):
        s = resize(student.float(), teacher.shape[-2:]).flatten(2) / temperature  # [B, C, h*w]
        t = teacher.detach().float().flatten(2) / temperature
        log_ps = torch.log_softmax(s, dim=-1)
        log_pt = torch.log_softmax(t, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum()
        return kl * (temperature * temperature) / (batch * channels)
