"""The files the benchmark servers take: one PNG per test image, named, encoded and laid out as each wants.

* ``cityscapes`` (cityscapes-dataset.com): ``<city>/<city>_<seq>_<frame>_leftImg8bit.png`` per
  ``*_leftImg8bit.png`` test image, 8-bit grayscale **label ids** (the 19 train ids mapped back through the
  Cityscapes label table: road 7, sidewalk 8, ..., bicycle 33), packed as ``cityscapes.zip``.
* ``ade20k`` (the MIT scene-parsing benchmark): ``<image name>.png``, 8-bit grayscale ``1..150``
  (train id + 1; 0, "other", is never predicted), packed as ``ade20k.zip``.
* ``voc`` (the PASCAL VOC 2012 server): ``results/VOC2012/Segmentation/comp6_test_cls/<image id>.png``,
  palette-mode PNGs of the class ids ``0..20`` with the VOC colour map, packed as ``voc.tar.gz``. ``comp6``
  is the competition of methods trained on more than VOC's own labels (this package's VOC recipe trains on
  the SBD-augmented set).

Plain numpy and PIL; ``rdd_lightning.predict`` calls :func:`submission_format` and writes through it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from rdd_lightning.data.cityscapes import LABEL_ID_TO_TRAIN_ID
from rdd_lightning.data.voc import voc_colormap
from rdd_lightning.errors import ConfigError

#: train id -> Cityscapes label id of the 19 evaluated classes (the inverse of the dataset's mapping).
TRAIN_ID_TO_LABEL_ID = np.array(
    [label_id for label_id, _ in sorted(LABEL_ID_TO_TRAIN_ID.items(), key=lambda item: item[1])],
    dtype=np.uint8,
)
CITYSCAPES_NAME = re.compile(r"(?P<city>[^_/]+)_\d{6}_\d{6}_leftImg8bit")


class SubmissionFormat:
    """How one server wants its files: :meth:`relative_path` of each image's file in the submission folder,
    :meth:`encode` of its classes, and the archive (``zip`` or ``gztar``) of the folder that it takes."""

    name: ClassVar[str]
    num_classes: ClassVar[int]
    archive_format: ClassVar[str] = "zip"

    def check_classes(self, num_classes: int, where: str) -> None:
        if num_classes != self.num_classes:
            raise ConfigError(
                f"submission={self.name} needs a network of the {self.num_classes} {self.name} classes; "
                f"{where} predicts {num_classes}"
            )

    def relative_path(self, name: str) -> str:
        """Where the file of the image named ``name`` (its relative path without suffix) goes."""
        return f"{Path(name).name}.png"

    def encode(self, classes: np.ndarray) -> Image.Image:
        """The PNG of predicted classes ``int [H, W]`` (train ids ``0..C-1``)."""
        raise NotImplementedError

    def archive_name(self) -> str:
        return self.name + (".tar.gz" if self.archive_format == "gztar" else ".zip")

    def write_archive(self, folder: Path, archive: Path) -> Path:
        """Pack ``folder`` (the written files) as the server takes them into ``archive``."""
        base = (
            str(archive)[: -len(".tar.gz")]
            if self.archive_format == "gztar"
            else str(archive.with_suffix(""))
        )
        return Path(shutil.make_archive(base, self.archive_format, root_dir=folder))


class CityscapesSubmission(SubmissionFormat):
    name = "cityscapes"
    num_classes = 19

    def relative_path(self, name: str) -> str:
        stem = Path(name).name
        match = CITYSCAPES_NAME.fullmatch(stem)
        if match is None:
            raise ConfigError(
                f"submission=cityscapes: image {name!r} is not named <city>_<seq>_<frame>_leftImg8bit (the "
                f"server finds each prediction by that name); predict the images of leftImg8bit/test/"
            )
        return f"{match['city']}/{stem}.png"

    def encode(self, classes: np.ndarray) -> Image.Image:
        return Image.fromarray(TRAIN_ID_TO_LABEL_ID[classes], mode="L")


class ADE20KSubmission(SubmissionFormat):
    name = "ade20k"
    num_classes = 150

    def encode(self, classes: np.ndarray) -> Image.Image:
        return Image.fromarray((classes + 1).astype(np.uint8), mode="L")


class VOCSubmission(SubmissionFormat):
    name = "voc"
    num_classes = 21
    archive_format = "gztar"
    FOLDER: ClassVar[str] = "results/VOC2012/Segmentation/comp6_test_cls"

    def relative_path(self, name: str) -> str:
        return f"{self.FOLDER}/{Path(name).name}.png"

    def encode(self, classes: np.ndarray) -> Image.Image:
        image = Image.fromarray(classes.astype(np.uint8), mode="P")
        image.putpalette([value for colour in voc_colormap(256) for value in colour])
        return image


FORMATS: dict[str, type[SubmissionFormat]] = {
    cls.name: cls for cls in (CityscapesSubmission, ADE20KSubmission, VOCSubmission)
}


def submission_format(name: str) -> SubmissionFormat:
    """The format of ``submission=<name>``."""
    if name not in FORMATS:
        raise ConfigError(f"submission={name!r}: choose one of {list(FORMATS)} (or null for none)")
    return FORMATS[name]()
