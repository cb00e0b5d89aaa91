"""DistillationModule: a trainable student, an optional frozen teacher, the objective, metrics and optim."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from rdd_lightning import inference as infer
from rdd_lightning.distillation import DistillationObjective
from rdd_lightning.errors import ConfigError
from rdd_lightning.models import SegmentationNet


def segmentation_metrics(num_classes: int, ignore_index: int) -> MetricCollection:
    """Per-class IoU ``[C]`` (NaN for a class absent from both prediction and labels, left out of the mean)
    and pixel accuracy, over every pixel seen since the last reset, summed over processes under DDP."""
    return MetricCollection(
        {
            "iou": MulticlassJaccardIndex(
                num_classes,
                average="none",
                ignore_index=ignore_index,
                zero_division=float("nan"),
                validate_args=False,
            ),
            "acc": MulticlassAccuracy(
                num_classes, average="micro", ignore_index=ignore_index, validate_args=False
            ),
        }  # fmt: skip
    )


class DistillationModule(L.LightningModule):
    """Trains ``student`` (optionally distilled from a frozen ``teacher``) with ``objective``; validates
    (and tests) it with ``inference``.

    Args:
        student: the trainable network.
        teacher: a frozen network or ``None`` (plain supervised training). It is put in eval mode with
            ``requires_grad=False``, forwarded under ``no_grad``, left out of the optimizer, and left out of
            checkpoints (it is rebuilt from ``teacher.checkpoint`` when a run resumes).
        objective: the loss of a step (built from the ``distillation`` config); ``None`` for a module that
            only evaluates (``rdd_lightning.evaluate``).
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``); ``None`` when only evaluating.
        scheduler: ``(optimizer, total_iters) -> LRScheduler``, stepped every iteration, or ``None``.
        num_classes, class_names, ignore_index: label space of the dataset.
        metadata: stored under ``checkpoint["rdd_lightning"]`` (architecture, dataset) so a checkpoint can be
            checked when it is loaded as a teacher.
        inference: how validation/test images are predicted (the ``inference`` config key, see
            :class:`rdd_lightning.inference.InferenceConfig`); ``None`` = whole image, one scale, no flip.
    """

    def __init__(
        self,
        student: SegmentationNet,
        teacher: SegmentationNet | None,
        objective: DistillationObjective | None,
        optimizer: Callable[..., torch.optim.Optimizer] | None,
        scheduler: Callable[..., Any] | None,
        num_classes: int,
        class_names: Sequence[str],
        ignore_index: int = 255,
        metadata: dict[str, Any] | None = None,
        inference: infer.InferenceConfig | Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.inference = infer.InferenceConfig.from_any(inference)
        inference = self.inference.to_dict()  # what save_hyperparameters records
        # Plain values only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            ignore=["student", "teacher", "objective", "optimizer", "scheduler"], logger=False
        )
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.objective = objective
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        self.metadata = dict(metadata or {})
        self.val_metrics = segmentation_metrics(num_classes, ignore_index)
        self.last_val: dict[str, Any] = {}  # metrics of the last validation (train.py's results)
        self.last_test: dict[str, Any] = {}  # metrics of the last test

    # ---------------------------------------------------------------------------------------- teacher
    def train(self, mode: bool = True) -> DistillationModule:
        """Lightning toggles train/eval around validation; the teacher stays in eval mode throughout."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def teacher_forward(self, images: Tensor):
        if self.teacher is None or not self.objective.needs_teacher:
            return None
        with torch.no_grad():
            return self.teacher(images)

    # ---------------------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images, target = batch["image"], batch["mask"]
        out = self.student(images)
        losses = self.objective(out, self.teacher_forward(images), target)
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=images.shape[0])
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=images.shape[0])
        return losses["loss"]

    def predict_logits(self, images: Tensor) -> Tensor:
        """Logits ``[B, C, H, W]`` of ``images [B, 3, H, W]`` by the student, at the input size, as
        :attr:`inference` says (see :func:`rdd_lightning.inference.predict_logits`)."""
        return infer.predict_logits(self.student, images, self.inference)

    def evaluation_step(self, batch: dict[str, Any]) -> Tensor:
        """Predicted classes ``int64 [B, H, W]`` of a batch, counted into the confusion matrix."""
        preds = self.predict_logits(batch["image"]).argmax(1)
        self.val_metrics.update(preds, batch["mask"])
        return preds

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.evaluation_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.evaluation_step(batch)

    def on_validation_epoch_end(self) -> None:
        self.last_val = self.log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self.last_test = self.log_evaluation("test")

    def log_evaluation(self, prefix: str) -> dict[str, Any]:
        """Log ``<prefix>/mIoU``, ``/aAcc`` and ``/IoU/<class>`` (percent) of the pixels counted since the last
        call, reset the count, and return the numbers."""
        metrics = self.val_metrics.compute()
        self.val_metrics.reset()
        iou, acc = metrics["iou"].double(), metrics["acc"].double()
        miou = torch.nanmean(iou) * 100
        self.log(f"{prefix}/mIoU", miou.float(), prog_bar=True, sync_dist=False)
        self.log(f"{prefix}/aAcc", (acc * 100).float())
        per_class = {
            name: (None if v.isnan() else float(v * 100))
            for name, v in zip(self.class_names, iou, strict=True)
        }
        self.log_dict({f"{prefix}/IoU/{name}": v for name, v in per_class.items() if v is not None})
        return {
            "miou": float(miou),
            "pixel_acc": float(acc * 100),
            "per_class_iou": per_class,
            "global_step": int(self.global_step),
            "sanity": bool(self.trainer.sanity_checking),
        }

    # ---------------------------------------------------------------------------------------- optim
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        total = self.trainer.estimated_stepping_batches
        if not total or total == float("inf"):
            raise ValueError(
                "a per-iteration LR schedule needs trainer.max_steps or trainer.max_epochs to be set"
            )
        scheduler = self.scheduler_factory(optimizer=optimizer, total_iters=int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]
        checkpoint["rdd_lightning"] = {**self.metadata, "student": self.student.describe()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = (checkpoint.get("rdd_lightning") or {}).get("teacher")
        current = self.metadata.get("teacher")
        if saved and current and saved.get("sha256") != current.get("sha256"):
            raise ConfigError(
                f"the checkpoint being resumed was distilled from teacher {saved.get('checkpoint')!r} (weights "
                f"{saved.get('sha256')}), but this run's teacher.checkpoint={current.get('checkpoint')!r} has "
                f"weights {current.get('sha256')}; resume with teacher.checkpoint={saved.get('checkpoint')}"
            )
        if self.teacher is not None:
            checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
