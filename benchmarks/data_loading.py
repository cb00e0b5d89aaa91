"""Training-loader throughput of each real dataset's loader at its real image size and crop.

Usage::

    python benchmarks/data_loading.py [--images 16] [--passes 3] [--workers 0 2] [--batch-size 4]
                                      [--datasets camvid cityscapes voc ade20k]

For each dataset, ``--images`` image/label pairs are written to a temporary folder in the dataset's real
layout, size and file format (CamVid 360x480 PNG, Cityscapes 1024x2048 PNG, VOC 375x500 JPEG, ADE20K
512x683 JPEG; labels are 8-bit PNGs as on disk). Images are smooth colour fields with fine noise and labels
are blocky regions, so that the files compress (and decode) about as fast as photographs and real label maps.
The dataset class reads them through the train transform of its config (``conf/dataset/<name>.yaml``: random
scale 0.5-2, pad, crop, flip, normalise) into a ``DataLoader`` (shuffled, ``--batch-size``, the package's
``worker_init_fn``). Each worker count runs one warm-up pass (worker start-up, page cache) and then
``--passes`` timed passes over all images; the table reports the median images/s and, for reference, how
fast the same files decode without augmentation in this process (``read only``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import cv2
import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from rdd_lightning.data import ADE20K, VOC, CamVid, Cityscapes
from rdd_lightning.data.transforms import resolve_normalization, seed_worker, train_transform

# name -> (dataset class, image (h, w), image format)
DATASETS = {
    "camvid": (CamVid, (360, 480), "png"),
    "cityscapes": (Cityscapes, (1024, 2048), "png"),
    "voc": (VOC, (375, 500), "jpg"),
    "ade20k": (ADE20K, (512, 683), "jpg"),
}


def photo_like(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """``uint8 [h, w, 3]``: a smooth random colour field plus fine noise (compresses like a photograph)."""
    coarse = rng.uniform(0, 255, size=(max(hw[0] // 32, 2), max(hw[1] // 32, 2), 3)).astype(np.float32)
    field = cv2.resize(coarse, (hw[1], hw[0]), interpolation=cv2.INTER_CUBIC)
    noise = rng.normal(0, 6, size=(*hw, 3)).astype(np.float32)
    return np.clip(field + noise, 0, 255).astype(np.uint8)


def label_like(rng: np.random.Generator, hw: tuple[int, int], values: list[int]) -> np.ndarray:
    """``uint8 [h, w]``: regions of about 1/16 of the image side drawn from the raw label ``values``."""
    coarse = rng.choice(values, size=(16, 16)).astype(np.uint8)
    return cv2.resize(coarse, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)


def write_pair(image_path: Path, label_path: Path, image: np.ndarray, label: np.ndarray) -> None:
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 90} if image_path.suffix == ".jpg" else {}
    Image.fromarray(image).save(image_path, **options)
    Image.fromarray(label).save(label_path)


def write_dataset(name: str, root: Path, count: int, seed: int = 0) -> Path:
    """``count`` training pairs of dataset ``name`` under ``root`` in its real layout; returns the root."""
    rng = np.random.default_rng(seed)
    _, hw, _ = DATASETS[name]
    stems = [f"img_{i:05d}" for i in range(count)]
    for stem in stems:
        image = photo_like(rng, hw)
        if name == "camvid":
            write_pair(
                root / "train" / f"{stem}.png",
                root / "trainannot" / f"{stem}.png",
                image,
                label_like(rng, hw, list(range(12))),
            )
        elif name == "cityscapes":
            city = root / "leftImg8bit" / "train" / "aachen", root / "gtFine" / "train" / "aachen"
            write_pair(
                city[0] / f"aachen_{stem}_leftImg8bit.png",
                city[1] / f"aachen_{stem}_gtFine_labelIds.png",
                image,
                label_like(rng, hw, list(range(34))),
            )
        elif name == "voc":
            voc = root / "VOCdevkit" / "VOC2012"
            write_pair(
                voc / "JPEGImages" / f"{stem}.jpg",
                voc / "SegmentationClassAug" / f"{stem}.png",
                image,
                label_like(rng, hw, [*range(21), 255]),
            )
        else:
            ade = root / "ADEChallengeData2016"
            write_pair(
                ade / "images" / "training" / f"{stem}.jpg",
                ade / "annotations" / "training" / f"{stem}.png",
                image,
                label_like(rng, hw, list(range(151))),
            )
    if name == "voc":
        sets = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
        sets.mkdir(parents=True, exist_ok=True)
        (sets / "train_aug.txt").write_text("\n".join(stems) + "\n")
    return root


def dataset_config(name: str):
    return OmegaConf.load(str(files("rdd_lightning.conf").joinpath("dataset", f"{name}.yaml")))


def loader_throughput(dataset, batch_size: int, workers: int, passes: int) -> float:
    """Median images/s over ``passes`` full passes, after one warm-up pass."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=seed_worker,
    )
    rates = []
    for index in range(passes + 1):
        start, seen = time.perf_counter(), 0
        for batch in loader:
            seen += batch["image"].shape[0]
        if index:  # pass 0 warms up
            rates.append(seen / (time.perf_counter() - start))
    return statistics.median(rates)


def read_throughput(dataset, passes: int) -> float:
    """Median images/s of decoding image and label (no augmentation) in this process."""
    rates = []
    for _ in range(passes):
        start = time.perf_counter()
        for image_path, label_path in dataset.pairs:
            dataset.read_image(image_path), dataset.read_label(label_path)
        rates.append(len(dataset) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="images per dataset")
    parser.add_argument("--passes", type=int, default=3, help="timed passes per setting (median)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of this process (collation with 0 workers; workers use 1)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory(prefix="rdd-data-bench-") as tmp:
        for name in args.datasets:
            cls, hw, fmt = DATASETS[name]
            cfg = dataset_config(name)
            norm = resolve_normalization(cfg.normalization, cfg.mean, cfg.std)
            transform = train_transform(
                list(cfg.crop_size), list(cfg.scale_range), cfg.hflip, norm.mean, norm.std, norm.bgr, seed=0
            )
            root = write_dataset(name, Path(tmp) / name, args.images)
            dataset = cls(root, "train", transform)
            read = read_throughput(dataset, args.passes)
            for workers in args.workers:
                rate = loader_throughput(dataset, args.batch_size, workers, args.passes)
                rows.append(
                    (
                        name,
                        f"{hw[0]}x{hw[1]} {fmt.upper()}",
                        "x".join(map(str, cfg.crop_size)),
                        workers,
                        rate,
                        read,
                    )
                )
                print(f"{name}: {workers} worker(s) {rate:.1f} images/s", flush=True)

    print(
        f"\n{args.images} images per dataset, batch {args.batch_size}, median of {args.passes} passes, "
        f"torch threads {args.threads}, {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.2f}\n"
    )
    print("| dataset | images | crop | workers | train loader (images/s) | ms/image | read only (images/s) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, size, crop, workers, rate, read in rows:
        print(f"| {name} | {size} | {crop} | {workers} | {rate:.1f} | {1000 / rate:.0f} | {read:.1f} |")


if __name__ == "__main__":
    main()
