"""An independent plain-torch implementation of the segmentation-KD papers' networks in CIRKD's key layout.

Written for the tests from the networks' description (RDD_SPEC, DESIGN "the paper's networks", issue 15), not
from the package: its module names are CIRKD's, so ``state_dict()`` has exactly the keys of CIRKD's files
(``pretrained.*`` backbone, ``head.*``, ``auxlayer.*``), and its forward is the networks' definition:

- deep-stem ResNet "v1s": 3x3 convs 3->64 (stride 2), 64->64, 64->128, each BN + ReLU, max-pool 3/2/1; stages
  of ``BasicBlock`` (R18) or ``Bottleneck`` (R101) blocks with the stride on the 3x3 conv; output stride 8:
  layer3 dilated 2 and layer4 4, the first block of each at the previous dilation (layer3.0 at 1, layer4.0 at 2;
  a BasicBlock's second conv at the stage's dilation);
- MobileNetV2 without its last 1x1 conv (features 0..17, 320 channels out), the strided blocks of the last two
  strided stages made stride 1 with dilation 1 / 2 and the rest of those stages dilated 2 / 4;
- DeepLabV3 head: ASPP (1x1, 3x3 at rates 12/24/36, image pooling broadcast back), 1x1 projection + BN + ReLU +
  Dropout(0.5), 3x3 conv + BN + ReLU + Dropout(0.1), 1x1 classifier;
- PSP head: bins 1/2/3/6, a 1x1 conv + BN + ReLU to in/4 channels each, upsampled with align_corners=True and
  concatenated with the input, 3x3 conv + BN + ReLU + Dropout(0.1), 1x1 classifier;
- FCN aux head on layer3: 3x3 conv to in/4 + BN + ReLU + Dropout(0.1), 1x1 conv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_relu(
    cin: int, cout: int, k: int, *, stride: int = 1, dilation: int = 1, relu6: bool = False
) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, k, stride, padding=dilation * (k // 2), dilation=dilation, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU6() if relu6 else nn.ReLU())


# ---------------------------------------------------------------------------------------------- ResNet v1s
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, first_dilation: int, dilation: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, first_dilation, first_dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = shortcut(cin, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, first_dilation: int, dilation: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, first_dilation, first_dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = shortcut(cin, planes * 4, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def shortcut(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class DilatedResNetV1s(nn.Module):
    """``depths``: blocks per stage, (2, 2, 2, 2) for ResNet-18 (BasicBlock), (3, 4, 23, 3) for ResNet-101."""

    def __init__(self, depths: tuple[int, int, int, int], block: type[nn.Module]):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64)
        self.conv2, self.bn2 = nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        self.conv3, self.bn3 = nn.Conv2d(64, 128, 3, 1, 1, bias=False), nn.BatchNorm2d(128)
        cin = 128
        plan = [
            (64, 1, 1, 1),
            (128, 2, 1, 1),
            (256, 1, 1, 2),
            (512, 1, 2, 4),
        ]  # planes, stride, first dil, dil
        for index, ((planes, stride, first, dilation), n) in enumerate(
            zip(plan, depths, strict=True), start=1
        ):
            blocks = []
            for b in range(n):
                blocks.append(
                    block(cin, planes, stride if b == 0 else 1, first if b == 0 else dilation, dilation)
                )
                cin = planes * block.expansion
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
        self.out_channels = cin

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(layer3, layer4)`` maps, both at 1/8."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.max_pool2d(x, 3, 2, 1)
        c3 = self.layer3(self.layer2(self.layer1(x)))
        return c3, self.layer4(c3)


# ------------------------------------------------------------------------------------------- MobileNetV2
class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, dilation: int, residual: bool):
        super().__init__()
        hidden = cin * expand
        dw = [
            nn.Conv2d(hidden, hidden, 3, stride, dilation, dilation, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
        ]
        pw_linear = [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        expand_layers = (
            [] if expand == 1 else [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        )
        self.conv = nn.Sequential(*expand_layers, *dw, *pw_linear)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class DilatedMobileNetV2(nn.Module):
    """``net.features`` 0..17 at output stride 8 (``pretrained.net.features.*`` keys)."""

    def __init__(self):
        super().__init__()
        settings = [
            (1, 16, 1, 1),
            (6, 24, 2, 2),
            (6, 32, 3, 2),
            (6, 64, 4, 2),
            (6, 96, 3, 1),
            (6, 160, 3, 2),
            (6, 320, 1, 1),
        ]
        layers: list[nn.Module] = [conv_bn_relu(3, 32, 3, stride=2, relu6=True)]
        cin, index = 32, 1
        for expand, cout, n, stride in settings:
            for b in range(n):
                original_stride = stride if b == 0 else 1
                # output stride 8: blocks 7..13 run at dilation 2 and 14..17 at 4; a block that had stride 2
                # there drops it and keeps the previous dilation
                dilation = 1 if index < 7 else (2 if index < 14 else 4)
                if original_stride == 2 and index >= 7:
                    stride_now, dilation = 1, dilation // 2
                else:
                    stride_now = original_stride
                residual = original_stride == 1 and cin == cout
                layers.append(InvertedResidual(cin, cout, stride_now, expand, dilation, residual))
                cin, index = cout, index + 1
        self.net = nn.Module()
        self.net.features = nn.Sequential(*layers)
        self.out_channels = 320

    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(x)


# --------------------------------------------------------------------------------------------------- heads
class ASPPConv(nn.Module):
    def __init__(self, cin: int, cout: int, rate: int):
        super().__init__()
        self.block = conv_bn_relu(cin, cout, 3, dilation=rate)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class ASPPPooling(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(cin, cout, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.gap(x).expand(-1, -1, *x.shape[-2:])  # a 1x1 map upsampled is a broadcast


class ASPP(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.b0 = conv_bn_relu(cin, cout, 1)
        self.b1, self.b2, self.b3 = (ASPPConv(cin, cout, r) for r in (12, 24, 36))
        self.b4 = ASPPPooling(cin, cout)
        self.project = nn.Sequential(*conv_bn_relu(5 * cout, cout, 1), nn.Dropout(0.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1))


class DeepLabHead(nn.Module):
    def __init__(self, cin: int, channels: int, classes: int):
        super().__init__()
        self.aspp = ASPP(cin, channels)
        self.block = nn.Sequential(
            *conv_bn_relu(channels, channels, 3), nn.Dropout(0.1), nn.Conv2d(channels, classes, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.aspp(x))


class PSPHead(nn.Module):
    def __init__(self, cin: int, channels: int, classes: int):
        super().__init__()
        self.psp = nn.Module()
        for i in range(1, 5):
            setattr(self.psp, f"conv{i}", conv_bn_relu(cin, cin // 4, 1))
        self.block = nn.Sequential(*conv_bn_relu(2 * cin, channels, 3), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(channels, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        branches = [
            F.interpolate(
                getattr(self.psp, f"conv{i}")(F.adaptive_avg_pool2d(x, b)),
                size,
                mode="bilinear",
                align_corners=True,
            )
            for i, b in zip(range(1, 5), (1, 2, 3, 6), strict=True)
        ]
        return self.classifier(self.block(torch.cat([x, *branches], 1)))


def fcn_head(cin: int, classes: int) -> nn.Module:
    head = nn.Module()
    head.block = nn.Sequential(
        *conv_bn_relu(cin, cin // 4, 3), nn.Dropout(0.1), nn.Conv2d(cin // 4, classes, 1)
    )
    return head


class ReferenceNet(nn.Module):
    """``kind``: ``deeplabv3_resnet18`` | ``deeplabv3_resnet101`` | ``deeplabv3_mobilenetv2`` | ``pspnet_resnet18``.
    ``forward`` returns ``(logits, aux logits or None)`` at 1/8 of the input."""

    def __init__(self, kind: str, classes: int):
        super().__init__()
        head_kind, backbone = kind.split("_")
        if backbone == "mobilenetv2":
            self.pretrained = DilatedMobileNetV2()
        elif backbone == "resnet18":
            self.pretrained = DilatedResNetV1s((2, 2, 2, 2), BasicBlock)
        else:
            self.pretrained = DilatedResNetV1s((3, 4, 23, 3), Bottleneck)
        cin = self.pretrained.out_channels
        channels = 256 if backbone == "resnet101" else 128
        self.head = (
            DeepLabHead(cin, channels, classes)
            if head_kind == "deeplabv3"
            else PSPHead(cin, channels, classes)
        )
        self.auxlayer = fcn_head(cin // 2, classes) if backbone != "mobilenetv2" else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.auxlayer is None:
            return self.head(self.pretrained(x)), None
        c3, c4 = self.pretrained(x)
        return self.head(c4), self.auxlayer.block(c3)


def randomize_(net: nn.Module, seed: int = 0, size: tuple[int, int] = (64, 64)) -> nn.Module:
    """Random weights, random BatchNorm affine parameters, and BatchNorm statistics measured on random images
    (one batch; so activations stay O(1) through 100 layers while a mis-wired layer or a skipped tensor changes the
    output); returned in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5
                )
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
                module.reset_running_stats()
                module.momentum = None  # cumulative average over the calibration batches
        net.train()
        net(torch.randn(2, 3, *size, generator=generator))
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.1
    return net.eval()
