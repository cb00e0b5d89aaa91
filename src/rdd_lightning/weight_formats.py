"""Weight files of other codebases, recognised by their keys and converted exactly (names only, never values).

Where the package loads weights (``teacher.checkpoint``, ``student.encoder_weights``, ``ckpt_path`` of
``evaluate``), a file may be in one of these layouts:

- **this package's**: a Lightning checkpoint (``state_dict`` with ``student.*`` keys) or a bare state dict of
  :class:`rdd_lightning.models.SegmentationNet` (``net.*``, ``aux_head.*``); for an encoder, the encoder's own
  keys (smp's native encoders also take torchvision's ImageNet files, whose ``fc.*`` smp drops).
- **timm's** backbone files for ``tu-`` encoders: the timm model's keys (``conv1.0.weight``, ...), which smp
  keeps under ``model.``; the ImageNet classifier (``fc.*``, ``classifier.*``, ``conv_head``) is dropped.
- **CIRKD's** (Yang et al., CVPR 2022; the networks of RDD and most segmentation-KD papers since):
  whole networks (``pretrained.*`` backbone, ``head.*``, ``auxlayer.*``; saved from DDP with or without a
  ``module.`` prefix) and ImageNet backbone files (``resnet18-imagenet.pth``, ``resnet101-imagenet.pth``:
  ``conv1``/``bn1``/``conv2``/``bn2``/``conv3``/``bn3`` deep stem, ``layer*``, ``fc``; ``mobilenetv2-imagenet.pth``:
  ``features.<i>.*``). They fit the ``cirkd_*`` networks (timm's deep-stem ResNets and MobileNetV2 under smp's
  DeepLabV3, or :class:`rdd_lightning.pspnet.CIRKDPSPNet`) under the key mapping of :func:`cirkd_names`.

Loading is strict: every tensor of the network must be in the file with its shape (BatchNorm's
``num_batches_tracked`` counters may be absent), and nothing but the ImageNet classifier may be left over.
Anything else raises :class:`WeightMismatch`, whose message names the first missing, unexpected and mismatched
keys; the callers turn it into the one-line :class:`~rdd_lightning.errors.ConfigError` that names the file and the
config. CIRKD's own loaders keep whatever matches and silently drop the rest; this module never does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "WeightMismatch",
    "cirkd_names",
    "convert_state",
    "encoder_state",
    "infer_cirkd_network",
    "is_cirkd_network_state",
    "network_state",
    "read_weights",
    "strip_module_prefix",
    "to_cirkd_state_dict",
]

#: keys of an ImageNet classifier a backbone file may carry (dropped when it is loaded as an encoder)
CLASSIFIER_KEYS = re.compile(r"^(fc|classifier|head\.fc|conv_head|bn2)\.")
#: CIRKD's MobileNetV2 ImageNet file also holds the final 1x1 conv to 1280 channels (features.18), which the
#: dilated backbone drops
MOBILENET_LAST_CONV = re.compile(r"^features\.18\.")
OPTIONAL_SUFFIX = "num_batches_tracked"
#: the names CIRKD's config option names map to (``infer_cirkd_network``)
CIRKD_CONFIGS = {
    ("deeplabv3", "resnet18"): "cirkd_deeplabv3_resnet18",
    ("deeplabv3", "resnet101"): "cirkd_deeplabv3_resnet101",
    ("deeplabv3", "mobilenetv2"): "cirkd_deeplabv3_mobilenetv2",
    ("pspnet", "resnet18"): "cirkd_pspnet_resnet18",
}


class WeightMismatch(ValueError):
    """A state dict that does not fit a network: ``missing`` and ``unexpected`` keys (in the file's layout) and
    ``shapes`` (``key: (file shape, network shape)``). ``str()`` is one line with the first few of each."""

    def __init__(self, missing: list[str], unexpected: list[str], shapes: dict[str, tuple], layout: str):
        self.missing, self.unexpected, self.shapes, self.layout = missing, unexpected, shapes, layout
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_first(unexpected)})")
        if shapes:
            shown = [f"{k} file {list(a)} vs network {list(b)}" for k, (a, b) in list(shapes.items())[:3]]
            more = f", +{len(shapes) - 3} more" if len(shapes) > 3 else ""
            parts.append(f"{len(shapes)} shape(s) differ ({'; '.join(shown)}{more})")
        super().__init__(f"read as {layout}: " + ", ".join(parts) if parts else layout)


def _first(keys: list[str], n: int = 3) -> str:
    more = f", +{len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# ------------------------------------------------------------------------------------------------ reading
def read_weights(path: str | os.PathLike) -> dict[str, Any]:
    """The contents of a weight file (``torch.load`` with ``weights_only=True``, or safetensors)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def strip_module_prefix(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` without the ``module.`` prefix that saving a DDP-wrapped network leaves on every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def unwrap_state_dict(contents: Mapping[str, Any]) -> dict[str, Tensor]:
    """The tensors of a file's contents: its ``state_dict`` / ``model`` entry when it has one, without a
    DDP ``module.`` prefix."""
    state = contents
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    return strip_module_prefix({k: v for k, v in state.items() if isinstance(v, Tensor)})


# ------------------------------------------------------------------------------------------------ matching
def convert_state(
    state: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    names: Mapping[str, str],
    *,
    layout: str,
    droppable: Callable[[str], bool] = lambda key: False,
) -> dict[str, Tensor]:
    """``state`` renamed into ``target``'s keys, checked strictly.

    Args:
        state: the file's tensors, in its own layout.
        target: the network's ``state_dict()`` (for keys and shapes).
        names: ``{target key: file key}`` for every key of ``target``.
        layout: the layout's name, for the error message.
        droppable: file keys allowed to be left over (an ImageNet classifier).

    Returns:
        ``{target key: tensor}``; a ``num_batches_tracked`` the file lacks is left out (BatchNorm fills it).

    Raises:
        WeightMismatch: a target tensor missing from the file, a file tensor that is neither used nor
            droppable, or a shape that differs.
    """
    converted: dict[str, Tensor] = {}
    missing: list[str] = []
    shapes: dict[str, tuple] = {}
    for key, reference in target.items():
        source = names[key]
        if source not in state:
            if not key.endswith(OPTIONAL_SUFFIX):
                missing.append(source)
            continue
        tensor = state[source]
        if tuple(tensor.shape) != tuple(reference.shape):
            shapes[source] = (tuple(tensor.shape), tuple(reference.shape))
            continue
        converted[key] = tensor
    used = {names[key] for key in target}
    unexpected = [k for k in state if k not in used and not droppable(k)]
    if missing or unexpected or shapes:
        raise WeightMismatch(missing, unexpected, shapes, layout)
    return converted


def _closest(
    state: Mapping[str, Tensor], target: Mapping[str, Tensor], layouts: dict[str, tuple[dict, Callable]]
) -> dict[str, Tensor]:
    """The conversion of ``state`` under the first layout that fits; if none fits, the mismatch of the layout
    that names the most of ``state``'s keys (the user's file is most likely in that one)."""
    best: tuple[int, WeightMismatch] | None = None
    for layout, (names, droppable) in layouts.items():
        try:
            return convert_state(state, target, names, layout=layout, droppable=droppable)
        except WeightMismatch as err:
            score = len(set(names.values()) & set(state))
            if best is None or score > best[0]:
                best = (score, err)
    assert best is not None
    raise best[1]


# ---------------------------------------------------------------------------------------- CIRKD's names
_RESNET_DEEP_STEM = {
    "conv1.0": "conv1",
    "conv1.1": "bn1",
    "conv1.3": "conv2",
    "conv1.4": "bn2",
    "conv1.6": "conv3",
}
#: timm MobileNetV2 block part -> index in CIRKD's ``conv`` Sequential: depthwise-separable first block, then
#: inverted residuals
_MBV2_DS = {"conv_dw": 0, "bn1": 1, "conv_pw": 3, "bn2": 4}
_MBV2_IR = {"conv_pw": 0, "bn1": 1, "conv_dw": 3, "bn2": 4, "conv_pwl": 6, "bn3": 7}


def _resnet_backbone_name(key: str, deep_stem: bool) -> str | None:
    """CIRKD's backbone name of a timm ResNet key (``conv1.0.weight`` -> ``conv1.weight``), or ``None``."""
    module, _, param = key.rpartition(".")
    if module.startswith("layer"):
        return key
    if deep_stem:
        if module in _RESNET_DEEP_STEM:
            return f"{_RESNET_DEEP_STEM[module]}.{param}"
        return f"bn3.{param}" if module == "bn1" else None
    return key if module in ("conv1", "bn1") else None


def _mobilenetv2_backbone_name(key: str, stage_sizes: list[int]) -> str | None:
    """CIRKD's name (``features.<i>.conv.<j>.*``) of a timm MobileNetV2 key (``blocks.<s>.<b>.<part>.*``)."""
    if key.startswith("conv_stem."):
        return "features.0.0." + key[len("conv_stem.") :]
    if key.startswith("bn1."):
        return "features.0.1." + key[len("bn1.") :]
    match = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(\w+)\.(.+)", key)
    if match is None:
        return None
    stage, block, part, rest = int(match[1]), int(match[2]), match[3], match[4]
    parts = _MBV2_DS if stage == 0 else _MBV2_IR
    if part not in parts:
        return None
    index = 1 + sum(stage_sizes[:stage]) + block
    return f"features.{index}.conv.{parts[part]}.{rest}"


def _deeplabv3_head_name(key: str) -> str | None:
    """CIRKD's name of a key of smp's DeepLabV3 decoder / head (relative to the smp model)."""
    rules = [
        (r"decoder\.aspp\.convs\.0\.([01])\.(.+)", r"head.aspp.b0.\1.\2"),
        (r"decoder\.aspp\.convs\.([123])\.([01])\.(.+)", r"head.aspp.b\1.block.\2.\3"),
        (r"decoder\.aspp\.convs\.4\.([12])\.(.+)", r"head.aspp.b4.gap.\1.\2"),
        (r"decoder\.aspp\.project\.([01])\.(.+)", r"head.aspp.project.\1.\2"),
        (r"decoder\.conv\.(.+)", r"head.block.0.\1"),
        (r"decoder\.bn\.(.+)", r"head.block.1.\1"),
        (r"segmentation_head\.0\.(.+)", r"head.block.4.\1"),
    ]
    return _apply(rules, key)


def _pspnet_head_name(key: str) -> str | None:
    """CIRKD's name of a key of :class:`~rdd_lightning.pspnet.CIRKDPSPNet`'s decoder / head."""
    match = re.fullmatch(r"decoder\.stages\.(\d)\.([01])\.(.+)", key)
    if match is not None:
        return f"head.psp.conv{int(match[1]) + 1}.{match[2]}.{match[3]}"
    rules = [
        (r"decoder\.bottleneck\.([01])\.(.+)", r"head.block.\1.\2"),
        (r"segmentation_head\.0\.(.+)", r"head.classifier.\1"),
    ]
    return _apply(rules, key)


def _apply(rules: list[tuple[str, str]], key: str) -> str | None:
    for pattern, replacement in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def backbone_names(encoder: nn.Module) -> dict[str, str] | None:
    """``{encoder key: CIRKD ImageNet-file key}`` for every tensor of an smp ``tu-`` encoder over timm's ResNet
    or MobileNetV2, or ``None`` when the encoder has no CIRKD counterpart (smp's native encoders, ...)."""
    keys = list(encoder.state_dict())
    if not keys or not all(k.startswith("model.") for k in keys):
        return None
    inner = [k[len("model.") :] for k in keys]
    if "conv_stem.weight" in inner:
        blocks = getattr(encoder.model, "blocks", None)
        if blocks is None:
            return None
        sizes = [len(stage) for stage in blocks]
        translate = lambda k: _mobilenetv2_backbone_name(k, sizes)  # noqa: E731
    elif any(k.startswith("layer1.") for k in inner):
        deep_stem = "conv1.0.weight" in inner
        translate = lambda k: _resnet_backbone_name(k, deep_stem)  # noqa: E731
    else:
        return None
    names = {}
    for key, rest in zip(keys, inner, strict=True):
        name = translate(rest)
        if name is None:
            return None
        names[key] = name
    return names


def _backbone_prefix(encoder: nn.Module) -> str:
    """Where CIRKD's networks keep the backbone: ``pretrained.`` (ResNets), ``pretrained.net.`` (MobileNetV2)."""
    return "pretrained.net." if "model.conv_stem.weight" in encoder.state_dict() else "pretrained."


def cirkd_names(net: nn.Module) -> dict[str, str] | None:
    """``{key of net.state_dict(): CIRKD's key}`` for a :class:`~rdd_lightning.models.SegmentationNet` whose
    architecture CIRKD has (DeepLabV3 or CIRKDPSPNet over a timm deep-stem ResNet or MobileNetV2, with or
    without the FCN aux head), else ``None``."""
    model = getattr(net, "net", None)
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        return None
    backbone = backbone_names(encoder)
    head = {"DeepLabV3": _deeplabv3_head_name, "CIRKDPSPNet": _pspnet_head_name}.get(getattr(net, "arch", ""))
    if backbone is None or head is None:
        return None
    prefix = _backbone_prefix(encoder)
    names = {}
    for key in net.state_dict():
        if key.startswith("net.encoder."):
            name = prefix + backbone[key[len("net.encoder.") :]]
        elif key.startswith("net."):
            name = head(key[len("net.") :])
        elif key.startswith("aux_head."):
            name = _apply([(r"aux_head\.([014])\.(.+)", r"auxlayer.block.\1.\2")], key)
        else:
            name = None
        if name is None:
            return None
        names[key] = name
    return names


def is_cirkd_network_state(state: Mapping[str, Tensor]) -> bool:
    """``state`` (``module.`` already stripped) is a whole CIRKD network: a ``pretrained.*`` backbone and a
    ``head.*``."""
    return any(k.startswith("pretrained.") for k in state) and any(k.startswith("head.") for k in state)


def infer_cirkd_network(state: Mapping[str, Tensor]) -> tuple[str | None, int | None]:
    """The package config (``cirkd_deeplabv3_resnet18``, ...) of a whole CIRKD network's state dict and its
    number of classes; ``(None, None)`` for anything else (``(None, C)`` for a CIRKD network the package has no
    config of, e.g. a PSPNet-ResNet101)."""
    state = strip_module_prefix(state)
    if not is_cirkd_network_state(state):
        return None, None
    classifier = state.get("head.classifier.weight", state.get("head.block.4.weight"))
    classes = int(classifier.shape[0]) if classifier is not None else None
    head = "pspnet" if any(k.startswith("head.psp.") for k in state) else "deeplabv3"
    if any(k.startswith("pretrained.net.features.") for k in state):
        backbone = "mobilenetv2"
    elif "pretrained.layer3.22.conv1.weight" in state and "pretrained.layer3.23.conv1.weight" not in state:
        backbone = "resnet101"
    elif "pretrained.layer4.1.conv2.weight" in state and "pretrained.layer1.0.conv3.weight" not in state:
        backbone = "resnet18" if "pretrained.layer4.2.conv1.weight" not in state else "resnet34"
    else:
        backbone = None
    return CIRKD_CONFIGS.get((head, backbone)), classes


def to_cirkd_state_dict(net: nn.Module) -> dict[str, Tensor]:
    """``net``'s weights under CIRKD's names (what CIRKD's ``eval.py`` loads with ``--pretrained``).

    Raises:
        ValueError: ``net`` is not one of CIRKD's architectures (see :func:`cirkd_names`).
    """
    names = cirkd_names(net)
    if names is None:
        raise ValueError(
            f"{getattr(net, 'arch', type(net).__name__)} over {getattr(net, 'encoder_name', '?')!r} has no CIRKD "
            f"layout; only the cirkd_* networks (timm deep-stem ResNets / MobileNetV2 under DeepLabV3 or "
            f"CIRKDPSPNet) can be written in it"
        )
    return {names[k]: v.detach().clone() for k, v in net.state_dict().items()}


# ------------------------------------------------------------------------------------------ the loaders
def network_state(state: Mapping[str, Tensor], net: nn.Module) -> dict[str, Tensor]:
    """``state`` (this package's or CIRKD's layout, ``module.`` prefix or not) as ``net``'s state dict.

    Raises:
        WeightMismatch: it does not fit ``net`` exactly.
    """
    state = strip_module_prefix(state)
    target = net.state_dict()
    if is_cirkd_network_state(state):
        names = cirkd_names(net)
        if names is None:
            raise WeightMismatch(
                [], [], {}, "a CIRKD network, which this network cannot hold (not a cirkd_* network)"
            )
        return convert_state(state, target, names, layout="CIRKD's network layout")
    identity = {k: k for k in target}
    return convert_state(state, target, identity, layout="this package's layout")


def encoder_state(state: Mapping[str, Tensor], encoder: nn.Module) -> dict[str, Tensor]:
    """A backbone file's ``state`` (the encoder's own keys, timm's or CIRKD's layout; an ImageNet classifier
    is dropped) as ``encoder``'s state dict.

    Raises:
        WeightMismatch: no layout fits ``encoder`` exactly (the message is that of the closest layout).
    """
    state = strip_module_prefix(state)
    target = encoder.state_dict()
    classifier = CLASSIFIER_KEYS.match
    layouts: dict[str, tuple[dict, Callable]] = {
        "the encoder's own layout": ({k: k for k in target}, classifier)
    }
    if all(k.startswith("model.") for k in target):
        layouts["timm's layout"] = ({k: k[len("model.") :] for k in target}, classifier)
    backbone = backbone_names(encoder)
    if backbone is not None:
        layouts["CIRKD's backbone layout"] = (
            backbone,
            lambda k: bool(re.match(r"^(fc|classifier)\.", k) or MOBILENET_LAST_CONV.match(k)),
        )
    return _closest(state, target, layouts)
