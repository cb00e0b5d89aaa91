"""FitNet hint regression (Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets: Hints for Thin Deep
Nets", ICLR 2015).

A learnable regressor (here a ``1x1`` conv, optionally with BN:
:class:`~rdd_lightning.losses.FeatureConnector`) maps the student's guided layer to the teacher's hint layer,
and the mean squared error between them is minimised:

    L_hint = mean over the B*Ct*h*w entries of ( r(s) - t )^2

Default recipe of this research line: ``KD 1 + hint 10`` on the feature map before the classifier. The
published regressor always exists, also when the channel counts agree: build it as
``FeatureConnector(Cs, Ct, always=True)`` (add ``norm=False`` for the CIRKD code's bare ``1x1`` conv).

Deliberate differences from the published code: the regressor has a BatchNorm by default (this package's
connector convention); a student map at another resolution is resized bilinearly (``align_corners=True``) to
the teacher's; FitNet's original two-stage schedule (hint pre-training, then KD) is replaced by the joint loss
the segmentation KD codebases use.
"""

from __future__ import annotations

from torch import Tensor

from rdd_lightning.losses._precision import fp32_scope
from rdd_lightning.losses._shapes import check_pair, resize

__all__ = ["hint_loss"]


def hint_loss(student_hint: Tensor, teacher_feature: Tensor) -> Tensor:
    """Mean squared error between the regressed student feature and the teacher's hint.

    Args:
        student_hint: ``[B, Ct, hs, ws]`` output of the regressor on the student feature (differentiable);
            resized bilinearly (``align_corners=True``) to the teacher's ``(h, w)`` if it differs.
        teacher_feature: ``[B, Ct, h, w]`` teacher feature (detached).

    Returns:
        0-dim float32 loss in squared feature units, averaged over the ``B*Ct*h*w`` entries (float32,
        autocast off). Zero when the regressed student equals the teacher.
    """
    check_pair(student_hint, teacher_feature, same_channels=True, what="features")
    with fp32_scope(student_hint.device):
        s = resize(student_hint.float(), teacher_feature.shape[-2:])
        return (s - teacher_feature.detach().float()).pow(2).mean()
