"""PSPNet with the pyramid-pooling head of Zhao et al. (CVPR 2017), as the segmentation-KD literature builds it.

smp's ``PSPNet`` pools to the same bins but follows the pooling with a 1x1 bottleneck; the networks of CIRKD and
of every paper that reuses them (RDD included) keep the original head:

    x = features[-1]                                       [B, Cin, h, w]   (1/8 of the input, dilated)
    p_k = up(ReLU(BN(conv1x1(avgpool_k(x)))))              [B, Cin/4, h, w] for bins k = 1, 2, 3, 6
    y = Dropout(0.1)(ReLU(BN(conv3x3([x, p_1, p_2, p_3, p_6]))))   [B, Cd, h, w]
    logits = conv1x1(y)                                    [B, C, h, w]

``up`` is bilinear with ``align_corners=True``; Cd is 128 for a ResNet-18 encoder (512 for ResNet-50/101).
:class:`CIRKDPSPNet` is an smp ``SegmentationModel`` (any smp encoder, ``tu-`` ones included), so
:class:`rdd_lightning.models.SegmentationNet` wraps it like smp's own architectures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import SegmentationHead, SegmentationModel
from segmentation_models_pytorch.encoders import get_encoder
from torch import Tensor, nn

__all__ = ["CIRKDPSPNet", "PyramidPoolingDecoder"]


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class PyramidPoolingDecoder(nn.Module):
    """Pyramid pooling over ``bins`` (1x1 conv to ``in/len(bins)`` channels each), concatenated with the input,
    then a 3x3 conv + BN + ReLU + dropout to ``out_channels``.

    Submodules: ``stages[i]`` (conv, BN, ReLU of bin ``bins[i]``) and ``bottleneck`` (conv, BN, ReLU, dropout).
    """

    def __init__(
        self, in_channels: int, out_channels: int, bins: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1
    ):
        super().__init__()
        self.bins = tuple(int(b) for b in bins)
        branch = in_channels // len(self.bins)
        self.stages = nn.ModuleList(_conv_bn_relu(in_channels, branch, 1) for _ in self.bins)
        bottleneck = _conv_bn_relu(in_channels + branch * len(self.bins), out_channels, 3)
        self.bottleneck = nn.Sequential(*bottleneck, nn.Dropout(dropout))

    def forward(self, features: list[Tensor]) -> Tensor:
        """``features``: the encoder's pyramid; its last map ``[B, Cin, h, w]`` -> ``[B, out_channels, h, w]``."""
        x = features[-1]
        size = x.shape[-2:]
        pooled = [
            F.interpolate(stage(F.adaptive_avg_pool2d(x, b)), size, mode="bilinear", align_corners=True)
            for b, stage in zip(self.bins, self.stages, strict=True)
        ]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class CIRKDPSPNet(SegmentationModel):
    """An smp encoder + :class:`PyramidPoolingDecoder` + a 1x1 classifier (smp ``SegmentationHead``).

    Args:
        encoder_name, encoder_depth, encoder_weights, in_channels: as in smp's models.
        encoder_output_stride: 8 (dilated, the segmentation-KD setting) or 16 / 32.
        decoder_channels: width of the 3x3 bottleneck (128 for ResNet-18 in CIRKD).
        psp_bins: output sizes of the pyramid's adaptive average pools.
        decoder_dropout: dropout after the bottleneck (0.1).
        classes: number of output classes.
        upsampling: factor of the segmentation head's upsampling (1 keeps logits at the decoder's resolution).
        **kwargs: passed to the encoder (e.g. timm's ``stem_type``/``stem_width`` for ``tu-`` encoders).
    """

    def __init__(
        self,
        encoder_name: str = "tu-resnet18",
        encoder_depth: int = 5,
        encoder_weights: str | None = None,
        encoder_output_stride: int = 8,
        decoder_channels: int = 128,
        psp_bins: Sequence[int] = (1, 2, 3, 6),
        decoder_dropout: float = 0.1,
        in_channels: int = 3,
        classes: int = 1,
        upsampling: int = 1,
        **kwargs: Any,
    ):
        super().__init__()
        self.encoder = get_encoder(
            encoder_name,
            in_channels=in_channels,
            depth=encoder_depth,
            weights=encoder_weights,
            output_stride=encoder_output_stride,
            **kwargs,
        )
        self.decoder = PyramidPoolingDecoder(
            self.encoder.out_channels[-1], decoder_channels, bins=psp_bins, dropout=decoder_dropout
        )
        self.segmentation_head = SegmentationHead(
            decoder_channels, classes, kernel_size=1, upsampling=upsampling
        )
        self.classification_head = None
        self.name = f"cirkd-pspnet-{encoder_name}"
        self.initialize()
