"""Cityscapes (fine annotations): 19 train classes, 2975 train / 500 val / 1525 test images at 1024x2048."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rdd_lightning.data.base import IGNORE_INDEX, SegmentationDataset, pair_by_stem

CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

#: The colours of the 19 train classes in Cityscapes' label table.
CITYSCAPES_PALETTE = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)

#: labelId -> train id of the 19 evaluated classes. Every other labelId of the table (0..33: unlabeled,
#: ego vehicle, ..., parking, rail track, guard rail, bridge, tunnel, polegroup, caravan, trailer) is void.
LABEL_ID_TO_TRAIN_ID = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}
NUM_LABEL_IDS = 34  # labelIds 0..33; license plate (-1) is never written to the label files


class Cityscapes(SegmentationDataset):
    """``root/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with ``root/gtFine/<split>/<city>/
    *_gtFine_labelIds.png``; labelIds are mapped to the 19 train ids, everything else to 255."""

    NUM_CLASSES = 19
    CLASS_NAMES = CITYSCAPES_CLASSES
    PALETTE = CITYSCAPES_PALETTE
    LAYOUT = (
        "root/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png and "
        "root/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png "
        "(the two zips unpacked into one folder)"
    )
    SOURCE = (
        "https://www.cityscapes-dataset.com/downloads/ (leftImg8bit_trainvaltest.zip and "
        "gtFine_trainvaltest.zip; free registration)"
    )
    SPLIT_SIZES = {"train": 2975, "val": 500, "test": 1525}
    IMAGE_SUFFIX = "_leftImg8bit"
    LABEL_SUFFIX = "_gtFine_labelIds"

    def find_pairs(self, root: Path, split: str) -> list[tuple[Path, Path]]:
        images = sorted((root / "leftImg8bit" / split).glob(f"*/*{self.IMAGE_SUFFIX}.png"))
        labels = sorted((root / "gtFine" / split).glob(f"*/*{self.LABEL_SUFFIX}.png"))
        where = f"{root}/leftImg8bit/{split} vs {root}/gtFine/{split} (*{self.LABEL_SUFFIX}.png)"
        return pair_by_stem(images, labels, where, suffix=self.LABEL_SUFFIX, image_suffix=self.IMAGE_SUFFIX)

    def find_images(self, root: Path, split: str) -> list[Path]:
        """The split's ``*_leftImg8bit.png`` images, without looking for labels (the test split's are dummies)."""
        return sorted((root / "leftImg8bit" / split).glob(f"*/*{self.IMAGE_SUFFIX}.png"))

    def label_lut(self) -> np.ndarray:
        lut = np.full(256, -1, dtype=np.int64)
        lut[:NUM_LABEL_IDS] = IGNORE_INDEX
        for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
            lut[label_id] = train_id
        lut[IGNORE_INDEX] = IGNORE_INDEX  # license plate (-1) if a converter wrote it as uint8
        return lut
