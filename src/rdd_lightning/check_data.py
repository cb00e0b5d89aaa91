"""Check a dataset before training: ``python -m rdd_lightning.check_data dataset=<name> [dataset.root=...]``.

Composed by Hydra from ``conf/check_data.yaml`` (the same ``dataset`` and ``paths`` groups as ``train``).
Reads every image and label of every split in loader worker processes and collects every problem instead of
stopping at the first: an unreadable image or label, a label value that is neither a class nor void, an
image and label of different sizes, a split whose files are missing or unpaired. Prints per-split counts,
image sizes and class pixel frequencies, writes them to ``check_data.json`` in the run directory, and exits
with status 1 when anything is bad (2 for a config error, as ``train`` does).
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from rdd_lightning.data.base import IGNORE_INDEX, SegmentationDataset
from rdd_lightning.data.datamodule import SegmentationDataModule
from rdd_lightning.errors import ConfigError, exit_on_config_error

log = logging.getLogger("rdd_lightning.check_data")


@dataclass
class SplitReport:
    """What one split holds: ``pixels`` is ``int64 [num_classes + 1]`` (the last entry counts void)."""

    split: str
    num_images: int = 0
    expected: int | None = None  # images of the published split, when the dataset class knows it
    sizes: Counter = field(default_factory=Counter)  # (h, w) -> images
    pixels: np.ndarray | None = None
    num_bad: int = 0


@dataclass
class DataReport:
    """Every split's :class:`SplitReport` and every problem found (one message per bad file or split)."""

    dataset: str
    root: str
    class_names: list[str]
    splits: list[SplitReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "root": self.root,
            "ok": self.ok,
            "problems": self.problems,
            "splits": {
                s.split: {
                    "images": s.num_images,
                    "expected": s.expected,
                    "bad": s.num_bad,
                    "sizes": {f"{h}x{w}": n for (h, w), n in s.sizes.most_common()},
                    "class_pixels": None
                    if s.pixels is None
                    else dict(zip([*self.class_names, "void"], s.pixels.tolist(), strict=True)),
                }
                for s in self.splits
            },
        }


class FileScan(Dataset):
    """Item ``i``: what reading pair ``i`` of ``dataset`` found, never raising.

    Returns ``{"problems": [str], "size": (h, w) | None, "pixels": int64 [num_classes + 1] | None}``.
    """

    def __init__(self, dataset: SegmentationDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, label_path = self.dataset.pairs[index]
        problems: list[str] = []
        image = _read(self.dataset.read_image, image_path, problems)
        label = _read(self.dataset.read_label, label_path, problems)
        pixels = None
        if label is not None:
            num_classes = self.dataset.NUM_CLASSES
            ids = np.where(label == IGNORE_INDEX, num_classes, label).ravel()
            pixels = np.bincount(ids, minlength=num_classes + 1)
        if image is not None and label is not None:
            try:
                self.dataset.check_same_size(image_path, image, label_path, label)
            except ConfigError as err:
                problems.append(str(err))
        size = tuple(image.shape[:2]) if image is not None else None
        return {"problems": problems, "size": size, "pixels": pixels}


def _read(reader, path: Path, problems: list[str]) -> np.ndarray | None:
    try:
        return reader(path)
    except ConfigError as err:
        problems.append(str(err))
    except Exception as err:  # anything else a broken file makes a decoder raise
        problems.append(f"cannot read {str(path)!r}: {type(err).__name__}: {err}")
    return None


def _as_is(item: Any) -> Any:
    return item


def scan_split(
    dataset: SegmentationDataset, report: DataReport, num_workers: int = 0, progress: bool = False
) -> SplitReport:
    """Read every pair of ``dataset`` (in ``num_workers`` processes), adding its problems to ``report``."""
    split = SplitReport(dataset.split, expected=dataset.SPLIT_SIZES.get(dataset.split))
    split.pixels = np.zeros(dataset.NUM_CLASSES + 1, dtype=np.int64)
    loader = DataLoader(FileScan(dataset), batch_size=None, num_workers=num_workers, collate_fn=_as_is)
    for item in tqdm(
        loader,
        total=len(dataset),
        desc=f"{report.dataset}/{dataset.split}",
        unit="img",
        disable=not progress,
        file=sys.stderr,
    ):
        split.num_images += 1
        if item["size"] is not None:
            split.sizes[item["size"]] += 1
        if item["pixels"] is not None:
            split.pixels += item["pixels"]
        if item["problems"]:
            split.num_bad += 1
            report.problems.extend(f"[{dataset.split}] {p}" for p in item["problems"])
    return split


def check_dataset(
    datamodule: SegmentationDataModule,
    splits: Sequence[str] | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> DataReport:
    """Scan ``splits`` (default: every split the dataset class offers) of the datamodule's dataset."""
    cls = datamodule.dataset_cls
    report = DataReport(datamodule.name, datamodule.root, list(datamodule.class_names))
    for split in splits or cls.SPLITS:
        try:
            dataset = cls(datamodule.root, split, transform=None)
        except ConfigError as err:
            if str(err) not in report.problems:  # a missing root fails every split alike
                report.problems.append(str(err))
            report.splits.append(SplitReport(split, expected=cls.SPLIT_SIZES.get(split)))
            continue
        report.splits.append(scan_split(dataset, report, num_workers, progress))
    return report


def format_report(report: DataReport) -> str:
    """The report as text: a split table, a class-frequency table and the list of problems."""
    lines = [
        f"{report.dataset}: {report.root} ({len(report.class_names)} classes, void = {IGNORE_INDEX})",
        "",
    ]
    lines.append(f"{'split':<10} {'images':>7} {'expected':>8} {'bad':>5}  image sizes (h x w)")
    for s in report.splits:
        common = s.sizes.most_common()
        sizes = "-" if not common else f"{common[0][0][0]}x{common[0][0][1]} ({common[0][1]})"
        if len(common) > 1:
            sizes += f" and {len(common) - 1} other size(s)"
        expected = "-" if s.expected is None else str(s.expected)
        lines.append(f"{s.split:<10} {s.num_images:>7} {expected:>8} {s.num_bad:>5}  {sizes}")
    counted = [s for s in report.splits if s.pixels is not None and s.pixels.sum() > 0]
    if counted:
        width = max(len(n) for n in report.class_names) + 2
        lines += ["", "class pixels (% of labelled pixels; void: % of all pixels)"]
        lines.append(f"{'class':<{width}}" + "".join(f"{s.split:>10}" for s in counted))
        for c, name in enumerate(report.class_names):
            cells = "".join(f"{100 * s.pixels[c] / max(s.pixels[:-1].sum(), 1):>10.2f}" for s in counted)
            lines.append(f"{name:<{width}}{cells}")
        lines.append(
            f"{'void':<{width}}" + "".join(f"{100 * s.pixels[-1] / s.pixels.sum():>10.2f}" for s in counted)
        )
    lines.append("")
    if report.ok:
        lines.append(f"no problems in {sum(s.num_images for s in report.splits)} image/label pairs")
    else:
        lines.append(f"{len(report.problems)} problem(s):")
        lines += [f"  {p}" for p in report.problems]
    return "\n".join(lines)


def run(cfg: DictConfig) -> DataReport:
    """Check the dataset ``cfg`` composes; print the report and write ``check_data.json``."""
    datamodule: SegmentationDataModule = instantiate(cfg.dataset, _convert_="all")
    datamodule.prepare_data()  # the synthetic dataset is generated on first use
    report = check_dataset(datamodule, cfg.get("splits"), int(cfg.num_workers), bool(cfg.get("progress")))
    print(format_report(report))
    output_dir = cfg.paths.get("output_dir")
    if output_dir:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "check_data.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report


@hydra.main(version_base="1.3", config_path="pkg://rdd_lightning.conf", config_name="check_data")
def main(cfg: DictConfig) -> None:
    report = exit_on_config_error(lambda: run(cfg), log)
    if not report.ok:
        print(
            f"error: {len(report.problems)} problem(s) in dataset {report.dataset} at {report.root} "
            f"(listed above)",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
