"""Segmentation networks: any smp architecture/encoder plus RDD's FCN auxiliary head.

Every network returns :class:`SegOutput` with logits at the decoder's own resolution (1/8 of the input
for the dilated DeepLabV3/PSPNet of the paper); losses resize to the label size themselves.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
from torch import Tensor, nn

from rdd_lightning import weight_formats
from rdd_lightning.errors import ConfigError
from rdd_lightning.pspnet import CIRKDPSPNet

#: Architectures of this package that smp does not have, by ``arch`` name (built like smp's own).
ARCHITECTURES: dict[str, type[nn.Module]] = {"CIRKDPSPNet": CIRKDPSPNet}


@dataclass
class SegOutput:
    """What every network of this package returns.

    Attributes:
        logits: ``[B, C, h, w]`` main-head logits at the decoder's resolution.
        aux_logits: ``[B, C, h', w']`` FCN auxiliary-head logits on the second-to-last encoder stage, or
            ``None`` for a network without an auxiliary head.
        features: the encoder's feature pyramid ``[x, 1/2, 1/4, 1/8, stage4, stage5]`` (smp order), for
            feature-based distillation methods.
        decoder_features: ``[B, Cd, h, w]`` the decoder's output, the map the classifier (segmentation head)
            turns into ``logits`` (at the logits' resolution for DeepLabV3 with ``upsampling=1``); the feature
            the published segmentation-KD recipes distil. ``None`` for a network that does not expose it.
    """

    logits: Tensor
    aux_logits: Tensor | None
    features: list[Tensor]
    decoder_features: Tensor | None = None


class FCNHead(nn.Sequential):
    """FCN auxiliary head: 3x3 conv -> BN -> ReLU -> Dropout(0.1) -> 1x1 conv, inner channels = in / 4."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.1):
        inner = in_channels // 4
        super().__init__(
            nn.Conv2d(in_channels, inner, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(inner),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(inner, num_classes, kernel_size=1),
        )


class SegmentationNet(nn.Module):
    """An smp model (encoder, decoder, segmentation head) with an optional FCN auxiliary head.

    Args:
        arch: smp architecture name (``DeepLabV3``, ``PSPNet``, ``Unet``, ... any of ``smp.create_model``) or
            one of :data:`ARCHITECTURES` (``CIRKDPSPNet``: PSPNet with the original 3x3 bottleneck head).
        encoder_name: smp encoder name (``resnet18``, ``resnet101``, ``mobilenet_v2``, ``tu-...``; the paper's
            deep-stem ResNets are timm's: ``tu-resnet101s``, ``tu-resnet18`` with ``stem_type="deep"``).
        num_classes: number of output classes C.
        encoder_weights: ``None`` (random init), an smp weight name such as ``imagenet`` (must be in the local
            Hugging Face cache when offline) or a path to a local encoder state-dict file (``.pth``/``.pt``/
            ``.safetensors``; torchvision ImageNet checkpoints load as they are, and so do timm's and CIRKD's
            ImageNet backbone files for the matching encoders, see :mod:`rdd_lightning.weight_formats`).
        aux_head: add the FCN auxiliary head on the encoder's second-to-last stage.
        head_dropout: dropout between the decoder and the classifier (CIRKD's DeepLabV3 has 0.1 there; smp's
            has none). :attr:`SegOutput.decoder_features` is taken after it, as CIRKD's distilled feature is.
        zero_init_residual: start every residual block of the encoder as the identity (the last BatchNorm
            of each block gets weight 0), which makes deep encoders trained from scratch learn much faster
            early on. Pretrained or checkpoint weights, loaded afterwards, replace it.
        **arch_kwargs: passed to the smp architecture (``encoder_output_stride``, ``decoder_channels``,
            ``upsampling``, ``encoder_depth``, ...).
    """

    def __init__(
        self,
        arch: str,
        encoder_name: str,
        num_classes: int,
        encoder_weights: str | None = None,
        aux_head: bool = True,
        in_channels: int = 3,
        zero_init_residual: bool = False,
        head_dropout: float = 0.0,
        **arch_kwargs: Any,
    ):
        super().__init__()
        self.arch = arch
        self.encoder_name = encoder_name
        self.num_classes = num_classes
        build = ARCHITECTURES.get(arch)
        try:
            common = {"encoder_name": encoder_name, "in_channels": in_channels, "classes": num_classes}
            if build is not None:
                self.net = build(**common, encoder_weights=None, **arch_kwargs)
            else:
                self.net = smp.create_model(arch, **common, encoder_weights=None, **arch_kwargs)
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise ConfigError(
                f"cannot build smp model arch={arch!r} encoder_name={encoder_name!r} with {arch_kwargs}: {err}"
            ) from err
        if zero_init_residual:
            zero_init_residual_blocks(self.net.encoder, encoder_name)
        if encoder_weights is not None:
            load_encoder_weights(self.net.encoder, encoder_name, encoder_weights)
        self.head_dropout = nn.Dropout(head_dropout) if head_dropout > 0 else None
        self.aux_head = FCNHead(self.net.encoder.out_channels[-2], num_classes) if aux_head else None

    @property
    def output_stride(self) -> int:
        """Input sizes must be multiples of this (the encoder's total stride)."""
        return int(self.net.encoder.output_stride)

    def forward(self, x: Tensor) -> SegOutput:
        """``x``: ``[B, 3, H, W]`` normalised images, H and W multiples of :attr:`output_stride`."""
        self.net.check_input_shape(x)
        features = self.net.encoder(x)
        decoded = self.net.decoder(features)
        if self.head_dropout is not None:
            decoded = self.head_dropout(decoded)
        logits = self.net.segmentation_head(decoded)
        aux = self.aux_head(features[-2]) if self.aux_head is not None else None
        return SegOutput(logits=logits, aux_logits=aux, features=features, decoder_features=decoded)

    def feature_channels(self) -> dict[str, int]:
        """Channels of the maps feature-based distillation reads: ``decoder`` (:attr:`SegOutput.decoder_features`,
        the input of the segmentation head's first convolution) and ``encoder`` (the last encoder stage,
        ``SegOutput.features[-1]``)."""
        head_conv = next(m for m in self.net.segmentation_head.modules() if isinstance(m, nn.Conv2d))
        return {"decoder": int(head_conv.in_channels), "encoder": int(self.net.encoder.out_channels[-1])}

    def describe(self) -> dict[str, Any]:
        """Identity of the architecture, stored in checkpoints and checked when a teacher is loaded."""
        return {
            "arch": self.arch,
            "encoder_name": self.encoder_name,
            "num_classes": self.num_classes,
            "aux_head": self.aux_head is not None,
        }


def build_model(
    arch: str,
    encoder_name: str,
    num_classes: int,
    encoder_weights: str | None = None,
    aux_head: bool = True,
    zero_init_residual: bool = False,
    head_dropout: float = 0.0,
    **arch_kwargs: Any,
) -> SegmentationNet:
    """Factory used by the ``student``/``teacher`` configs (``_target_: rdd_lightning.models.build_model``)."""
    return SegmentationNet(
        arch,
        encoder_name,
        num_classes,
        encoder_weights,
        aux_head,
        zero_init_residual=zero_init_residual,
        head_dropout=head_dropout,
        **arch_kwargs,
    )


def zero_init_residual_blocks(encoder: nn.Module, encoder_name: str) -> int:
    """Zero the weight of the last BatchNorm of every residual block, so each block starts as the identity.

    Covers the ResNet/ResNeXt blocks of torchvision and timm (``BasicBlock.bn2``, ``Bottleneck.bn3``) and the
    MobileNetV2 inverted residuals with a skip connection of both, the encoders smp builds (``tu-`` ones
    included). Returns the number of blocks changed; an encoder without such blocks raises a
    :class:`ConfigError`.
    """
    from timm.models._efficientnet_blocks import InvertedResidual as TimmInvertedResidual
    from timm.models.resnet import BasicBlock as TimmBasicBlock
    from timm.models.resnet import Bottleneck as TimmBottleneck
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.resnet import BasicBlock, Bottleneck

    changed = 0
    for module in encoder.modules():
        if isinstance(module, BasicBlock | TimmBasicBlock):
            bn = module.bn2
        elif isinstance(module, Bottleneck | TimmBottleneck):
            bn = module.bn3
        elif isinstance(module, InvertedResidual) and module.use_res_connect:
            bn = module.conv[-1]
        elif isinstance(module, TimmInvertedResidual) and module.has_skip:
            bn = module.bn3
        else:
            continue
        if isinstance(bn, nn.BatchNorm2d):
            nn.init.zeros_(bn.weight)
            changed += 1
    if not changed:
        raise ConfigError(
            f"zero_init_residual=true: encoder {encoder_name!r} has no ResNet/ResNeXt or MobileNetV2 residual "
            f"blocks to initialise; set zero_init_residual=false for it."
        )
    return changed


def to_sync_batchnorm(net: nn.Module) -> nn.Module:
    """``net`` with every BatchNorm synchronised across processes. timm's fused BatchNorm + activation layers
    (MobileNetV2's ``BatchNormAct2d``) become timm's ``SyncBatchNormAct``: torch's converter would turn them into
    plain ``SyncBatchNorm`` and silently drop their activation."""
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(net)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------- encoder weights
def load_encoder_weights(encoder: nn.Module, encoder_name: str, weights: str) -> None:
    """Load ``weights`` (a local file or an smp weight name) into ``encoder``, failing fast when offline.

    A file may be in the encoder's own layout, timm's, or CIRKD's ImageNet-backbone layout
    (:func:`rdd_lightning.weight_formats.encoder_state`); it must hold every tensor of the encoder (an ImageNet
    classifier is dropped), else a :class:`ConfigError` names the first missing / unexpected / mismatched keys.
    """
    path = Path(os.path.expanduser(str(weights)))
    if path.suffix in {".pth", ".pt", ".bin", ".safetensors"} or path.exists():
        if not path.is_file():
            raise ConfigError(
                f"encoder_weights={weights!r}: file not found. Pass an existing encoder state-dict file "
                f"(.pth/.pt/.safetensors), an smp weight name such as 'imagenet', or null for random init."
            )
        try:
            state = weight_formats.unwrap_state_dict(weight_formats.read_weights(path))
            encoder.load_state_dict(weight_formats.encoder_state(state, encoder))
        except weight_formats.WeightMismatch as err:
            raise ConfigError(
                f"encoder_weights={str(path)!r} does not fit encoder {encoder_name!r} ({err}); pass the backbone "
                f"file of this encoder, or choose the network the file was made for"
            ) from err
        except (RuntimeError, OSError, ValueError) as err:  # unreadable or not a weight file
            raise ConfigError(f"encoder_weights={str(path)!r}: cannot read it as weights: {err}") from err
        return
    weights_path = _resolve_smp_weights(encoder_name, str(weights))
    from safetensors.torch import load_file

    encoder.load_state_dict(load_file(weights_path, device="cpu"))


def _resolve_smp_weights(encoder_name: str, weights: str) -> str:
    """Path of smp's ``model.safetensors`` for ``encoder_name``/``weights``, from the cache or the Hub.

    smp would otherwise retry an unreachable Hub for about half a minute; here a missing cache entry is
    answered within seconds when the Hub cannot be reached.
    """
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from segmentation_models_pytorch.encoders import encoders as smp_encoders

    if encoder_name.startswith("tu-") or encoder_name not in smp_encoders:
        raise ConfigError(
            f"encoder_weights={weights!r} for encoder {encoder_name!r}: named weights are supported for smp's "
            f"own encoders; for timm ('tu-') encoders pass a local state-dict file or null."
        )
    settings = smp_encoders[encoder_name]["pretrained_settings"]
    if weights not in settings:
        raise ConfigError(
            f"encoder_weights={weights!r} is neither a file nor a weight name of encoder {encoder_name!r} "
            f"(known names: {sorted(settings)}); pass a path to a local state-dict file or null."
        )
    repo_id, revision = settings[weights]["repo_id"], settings[weights].get("revision")
    cached = try_to_load_from_cache(repo_id, "model.safetensors", revision=revision)
    if isinstance(cached, str):
        return cached
    hint = (
        f"encoder_weights={weights!r} for {encoder_name!r} is not in the local Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and the Hub cannot be reached. Pre-fill the cache on a machine with "
        f'internet (python -c "import segmentation_models_pytorch as smp; '
        f"smp.encoders.get_encoder('{encoder_name}', weights='{weights}')\") and copy it here, or pass a local "
        f"file: student.encoder_weights=/path/to/{encoder_name}.pth (a torchvision ImageNet checkpoint works), "
        f"or train from scratch with encoder_weights=null."
    )
    if constants.HF_HUB_OFFLINE or not _reachable(constants.ENDPOINT):
        raise ConfigError(hint)
    try:
        hf_hub_download(repo_id, filename="config.json", revision=revision)
        return hf_hub_download(repo_id, filename="model.safetensors", revision=revision)
    except Exception as err:  # network errors of many kinds
        raise ConfigError(f"{hint} ({type(err).__name__}: {err})") from err


def _reachable(url: str, timeout: float = 3.0) -> bool:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
