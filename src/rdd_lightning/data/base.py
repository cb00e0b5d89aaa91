"""The file-backed segmentation dataset every concrete dataset derives from.

A concrete dataset says where its files are (:meth:`SegmentationDataset.find_pairs`) and how its raw label
values map to train ids (:meth:`SegmentationDataset.label_lut`); this class reads, checks and transforms.
Labels come out as ``int64 [H, W]`` with void = 255 whatever the dataset's own encoding.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from rdd_lightning.errors import ConfigError

IGNORE_INDEX = 255
_INVALID = -1  # LUT entry of a raw label value that is neither a class nor void


class SegmentationDataset(Dataset):
    """Image/label file pairs of one split, decoded to ``(image uint8 [H,W,3], label int64 [H,W])``.

    Args:
        root: dataset folder (layout in the subclass's ``LAYOUT``).
        split: ``train``, ``val``, ``test`` (what the subclass offers).
        transform: an albumentations ``Compose`` called as ``transform(image=..., mask=...)`` that returns a
            float image tensor ``[3,H,W]`` and a mask; ``None`` returns numpy arrays.

    Items are dicts ``{"image": [3,H,W] float, "mask": int64 [H,W], "name": str}``.
    """

    NUM_CLASSES: ClassVar[int]
    CLASS_NAMES: ClassVar[Sequence[str]]
    LAYOUT: ClassVar[str]  # the expected folder layout, shown when files are missing
    SOURCE: ClassVar[str]  # where the data is obtained
    SPLITS: ClassVar[Sequence[str]] = ("train", "val", "test")

    def __init__(self, root: str | os.PathLike, split: str, transform: Callable[..., dict] | None = None):
        self.root = Path(root)
        self.split = split
        self.transform = transform
        if split not in self.SPLITS:
            raise ConfigError(
                f"{type(self).__name__}: unknown split {split!r}; choose one of {list(self.SPLITS)}"
            )
        if not self.root.is_dir() or not any(self.root.iterdir()):
            raise ConfigError(
                f"{type(self).__name__}: dataset.root={str(self.root)!r} is missing or empty. Expected layout: "
                f"{self.LAYOUT}. Get the data from {self.SOURCE} and pass dataset.root=/path/to/it "
                f"(or set RDD_DATA_DIR)."
            )
        self.pairs = self.find_pairs(self.root, split)
        if not self.pairs:
            raise ConfigError(
                f"{type(self).__name__}: no {split!r} images under {str(self.root)!r}. Expected layout: {self.LAYOUT}."
            )
        self._lut = self.label_lut()

    # -- to be provided by each dataset -------------------------------------------------------------------
    def find_pairs(self, root: Path, split: str) -> list[tuple[Path, Path]]:
        raise NotImplementedError

    def label_lut(self) -> np.ndarray:
        """``int64 [256]``: raw label value -> train id, 255 for void, -1 for values that must not occur."""
        raise NotImplementedError

    # -- reading ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.pairs)

    def read_image(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read image {str(path)!r}: {err}") from err

    def read_label(self, path: Path) -> np.ndarray:
        """Train-id label ``int64 [H, W]`` (void 255) of one file; bad values raise naming file and value."""
        try:
            with Image.open(path) as img:
                raw = np.asarray(img)  # palette PNGs give their indices, as VOC needs
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read label {str(path)!r}: {err}") from err
        if raw.ndim != 2:
            raise ConfigError(
                f"label {str(path)!r} has shape {raw.shape}; expected a single-channel PNG of class ids"
            )
        label = self._lut[raw]
        if (label == _INVALID).any():
            bad = sorted(int(v) for v in np.unique(raw[label == _INVALID]))[:10]
            raise ConfigError(
                f"label {str(path)!r} holds value(s) {bad} that are neither a class of "
                f"{type(self).__name__} (0..{self.NUM_CLASSES - 1} after mapping) nor void"
            )
        return label

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, label_path = self.pairs[index]
        image, label = self.read_image(image_path), self.read_label(label_path)
        if image.shape[:2] != label.shape:
            raise ConfigError(
                f"{str(image_path)!r} is {image.shape[:2]} but its label {str(label_path)!r} is {label.shape}"
            )
        if self.transform is not None:
            out = self.transform(image=image, mask=label.astype(np.uint8))
            image, label = out["image"], torch.as_tensor(out["mask"]).long()
        return {"image": image, "mask": label, "name": image_path.stem}


def pair_by_stem(
    images: Sequence[Path], labels: Sequence[Path], where: str, suffix: str = ""
) -> list[tuple[Path, Path]]:
    """Pair image and label files whose stems match (``suffix`` stripped from label stems).

    Raises a :class:`ConfigError` naming the first few unpaired files on either side.
    """
    by_stem = {
        p.stem[: len(p.stem) - len(suffix)] if suffix and p.stem.endswith(suffix) else p.stem: p
        for p in labels
    }
    image_stems = {p.stem for p in images}
    missing_labels = [p.name for p in images if p.stem not in by_stem]
    missing_images = [p.name for s, p in by_stem.items() if s not in image_stems]
    if missing_labels or missing_images:
        parts = []
        if missing_labels:
            parts.append(f"{len(missing_labels)} image(s) without a label, e.g. {missing_labels[:3]}")
        if missing_images:
            parts.append(f"{len(missing_images)} label(s) without an image, e.g. {missing_images[:3]}")
        raise ConfigError(f"{where}: " + "; ".join(parts))
    return [(p, by_stem[p.stem]) for p in sorted(images)]
