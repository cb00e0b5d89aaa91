"""Colours of classes and what is drawn with them: colour masks and overlays of predictions.

Shared by ``rdd_lightning.evaluate`` (``save_predictions``) and ``rdd_lightning.predict``. Plain numpy:
classes are ``int [H, W]`` arrays of class ids ``0..C-1``, images ``uint8 [H, W, 3]`` RGB.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from typing import Any

import numpy as np


def generated_palette(num_classes: int) -> np.ndarray:
    """A fixed colour per class, ``uint8 [num_classes, 3]``: hues a golden-ratio turn apart, alternating
    saturation and brightness so neighbouring class ids stay distinguishable."""
    colours = [
        colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.9 if i % 2 else 0.6, 0.95 if (i // 2) % 2 else 0.75)
        for i in range(num_classes)
    ]
    return np.round(np.asarray(colours).reshape(-1, 3) * 255).astype(np.uint8)


def complete_palette(palette: Sequence[Sequence[int]] | None, num_classes: int) -> np.ndarray:
    """``uint8 [C, 3]``: ``palette`` (``[r, g, b]`` per class, 0..255) where given; the entries it lacks (all
    of them for ``None``) are those of :func:`generated_palette`."""
    generated = generated_palette(num_classes)
    if palette is None or len(palette) == 0:
        return generated
    given = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:num_classes]
    generated[: len(given)] = given
    return generated


def class_palette(datamodule: Any) -> np.ndarray:
    """``uint8 [C, 3]``: the datamodule's palette where it has one (entries it lacks are generated)."""
    return complete_palette(getattr(datamodule, "palette", None), datamodule.num_classes)


def colour_mask(classes: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """``uint8 [H, W, 3]``: class ids ``[H, W]`` drawn in ``palette`` (``uint8 [C, 3]``)."""
    return palette[classes]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float) -> np.ndarray:
    """``uint8 [H, W, 3]``: the colour ``mask`` blended over ``image`` (both ``uint8 [H, W, 3]``),
    ``round((1 - alpha) * image + alpha * mask)``."""
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * mask.astype(np.float32)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)
