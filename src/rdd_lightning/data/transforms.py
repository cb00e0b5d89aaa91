"""Albumentations pipelines of the paper's recipe: random scale, pad, random crop, flip, normalise.

Images enter as ``uint8 [H, W, 3]`` RGB and leave as ``float32 [3, H, W]`` tensors; masks enter as
``uint8 [H, W]`` train ids (void 255) and leave as ``[h, w]`` tensors. Two normalisations are offered
(:data:`NORMALIZATIONS`): ``imagenet`` (RGB, ImageNet mean/std: torchvision and smp encoders) and ``caffe``
(BGR, mean pixel subtracted, no scaling: the authors' code and Caffe-converted ResNets).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import get_worker_info

from rdd_lightning.data.base import IGNORE_INDEX
from rdd_lightning.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Mean pixel (0..255, BGR) that the authors' code (after CIRKD/DeepLab) subtracts from BGR images.
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)


@dataclass(frozen=True)
class Normalization:
    """``x = (pixel / 255 - mean) / std`` per channel, with the channels in BGR order when ``bgr``.

    ``mean`` and ``std`` are fractions of 255 (albumentations' ``Normalize`` convention), in the order the
    network sees the channels.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bgr: bool = False


NORMALIZATIONS = {
    "imagenet": Normalization(IMAGENET_MEAN, IMAGENET_STD, bgr=False),
    "caffe": Normalization(tuple(m / 255 for m in CAFFE_MEAN_BGR), (1 / 255,) * 3, bgr=True),
}


def resolve_normalization(
    name: str = "imagenet", mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> Normalization:
    """The preset ``name`` (``imagenet`` | ``caffe``), with ``mean``/``std`` replacing its values when given."""
    if name not in NORMALIZATIONS:
        raise ConfigError(f"dataset.normalization={name!r}: choose one of {list(NORMALIZATIONS)}")
    preset = NORMALIZATIONS[name]
    for key, value in (("mean", mean), ("std", std)):
        if value is not None and len(value) != 3:
            raise ConfigError(f"dataset.{key}={list(value)}: expected 3 values (one per channel) or null")
    if std is not None and any(s <= 0 for s in std):
        raise ConfigError(f"dataset.std={list(std)}: every value must be > 0")
    return Normalization(
        mean=tuple(float(m) for m in (preset.mean if mean is None else mean)),
        std=tuple(float(s) for s in (preset.std if std is None else std)),
        bgr=preset.bgr,
    )


class RGBToBGR(A.ImageOnlyTransform):
    """Reverse the channel order of an ``[H, W, 3]`` image (for networks trained on BGR input)."""

    def __init__(self, p: float = 1.0):
        super().__init__(p=p)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return np.ascontiguousarray(img[..., ::-1])

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ()


def _channel_order(bgr: bool) -> list[A.BasicTransform]:
    return [RGBToBGR()] if bgr else []


def train_transform(
    crop_size: Sequence[int],
    scale_range: Sequence[float] = (0.5, 2.0),
    hflip: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    bgr: bool = False,
    interpolation: int = cv2.INTER_LINEAR,
    seed: int | None = None,
) -> A.Compose:
    """Random scale in ``scale_range``, pad to and random-crop ``crop_size = (h, w)``, horizontal flip with
    probability ``hflip``, normalise, to tensor.

    Padding goes to the bottom and right: the image with its mean colour (0 after normalisation, as in the
    authors' code), the label with 255. Labels are resized with nearest neighbour, images with
    ``interpolation``. ``seed`` seeds the pipeline's own random generator (see :func:`seed_worker`).
    """
    h, w = int(crop_size[0]), int(crop_size[1])
    lo, hi = float(scale_range[0]), float(scale_range[1])
    if not 0 < lo <= hi:
        raise ConfigError(f"dataset.scale_range={[lo, hi]}: expected 0 < low <= high")
    mean_pixel = tuple(float(round(m * 255)) for m in mean)
    return A.Compose(
        [
            *_channel_order(bgr),
            A.RandomScale(
                scale_limit=(lo - 1.0, hi - 1.0),
                interpolation=interpolation,
                mask_interpolation=cv2.INTER_NEAREST,
                p=1.0,
            ),
            A.PadIfNeeded(
                min_height=h,
                min_width=w,
                position="top_left",
                border_mode=cv2.BORDER_CONSTANT,
                fill=mean_pixel,
                fill_mask=IGNORE_INDEX,
            ),
            A.RandomCrop(height=h, width=w),
            A.HorizontalFlip(p=hflip),
            A.Normalize(mean=tuple(mean), std=tuple(std)),
            ToTensorV2(),
        ],
        seed=seed,
    )


def eval_transform(
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, bgr: bool = False
) -> A.Compose:
    """Whole image, normalised; padding to the network's stride happens at inference."""
    return A.Compose([*_channel_order(bgr), A.Normalize(mean=tuple(mean), std=tuple(std)), ToTensorV2()])


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` of the loaders: give each worker's augmentation its own random stream.

    An albumentations ``Compose`` draws from its own generator, which every forked worker would otherwise
    inherit in the same state (worker 0 and 1 would crop and flip alike, and each epoch of non-persistent
    workers would repeat the last). The stream is seeded from the worker's torch seed, which differs per
    worker, per epoch and (after Lightning's seeding, kept here when ``seed_everything(workers=True)`` asked
    for it) per process, and is reproducible under ``seed_everything``.
    """
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)
    info = get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if isinstance(transform, A.Compose):
        transform.set_random_seed(torch.initial_seed() % 2**32)
