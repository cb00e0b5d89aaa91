"""Lightning callbacks of the package."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L

from rdd_lightning.distillation import BLENDS, TFE, TSE, check_choice, resolve_switch
from rdd_lightning.errors import ConfigError

log = logging.getLogger(__name__)


class RDDStageSwitch(L.Callback):
    """Switch the objective from TFE-RDD to TSE-RDD at an epoch, a global step or a fraction of training.

    The stage is a function of the trainer's progress (global step, or epoch), evaluated before every
    training batch, so a run resumed from a checkpoint is in the same stage, and switches at the same step,
    as an uninterrupted run. The switch step is kept in the callback's checkpoint state, and a resumed run
    keeps it even if its planned length changed (``trainer.max_steps``): a run already in TSE-RDD stays there.
    The planned length itself is re-read at every start, so a linear blend ends at the new last step.

    Args:
        fraction: switch after this fraction of ``trainer.estimated_stepping_batches`` (paper: 0.1).
        epoch: switch at the start of this epoch (0-based).
        step: switch at this global step (optimizer steps).
        blend: ``none`` (hard switch) or ``linear``: after the switch the objective uses
            ``λ·L_TFE + (1-λ)·L_TSE`` with λ falling linearly from 1 at the switch to 0 at the last step.

    At most one of ``fraction``, ``epoch``, ``step`` may be set; none means ``fraction=0.1`` (the paper's
    first 10 %), as in the config (:func:`rdd_lightning.distillation.resolve_switch`). A switch point of 0
    means TSE-RDD only; a point at or past the end of training means TFE-RDD only.
    """

    def __init__(self, fraction: float | None = None, epoch: int | None = None, step: int | None = None,
                 blend: str = "none"):  # fmt: skip
        switch = resolve_switch(fraction=fraction, epoch=epoch, step=step)
        self.fraction, self.epoch, self.step = (switch.get(k) for k in ("fraction", "epoch", "step"))
        self.blend = check_choice("distillation.blend", blend, BLENDS)
        self.switch_step: int | None = None  # global step of the switch, once known
        self.total_steps: int | None = None
        self._restored_switch_step: int | None = None  # from a checkpoint: wins over the planned one

    def _planned_switch_step(self, trainer: L.Trainer) -> int | None:
        if self.step is not None:
            return int(self.step)
        if self.fraction is not None:
            return int(round(self.fraction * self.total_steps))
        per_epoch = trainer.num_training_batches
        if per_epoch is None or not math.isfinite(per_epoch):
            return None
        return int(self.epoch * math.ceil(per_epoch / max(1, trainer.accumulate_grad_batches)))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        self.total_steps = int(total) if math.isfinite(total) else None
        if self.fraction is not None and self.total_steps is None:
            raise ConfigError(
                "distillation.switch.fraction needs a finite training length (trainer.max_steps or max_epochs)"
            )
        planned = self._planned_switch_step(trainer)
        if self._restored_switch_step is None:
            self.switch_step = planned
            return
        self.switch_step = self._restored_switch_step
        if planned is not None and planned != self.switch_step:
            log.info("RDD stage switch: keeping step %d from the checkpoint (this run's plan gives %d)",
                     self.switch_step, planned)  # fmt: skip

    def stage_at(self, global_step: int, epoch: int) -> int:
        if self.epoch is not None:
            return TSE if epoch >= self.epoch else TFE
        return TSE if global_step >= self.switch_step else TFE

    def blend_lambda_at(self, global_step: int) -> float:
        if self.blend != "linear" or self.switch_step is None or self.total_steps is None:
            return 0.0
        span = self.total_steps - self.switch_step
        if span <= 0:
            return 0.0
        return max(0.0, 1.0 - (global_step - self.switch_step) / span)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        objective = pl_module.objective
        stage = self.stage_at(trainer.global_step, trainer.current_epoch)
        if stage == TSE and self.switch_step is None:  # epoch-based switch with unknown epoch length
            self.switch_step = trainer.global_step
        objective.stage = stage
        objective.blend_lambda = self.blend_lambda_at(trainer.global_step) if stage == TSE else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"switch_step": self.switch_step, "total_steps": self.total_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the saved switch step (kept by :meth:`on_train_start`, which re-reads total_steps)."""
        self._restored_switch_step = state_dict.get("switch_step")
        self.switch_step = state_dict.get("switch_step", self.switch_step)
        self.total_steps = state_dict.get("total_steps", self.total_steps)
