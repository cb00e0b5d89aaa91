"""DistillationModule: a trainable student, an optional frozen teacher, the objective, metrics and optim."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
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
        }
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
            only evaluates (``rdd_lightning.evaluate``). The modules of its terms that learn or remember
            (connectors, the CIRKD memory, the SKD discriminator) are built here from both networks
            (:meth:`DistillationObjective.build_modules`) and kept as :attr:`distill_modules`: saved in
            checkpoints and trained with the run, but not part of the student (``student.*`` keys, what
            ``evaluate`` and a teacher load, stay the network alone).
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``); ``None`` when only evaluating.
        scheduler: ``(optimizer, total_iters) -> LRScheduler``, stepped every iteration, or ``None``.
        num_classes, class_names, ignore_index: label space of the dataset.
        metadata: stored under ``checkpoint["rdd_lightning"]`` (architecture, dataset) so a checkpoint can be
            checked when it is loaded as a teacher.
        inference: how validation/test images are predicted (the ``inference`` config key, see
            :class:`rdd_lightning.inference.InferenceConfig`); ``None`` = whole image, one scale, no flip.

    Optimization: automatic (one optimizer: the student and its connectors) unless the objective has a
    discriminator. Then a second optimizer trains the discriminator, which Lightning supports only under
    manual optimization: :meth:`setup` switches to it for fitting and :meth:`adversarial_step` does what
    Lightning would do (one backward, gradient accumulation over ``trainer.accumulate_grad_batches``, gradient
    clipping, the per-iteration LR schedule; under 16-bit AMP the loss scaler unscales each optimizer's
    gradients and skips a step with non-finite ones). ``trainer.global_step`` still counts student steps.
    Under DDP that one backward reduces the student's and the discriminator's gradients together (every
    accumulated micro-batch is reduced: manual optimization has no ``no_sync``). The CIRKD queues are
    per-process buffers that DDP neither broadcasts nor syncs (every process enqueues the gathered global
    batch itself).
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
        self.distill_modules = (
            objective.build_modules(student, teacher) if objective is not None else nn.ModuleDict()
        )
        local_buffers = objective.process_local_buffers(self.distill_modules) if objective is not None else []
        if local_buffers:  # read by DistributedDataParallel, which Lightning wraps around this module
            self._ddp_params_and_buffers_to_ignore = [f"distill_modules.{name}" for name in local_buffers]
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        self.metadata = dict(metadata or {})
        self.val_metrics = segmentation_metrics(num_classes, ignore_index)
        # the teacher's mIoU on the same validation images, measured once (at the first real validation)
        self.teacher_metrics = (
            segmentation_metrics(num_classes, ignore_index) if teacher is not None else None
        )
        self.teacher_val: dict[str, Any] = {}
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
    def setup(self, stage: str) -> None:
        """Fitting with a discriminator: switch to manual optimization (see the class docstring). Done here,
        after Lightning's configuration checks, which refuse ``accumulate_grad_batches`` and
        ``gradient_clip_val`` under manual optimization; :meth:`adversarial_step` applies both itself."""
        if stage == "fit" and self.objective is not None and self.objective.has_discriminator:
            self.automatic_optimization = False

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images, target = batch["image"], batch["mask"]
        out = self.student(images)
        teacher_out = self.teacher_forward(images)
        losses = self.objective(out, teacher_out, target, self.distill_modules)
        if not self.automatic_optimization:
            losses["loss_discriminator"] = self.adversarial_step(out, teacher_out, losses["loss"], batch_idx)
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=images.shape[0])
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=images.shape[0])
        return losses["loss"]  # under manual optimization Lightning only detaches and records it

    def adversarial_step(self, out, teacher_out, loss: Tensor, batch_idx: int) -> Tensor:
        """Manual optimization of a step with a discriminator; returns the discriminator's loss (detached).

        One backward of ``loss + λ_d · L_D``: the student's loss gives no gradient to the discriminator (it is
        frozen while it scores the student) and ``L_D`` none to the student (it sees detached score maps), so
        each optimizer gets exactly its own gradient, and under DDP one backward reduces both. Every
        ``trainer.accumulate_grad_batches`` batches (and at the end of an epoch) the discriminator's optimizer
        steps, then the student's (whose step is the one counted in ``global_step``), then the LR scheduler.
        """
        student_optimizer, discriminator_optimizer = self.optimizers()
        loss_d = self.objective.discriminator_loss(out, teacher_out, self.distill_modules)
        accumulate = max(1, int(self.trainer.accumulate_grad_batches))
        self.manual_backward((loss + self.objective.discriminator_weight * loss_d) / accumulate)
        if (batch_idx + 1) % accumulate == 0 or batch_idx + 1 == self.trainer.num_training_batches:
            # the raw optimizer: a LightningOptimizer step would count as a training step (global_step)
            raw = discriminator_optimizer.optimizer
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            if scaler is not None:
                scaler.step(raw)  # unscale, skip on inf/NaN; scaler.update() follows the student's step
            else:
                raw.step()
            student_optimizer.step()
            student_optimizer.zero_grad()
            raw.zero_grad()
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
        return loss_d.detach()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Under manual optimization Lightning does not clip: clip the student's (unscaled) gradients here."""
        clip = self.trainer.gradient_clip_val
        if not self.automatic_optimization and clip:
            self.clip_gradients(optimizer, clip, self.trainer.gradient_clip_algorithm)

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
        if self._measuring_teacher():
            with torch.no_grad():
                teacher_preds = infer.predict_logits(self.teacher, batch["image"], self.inference).argmax(1)
            self.teacher_metrics.update(teacher_preds, batch["mask"])
        return self.evaluation_step(batch)

    def _measuring_teacher(self) -> bool:
        return self.teacher_metrics is not None and not self.teacher_val and not self.trainer.sanity_checking

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.evaluation_step(batch)

    def on_validation_epoch_end(self) -> None:
        if self._measuring_teacher():
            self.teacher_val = self.summarize(self.teacher_metrics)
        if self.teacher_val:  # logged at every validation: a flat reference line beside val/mIoU
            self.log("val/teacher_mIoU", self.teacher_val["miou"], sync_dist=False)
        self.last_val = self.log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self.last_test = self.log_evaluation("test")

    def log_evaluation(self, prefix: str) -> dict[str, Any]:
        """Log ``<prefix>/mIoU``, ``/aAcc`` and ``/IoU/<class>`` (percent) of the pixels counted since the last
        call, reset the count, and return the numbers."""
        result = self.summarize(self.val_metrics)
        self.log(f"{prefix}/mIoU", result["miou"], prog_bar=True, sync_dist=False)
        self.log(f"{prefix}/aAcc", result["pixel_acc"])
        self.log_dict({f"{prefix}/IoU/{k}": v for k, v in result["per_class_iou"].items() if v is not None})
        return {**result, "global_step": int(self.global_step), "sanity": bool(self.trainer.sanity_checking)}

    def summarize(self, metrics: MetricCollection) -> dict[str, Any]:
        """``{"miou", "pixel_acc", "per_class_iou": {class: IoU or None}}`` (percent) of the pixels ``metrics``
        counted (over every process), which are then reset."""
        values = metrics.compute()
        metrics.reset()
        iou, acc = values["iou"].double(), values["acc"].double()
        per_class = {
            name: (None if v.isnan() else float(v * 100))
            for name, v in zip(self.class_names, iou, strict=True)
        }
        return {
            "miou": float(torch.nanmean(iou) * 100),
            "pixel_acc": float(acc * 100),
            "per_class_iou": per_class,
        }

    # ---------------------------------------------------------------------------------------- optim
    def configure_optimizers(self) -> dict[str, Any] | tuple[list[Any], list[Any]]:
        """The student's optimizer over the student and the modules that train with it (connectors, CIRKD
        projection head), with the per-iteration LR schedule; with a discriminator, its own optimizer second
        (the student's never holds the discriminator's parameters)."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        params += list(self.objective.student_side_parameters(self.distill_modules))
        optimizer = self.optimizer_factory(params=params)
        scheduler = None
        if self.scheduler_factory is not None:
            total = self.trainer.estimated_stepping_batches
            if not total or total == float("inf"):
                raise ValueError(
                    "a per-iteration LR schedule needs trainer.max_steps or trainer.max_epochs to be set"
                )
            scheduler = self.scheduler_factory(optimizer=optimizer, total_iters=int(total))
        if self.objective.has_discriminator:  # manual optimization: stepped in adversarial_step
            discriminator = self.objective.discriminator_optimizer(self.distill_modules)
            return [optimizer, discriminator], [scheduler] if scheduler is not None else []
        if scheduler is None:
            return {"optimizer": optimizer}
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
