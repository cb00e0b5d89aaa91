"""PASCAL VOC 2012 with the SBD-augmented training set: 21 classes, 10582 train_aug / 1449 val images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rdd_lightning.data.base import IGNORE_INDEX, SegmentationDataset, first_existing, missing_files_error
from rdd_lightning.errors import ConfigError

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def voc_colormap(n: int = 256) -> tuple[tuple[int, int, int], ...]:
    """VOC's label colours: the bits of index ``i`` spread over r, g, b from the most significant bit down.

    Returns ``n`` ``(r, g, b)`` tuples; index 255 (void) is ``(224, 224, 192)``.
    """
    colours = []
    for index in range(n):
        rgb = [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
        colours.append(tuple(rgb))
    return tuple(colours)


VOC_PALETTE = voc_colormap(21)

# Names the SBD-augmented training list goes by (mmsegmentation, DeepLab, deeplab-pytorch), in this order.
TRAIN_AUG_LISTS = (
    "ImageSets/Segmentation/train_aug.txt",
    "ImageSets/Segmentation/trainaug.txt",
    "ImageSets/SegmentationAug/train_aug.txt",
    "ImageSets/SegmentationAug/trainaug.txt",
)
VAL_LIST = "ImageSets/Segmentation/val.txt"
TEST_LIST = (
    "ImageSets/Segmentation/test.txt"  # of VOC2012test.tar (the evaluation server's images, no labels)
)
# Where VOC2012 may sit below dataset.root: the VOC2012 folder itself, VOCdevkit, or VOCdevkit's parent.
ROOT_CANDIDATES = ("", "VOC2012", "VOCdevkit/VOC2012")


def read_id_list(path: Path) -> list[str]:
    """Image ids of a VOC list file: one id per line (``2007_000032``) or DeepLab's two-column form
    (``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``); blank lines are skipped."""
    ids = []
    for line in path.read_text().splitlines():
        if line.strip():
            ids.append(Path(line.split()[0]).stem)
    return ids


class VOC(SegmentationDataset):
    """VOC 2012 + SBD: ``train`` = ``JPEGImages`` with ``SegmentationClassAug`` labels listed by the
    train_aug list, ``val`` = ``SegmentationClass`` labels listed by ``val.txt``. Labels 0..20, 255 void;
    palette PNGs and grayscale PNGs both work."""

    NUM_CLASSES = 21
    CLASS_NAMES = VOC_CLASSES
    PALETTE = VOC_PALETTE
    SPLITS = ("train", "val")
    SPLIT_SIZES = {"train": 10582, "val": 1449, "test": 1456}
    IMAGE_ONLY_SPLITS = ("test",)  # VOC2012test.tar's images, listed by ImageSets/Segmentation/test.txt
    LAYOUT = (
        "root = VOCdevkit/VOC2012 (or VOCdevkit, or its parent) with JPEGImages/*.jpg, "
        "SegmentationClass/*.png, SegmentationClassAug/*.png, ImageSets/Segmentation/val.txt and the "
        f"SBD training list as one of {list(TRAIN_AUG_LISTS)}"
    )
    SOURCE = (
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ (VOCtrainval_11-May-2012.tar) plus the SBD "
        "labels converted to SegmentationClassAug/ with the 10582-image train_aug list (e.g. mmsegmentation's "
        "tools/dataset_converters/voc_aug.py on SBD's benchmark.tgz)"
    )

    def find_pairs(self, root: Path, split: str) -> list[tuple[Path, Path]]:
        voc = first_existing(root, ROOT_CANDIDATES, "JPEGImages")
        if voc is None:
            raise ConfigError(
                f"VOC: no JPEGImages/ in dataset.root={str(root)!r} or in its VOC2012/ or VOCdevkit/VOC2012/. "
                f"Expected layout: {self.LAYOUT}. Get the data from {self.SOURCE}."
            )
        if split == "train":
            list_file = first_existing(voc, TRAIN_AUG_LISTS, "")
            if list_file is None:
                raise ConfigError(
                    f"VOC: no SBD training list in {str(voc)!r}; looked for {list(TRAIN_AUG_LISTS)}. "
                    f"Get it (and SegmentationClassAug/) from {self.SOURCE}."
                )
            label_dir = voc / "SegmentationClassAug"
        else:
            list_file, label_dir = voc / VAL_LIST, voc / "SegmentationClass"
            if not list_file.is_file():
                raise ConfigError(f"VOC: {str(list_file)!r} not found. Expected layout: {self.LAYOUT}.")
        if not label_dir.is_dir():
            raise ConfigError(
                f"VOC: no {label_dir.name}/ folder in {str(voc)!r} (the {split!r} labels). "
                f"Get it from {self.SOURCE}."
            )
        ids = read_id_list(list_file)
        pairs = [(voc / "JPEGImages" / f"{i}.jpg", label_dir / f"{i}.png") for i in ids]
        for position, kind in ((0, "image"), (1, "label")):
            missing = [pair[position] for pair in pairs if not pair[position].is_file()]
            if missing:
                raise missing_files_error(f"VOC list {str(list_file)!r}", kind, missing)
        return sorted(pairs)

    def find_images(self, root: Path, split: str) -> list[Path]:
        """``train``/``val``: the images of :meth:`find_pairs`; ``test``: ``JPEGImages/<id>.jpg`` of the ids in
        ``ImageSets/Segmentation/test.txt`` (VOC2012test.tar unpacked over the same VOC2012 folder)."""
        if split != "test":
            return super().find_images(root, split)
        voc = first_existing(root, ROOT_CANDIDATES, TEST_LIST)
        if voc is None:
            raise ConfigError(
                f"VOC: no {TEST_LIST} in dataset.root={str(root)!r} or in its VOC2012/ or VOCdevkit/VOC2012/; "
                f"unpack VOC2012test.tar (the evaluation server's test images) there"
            )
        images = [voc / "JPEGImages" / f"{i}.jpg" for i in read_id_list(voc / TEST_LIST)]
        missing = [p for p in images if not p.is_file()]
        if missing:
            raise missing_files_error(f"VOC list {str(voc / TEST_LIST)!r}", "image", missing)
        return sorted(images)

    def label_lut(self) -> np.ndarray:
        lut = np.full(256, -1, dtype=np.int64)
        lut[: self.NUM_CLASSES] = np.arange(self.NUM_CLASSES)
        lut[IGNORE_INDEX] = IGNORE_INDEX  # object borders and difficult regions
        return lut
