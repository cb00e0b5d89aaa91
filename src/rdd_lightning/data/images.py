"""Images without labels, for prediction: listing them (a file, a folder, a glob or a dataset split),
reading them, and batching images of equal size together.

Items are ``{"image": float32 [3, H, W] (normalised as the network expects), "pixels": uint8 [H, W, 3] RGB,
"index": int}``; :func:`size_batches` groups indices so that every batch holds images of one size (the
network sees each image exactly as it would alone: no padding to a common size).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Sampler

from rdd_lightning.data.base import _READ_ERRORS
from rdd_lightning.data.transforms import Normalization, eval_transform
from rdd_lightning.errors import ConfigError

#: File suffixes read as images when a folder is given.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def list_images(pattern: str) -> list[Path]:
    """The image files ``pattern`` names, sorted: one file, every image below a folder (recursively), or
    the images a glob matches (``**`` recurses). Nothing found raises a :class:`ConfigError`."""
    path = Path(pattern).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        where = f"folder {str(path)!r} (looked for {', '.join(IMAGE_SUFFIXES)} files)"
    elif glob.has_magic(str(path)):
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        where = f"glob {pattern!r}"
    else:
        raise ConfigError(f"input={pattern!r}: no such file or folder; pass an image, a folder or a glob")
    if not found:
        raise ConfigError(f"input={pattern!r}: no images in {where}")
    return found


def output_names(paths: Sequence[Path]) -> list[str]:
    """A name per image (``/``-separated, no suffix), unique: its path relative to the deepest folder that
    holds all of them (so images of different sub-folders keep their sub-folder), without the suffix."""
    resolved = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    names = [p.relative_to(root).with_suffix("").as_posix() for p in resolved]
    seen: dict[str, Path] = {}
    for name, path in zip(names, paths, strict=True):
        if name in seen:
            raise ConfigError(
                f"input: {str(seen[name])!r} and {str(path)!r} would both be written as {name!r} (same name, "
                f"different suffix); predict them separately"
            )
        seen[name] = path
    return names


def read_rgb(path: Path) -> np.ndarray:
    """``uint8 [H, W, 3]`` RGB of an image file (grayscale, palette and CMYK files are converted)."""
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))  # a writable copy (the loader makes tensors of it)
    except _READ_ERRORS as err:
        raise ConfigError(f"cannot read image {str(path)!r}: {err}") from err


def image_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image file, from its header."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except _READ_ERRORS as err:
        raise ConfigError(f"cannot read image {str(path)!r}: {err}") from err


class ImageFiles(Dataset):
    """Image files, each normalised with ``normalization`` (the eval transform of training) and also kept
    as its ``uint8`` RGB pixels (for overlays)."""

    def __init__(self, paths: Sequence[Path], normalization: Normalization):
        self.paths = list(paths)
        self.transform = eval_transform(normalization.mean, normalization.std, normalization.bgr)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pixels = read_rgb(self.paths[index])
        return {"image": self.transform(image=pixels)["image"], "pixels": pixels, "index": index}


class SizeBatches(Sampler[list[int]]):
    """Batches of at most ``batch_size`` indices whose images have the same size, in the order of each
    size's first image (within a size, in input order).

    Args:
        sizes: ``(H, W)`` of every image, in input order.
        batch_size: images per batch (at least 1).
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int):
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: give at least 1 image per batch")
        groups: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(sizes):
            groups.setdefault(tuple(size), []).append(index)
        self.batches = [
            group[start : start + batch_size]
            for group in groups.values()
            for start in range(0, len(group), batch_size)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
