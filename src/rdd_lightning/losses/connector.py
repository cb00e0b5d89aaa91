"""Connectors: the learnable 1x1 maps that bring a student feature to the teacher's channel count.

A connector trains with the student (its parameters belong in the student's optimizer), is saved in training
checkpoints with the rest of the distillation objective, and is not part of an exported student network.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["FeatureConnector"]


class FeatureConnector(nn.Module):
    """``1x1 conv (no bias) -> BatchNorm`` from ``in_channels`` to ``out_channels``, or the identity.

    Args:
        in_channels: student feature channels ``Cs``.
        out_channels: teacher feature channels ``Ct``.
        always: build the convolution even when ``Cs == Ct`` (FitNet's regressor always exists); otherwise
            equal channel counts give the identity (no parameters).
        norm: append a ``BatchNorm2d`` after the convolution (default). The CIRKD code's CWD and FitNet
            connectors are a bare 1x1 convolution (``norm=False``).

    Shapes: ``[B, Cs, h, w] -> [B, Ct, h, w]``; runs in the caller's precision (autocast applies).
    """

    def __init__(self, in_channels: int, out_channels: int, *, always: bool = False, norm: bool = True):
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"channel counts must be >= 1; got in={in_channels}, out={out_channels}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        if in_channels == out_channels and not always:
            self.body: nn.Module = nn.Identity()
        else:
            layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)]
            if norm:
                layers.append(nn.BatchNorm2d(out_channels))
            self.body = nn.Sequential(*layers)

    @property
    def is_identity(self) -> bool:
        return isinstance(self.body, nn.Identity)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"FeatureConnector({self.in_channels} -> {self.out_channels}) got a tensor of shape "
                f"{tuple(x.shape)}; expected [B, {self.in_channels}, h, w]"
            )
        return self.body(x)
