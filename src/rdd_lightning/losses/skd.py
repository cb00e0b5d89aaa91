"""Structured knowledge distillation (SKD; Liu, Chen, Liu, Qin, Luo, Wang, "Structured Knowledge Distillation
for Semantic Segmentation", CVPR 2019; extended in TPAMI 2020).

Besides pixel KD, SKD transfers two kinds of structure:

* **Pair-wise similarity.** The feature map is max-pooled into ``pool_size x pool_size`` patches (nodes), each
  node's feature vector is L2-normalised, and the ``N x N`` cosine-similarity matrix ``A`` of the nodes is
  matched with a squared error averaged over the ``B * N * N`` entries:

      A_b = F_b^T F_b    (F_b: [C, N] normalised node features)
      L_pa = mean_{b,i,j} (A^s_{b,ij} - A^t_{b,ij})^2

  The similarity matrices are channel-free, so student and teacher channels may differ.
* **Holistic (adversarial) distillation.** A discriminator ``D`` (a small fully-convolutional critic on the
  ``C``-class score maps) learns to tell the teacher's maps from the student's; the student is trained to fool
  it. Generator loss ``L_ho = -mean(D(z_s))``; discriminator (hinge) loss
  ``L_D = mean(relu(1 - D(z_t))) + mean(relu(1 + D(z_s)))`` with ``z_s`` detached.

Which adversarial objective, and why: **hinge**. The SKD authors' code trains ``D`` as a WGAN with gradient
penalty (``lambda_gp = 10``); the CIRKD code, whose SKD/IFVD/CWD numbers the RDD paper quotes (Cityscapes,
DeepLabV3-R18: SKD 75.42, IFVD 75.59, CWD 75.55), uses the hinge loss without a gradient penalty. This package
reproduces the numbers RDD is compared with, so it follows CIRKD. Hinge also needs no double backward through
the critic (spectral norm, self-attention, BatchNorm), which keeps the adversarial step cheap.

Default recipe of this research line (CIRKD's ``train_kd.py``): ``SKD = KD 1 + pair-wise 10 + adversarial
0.001`` on the feature map before the classifier (pair-wise) and the main logits (adversarial);
``IFVD`` and ``CWD`` add the same adversarial term with weight 0.001. The discriminator is trained by its own
Adam optimizer, lr ``4e-4``, betas ``(0.9, 0.99)`` (:data:`DISCRIMINATOR_OPTIMIZER`), on its loss times
``0.1`` (:data:`DISCRIMINATOR_LOSS_WEIGHT`); its parameters must never be in the student's optimizer. Its
input is normalised by a BatchNorm (the code's ``preprocess_GAN_mode=1``); its body is four
spectral-normalised stride-2 convolutions (64-128-256-512 channels, LeakyReLU 0.1) with SAGAN self-attention
after the third and fourth.

Deliberate differences from the published code:

- Discriminator convolutions are ``3x3`` (padding 1) instead of ``4x4``, and the last layer is a padded
  ``3x3`` conv to a score map instead of an unpadded ``4x4`` conv, so that any input size down to ``1x1``
  works (the published critic needs score maps of at least 64 px per side). The losses average the score map
  as before.
- PyTorch's ``spectral_norm`` parametrisation (one power iteration per forward) replaces the SAGAN copy.
- The generator loss runs ``D`` with its parameters frozen, so ``D`` gets gradient only from its own loss (the
  published code lets the student's backward write gradients into ``D`` and clears them before ``D``'s step).
- Pair-wise similarity follows the CIRKD code (``2x2`` max-pool patches, gradient through the normalisation);
  the SKD authors' code pools with patches of half the map and detaches the feature norm.
- A student map at another resolution is resized bilinearly (``align_corners=True``) to the teacher's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from rdd_lightning.losses._precision import fp32_scope
from rdd_lightning.losses._shapes import check_map, check_pair, resize

__all__ = [
    "DISCRIMINATOR_LOSS_WEIGHT",
    "DISCRIMINATOR_OPTIMIZER",
    "SKDDiscriminator",
    "discriminator_loss",
    "generator_loss",
    "pairwise_similarity",
    "pairwise_similarity_loss",
]

#: Keyword arguments of ``torch.optim.Adam`` for the discriminator, as published (SKD and CIRKD code).
DISCRIMINATOR_OPTIMIZER: dict[str, Any] = {"lr": 4e-4, "betas": (0.9, 0.99)}
#: Weight of the discriminator's own loss (``lambda_d``), as published.
DISCRIMINATOR_LOSS_WEIGHT = 0.1


# ----------------------------------------------------------------------------------------- pair-wise term
def pairwise_similarity(feature: Tensor, *, pool_size: int = 2) -> Tensor:
    """Cosine similarities between the max-pooled nodes of a feature map.

    Args:
        feature: ``[B, C, h, w]`` feature map, any floating dtype.
        pool_size: side of the square max-pool patch that forms a node (stride = size, ``ceil_mode=True``);
            1 uses every pixel as a node.

    Returns:
        ``[B, N, N]`` float32 similarities in ``[-1, 1]`` with ``N = ceil(h / pool_size) * ceil(w /
        pool_size)`` (differentiable; autocast off).
    """
    check_map("feature", feature)
    if int(pool_size) < 1:
        raise ValueError(f"pool_size={pool_size!r} must be an integer >= 1")
    with fp32_scope(feature.device):
        f = feature.float()
        if pool_size > 1:
            f = F.max_pool2d(f, kernel_size=pool_size, stride=pool_size, ceil_mode=True)
        f = F.normalize(f.flatten(2), dim=1)  # [B, C, N]
        return f.transpose(1, 2) @ f


def pairwise_similarity_loss(
    student_feature: Tensor, teacher_feature: Tensor, *, pool_size: int = 2
) -> Tensor:
    """SKD pair-wise term: mean squared difference of the node-similarity matrices.

    Args:
        student_feature: ``[B, Cs, hs, ws]`` student feature (differentiable); resized bilinearly
            (``align_corners=True``) to the teacher's ``(h, w)`` if it differs, before pooling.
        teacher_feature: ``[B, Ct, h, w]`` teacher feature (detached); ``Ct`` may differ from ``Cs``.
        pool_size: node patch side (2, as in the CIRKD code).

    Returns:
        0-dim float32 loss (unitless), averaged over the ``B * N * N`` matrix entries. Zero when the student
        equals the teacher (or differs by a positive per-node scale).
    """
    check_pair(student_feature, teacher_feature, same_channels=False, what="features")
    with fp32_scope(student_feature.device):
        s = pairwise_similarity(
            resize(student_feature.float(), teacher_feature.shape[-2:]), pool_size=pool_size
        )
        t = pairwise_similarity(teacher_feature.detach(), pool_size=pool_size)
        return (s - t).pow(2).mean()


# ------------------------------------------------------------------------------------- adversarial term
class _SelfAttention(nn.Module):
    """SAGAN self-attention: ``x + gamma * V softmax(Q^T K)^T`` with ``gamma`` starting at 0."""

    def __init__(self, channels: int):
        super().__init__()
        inner = max(channels // 8, 1)
        self.query = nn.Conv2d(channels, inner, kernel_size=1)
        self.key = nn.Conv2d(channels, inner, kernel_size=1)
        self.value = nn.Conv2d(channels, channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        q = self.query(x).flatten(2)  # [B, C', N]
        k = self.key(x).flatten(2)  # [B, C', N]
        v = self.value(x).flatten(2)  # [B, C, N]
        attention = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # [B, N(query), N(key)]
        out = (v @ attention.transpose(1, 2)).view(batch, channels, height, width)
        return x + self.gamma * out


class SKDDiscriminator(nn.Module):
    """The holistic critic of SKD on ``C``-class score maps: ``[B, C, h, w] -> [B, 1, h', w']`` scores.

    ``BatchNorm(C) -> 4 x [spectral-norm 3x3 conv, stride 2, LeakyReLU(0.1)]`` with widths ``base``,
    ``2 base``, ``4 base``, ``8 base`` and SAGAN self-attention after the third and fourth block, then a
    ``3x3`` conv to one score channel (``h' = ceil(h / 16)``). A higher score means "looks like the
    teacher". Trained by its own optimizer (:data:`DISCRIMINATOR_OPTIMIZER`) on :func:`discriminator_loss`;
    the student sees it only through :func:`generator_loss`.

    Args:
        num_classes: ``C``, the channels of the score maps it judges.
        base_channels: width of the first block (64, as published).
        self_attention: add the two self-attention layers (as published).
    """

    def __init__(self, num_classes: int, *, base_channels: int = 64, self_attention: bool = True):
        super().__init__()
        self.num_classes = int(num_classes)
        layers: list[nn.Module] = [nn.BatchNorm2d(num_classes)]
        in_channels = num_classes
        for index in range(4):
            out_channels = base_channels * 2**index
            layers += [
                spectral_norm(nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)),
                nn.LeakyReLU(0.1),
            ]
            if self_attention and index >= 2:
                layers.append(_SelfAttention(out_channels))
            in_channels = out_channels
        layers.append(nn.Conv2d(in_channels, 1, kernel_size=3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, score_maps: Tensor) -> Tensor:
        if score_maps.dim() != 4 or score_maps.shape[1] != self.num_classes:
            raise ValueError(
                f"SKDDiscriminator({self.num_classes} classes) got {tuple(score_maps.shape)}; expected "
                f"[B, {self.num_classes}, h, w] score maps"
            )
        return self.body(score_maps)


def generator_loss(
    discriminator: nn.Module, student_logits: Tensor, *, size: tuple[int, int] | None = None
) -> Tensor:
    """The student's adversarial (holistic) loss ``-mean(D(z_s))``; ``D`` gets no gradient from it.

    ``D``'s parameters are frozen (``requires_grad=False``) while it scores the student, so the backward of
    this loss reaches the student's logits only. ``D`` runs in its current mode (its BatchNorm statistics
    update in training mode, as in the published code).

    Args:
        discriminator: the critic (:class:`SKDDiscriminator`).
        student_logits: ``[B, C, hs, ws]`` student main-head scores (differentiable).
        size: ``(h, w)`` to resize the student's scores to first (the teacher's logit size), or ``None``.

    Returns:
        0-dim float32 loss (critic score units), float32 with autocast off.
    """
    check_map("student_logits", student_logits)
    trainable = [p for p in discriminator.parameters() if p.requires_grad]
    with fp32_scope(student_logits.device):
        z = student_logits.float()
        if size is not None:
            z = resize(z, size)
        for p in trainable:
            p.requires_grad_(False)
        try:
            scores = discriminator(z)
        finally:
            for p in trainable:
                p.requires_grad_(True)
        return -scores.float().mean()


def discriminator_loss(discriminator: nn.Module, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """The critic's hinge loss ``mean(relu(1 - D(z_t))) + mean(relu(1 + D(z_s)))``.

    Both score maps are detached: this loss trains ``D`` only (step it with ``D``'s own optimizer, weighted by
    :data:`DISCRIMINATOR_LOSS_WEIGHT`). ``D`` scores the teacher's and the student's maps in two separate
    forwards, as published (so its input BatchNorm normalises each batch with its own statistics).

    Args:
        discriminator: the critic (:class:`SKDDiscriminator`).
        student_logits: ``[B, C, hs, ws]`` student scores; resized bilinearly (``align_corners=True``) to the
            teacher's ``(h, w)`` if they differ.
        teacher_logits: ``[B, C, h, w]`` teacher scores.

    Returns:
        0-dim float32 loss (>= 0), float32 with autocast off.
    """
    check_pair(student_logits, teacher_logits, same_channels=True, what="logits")
    with fp32_scope(teacher_logits.device):
        zt = teacher_logits.detach().float()
        zs = resize(student_logits.detach().float(), zt.shape[-2:])
        real = discriminator(zt).float()
        fake = discriminator(zs).float()
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
