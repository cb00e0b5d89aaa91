"""The file-backed segmentation dataset every concrete dataset derives from.

A concrete dataset says where its files are (:meth:`SegmentationDataset.find_pairs`) and how its raw label
values map to train ids (:meth:`SegmentationDataset.label_lut`); this class reads, checks and transforms.
Labels come out as ``int64 [H, W]`` with void = 255 whatever the dataset's own encoding.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from rdd_lightning.errors import ConfigError

IGNORE_INDEX = 255
_INVALID = -1  # LUT entry of a raw label value that is neither a class nor void
# what PIL raises for a missing, truncated or corrupt file
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class SegmentationDataset(Dataset):
    """Image/label file pairs of one split, decoded to ``(image uint8 [H,W,3] RGB, label int64 [H,W])``.

    Args:
        root: dataset folder (layout in the subclass's ``LAYOUT``).
        split: one of the subclass's ``SPLITS`` (or a name in its ``SPLIT_ALIASES``).
        transform: an albumentations ``Compose`` called as ``transform(image=..., mask=...)`` that returns a
            float image tensor ``[3,H,W]`` and a mask; ``None`` returns numpy arrays.
        labels: ``False`` lists the split's images alone (:meth:`find_images`; for prediction, which needs no
            labels): the split may then also be one of ``IMAGE_ONLY_SPLITS`` (a benchmark's test images, whose
            labels are withheld), and :attr:`pairs` holds ``(image, None)``. Only :attr:`pairs` is meant to
            be read then (the items need labels).

    Items are dicts ``{"image": [3,H,W] float, "mask": int64 [H,W], "name": str}``.
    """

    NUM_CLASSES: ClassVar[int]
    CLASS_NAMES: ClassVar[Sequence[str]]
    PALETTE: ClassVar[Sequence[Sequence[int]] | None] = None  # [r, g, b] per class, the dataset's own
    LAYOUT: ClassVar[str]  # the expected folder layout, shown when files are missing
    SOURCE: ClassVar[str]  # where the data is obtained
    SPLITS: ClassVar[Sequence[str]] = ("train", "val", "test")
    SPLIT_ALIASES: ClassVar[Mapping[str, str]] = {}  # other accepted split names -> a name in SPLITS
    SPLIT_SIZES: ClassVar[Mapping[str, int]] = {}  # images per split of the published dataset
    IMAGE_ONLY_SPLITS: ClassVar[Sequence[str]] = ()  # splits published without labels (benchmark test sets)

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        transform: Callable[..., dict] | None = None,
        *,
        labels: bool = True,
    ):
        self.root = Path(root)
        self.split = self.SPLIT_ALIASES.get(split, split)
        self.transform = transform
        known = [*self.SPLITS, *([] if labels else self.IMAGE_ONLY_SPLITS)]
        if self.split not in known:
            raise ConfigError(f"{type(self).__name__}: unknown split {split!r}; choose one of {known}")
        if not self.root.is_dir() or not any(self.root.iterdir()):
            raise ConfigError(
                f"{type(self).__name__}: dataset.root={str(self.root)!r} is missing or empty. Expected layout: "
                f"{self.LAYOUT}. Get the data from {self.SOURCE} and pass dataset.root=/path/to/it "
                f"(or set RDD_DATA_DIR)."
            )
        if labels:
            self.pairs = self.find_pairs(self.root, self.split)
        else:
            self.pairs = [(image, None) for image in self.find_images(self.root, self.split)]
        if not self.pairs:
            raise ConfigError(
                f"{type(self).__name__}: no {self.split!r} images under {str(self.root)!r}. "
                f"Expected layout: {self.LAYOUT}."
            )
        self._lut = self.label_lut()

    # -- to be provided by each dataset -------------------------------------------------------------------
    def find_pairs(self, root: Path, split: str) -> list[tuple[Path, Path]]:
        """``(image, label)`` paths of ``split``, sorted; missing or unpaired files raise a ConfigError."""
        raise NotImplementedError

    def label_lut(self) -> np.ndarray:
        """``int64 [256]``: raw label value -> train id, 255 for void, -1 for values that must not occur."""
        raise NotImplementedError

    def find_images(self, root: Path, split: str) -> list[Path]:
        """Image paths of ``split``, sorted, whether or not labels exist (default: those of
        :meth:`find_pairs`; a dataset with ``IMAGE_ONLY_SPLITS`` lists those here)."""
        return [image for image, _ in self.find_pairs(root, split)]

    # -- reading ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.pairs)

    def read_image(self, path: Path) -> np.ndarray:
        """RGB image ``uint8 [H, W, 3]`` (grayscale, palette and CMYK files are converted)."""
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"))
        except _READ_ERRORS as err:
            raise ConfigError(f"cannot read image {str(path)!r}: {err}") from err

    def read_label(self, path: Path) -> np.ndarray:
        """Train-id label ``int64 [H, W]`` (void 255) of one file; bad values raise naming file and value.

        Palette PNGs (VOC's ``SegmentationClass``) give their palette indices, grayscale PNGs their values;
        16-bit PNGs are accepted as long as every value is a known raw label value.
        """
        try:
            with Image.open(path) as img:
                raw = np.asarray(img)  # palette PNGs give their indices, as VOC needs
        except _READ_ERRORS as err:
            raise ConfigError(f"cannot read label {str(path)!r}: {err}") from err
        if raw.ndim != 2:
            raise ConfigError(
                f"label {str(path)!r} has shape {raw.shape}; expected a single-channel PNG of class ids "
                f"(a colour-coded label must be converted to ids first)"
            )
        if raw.dtype != np.uint8:  # 16/32-bit or 1-bit files: values outside the LUT are bad values too
            outside = (raw < 0) | (raw >= len(self._lut))
            if outside.any():
                self._raise_bad_values(path, raw[outside])
            raw = raw.astype(np.int64)
        label = self._lut[raw]
        if (label == _INVALID).any():
            self._raise_bad_values(path, raw[label == _INVALID])
        return label

    def _raise_bad_values(self, path: Path, values: np.ndarray) -> None:
        bad = [int(v) for v in np.unique(values)[:10]]
        raise ConfigError(
            f"label {str(path)!r} holds value(s) {bad} that are neither a class of "
            f"{type(self).__name__} (0..{self.NUM_CLASSES - 1} after mapping) nor void"
        )

    @staticmethod
    def check_same_size(image_path: Path, image: np.ndarray, label_path: Path, label: np.ndarray) -> None:
        """Raise a :class:`ConfigError` naming both files when ``image [H, W, 3]`` and ``label [h, w]`` differ."""
        if image.shape[:2] != label.shape:
            raise ConfigError(
                f"{str(image_path)!r} is {image.shape[:2]} but its label {str(label_path)!r} is {label.shape}"
            )

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Sample ``key``: an index, or ``(index, seed)`` to draw the augmentation from ``seed`` (what
        :class:`~rdd_lightning.data.samplers.GlobalBatchSampler` yields, so a sample's crop and flip do not
        depend on the loader worker or process that reads it)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        image_path, label_path = self.pairs[index]
        image, label = self.read_image(image_path), self.read_label(label_path)
        self.check_same_size(image_path, image, label_path, label)
        if seed is not None and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed)
        if self.transform is not None:
            out = self.transform(image=image, mask=label.astype(np.uint8))
            image, label = out["image"], torch.as_tensor(out["mask"]).long()
        return {"image": image, "mask": label, "name": image_path.stem}


def _strip(stem: str, suffix: str) -> str:
    return stem[: len(stem) - len(suffix)] if suffix and stem.endswith(suffix) else stem


def pair_by_stem(
    images: Sequence[Path], labels: Sequence[Path], where: str, suffix: str = "", image_suffix: str = ""
) -> list[tuple[Path, Path]]:
    """Pair image and label files whose stems match once ``suffix`` is stripped from label stems and
    ``image_suffix`` from image stems (Cityscapes: ``_gtFine_labelIds`` and ``_leftImg8bit``).

    Returns the pairs sorted by image path. Raises a :class:`ConfigError` naming the first few unpaired
    files on either side.
    """
    by_stem = {_strip(p.stem, suffix): p for p in labels}
    image_by_stem = {_strip(p.stem, image_suffix): p for p in images}
    missing_labels = [p.name for s, p in sorted(image_by_stem.items()) if s not in by_stem]
    missing_images = [p.name for s, p in sorted(by_stem.items()) if s not in image_by_stem]
    if missing_labels or missing_images:
        parts = []
        if missing_labels:
            parts.append(f"{len(missing_labels)} image(s) without a label, e.g. {missing_labels[:3]}")
        if missing_images:
            parts.append(f"{len(missing_images)} label(s) without an image, e.g. {missing_images[:3]}")
        raise ConfigError(f"{where}: " + "; ".join(parts))
    return sorted((p, by_stem[s]) for s, p in image_by_stem.items())


def first_existing(root: Path, candidates: Iterable[str], marker: str) -> Path | None:
    """The first ``root / c`` (``c`` in ``candidates``, ``""`` = root itself) that holds ``marker``
    (``marker=""``: that exists itself); ``None`` when none does."""
    for sub in candidates:
        base = root / sub if sub else root
        if (base / marker).exists():
            return base
    return None


def missing_files_error(where: str, kind: str, missing: Sequence[Path]) -> ConfigError:
    """A ConfigError naming how many ``kind`` files ``where`` refers to that do not exist, and a few."""
    return ConfigError(
        f"{where} names {len(missing)} {kind} file(s) that do not exist, e.g. {[str(p) for p in missing[:3]]}"
    )
