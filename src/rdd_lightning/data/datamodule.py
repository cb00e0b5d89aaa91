"""The LightningDataModule: one dataset class, its root, the recipe's augmentation and loaders."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class
from torch.utils.data import DataLoader

from rdd_lightning.data.base import SegmentationDataset
from rdd_lightning.data.samplers import GlobalBatchSampler, ShardSampler
from rdd_lightning.data.transforms import eval_transform, resolve_normalization, seed_worker, train_transform
from rdd_lightning.errors import ConfigError

log = logging.getLogger(__name__)


class SegmentationDataModule(L.LightningDataModule):
    """Train/val(/test) loaders of one dataset.

    Args:
        name: dataset name (for logs and results).
        dataset_class: dotted path of a :class:`SegmentationDataset` subclass.
        root: dataset folder.
        num_classes: classes of the dataset (checked against the class).
        crop_size: ``[h, w]`` training crop.
        batch_size: the *global* training batch (images per optimizer step over all processes; the paper's
            16). Each of the ``devices x num_nodes`` processes loads ``batch_size / world_size`` of them
            (see :meth:`per_process_batch`), at least 2 (BatchNorm on ASPP pooling).
        val_batch_size: validation images per process (1 for datasets whose images differ in size).
        num_workers: loader workers per process, capped at the CPUs this process may use divided by the
            processes of this machine.
        seed: seeds the training order and augmentation (see
            :class:`~rdd_lightning.data.samplers.GlobalBatchSampler`).
        scale_range, hflip: augmentation (random scale range, horizontal-flip probability).
        normalization: ``imagenet`` (RGB, ImageNet mean/std) or ``caffe`` (BGR, mean pixel subtracted, no
            scaling; for checkpoints trained that way, as the authors' code did).
        mean, std: per-channel values replacing the preset's (fractions of 255, in the network's channel
            order); ``None`` keeps the preset's.
        train_split, val_split, test_split: which split each stage reads.
        prepare: keyword arguments of ``dataset_class.prepare(root, **prepare)`` when the class can
            generate its data (the synthetic dataset), run once by ``prepare_data``.
        class_names: one name per class (default: the dataset class's).
        palette: ``[r, g, b]`` (0..255) per class for drawing predictions (default: the dataset class's).
        recipe: the dataset's training recipe (``max_steps``, ``val_check_interval``, ``lr``,
            ``weight_decay``, ``min_kept``); the trainer, optimizer and distillation configs read it, the
            datamodule only keeps it.
        teacher_checkpoint: the default of ``teacher.checkpoint`` on this dataset (``auto`` on the synthetic
            dataset); read by the teacher config, kept here for reference.

    Attributes other code relies on: ``num_classes``, ``class_names: list[str]``,
    ``palette: list[list[int]] | None``, ``ignore_index``, ``normalization`` (a
    :class:`~rdd_lightning.data.transforms.Normalization`), ``train_tf`` and ``eval_tf``.
    """

    def __init__(
        self,
        name: str,
        dataset_class: str,
        root: str,
        num_classes: int,
        crop_size: Sequence[int],
        batch_size: int = 8,
        val_batch_size: int = 1,
        num_workers: int = 4,
        scale_range: Sequence[float] = (0.5, 2.0),
        hflip: float = 0.5,
        normalization: str = "imagenet",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        prepare: dict[str, Any] | None = None,
        class_names: Sequence[str] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        ignore_index: int = 255,
        recipe: dict[str, Any] | None = None,
        teacher_checkpoint: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.name = name
        self.dataset_cls: type[SegmentationDataset] = get_class(dataset_class)
        self.root = str(root)
        if num_classes != self.dataset_cls.NUM_CLASSES:
            raise ConfigError(
                f"dataset.num_classes={num_classes} but {dataset_class} has {self.dataset_cls.NUM_CLASSES} classes"
            )
        if len(crop_size) != 2:
            raise ConfigError(f"dataset.crop_size={list(crop_size)}: expected [height, width]")
        self.num_classes = num_classes
        self.class_names = list(class_names or self.dataset_cls.CLASS_NAMES)
        if len(self.class_names) != num_classes:
            raise ConfigError(
                f"dataset.class_names has {len(self.class_names)} names but dataset.num_classes={num_classes}"
            )
        self.palette = check_palette(
            palette if palette is not None else self.dataset_cls.PALETTE, num_classes
        )
        self.ignore_index = ignore_index
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.seed = int(seed)
        self.per_process_batch(1)  # a global batch below 2 fails at once
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.prepare_kwargs = dict(prepare or {})
        self.recipe = dict(recipe or {})
        self.teacher_checkpoint = teacher_checkpoint
        self.normalization = resolve_normalization(normalization, mean, std)
        norm = self.normalization
        # every training sample reseeds this pipeline from (seed, epoch, position): see GlobalBatchSampler
        self.train_tf = train_transform(crop_size, scale_range, hflip, norm.mean, norm.std, norm.bgr)
        self.eval_tf = eval_transform(norm.mean, norm.std, norm.bgr)
        self.datasets: dict[str, SegmentationDataset] = {}

    def prepare_data(self) -> None:
        prepare = getattr(self.dataset_cls, "prepare", None)
        if prepare is not None:
            prepare(self.root, **self.prepare_kwargs)

    def dataset(self, stage: str) -> SegmentationDataset:
        """The dataset of ``stage`` (``train``/``val``/``test``), built on first use."""
        if stage not in self.datasets:
            transform = self.train_tf if stage == "train" else self.eval_tf
            self.datasets[stage] = self.dataset_cls(self.root, self.splits[stage], transform)
        return self.datasets[stage]

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.dataset("train")
            self.dataset("val")
        elif stage == "validate":
            self.dataset("val")
        elif stage in ("test", "predict"):
            self.dataset("test")

    def per_process_batch(self, world_size: int) -> int:
        """Training images per process when ``world_size`` processes share the global ``batch_size``."""
        per_process, rest = divmod(self.batch_size, world_size)
        if rest or per_process < 2:
            raise ConfigError(
                f"dataset.batch_size={self.batch_size} (the global batch) cannot be split over {world_size} "
                f"process(es) into equal parts of at least 2 images (BatchNorm in DeepLabV3's image-pooling "
                f"branch); use a multiple of {2 * world_size}, or fewer trainer.devices / trainer.num_nodes"
            )
        return per_process

    def _world(self) -> tuple[int, int, int]:
        """``(global rank, world size, processes on this machine)`` of the attached trainer, or one process."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1, 1
        return (
            trainer.global_rank,
            trainer.world_size,
            max(1, trainer.world_size // max(1, trainer.num_nodes)),
        )

    def _workers(self) -> int:
        local_processes = self._world()[2]
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        cap = max(0, cpus // local_processes)
        if self.num_workers > cap:
            log.info(
                "dataset.num_workers=%d capped at %d: %d CPUs for %d process(es) on this machine",
                self.num_workers,
                cap,
                cpus,
                local_processes,
            )
        return min(self.num_workers, cap)

    def _train_position(self) -> tuple[int, int]:
        """``(data epoch, batches of it already trained)``, a function of the optimizer step alone.

        Lightning's epoch counter is not used: a run stopped by ``max_steps`` mid-epoch is saved with the
        epoch counted as complete, so a resume from it (with a larger ``max_steps``) would skip the rest of
        that epoch's batches. Counting from the global step continues where an uninterrupted run would; the
        sampler then ends Lightning's epoch early, and the next one starts aligned again.
        """
        trainer = self.trainer
        batches = len(self.dataset("train")) // self.batch_size
        accumulate = trainer.accumulate_grad_batches
        steps_per_epoch = math.ceil(batches / accumulate)  # Lightning steps on an epoch's last batch too
        epoch, step_in_epoch = divmod(trainer.global_step, steps_per_epoch)
        return epoch, min(step_in_epoch * accumulate, batches)

    def _loader(self, dataset: SegmentationDataset, **kwargs: Any) -> DataLoader:
        workers = self._workers()
        return DataLoader(
            dataset,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            worker_init_fn=seed_worker,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        rank, world_size, _ = self._world()
        sampler = GlobalBatchSampler(
            len(self.dataset("train")),
            self.batch_size,
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            position=self._train_position if self.trainer is not None else None,
        )
        if len(sampler) == 0:
            raise ConfigError(
                f"dataset.batch_size={self.batch_size} is larger than the {len(self.dataset('train'))} training "
                f"images of {self.name!r}; use a smaller batch"
            )
        self.per_process_batch(world_size)
        return self._loader(self.dataset("train"), batch_sampler=sampler)

    def _eval_loader(self, stage: str) -> DataLoader:
        rank, world_size, _ = self._world()
        dataset = self.dataset(stage)
        sampler = ShardSampler(len(dataset), rank, world_size)
        return self._loader(dataset, batch_size=self.val_batch_size, sampler=sampler, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


def check_palette(palette: Sequence[Sequence[int]] | None, num_classes: int) -> list[list[int]] | None:
    """``palette`` as ``[[r, g, b], ...]`` with one colour (ints 0..255) per class; ``None`` stays ``None``."""
    if palette is None:
        return None
    colours = [list(c) for c in palette]
    if len(colours) != num_classes:
        raise ConfigError(f"dataset.palette has {len(colours)} colours but dataset.num_classes={num_classes}")
    for index, colour in enumerate(colours):
        if len(colour) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in colour):
            raise ConfigError(f"dataset.palette[{index}]={colour}: expected [r, g, b] with ints 0..255")
    return colours
