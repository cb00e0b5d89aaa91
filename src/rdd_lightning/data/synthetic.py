"""A procedurally generated segmentation dataset, written to disk in the CamVid (SegNet) layout.

Every scene has a sky/ground/wall background and several overlapping objects of eight shape classes.
Each class has a typical hue, but the hues of neighbouring classes overlap (jitter about half the spacing),
textures are only partly tied to the class, objects appear over a 6x range of scales and occlude each
other, and every image gets noise and brightness changes. Colour and texture get a network started; the
overlapping cases must be told apart by shape and context, which needs receptive field and capacity, so a
bigger network wins: what a distillation demo needs.

The files go through exactly the loading code of real data (``CamVid``): RGB PNGs in ``<split>/`` and
label PNGs in ``<split>annot/`` with values 0..10 and 11 for void (object outlines, as in CamVid).
Generation is deterministic in ``(seed, split, index)``.
"""

from __future__ import annotations

import colorsys
import json
import os
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image

from rdd_lightning.data.camvid import CamVid
from rdd_lightning.errors import ConfigError

CLASS_NAMES = (
    "sky",
    "ground",
    "wall",
    "disk",
    "box",
    "triangle",
    "ellipse",
    "ring",
    "star",
    "cross",
    "hexagon",
)
VOID = 11
_TEXTURES = ("solid", "stripes", "checker", "dots", "noise", "gradient")
# Each object class prefers one texture (70 % of the time); otherwise it draws any texture.
_PREFERRED_TEXTURE = {
    3: "dots",
    4: "checker",
    5: "stripes",
    6: "gradient",
    7: "solid",
    8: "noise",
    9: "stripes",
    10: "checker",
}
_SPLITS = {"train": 0, "val": 1, "test": 2}


def _texture(kind: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A ``[H, W]`` map in [0, 1] from object-local coordinates ``u, v`` (object radius = 1)."""
    if kind == "solid":
        return np.ones_like(u)
    if kind == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        return np.clip(0.5 + 0.5 * (u * np.cos(a) + v * np.sin(a)), 0, 1)
    freq = rng.uniform(1.5, 4.0)
    if kind == "stripes":
        a = rng.uniform(0, np.pi)
        return (np.sin(np.pi * freq * (u * np.cos(a) + v * np.sin(a))) > 0).astype(np.float32)
    if kind == "checker":
        return ((np.sin(np.pi * freq * u) * np.sin(np.pi * freq * v)) > 0).astype(np.float32)
    if kind == "dots":
        pu, pv = np.mod(u * freq, 1.0) - 0.5, np.mod(v * freq, 1.0) - 0.5
        return (pu**2 + pv**2 < 0.09).astype(np.float32)
    # "noise": blocky value noise
    cells = rng.random((8, 8)).astype(np.float32)
    iu = np.clip(((u + 1.5) / 3.0 * 8).astype(int), 0, 7)
    iv = np.clip(((v + 1.5) / 3.0 * 8).astype(int), 0, 7)
    return cells[iu, iv]


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean ``[H, W]`` mask of object class ``cls`` in local coordinates (radius 1)."""
    rho, phi = np.hypot(u, v), np.arctan2(v, u)

    def polygon(n: int) -> np.ndarray:
        sector = np.mod(phi, 2 * np.pi / n) - np.pi / n
        return rho * np.cos(sector) <= np.cos(np.pi / n)

    if cls == 3:  # disk
        return rho <= 1.0
    if cls == 4:  # box
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.6)
    if cls == 5:  # triangle
        return polygon(3)
    if cls == 6:  # ellipse
        return (u / 1.0) ** 2 + (v / 0.45) ** 2 <= 1.0
    if cls == 7:  # ring
        return (rho <= 1.0) & (rho >= 0.55)
    if cls == 8:  # five-pointed star
        return rho <= 0.45 + 0.55 * np.abs(np.cos(2.5 * phi)) ** 3
    if cls == 9:  # cross
        return ((np.abs(u) <= 1.0) & (np.abs(v) <= 0.3)) | ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0))
    if cls == 10:  # hexagon
        return polygon(6)
    raise ValueError(f"not an object class: {cls}")


# Typical hue of each class (sky, ground, wall, then the eight objects spread round the colour circle).
_HUE = {0: 0.60, 1: 0.08, 2: 0.98, **{c: (c - 3) / 8.0 + 0.03 for c in range(3, 11)}}
_HUE_JITTER = 0.07  # about half the spacing of the object hues: neighbours overlap


def _colour(rng: np.random.Generator, cls: int) -> np.ndarray:
    """An RGB colour in [0, 1] near the typical hue of class ``cls``."""
    hue = (_HUE[cls] + rng.normal(0.0, _HUE_JITTER)) % 1.0
    sat, val = rng.uniform(0.35, 1.0), rng.uniform(0.45, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32)


def _colour_pair(rng: np.random.Generator, cls: int) -> tuple[np.ndarray, np.ndarray]:
    """Two shades of one class colour, for textures."""
    c1 = _colour(rng, cls)
    return c1, c1 * rng.uniform(0.3, 0.75)


def _outline(label: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbourhood holds another label (CamVid marks such borders void)."""
    edge = np.zeros(label.shape, dtype=bool)
    edge[:-1, :] |= label[:-1, :] != label[1:, :]
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    return edge


def generate_scene(seed: int, split: str, index: int, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """One scene: ``image`` uint8 ``[size, size, 3]`` and ``label`` uint8 ``[size, size]`` (0..10, 11 void)."""
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    image = np.zeros((size, size, 3), dtype=np.float32)
    label = np.zeros((size, size), dtype=np.uint8)

    # Background: sky above a wavy horizon, ground below it, a few walls standing on the horizon.
    horizon = size * rng.uniform(0.3, 0.6) + size * 0.06 * np.sin(
        xs / size * rng.uniform(2, 8) + rng.uniform(0, 6)
    )
    sky = ys < horizon
    sky_top, sky_bottom = _colour_pair(rng, 0)
    t = (ys / size)[..., None]
    image[:] = sky_top * (1 - t) + sky_bottom * t
    ground_tex = _texture("noise", xs / size * 3 - 1.5, ys / size * 3 - 1.5, rng)[..., None]
    g1, g2 = _colour_pair(rng, 1)
    image[~sky] = (g1 * ground_tex + g2 * (1 - ground_tex))[~sky]
    label[~sky] = 1
    for _ in range(rng.integers(0, 3)):
        x0 = rng.uniform(0, size)
        w, h = size * rng.uniform(0.1, 0.35), size * rng.uniform(0.15, 0.4)
        base = float(np.median(horizon))
        wall = (xs >= x0) & (xs < x0 + w) & (ys >= base - h) & (ys < base + size * 0.05)
        bricks = _texture("checker", xs / 6.0, ys / 3.0, rng)[..., None]
        c1, c2 = _colour_pair(rng, 2)
        image[wall] = (c1 * bricks + c2 * (1 - bricks))[wall]
        label[wall] = 2

    # Objects, drawn in order so later ones occlude earlier ones.
    for _ in range(rng.integers(3, 9)):
        cls = int(rng.integers(3, 11))
        radius = size * np.exp(rng.uniform(np.log(0.06), np.log(0.36)))
        cx, cy = rng.uniform(-0.1, 1.1) * size, rng.uniform(0.0, 1.1) * size
        angle = rng.uniform(0, 2 * np.pi)
        dx, dy = (xs - cx) / radius, (ys - cy) / radius
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        mask = _shape_mask(cls, u, v)
        if not mask.any():
            continue
        kind = _PREFERRED_TEXTURE[cls] if rng.random() < 0.7 else _TEXTURES[rng.integers(len(_TEXTURES))]
        tex = _texture(kind, u, v, rng)[..., None]
        c1, c2 = _colour_pair(rng, cls)
        image[mask] = (c1 * tex + c2 * (1 - tex))[mask]
        label[mask] = cls

    label[_outline(label)] = VOID
    # Photometric nuisance: contrast/brightness and sensor noise.
    image = image * rng.uniform(0.6, 1.2) + rng.uniform(-0.15, 0.15)
    image = image + rng.normal(0.0, rng.uniform(0.01, 0.06), size=image.shape)
    image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    return image, label


class Synthetic(CamVid):
    """The generated dataset, read back from disk with the CamVid loader (same layout, same void value).

    Call :meth:`prepare` once (the datamodule's ``prepare_data`` does) to write it to ``root``.
    """

    CLASS_NAMES = CLASS_NAMES
    PALETTE = tuple(
        tuple(round(255 * c) for c in colorsys.hsv_to_rgb(_HUE[cls], 0.8, 0.9))
        for cls in range(len(CLASS_NAMES))
    )  # each class's typical hue, for drawing predictions
    SPLIT_SIZES = {}  # set by the generator parameters, not a published dataset
    SOURCE = "the generator in rdd_lightning.data.synthetic (written on first use by the datamodule)"

    @staticmethod
    def prepare(
        root: str | os.PathLike,
        *,
        seed: int = 0,
        image_size: int = 96,
        num_train: int = 400,
        num_val: int = 100,
        num_test: int = 100,
        **_: object,
    ) -> None:
        """Write the dataset to ``root`` unless a complete copy with the same parameters is there.

        ``root`` gets a ``generator.json`` with the parameters; a different set of parameters needs a
        different ``root`` (the config derives it from a hash of them, so nothing is overwritten).
        """
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / ".generate.lock")):  # DDP ranks and sweep jobs wait for one writer
            Synthetic._write(root, seed, image_size, num_train, num_val, num_test)

    @staticmethod
    def _write(root: Path, seed: int, image_size: int, num_train: int, num_val: int, num_test: int) -> None:
        params = {
            "seed": seed,
            "image_size": image_size,
            "num_train": num_train,
            "num_val": num_val,
            "num_test": num_test,
            "version": 2,
        }
        stamp = root / "generator.json"
        if stamp.is_file():
            existing = json.loads(stamp.read_text())
            if existing == params:
                return
            raise ConfigError(
                f"{root} holds a synthetic dataset generated with {existing}, not {params}; "
                f"choose another dataset.root or delete that folder."
            )
        for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
            (root / split).mkdir(parents=True, exist_ok=True)
            (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
            for index in range(count):
                image, label = generate_scene(seed, split, index, image_size)
                name = f"synth_{split}_{index:05d}.png"
                Image.fromarray(image).save(root / split / name)
                Image.fromarray(label).save(root / f"{split}annot" / name)
        stamp.write_text(json.dumps(params, indent=2))  # written last: marks the copy complete
