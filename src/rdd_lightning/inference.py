"""Dense prediction on whole images: whole-image, sliding-window, and multi-scale + flip inference.

Plain torch functions (no Lightning, no Hydra); training-time validation and ``rdd_lightning.evaluate`` both
call :func:`predict_logits`. A network is any module that maps ``[B, 3, h, w]`` to logits ``[B, C, h/s, w/s]``
(a :class:`~rdd_lightning.models.SegOutput` or a bare tensor), where ``s`` is its ``output_stride``
attribute (1 when absent); ``h`` and ``w`` must be multiples of ``s``.

Conventions: every function returns float32 class scores ``[B, C, H, W]`` (logits, or log probabilities
when several views are merged) at the size of its input images ``[B, 3, H, W]``; the caller takes the
``argmax`` over ``C``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdd_lightning.errors import ConfigError

MODES = ("whole", "slide")


# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class InferenceConfig:
    """How a network is run on full-size images (the ``inference`` config key).

    Attributes:
        mode: ``whole`` (the whole image in one forward pass) or ``slide`` (overlapping windows).
        window: ``(h, w)`` window of ``slide`` mode, in pixels of the (rescaled) image.
        stride: ``(h, w)`` step between windows; at most ``window``. ``None`` in ``slide`` mode: two thirds
            of the window, rounded up (adjacent windows overlap by a third).
        scales: image scales whose predictions are merged (``(1.0,)``: the input size only).
        flip: also predict on the horizontally flipped image.
    """

    mode: str = "whole"
    window: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"inference.mode={self.mode!r}: choose one of {list(MODES)}")
        if self.mode == "slide":
            if self.window is None:
                raise ConfigError(
                    "inference.mode=slide needs inference.window=[height,width] (e.g. the training crop size)"
                )
            stride = self.stride or tuple(math.ceil(2 * n / 3) for n in self.window)
            object.__setattr__(self, "stride", stride)
            if any(s > w for s, w in zip(stride, self.window, strict=True)):
                raise ConfigError(
                    f"inference.stride={list(stride)} exceeds inference.window={list(self.window)}: pixels "
                    f"between windows would never be predicted; use a stride of at most the window"
                )
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ConfigError(
                f"inference.scales={list(self.scales)}: give one or more positive scales, e.g. [1.0]"
            )

    @classmethod
    def from_any(cls, config: InferenceConfig | Mapping[str, Any] | None) -> InferenceConfig:
        """An :class:`InferenceConfig` from itself, a (config) mapping with any of its keys, or ``None``
        (the default: whole-image, single scale, no flip)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        unknown = set(config) - {"mode", "window", "stride", "scales", "flip"}
        if unknown:
            raise ConfigError(
                f"inference: unknown key(s) {sorted(unknown)}; known: mode, window, stride, scales, flip"
            )
        return cls(
            mode=str(config.get("mode", "whole")),
            window=_pair(config.get("window"), "inference.window"),
            stride=_pair(config.get("stride"), "inference.stride"),
            scales=_scales(config.get("scales")),
            flip=bool(config.get("flip", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples) for hyper-parameters, checkpoints and ``results.json``."""
        return {
            "mode": self.mode,
            "window": list(self.window) if self.window else None,
            "stride": list(self.stride) if self.stride else None,
            "scales": list(self.scales),
            "flip": self.flip,
        }

    @property
    def single_view(self) -> bool:
        """One forward view (scale 1, no flip): the result is the network's own logits."""
        return tuple(self.scales) == (1.0,) and not self.flip


def _scales(value: float | Sequence[float] | None) -> tuple[float, ...]:
    """``None`` (-> ``(1.0,)``), one scale or a list of scales -> a tuple of floats (checked by the config)."""
    if value is None:
        return (1.0,)
    if isinstance(value, int | float):
        return (float(value),)
    return tuple(float(s) for s in value)


def _pair(value: int | Sequence[int] | None, key: str) -> tuple[int, int] | None:
    """``None``, ``n`` or ``[h, w]`` -> ``None`` or ``(h, w)`` of positive ints."""
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(int(v) != v or v < 1 for v in pair):
        raise ConfigError(f"{key}={value!r}: expected [height, width] in pixels (positive integers)")
    return int(pair[0]), int(pair[1])


# ------------------------------------------------------------------------------------------------ whole
def network_logits(net: nn.Module, images: Tensor) -> Tensor:
    """Float32 logits ``[B, C, h', w']`` of ``net`` on ``images [B, 3, h, w]`` at the network's resolution."""
    out = net(images)
    return getattr(out, "logits", out).float()


def stride_padding(height: int, width: int, stride: int) -> tuple[int, int]:
    """``(rows, columns)`` to add at the bottom/right of a ``height x width`` image so that both sides become
    multiples of ``stride``. TorchScript-compatible (the exported networks of ``rdd_lightning.export`` call
    it inside their graph)."""
    return (-height) % stride, (-width) % stride


def pad_to_stride(net: nn.Module, images: Tensor) -> Tensor:
    """``images [B, 3, H, W]`` zero-padded at the bottom/right to the next multiple of ``net.output_stride``
    (``images`` itself when ``H`` and ``W`` already are multiples)."""
    h, w = images.shape[-2:]
    pad_h, pad_w = stride_padding(h, w, int(getattr(net, "output_stride", 1)))
    return F.pad(images, (0, pad_w, 0, pad_h)) if (pad_h or pad_w) else images


def resize_and_crop(logits: Tensor, padded_size: list[int], size: list[int]) -> Tensor:
    """Logits ``[B, C, h', w']`` of a padded image upsampled bilinearly (``align_corners=True``) to
    ``padded_size = [H', W']`` and cropped to the image's ``size = [H, W]`` (top-left). TorchScript-compatible."""
    logits = F.interpolate(logits, size=padded_size, mode="bilinear", align_corners=True)
    return logits[:, :, : size[0], : size[1]]


@torch.no_grad()
def whole_image_logits(net: nn.Module, images: Tensor) -> Tensor:
    """Logits ``[B, C, H, W]`` of ``images [B, 3, H, W]`` in one forward pass.

    Images whose size is not a multiple of ``net.output_stride`` are zero-padded at the bottom/right to the
    next multiple; the logits are upsampled bilinearly (``align_corners=True``) to the padded size and
    cropped back to ``H x W``.
    """
    padded = pad_to_stride(net, images)
    return resize_and_crop(network_logits(net, padded), list(padded.shape[-2:]), list(images.shape[-2:]))


# ------------------------------------------------------------------------------------------------ slide
def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of size ``min(window, length)`` every ``stride`` pixels along ``length``;
    the last window ends exactly at ``length`` (so every pixel is covered when ``stride <= window``)."""
    window = min(window, length)
    count = math.ceil((length - window) / stride) + 1
    return [min(i * stride, length - window) for i in range(count)]


def window_boxes(
    size: tuple[int, int], window: tuple[int, int], stride: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """Windows ``(top, bottom, left, right)`` (bottom/right exclusive) tiling an image of ``size (H, W)``.

    A window larger than the image is shrunk to the image along that side (one window covers it).
    """
    (h, w), (wh, ww), (sh, sw) = size, window, stride
    return [
        (top, top + min(wh, h), left, left + min(ww, w))
        for top in window_starts(h, wh, sh)
        for left in window_starts(w, ww, sw)
    ]


@torch.no_grad()
def sliding_window_logits(
    net: nn.Module, images: Tensor, window: tuple[int, int], stride: tuple[int, int]
) -> Tensor:
    """Logits ``[B, C, H, W]`` of ``images [B, 3, H, W]`` from overlapping windows.

    Each window (``window = (h, w)`` pixels, moved by ``stride = (h, w)``, the last one aligned to the
    bottom/right border) goes through :func:`whole_image_logits` (so it is padded to the network's stride
    where needed); logits of pixels covered by several windows are averaged. An image no larger than the
    window along a side has one window along that side that spans it: a window at least as large as the image
    gives exactly :func:`whole_image_logits`.
    """
    size = (images.shape[-2], images.shape[-1])
    total: Tensor | None = None
    count = torch.zeros((1, 1, *size), device=images.device)
    for top, bottom, left, right in window_boxes(size, window, stride):
        logits = whole_image_logits(net, images[..., top:bottom, left:right])
        if total is None:
            total = logits.new_zeros((images.shape[0], logits.shape[1], *size))
        total[..., top:bottom, left:right] += logits
        count[..., top:bottom, left:right] += 1
    return total / count


# ------------------------------------------------------------------------------------------------ TTA
def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """``(H, W)`` scaled by ``scale`` and rounded, at least one pixel per side."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def single_view_logits(net: nn.Module, images: Tensor, config: InferenceConfig) -> Tensor:
    """Logits ``[B, C, H, W]`` of ``images [B, 3, H, W]`` by ``config.mode`` at the input scale, no flip."""
    if config.mode == "slide":
        return sliding_window_logits(net, images, config.window, config.stride)
    return whole_image_logits(net, images)


@torch.no_grad()
def predict_logits(
    net: nn.Module, images: Tensor, config: InferenceConfig | Mapping[str, Any] | None = None
) -> Tensor:
    """Scores ``[B, C, H, W]`` of ``images [B, 3, H, W]`` as ``config`` says (default: whole image).

    With one view (``scales=[1.0]``, ``flip=false``) these are the network's logits of
    :func:`single_view_logits`. With several views (each scale ``s``: the image resized bilinearly to
    ``round(s * H) x round(s * W)``, predicted by ``config.mode``, the logits resized back to ``H x W``;
    with ``flip`` each of these also on the horizontally flipped image, flipped back), the class
    *probabilities* (softmax) of the views are averaged, as the multi-scale evaluations of PSPNet and
    DeepLabV3 (and the KD-for-segmentation papers that report them) do; the result is returned as log
    probabilities ``log(mean_v softmax(logits_v))``, so ``softmax``/``argmax`` of it are the merged ones.
    """
    config = InferenceConfig.from_any(config)
    if config.single_view:
        return single_view_logits(net, images, config)
    size = (images.shape[-2], images.shape[-1])
    probs: Tensor | None = None
    views = 0
    for scale in config.scales:
        scaled = images if scale == 1.0 else _resize(images, scaled_size(size, scale))
        for flip in (False, True) if config.flip else (False,):
            view = scaled.flip(-1) if flip else scaled
            logits = single_view_logits(net, view, config)
            logits = logits.flip(-1) if flip else logits
            logits = logits if scale == 1.0 else _resize(logits, size)
            p = logits.softmax(1)
            probs = p if probs is None else probs + p
            views += 1
    return (probs / views).clamp_min(torch.finfo(probs.dtype).tiny).log()
