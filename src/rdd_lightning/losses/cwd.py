"""Channel-wise distillation (CWD; Shu, Liu, Gao, Yan, Shen, "Channel-wise Knowledge Distillation for Dense
Prediction", ICCV 2021).

Each channel of a ``[B, C, h, w]`` map is turned into a distribution over its ``h*w`` positions with a spatial
softmax at temperature ``T``; the student matches the teacher channel by channel with a KL divergence. With
the student map ``s`` of ``Cs`` channels, an optional connector ``g`` mapping it to the teacher's ``Ct``
channels (``g`` = identity and ``Cs = Ct`` without one) and the teacher map ``t``:

    phi(x)_{b,c,i} = exp(x_{b,c,i} / T) / sum_j exp(x_{b,c,j} / T)
    L_cwd = T^2 / (B * Cs) * sum_{b, c<Ct, i} phi(t)_{b,c,i} * (log phi(t)_{b,c,i} - log phi(g(s))_{b,c,i})

i.e. the KL summed over positions and over the ``B * Ct`` compared channel maps, times ``T^2``, divided by
``B`` times the channel count of the student map *before* the connector. That is exactly what the CIRKD code
computes (``CriterionCWD(s_channels, t_channels, norm_type='channel', divergence='kl')``, whose recipe and
weights we use): it reads the channel count from the student's input before its 1x1 conv connector. When the
channels agree (the logits term, or a student as wide as its teacher) this is the paper's ``T^2 / C``
average over channel maps and equals mmrazor's ``ChannelWiseDivergence``. With a connector it is ``Ct / Cs``
times the average over the compared maps (mmrazor, whose connectors run before the loss, divides by ``Ct``):
2x for the default ResNet-18 student (128 decoder channels) and ResNet-101 teacher (256), so the published
``cwd_feature`` weight 50 keeps its published strength.

It works on logits (``C`` = classes, no connector) and on feature maps; the objective's ``cwd_feature`` term
hands its :class:`~rdd_lightning.losses.FeatureConnector` to :func:`channel_wise_divergence` (``connector=``)
so the normaliser is the student's channel count.

Default recipe of this research line (CIRKD's ``train_kd.py``, whose CWD numbers the RDD paper quotes):
``KD 1 + adversarial 0.001 + CWD features 50 + CWD logits 3``, temperature ``T = 4`` for both CWD terms, on
the main logits and on the feature map before the classifier. The adversarial term is
:func:`rdd_lightning.losses.skd.generator_loss`.

Deliberate differences from the published code:

- The connector is ``1x1 conv + BN`` (:class:`FeatureConnector`); the CIRKD code uses a bare ``1x1`` conv.
- A student map at another resolution is resized bilinearly (``align_corners=True``, after the connector) to
  the teacher's; the published code assumes equal sizes.
- ``log_softmax`` instead of ``log(softmax)`` (same value, no ``-inf`` where a probability underflows).

As in the published recipe, the objective distils the decoder output before the classifier
(``SegOutput.decoder_features``; ``distillation.feature=encoder``: the encoder's last stage).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rdd_lightning.losses._precision import fp32_scope
from rdd_lightning.losses._shapes import check_map, check_pair, resize

__all__ = ["channel_wise_divergence"]


def channel_wise_divergence(
    student: Tensor, teacher: Tensor, *, temperature: float = 4.0, connector: nn.Module | None = None
) -> Tensor:
    """CWD loss between a student map (optionally through a connector) and a teacher map.

    Args:
        student: ``[B, Cs, hs, ws]`` student logits or features, differentiable. ``Cs`` must equal the
            teacher's ``Ct`` unless ``connector`` maps it there.
        teacher: ``[B, Ct, h, w]`` teacher map; treated as a constant (detached).
        temperature: spatial-softmax temperature ``T > 0`` (4 in the published recipe).
        connector: optional module ``[B, Cs, hs, ws] -> [B, Ct, hs, ws]`` applied to ``student`` first, in the
            caller's precision (autocast applies), e.g. a :class:`~rdd_lightning.losses.FeatureConnector`.
            The mapped map is resized bilinearly (``align_corners=True``) to the teacher's ``(h, w)`` if it
            differs.

    Returns:
        0-dim float32 loss: ``T^2`` times the KL (nats) summed over positions and over the ``B * Ct`` channel
        maps, divided by ``B * Cs`` (``Cs``: the channels of ``student`` as given, before the connector; the
        CIRKD code's normaliser). Without a connector ``Cs = Ct`` and this is the mean over channel maps.
        Computed in float32 with autocast off; zero when the (mapped) student equals the teacher.
    """
    check_map("student maps", student)
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    student_channels = student.shape[1]
    if connector is not None:
        student = connector(student)
    check_pair(student, teacher, same_channels=True)
    with fp32_scope(student.device):
        s = resize(student.float(), teacher.shape[-2:]).flatten(2) / temperature  # [B, Ct, h*w]
        t = teacher.detach().float().flatten(2) / temperature
        log_ps = torch.log_softmax(s, dim=-1)
        log_pt = torch.log_softmax(t, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum()
        return kl * (temperature * temperature) / (teacher.shape[0] * student_channels)
