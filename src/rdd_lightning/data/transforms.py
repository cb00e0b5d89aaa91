"""Albumentations pipelines of the paper's recipe: random scale, pad, random crop, flip, normalise."""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from rdd_lightning.data.base import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(
    crop_size: Sequence[int],
    scale_range: Sequence[float] = (0.5, 2.0),
    hflip: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> A.Compose:
    """Random scale in ``scale_range``, pad (image 0, label 255) to and random-crop ``crop_size = (h, w)``,
    horizontal flip, normalise, to tensor. Labels are resized with nearest neighbour."""
    h, w = int(crop_size[0]), int(crop_size[1])
    lo, hi = float(scale_range[0]), float(scale_range[1])
    return A.Compose(
        [
            A.RandomScale(
                scale_limit=(lo - 1.0, hi - 1.0),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                p=1.0,
            ),  # fmt: skip
            A.PadIfNeeded(
                min_height=h,
                min_width=w,
                position="top_left",
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=IGNORE_INDEX,
            ),  # fmt: skip
            A.RandomCrop(height=h, width=w),
            A.HorizontalFlip(p=hflip),
            A.Normalize(mean=tuple(mean), std=tuple(std)),
            ToTensorV2(),
        ]
    )


def eval_transform(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> A.Compose:
    """Whole image, normalised; padding to the network's stride happens at inference."""
    return A.Compose([A.Normalize(mean=tuple(mean), std=tuple(std)), ToTensorV2()])
