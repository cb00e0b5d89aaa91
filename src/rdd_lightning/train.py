"""Train a network, plain or distilled from a frozen teacher: ``python -m rdd_lightning.train [overrides]``.

Composed by Hydra from ``conf/train.yaml``. Every run writes, in its run directory, the resolved config
(``.hydra/``), checkpoints (``checkpoints/best.ckpt``, ``last.ckpt`` = the final weights), logs and
``results.json``. Single runs, multiruns (``-m``), DDP (``trainer=ddp``, or processes started by torchrun /
srun) and SLURM sweeps (``hydra/launcher=submitit_slurm``) all go through :func:`run`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from rdd_lightning import builders, wandb_job
from rdd_lightning.callbacks import ComputeMonitor
from rdd_lightning.errors import exit_on_config_error
from rdd_lightning.launch import ddp_job, track_children
from rdd_lightning.module import DistillationModule
from rdd_lightning.resume import Preempted, RunFinished, resolve_ckpt_path, write_json

log = logging.getLogger("rdd_lightning.train")


def validated_final(
    trainer: L.Trainer, module: DistillationModule, datamodule: L.LightningDataModule
) -> dict:
    """Validation metrics of the final weights: the last validation if it saw them, else a new one."""
    last = module.last_val
    if not last or last.get("sanity") or last.get("global_step") != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    return dict(module.last_val)


def save_final(trainer: L.Trainer, final: dict[str, Any]) -> tuple[str | None, float | None, str | None]:
    """Save the final weights as ``last.ckpt`` (always) and, if they beat every earlier validation, as
    ``best.ckpt`` too. Returns ``(best checkpoint, best mIoU, last checkpoint)``."""
    ckpt_cb = trainer.checkpoint_callback
    if ckpt_cb is None:
        return None, final.get("miou"), None
    last = Path(ckpt_cb.dirpath) / "last.ckpt"
    trainer.save_checkpoint(last)
    best_path = ckpt_cb.best_model_path or None
    best = float(ckpt_cb.best_model_score) if ckpt_cb.best_model_score is not None else None
    # best_model_score is the float32 value Lightning logged: compare with a tolerance above its rounding
    if final.get("miou") is not None and (best is None or final["miou"] > best + 1e-4):
        best, best_path = final["miou"], str(Path(ckpt_cb.dirpath) / f"{ckpt_cb.filename or 'best'}.ckpt")
        trainer.save_checkpoint(best_path)
    return best_path, best, str(last)


def compute_record(trainer: L.Trainer, wall_time_s: float) -> dict[str, Any]:
    """``results.json``'s ``compute``: wall time and device-hours of this invocation, training time, images
    and throughput over every segment of the run, peak memory (:class:`ComputeMonitor`)."""
    monitor = next((c for c in trainer.callbacks if isinstance(c, ComputeMonitor)), None)
    if monitor is None:
        return {"wall_time_s": round(wall_time_s, 2)}
    return monitor.summary(wall_time_s, trainer.world_size, trainer.strategy.root_device)


def results_record(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: DistillationModule,
    datamodule,
    final: dict,
    saved: tuple,
    teacher: dict | None,
    ckpt_path: str | None,
    wall_time_s: float,
) -> dict[str, Any]:
    """What ``results.json`` holds (``report`` and the notebooks read it instead of logs)."""
    best_path, best_miou, last_path = saved
    choices = HydraConfig.get().runtime.choices
    paper = cfg.get("paper")
    return {
        "task_name": cfg.task_name,
        "tags": list(cfg.tags),
        "overrides": list(HydraConfig.get().overrides.task),
        "choices": {k: v for k, v in choices.items() if not k.startswith("hydra")},
        "seed": int(cfg.seed),
        "dataset": datamodule.name,
        "val_split": datamodule.splits["val"],
        "distillation": module.objective.name,
        "experiment": choices.get("experiment"),
        "paper": OmegaConf.to_container(paper, resolve=True) if paper is not None else None,
        "best_val_miou": best_miou,
        "final_val_miou": final.get("miou"),
        "final_val_step": final.get("global_step"),
        "final_pixel_acc": final.get("pixel_acc"),
        "per_class_iou": final.get("per_class_iou"),
        "teacher_val_miou": module.teacher_val.get("miou"),
        "teacher_per_class_iou": module.teacher_val.get("per_class_iou"),
        "global_step": int(trainer.global_step),
        "world_size": trainer.world_size,
        "global_batch_size": datamodule.batch_size,
        "per_process_batch_size": datamodule.per_process_batch(trainer.world_size),
        "resumed_from": ckpt_path,
        "wall_time_s": round(wall_time_s, 2),
        "compute": compute_record(trainer, wall_time_s),
        "best_checkpoint": best_path,
        "last_checkpoint": last_path,
        "teacher_checkpoint": teacher["checkpoint"] if teacher else None,
        "teacher_sha256": teacher["sha256"] if teacher else None,
        "output_dir": str(cfg.paths.output_dir),
    }


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train as ``cfg`` says; return (and write) the results dictionary."""
    start = time.time()
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(output_dir, cfg.ckpt_path)  # before anything in the directory changes
    builders.print_config(cfg)
    builders.check_options(cfg)  # optimizer, schedule, trainer: before any data or network is built
    L.seed_everything(cfg.seed, workers=True)

    datamodule = builders.build_datamodule(cfg)
    objective = builders.build_objective(cfg, datamodule)
    wandb_job.configure(cfg)
    trainer = builders.build_trainer(cfg, builders.stage_switch_callback(objective))
    log.info(
        "batch: %d global = %d process(es) x %d",
        datamodule.batch_size,
        trainer.world_size,
        datamodule.per_process_batch(trainer.world_size),
    )
    student = builders.apply_sync_batchnorm(cfg, trainer, builders.build_student(cfg, datamodule.num_classes))
    teacher, teacher_record = (None, None)
    if objective.needs_teacher:
        teacher, teacher_record = builders.build_teacher(cfg, datamodule, objective, rank=rank_zero_only.rank)
    module = builders.build_module(cfg, datamodule, objective, student, teacher, teacher_record)
    for lg in trainer.loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        track_children(trainer)  # ddp_job waits for the ranks this trainer started
    final = validated_final(trainer, module, datamodule) if cfg.validate_final else dict(module.last_val)
    saved = save_final(trainer, final)
    results = results_record(
        cfg, trainer, module, datamodule, final, saved, teacher_record, ckpt_path, time.time() - start
    )
    if trainer.is_global_zero:
        write_json(output_dir / "results.json", results)
        wandb_job.log_results(trainer.loggers, results)
        log.info(
            "val mIoU: best %.2f, final %.2f -> %s",
            results["best_val_miou"] or float("nan"),
            results["final_val_miou"] or float("nan"),
            output_dir / "results.json",
        )
    return results


def run_job(cfg: DictConfig) -> dict[str, Any]:
    """:func:`run` as one job of a (possibly sweeping, possibly multi-process) launch: this job's DDP ranks
    get this job's command, its W&B run is finished, and a pre-empted job exits after saving."""
    try:
        with ddp_job("rdd_lightning.train", cfg.paths.output_dir), wandb_job.wandb_job():
            return run(cfg)
    except RunFinished as done:  # a requeued SLURM job's sweep: this job finished in an earlier segment
        log.info("%s", done)
        return json.loads((done.output_dir / "results.json").read_text())
    except Preempted as stop:  # the checkpoint is saved and the W&B run finished: requeue last
        log.warning("%s; resume with ckpt_path=last in the same run directory", stop)
        stop.requeue()
        sys.exit(128 + stop.signum)


@hydra.main(version_base="1.3", config_path="pkg://rdd_lightning.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    torch.set_float32_matmul_precision("high")
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")  # the frozen teacher
    warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")  # it is: see samplers
    # validation metrics are torchmetrics states summed over processes: every rank logs the same value
    warnings.filterwarnings(
        "ignore", message=r".*sync_dist=True.* when logging on epoch level in distributed"
    )
    results = exit_on_config_error(lambda: run_job(cfg), log)
    return results.get("best_val_miou")  # the value Hydra sweepers optimise


if __name__ == "__main__":
    main()
