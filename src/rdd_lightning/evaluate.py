"""Evaluate a checkpoint: ``python -m rdd_lightning.evaluate ckpt_path=<checkpoint> [dataset=...] [split=test]``.

Composed by Hydra from ``conf/evaluate.yaml``. The network is rebuilt from the checkpoint itself (a student
or a teacher run of this package; a teacher is a supervised run), evaluated on ``split`` with the
``inference`` settings through the same :class:`~rdd_lightning.module.DistillationModule` validation code as
training, and the run directory (``logs/evaluate/runs/<time>``) receives ``results.json`` and, with
``save_predictions=true``, colourised predictions in ``predictions/``.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from rdd_lightning.builders import build_datamodule, build_trainer
from rdd_lightning.data import SegmentationDataModule
from rdd_lightning.drawing import class_palette
from rdd_lightning.errors import ConfigError, exit_on_config_error
from rdd_lightning.inference import InferenceConfig
from rdd_lightning.launch import ddp_job, track_children
from rdd_lightning.module import DistillationModule
from rdd_lightning.resume import run_state, write_json
from rdd_lightning.teacher import check_normalization, read_checkpoint, rebuild_network

log = logging.getLogger("rdd_lightning.evaluate")

SPLITS = {"val": "validate", "test": "test"}  # split -> Lightning stage


# ------------------------------------------------------------------------------------------------ network
def check_classes(ckpt_path: Path, metadata: Mapping[str, Any], datamodule: SegmentationDataModule) -> None:
    """The checkpoint's class count must be the dataset's; other class names are only reported."""
    recorded = (metadata.get("student") or {}).get("num_classes")
    trained_on = metadata.get("dataset")
    if recorded is not None and recorded != datamodule.num_classes:
        raise ConfigError(
            f"ckpt_path={str(ckpt_path)!r} predicts {recorded} classes (trained on dataset {trained_on!r}) but "
            f"dataset={datamodule.name} has {datamodule.num_classes}; evaluate it on a dataset with its classes"
        )
    names = metadata.get("class_names")
    if trained_on not in (None, datamodule.name) or (names and list(names) != datamodule.class_names):
        log.warning(
            "the checkpoint was trained on dataset %r (classes %s), evaluated on %r (classes %s)",
            trained_on,
            names,
            datamodule.name,
            datamodule.class_names,
        )


# ------------------------------------------------------------------------------------------------ output
class EvaluationRecorder(L.Callback):
    """Counts the evaluated images and, given a ``folder``, writes each prediction there as
    ``<image name>.png`` coloured with ``palette`` (``uint8 [C, 3]``)."""

    def __init__(self, palette: np.ndarray, folder: Path | None = None):
        self.palette, self.folder = palette, folder
        self.num_images = 0

    def record(self, preds: torch.Tensor, batch: dict[str, Any]) -> None:
        """``preds``: predicted classes ``int64 [B, H, W]`` of ``batch`` (whose ``name`` lists the images)."""
        self.num_images += int(preds.shape[0])
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, pred in zip(batch["name"], preds.cpu().numpy(), strict=True):
            Image.fromarray(self.palette[pred]).save(self.folder / f"{name}.png")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.record(outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.record(outputs, batch)


def iou_table(per_class: Mapping[str, float | None], miou: float, acc: float) -> str:
    """Per-class IoU, mIoU and pixel accuracy (percent) as a text table."""
    width = max([len("class"), *(len(name) for name in per_class)])
    lines = [f"{'class':<{width}}  IoU (%)", "-" * (width + 9)]
    lines += [f"{name:<{width}}  {'-' if v is None else f'{v:.2f}':>7}" for name, v in per_class.items()]
    lines += ["-" * (width + 9), f"{'mIoU':<{width}}  {miou:7.2f}", f"{'aAcc':<{width}}  {acc:7.2f}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ run
def check_inputs(cfg: DictConfig, output_dir: Path) -> tuple[Path, InferenceConfig]:
    """Fail before any work on a missing checkpoint, a bad split or inference setting, or a used run dir."""
    if cfg.get("ckpt_path") in (None, ""):
        raise ConfigError(
            "ckpt_path is required: pass ckpt_path=<a checkpoint of this package>, e.g. "
            "ckpt_path=logs/train/runs/<time>/checkpoints/best.ckpt"
        )
    ckpt_path = Path(str(cfg.ckpt_path)).expanduser().resolve()
    if not ckpt_path.is_file():
        raise ConfigError(f"ckpt_path={str(cfg.ckpt_path)!r}: file not found")
    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split!r}: choose one of {list(SPLITS)}")
    inference = InferenceConfig.from_any(OmegaConf.to_container(cfg.inference, resolve=True))
    if run_state(output_dir) != "new":
        raise ConfigError(
            f"run directory {str(output_dir)!r} already holds results or checkpoints; pass a new hydra.run.dir"
        )
    predictions = output_dir / "predictions"
    if predictions.is_dir() and any(predictions.iterdir()):
        raise ConfigError(
            f"run directory {str(output_dir)!r} already holds predictions; pass a new hydra.run.dir"
        )
    return ckpt_path, inference


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` as ``cfg`` says; return (and write to ``results.json``) the results."""
    start = time.time()
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path, inference = check_inputs(cfg, output_dir)
    checkpoint = read_checkpoint(ckpt_path)
    metadata = checkpoint.get("rdd_lightning") or {}

    datamodule = build_datamodule(cfg, stage=SPLITS[cfg.split])  # a missing dataset fails before the network
    check_classes(ckpt_path, metadata, datamodule)
    check_normalization(checkpoint, ckpt_path, "ckpt_path", datamodule.normalization)
    net = rebuild_network(ckpt_path, checkpoint, cfg.get("student"), datamodule.num_classes)
    module = DistillationModule(
        student=net,
        teacher=None,
        objective=None,
        optimizer=None,
        scheduler=None,
        num_classes=datamodule.num_classes,
        class_names=datamodule.class_names,
        ignore_index=datamodule.ignore_index,
        inference=inference,
    )
    predictions_dir = output_dir / "predictions" if cfg.save_predictions else None
    recorder = EvaluationRecorder(class_palette(datamodule), predictions_dir)
    trainer = build_trainer(cfg, [recorder], with_loggers=False)
    try:
        if cfg.split == "val":
            trainer.validate(module, datamodule=datamodule, verbose=False)
            metrics = module.last_val
        else:
            trainer.test(module, datamodule=datamodule, verbose=False)
            metrics = module.last_test
    finally:
        track_children(trainer)

    num_images = recorder.num_images
    if trainer.world_size > 1:  # images of every process (each image is evaluated by exactly one)
        num_images = int(
            trainer.strategy.reduce(torch.tensor(num_images, device=module.device), reduce_op="sum")
        )
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    results = {
        "task_name": cfg.task_name,
        "tags": list(cfg.tags),
        "overrides": overrides,
        "checkpoint": str(ckpt_path),
        "checkpoint_dataset": metadata.get("dataset"),
        "checkpoint_global_step": checkpoint.get("global_step"),
        "network": net.describe(),
        "dataset": datamodule.name,
        "split": cfg.split,
        "inference": inference.to_dict(),
        "precision": str(trainer.precision),
        "mIoU": metrics["miou"],
        "aAcc": metrics["pixel_acc"],
        "per_class_iou": metrics["per_class_iou"],
        "num_images": num_images,
        "wall_time_s": round(time.time() - start, 2),
        "predictions_dir": str(predictions_dir) if predictions_dir is not None else None,
        "output_dir": str(output_dir),
    }
    if trainer.is_global_zero:
        write_json(output_dir / "results.json", results)
        log.info(
            "%s on %s/%s (%d images):\n%s\n-> %s",
            ckpt_path,
            datamodule.name,
            cfg.split,
            num_images,
            iou_table(metrics["per_class_iou"], metrics["miou"], metrics["pixel_acc"]),
            output_dir / "results.json",
        )
    return results


@hydra.main(version_base="1.3", config_path="pkg://rdd_lightning.conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    torch.set_float32_matmul_precision("high")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")

    def job() -> dict[str, Any]:
        with ddp_job("rdd_lightning.evaluate", cfg.paths.output_dir):
            return run(cfg)

    results = exit_on_config_error(job, log)
    return results["mIoU"]


if __name__ == "__main__":
    main()
