"""Lightning callbacks of the package."""

from __future__ import annotations

import logging
import math
import resource
import time
from typing import Any

import lightning as L
import torch

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

    def __init__(
        self,
        fraction: float | None = None,
        epoch: int | None = None,
        step: int | None = None,
        blend: str = "none",
    ):
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
            log.info(
                "RDD stage switch: keeping step %d from the checkpoint (this run's plan gives %d)",
                self.switch_step,
                planned,
            )

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


class ComputeMonitor(L.Callback):
    """What a run costs, so methods can be compared at equal compute: training throughput, training time
    (validation excluded), peak memory.

    Throughput is measured over the intervals between consecutive training-batch starts (no device
    synchronisation: over many steps the queue of asynchronous GPU work evens out); an interval ends early at
    a validation or a checkpoint save, whose time is not counted, and counts global images (``global batch`` per optimizer step). Peak memory is the
    peak of ``torch.cuda.max_memory_allocated`` on GPUs, else the peak resident memory of the process
    (``ru_maxrss``), the maximum over processes under DDP. The totals are kept in checkpoints, so a run resumed
    after a pre-emption reports the training time and images of all its segments.

    ``compute/train_images_per_s`` is logged every ``trainer.log_every_n_steps``.

    Args:
        global_batch_size: images per optimizer step over all processes (``dataset.batch_size``).
    """

    def __init__(self, global_batch_size: int):
        self.global_batch_size = int(global_batch_size)
        self.train_time_s = 0.0  # training intervals only, over every segment of the run
        self.train_images = 0
        self._last_start: float | None = None
        self._last_step: int | None = None
        self.peak_memory_mb: float | None = None

    # --------------------------------------------------------------------------------------- timing
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(pl_module.device, torch.device) and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._last_start = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._last_start is None:
            self._last_start, self._last_step = time.perf_counter(), trainer.global_step
        else:
            self._close_interval(trainer, restart=True)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        every = trainer.log_every_n_steps
        if every and trainer.global_step % every == 0 and self.train_time_s > 0:
            pl_module.log("compute/train_images_per_s", self.images_per_s, on_step=True, on_epoch=False)

    def _close_interval(self, trainer: L.Trainer, restart: bool) -> None:
        """Count the time since the interval began if whole optimizer steps (all their accumulated micro-batches)
        finished in it; then start the next interval now, or (``restart=False``) at the next batch."""
        now, step = time.perf_counter(), trainer.global_step
        if self._last_start is not None and step > self._last_step:
            per_step = self.global_batch_size * max(1, int(trainer.accumulate_grad_batches))
            self.train_time_s += now - self._last_start
            self.train_images += (step - self._last_step) * per_step
            self._last_start, self._last_step = now, step
        if not restart:
            self._last_start = None

    def _pause(self, trainer: L.Trainer, *args: Any) -> None:
        """A validation or a checkpoint save: the steps so far count, the time until the next batch does not."""
        self._close_interval(trainer, restart=False)

    on_validation_start = _pause
    on_save_checkpoint = _pause

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_interval(trainer, restart=False)
        peak = torch.tensor(self._process_peak_mb(pl_module.device), device=pl_module.device)
        self.peak_memory_mb = float(trainer.strategy.reduce(peak, reduce_op="max"))

    # --------------------------------------------------------------------------------------- results
    @property
    def images_per_s(self) -> float | None:
        return self.train_images / self.train_time_s if self.train_time_s > 0 else None

    @staticmethod
    def _process_peak_mb(device: torch.device) -> float:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def summary(self, wall_time_s: float, world_size: int, device: torch.device) -> dict[str, Any]:
        """The ``compute`` record of ``results.json``. ``device_hours`` = wall time × processes (what a
        cluster bills; GPU-hours on GPUs)."""
        return {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "world_size": int(world_size),
            "wall_time_s": round(wall_time_s, 2),
            "device_hours": round(wall_time_s * world_size / 3600, 5),
            "train_time_s": round(self.train_time_s, 2),
            "train_images": int(self.train_images),
            "train_images_per_s": None if self.images_per_s is None else round(self.images_per_s, 3),
            "peak_memory_mb": None if self.peak_memory_mb is None else round(self.peak_memory_mb, 1),
            "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "host_max_rss",
        }

    def state_dict(self) -> dict[str, Any]:
        return {"train_time_s": self.train_time_s, "train_images": self.train_images}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_time_s = float(state_dict.get("train_time_s", 0.0))
        self.train_images = int(state_dict.get("train_images", 0))
