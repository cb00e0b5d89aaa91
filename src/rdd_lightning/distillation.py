"""The training objective: task loss (plain CE, TFE-RDD, TSE-RDD or the RDD schedule) plus pixel KD.

Built from the ``distillation`` config group. Pure torch; the LightningModule calls it and the
:class:`~rdd_lightning.callbacks.RDDStageSwitch` callback sets :attr:`DistillationObjective.stage` and
:attr:`DistillationObjective.blend_lambda`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from rdd_lightning import rdd
from rdd_lightning.errors import ConfigError
from rdd_lightning.losses import pixel_kd_loss, segmentation_ce_loss
from rdd_lightning.models import SegOutput

TASKS = ("ce", "tfe", "tse", "rdd")
TFE, TSE = 0, 1


class DistillationObjective:
    """Loss of one training step.

    Args:
        name: the config's name (``none``, ``kd``, ``rdd``, ``tfe``, ``tse``, ...), for logs.
        task: ``ce`` (CE + aux_weight * aux CE), ``tfe`` (TFE-RDD throughout), ``tse`` (TSE-RDD throughout) or
            ``rdd`` (TFE-RDD, then TSE-RDD after the switch point).
        aux_weight: weight of the auxiliary head's task loss (0.4).
        kd: ``{"weight": λ_kd, "temperature": T}`` of the pixel KD term; weight 0 disables it.
        tfe: keyword options of :func:`rdd_lightning.rdd.tfe_task_loss` (``kl_direction``).
        tse: keyword options of :func:`rdd_lightning.rdd.tse_task_loss` (``mode``, ``threshold``, ``min_kept``,
            ``confidence``, ``normalize``, ``class_weight``).
        switch: when ``task: rdd`` switches stage (used by the callback): ``fraction``/``epoch``/``step``.
        blend: ``none`` (hard switch) or ``linear`` (λ·TFE + (1-λ)·TSE after the switch, λ from 1 to 0).
        class_weight: per-class weights of the plain CE task loss (``task: ce``), or ``None``.
        ignore_index: void label value.
    """

    def __init__(
        self,
        name: str = "kd",
        task: str = "ce",
        aux_weight: float = 0.4,
        kd: Mapping[str, Any] | None = None,
        tfe: Mapping[str, Any] | None = None,
        tse: Mapping[str, Any] | None = None,
        switch: Mapping[str, Any] | None = None,
        blend: str = "none",
        class_weight: Sequence[float] | None = None,
        ignore_index: int = 255,
    ):
        if task not in TASKS:
            raise ConfigError(f"distillation.task={task!r}: choose one of {list(TASKS)}")
        if blend not in ("none", "linear"):
            raise ConfigError(f"distillation.blend={blend!r}: choose 'none' or 'linear'")
        kd = dict(kd or {})
        self.name, self.task, self.aux_weight, self.blend = name, task, float(aux_weight), blend
        self.kd_weight = float(kd.get("weight", 0.0))
        self.kd_temperature = float(kd.get("temperature", 1.0))
        if self.kd_temperature <= 0:
            raise ConfigError(f"distillation.kd.temperature={self.kd_temperature}: must be > 0")
        self.tfe_options = dict(tfe or {})
        self.tse_options = dict(tse or {})
        if self.tse_options.get("class_weight") is not None and not isinstance(
            self.tse_options["class_weight"], str
        ):
            self.tse_options["class_weight"] = [float(w) for w in self.tse_options["class_weight"]]
        self.switch = dict(switch or {})
        self.class_weight = None if class_weight is None else [float(w) for w in class_weight]
        self.ignore_index = ignore_index
        # Stage state, driven by RDDStageSwitch for task "rdd"; fixed otherwise.
        self.stage = TSE if task == "tse" else TFE
        self.blend_lambda = 1.0

    @property
    def needs_teacher(self) -> bool:
        return self.task != "ce" or self.kd_weight > 0

    @property
    def needs_teacher_aux(self) -> bool:
        return self.task in ("tfe", "rdd")

    def task_loss(
        self, student: SegOutput, teacher: SegOutput | None, target: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Task loss of the current stage and its statistics (detached 0-dim tensors)."""
        if self.task == "ce":
            loss = segmentation_ce_loss(
                student.logits, student.aux_logits, target, aux_weight=self.aux_weight,
                ignore_index=self.ignore_index, class_weight=self.class_weight,
            )  # fmt: skip
            return loss, {}
        assert teacher is not None, "RDD task losses need the teacher's outputs"
        heads = (student.logits, student.aux_logits, teacher.logits, teacher.aux_logits, target)
        common = {"ignore_index": self.ignore_index, "aux_weight": self.aux_weight, "return_stats": True}
        use_tfe = self.stage == TFE or (self.blend == "linear" and self.blend_lambda > 0)
        use_tse = self.stage == TSE
        stats: dict[str, Tensor] = {}
        loss = target.new_zeros((), dtype=torch.float32)
        if use_tfe:
            tfe_loss, tfe_stats = rdd.tfe_task_loss(*heads, **common, **self.tfe_options)
            stats.update(tfe_stats)
            weight = 1.0 if self.stage == TFE else self.blend_lambda
            loss = loss + weight * tfe_loss
        if use_tse:
            tse_loss, tse_stats = rdd.tse_task_loss(*heads, **common, **self.tse_options)
            stats.update(tse_stats)
            weight = 1.0 - self.blend_lambda if (self.blend == "linear" and use_tfe) else 1.0
            loss = loss + weight * tse_loss
        stats["rdd_stage"] = torch.tensor(float(self.stage))
        if self.blend == "linear":
            stats["blend_lambda"] = torch.tensor(float(self.blend_lambda if self.stage == TSE else 1.0))
        return loss, stats

    def __call__(self, student: SegOutput, teacher: SegOutput | None, target: Tensor) -> dict[str, Tensor]:
        """``{"loss", "loss_task", "loss_kd", ...stats}`` of one batch; ``loss`` carries the gradient."""
        loss_task, stats = self.task_loss(student, teacher, target)
        out = {"loss_task": loss_task}
        loss = loss_task
        if self.kd_weight > 0:
            assert teacher is not None, "pixel KD needs the teacher's outputs"
            loss_kd = self.kd_weight * pixel_kd_loss(
                student.logits, teacher.logits, temperature=self.kd_temperature
            )
            out["loss_kd"] = loss_kd
            loss = loss + loss_kd
        out["loss"] = loss
        out.update(stats)
        return out
