"""Augmentation keeps image and label aligned; padding, normalisation presets and per-worker random streams."""

from __future__ import annotations

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from rdd_lightning.data.transforms import (
    CAFFE_MEAN_BGR,
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    resolve_normalization,
    seed_worker,
    train_transform,
)
from rdd_lightning.errors import ConfigError

# Five classes with colours far apart; void pixels are drawn in a sixth colour.
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [128, 128, 128]])


def colour_coded(seed: int, hw=(48, 72), block: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """A label of ``block``-pixel squares (classes 0..4, some void 255) and an image whose colour encodes it."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 6, size=(hw[0] // block, hw[1] // block))
    label = np.kron(blocks, np.ones((block, block), dtype=np.int64)).astype(np.uint8)
    image = COLOURS[label].astype(np.uint8)
    label[label == 5] = 255
    return image, label


def decode(image: torch.Tensor) -> np.ndarray:
    """Class index of each pixel of a ``[3, H, W]`` image normalised with mean 0, std 1 (= pixel / 255)."""
    pixels = image.permute(1, 2, 0).numpy() * 255
    distance = ((pixels[:, :, None, :] - COLOURS[None, None, :, :]) ** 2).sum(-1)
    index = distance.argmin(-1)
    return np.where(index == 5, 255, index)


def interior(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds one label (where linear interpolation cannot mix colours); the
    crop's border is never interior (the image went on beyond it)."""
    padded = np.pad(mask.astype(np.int16), 1, constant_values=-1)
    same = np.ones_like(mask, dtype=bool)
    for dy in range(3):
        for dx in range(3):
            same &= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]] == mask
    return same


@pytest.mark.parametrize("interpolation", [cv2.INTER_NEAREST, cv2.INTER_LINEAR])
def test_train_transform_keeps_image_and_label_aligned(interpolation):
    tf = train_transform(
        (32, 40), (0.5, 2.0), 0.5, mean=(0, 0, 0), std=(1, 1, 1), interpolation=interpolation, seed=0
    )
    checked = flipped_or_scaled = 0
    for seed in range(40):
        image, label = colour_coded(seed)
        out = tf(image=image, mask=label)
        img, mask = out["image"], np.asarray(out["mask"])
        assert img.shape == (3, 32, 40) and img.dtype == torch.float32 and mask.shape == (32, 40)
        decoded = decode(img)
        labelled = mask != 255
        check = labelled if interpolation == cv2.INTER_NEAREST else labelled & interior(mask)
        assert check.sum() > 0
        np.testing.assert_array_equal(decoded[check], mask[check])
        checked += int(check.sum())
        flipped_or_scaled += int(not np.array_equal(mask, label[:32, :40]))
    assert checked > 10000 and flipped_or_scaled > 30  # the check saw many pixels of transformed crops


def test_padding_is_void_and_zero_after_normalisation():
    tf = train_transform((64, 64), (1.0, 1.0), hflip=0.0, seed=0)  # no scaling: a 16x24 image is padded
    image = np.full((16, 24, 3), 200, np.uint8)
    out = tf(image=image, mask=np.zeros((16, 24), np.uint8))
    img, mask = out["image"], np.asarray(out["mask"])
    assert (mask[:16, :24] == 0).all() and (mask[16:, :] == 255).all() and (mask[:, 24:] == 255).all()
    assert img[:, 16:, :].abs().max() < 0.02  # mean colour: 0 after normalisation, as the authors' code
    expected = (200 / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(img[:, 0, 0].numpy(), expected, atol=1e-4)


def test_eval_transform_keeps_the_whole_image():
    out = eval_transform()(image=np.zeros((17, 23, 3), np.uint8), mask=np.zeros((17, 23), np.uint8))
    assert out["image"].shape == (3, 17, 23) and np.asarray(out["mask"]).shape == (17, 23)


def test_caffe_normalization_is_bgr_minus_mean_pixel():
    norm = resolve_normalization("caffe")
    assert norm.bgr
    image = np.zeros((4, 4, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 20, 30  # r, g, b
    for tf in (
        eval_transform(norm.mean, norm.std, norm.bgr),
        train_transform((4, 4), (1.0, 1.0), 0.0, norm.mean, norm.std, norm.bgr, seed=0),
    ):
        out = tf(image=image, mask=np.zeros((4, 4), np.uint8))["image"]
        expected = np.array([30, 20, 10]) - np.array(CAFFE_MEAN_BGR)  # b, g, r minus the BGR mean
        np.testing.assert_allclose(out[:, 0, 0].numpy(), expected, atol=1e-3)
    tf = train_transform((8, 8), (1.0, 1.0), 0.0, norm.mean, norm.std, norm.bgr, seed=0)
    padded = tf(image=image, mask=np.zeros((4, 4), np.uint8))["image"]
    assert padded[:, 6, 6].abs().max() < 0.6  # padding is the mean pixel


def test_normalization_presets_and_overrides():
    assert resolve_normalization().mean == IMAGENET_MEAN and not resolve_normalization().bgr
    custom = resolve_normalization("imagenet", mean=[0.5, 0.5, 0.5], std=None)
    assert custom.mean == (0.5, 0.5, 0.5) and custom.std == IMAGENET_STD
    with pytest.raises(ConfigError, match=r"dataset.mean=\[0.5\]: expected 3 values"):
        resolve_normalization("imagenet", mean=[0.5])
    with pytest.raises(ConfigError, match=r"dataset.std=.*> 0"):
        resolve_normalization("imagenet", std=[1, 0, 1])


class RepeatImage(Dataset):
    """The same image ``n`` times through ``transform``: differences come from the random stream alone."""

    def __init__(self, n: int = 8):
        self.n = n
        self.transform = train_transform((8, 8), (0.5, 2.0), 0.5, (0, 0, 0), (1, 1, 1))
        self.image = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(image=self.image, mask=np.zeros((16, 24), np.uint8))["image"]


def test_each_worker_and_epoch_draws_its_own_augmentation():
    loader = DataLoader(RepeatImage(), batch_size=1, num_workers=2, worker_init_fn=seed_worker)
    epochs = [torch.cat(list(loader)) for _ in range(2)]
    for crops in epochs:  # workers alternate: items 0 and 1 come from different workers
        assert len({c.sum().item() for c in crops}) == len(crops)
    assert not torch.equal(epochs[0], epochs[1])  # non-persistent workers do not replay the last epoch


def test_augmentation_is_reproducible_under_seed_everything():
    def draw() -> torch.Tensor:
        L.seed_everything(7, workers=True)
        loader = DataLoader(RepeatImage(4), batch_size=1, num_workers=2, worker_init_fn=seed_worker)
        return torch.cat(list(loader))

    assert torch.equal(draw(), draw())
