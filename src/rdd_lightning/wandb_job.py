"""Weights & Biases in Hydra sweeps: one W&B run per job, named, grouped, finished.

Lightning's ``WandbLogger`` reuses ``wandb.run`` when one is active, so without ``wandb.finish()`` inside
the task function every job of a sequential multirun after the first logs into the first job's run
(lightning-hydra-template#289, wandb#1314), and a crashed job is shown as finished. :func:`configure` names
the run after the job's overrides, groups it by sweep and gives it an id derived from the job's run
directory (resumed with ``resume="allow"``), so every segment of a pre-empted, requeued or resumed job
logs into one W&B run; :func:`wandb_job` finishes it at the end of the job, with exit code 1 when the job
failed (W&B shows it as failed), marking a pre-empted segment as such.
Only global rank 0 ever creates a W&B run (Lightning's loggers are rank-zero only).
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, open_dict


def job_name(overrides: Sequence[str]) -> str:
    """``key=value,key=value`` of a job's command-line overrides (without paths and hydra keys), or
    ``defaults``: what tells the runs of one sweep apart."""
    keep = [
        o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "paths.", "ckpt_path", "logger"))
    ]
    return ",".join(keep) or "defaults"


def sweep_group(log_dir: str | None = None) -> str | None:
    """The sweep a job belongs to (its sweep directory, relative to ``log_dir``), or ``None`` outside one."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    sweep_dir = Path(str(HydraConfig.get().sweep.dir))
    with contextlib.suppress(ValueError):
        if log_dir is not None:
            return str(sweep_dir.resolve().relative_to(Path(log_dir).resolve()))
    return str(sweep_dir)


def run_id(output_dir: str | Path) -> str:
    """The W&B run id of the job in ``output_dir``: 16 hex digits of the SHA-1 of its absolute path, the same
    in every segment of the job (a resume in place, a requeue) and different for every other run directory."""
    return hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]


def configure(cfg: DictConfig) -> None:
    """Fill the W&B logger's ``name`` (the job's overrides), ``group`` (the sweep, else ``task_name``) and
    ``id`` (:func:`run_id` of the run directory) where the config leaves them null."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if wandb_cfg is None:
        return
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    with open_dict(wandb_cfg):
        if wandb_cfg.get("name") is None:
            wandb_cfg.name = job_name(overrides)
        if wandb_cfg.get("group") is None:
            wandb_cfg.group = sweep_group(cfg.paths.get("log_dir")) or str(cfg.task_name)
        if wandb_cfg.get("id") is None:
            wandb_cfg.id = run_id(cfg.paths.output_dir)


SUMMARY_KEYS = ("best_val_miou", "final_val_miou", "teacher_val_miou", "global_step", "wall_time_s")


def summary(results: Mapping[str, Any]) -> dict[str, Any]:
    """The run's W&B summary: its mIoUs, steps and compute (``compute/<key>``), from ``results.json``."""
    values = {k: results[k] for k in SUMMARY_KEYS if results.get(k) is not None}
    compute = results.get("compute") or {}
    values.update({f"compute/{k}": v for k, v in compute.items() if v is not None})
    return values


def log_results(loggers: Sequence[Any], results: Mapping[str, Any]) -> None:
    """Per-class IoU of the student and the teacher as a W&B table and the run's summary (W&B loggers only;
    rank 0 only)."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        student = results.get("per_class_iou") or {}
        teacher = results.get("teacher_per_class_iou") or {}
        logger.log_table(
            "val/per_class_iou",
            columns=["class", "student IoU (%)", "teacher IoU (%)"],
            data=[[name, iou, teacher.get(name)] for name, iou in student.items()],
        )
        logger.experiment.summary.update(summary(results))


@contextlib.contextmanager
def wandb_job() -> Iterator[None]:
    """Finish the active W&B run (if any) when the job ends: exit code 0, or 1 after an exception."""
    try:
        yield
    except BaseException as err:
        _finish(exit_code=1, preempted=type(err).__name__ == "Preempted")
        raise
    else:
        _finish(exit_code=0)


def _finish(exit_code: int, preempted: bool = False) -> None:
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    if preempted:
        with contextlib.suppress(Exception):
            wandb.mark_preempting()
    wandb.finish(exit_code=exit_code)
