"""Train a network, plain or distilled from a frozen teacher: ``python -m rdd_lightning.train [overrides]``.

Composed by Hydra from ``conf/train.yaml``. Every run writes, in its run directory, the resolved config
(``.hydra/``), checkpoints (``checkpoints/best.ckpt``, ``last.ckpt``), logs and ``results.json``.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from rdd_lightning.data import SegmentationDataModule
from rdd_lightning.distillation import DistillationObjective
from rdd_lightning.errors import ConfigError, exit_on_config_error
from rdd_lightning.models import SegmentationNet
from rdd_lightning.module import DistillationModule
from rdd_lightning.teacher import auto_teacher_checkpoint, load_teacher, train_teacher_command

log = logging.getLogger("rdd_lightning.train")


@rank_zero_only
def print_config(cfg: DictConfig) -> None:
    """Print the composed config as a tree (lightning-hydra-template style)."""
    from rich import print as rprint
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    for key, value in cfg.items():
        branch = tree.add(str(key))
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch.add(text.rstrip())
    rprint(tree)


def check_run_dir(output_dir: Path) -> None:
    """Refuse to write into a run directory that already holds a finished run's results or checkpoints."""
    if (output_dir / "results.json").exists() or any((output_dir / "checkpoints").glob("*.ckpt")):
        raise ConfigError(
            f"run directory {str(output_dir)!r} already holds results or checkpoints of another run; "
            f"pass a new hydra.run.dir (resume with ckpt_path=<...>/last.ckpt into a new directory)"
        )


def build_student(cfg: DictConfig, num_classes: int) -> SegmentationNet:
    return instantiate(cfg.student, num_classes=num_classes)


def network_spec(student_cfg: DictConfig) -> dict[str, Any] | None:
    """Keyword arguments of ``build_model`` for the student (weights and class count left out), recorded in
    checkpoints so that ``rdd_lightning.evaluate`` rebuilds the network from the checkpoint alone."""
    spec = OmegaConf.to_container(student_cfg, resolve=True)
    if spec.pop("_target_", None) != "rdd_lightning.models.build_model":
        return None  # a custom network factory: evaluation needs student=<its config>
    spec.pop("num_classes", None)
    return {**spec, "encoder_weights": None}


def build_teacher(
    cfg: DictConfig, datamodule: SegmentationDataModule, objective: DistillationObjective
) -> SegmentationNet:
    """The frozen teacher of a distillation run; fails before training when no usable checkpoint is given."""
    choices = HydraConfig.get().runtime.choices
    teacher_choice, dataset_choice = choices.get("teacher"), choices.get("dataset")
    teacher_cfg = OmegaConf.to_container(cfg.teacher, resolve=True)
    checkpoint = teacher_cfg.pop("checkpoint", None)
    if checkpoint in (None, ""):
        raise ConfigError(
            f"distillation={objective.name} needs a teacher checkpoint: pass teacher.checkpoint=<path to a "
            f"checkpoint of this package>. Train one with `{train_teacher_command(teacher_choice, dataset_choice)}`"
            + (
                ", or use teacher.checkpoint=auto on dataset=synthetic."
                if datamodule.name == "synthetic"
                else "."
            )
        )
    if checkpoint == "auto":
        if datamodule.name != "synthetic":
            raise ConfigError(
                f"teacher.checkpoint=auto works on dataset=synthetic only (dataset={dataset_choice}). Train a "
                f"teacher with `{train_teacher_command(teacher_choice, dataset_choice)}` and pass "
                f"teacher.checkpoint=<its checkpoints/best.ckpt>."
            )
        overrides = [o for o in HydraConfig.get().overrides.task if o.lstrip("+~").startswith("dataset")]
        checkpoint = auto_teacher_checkpoint(
            cache_dir=cfg.paths.cache_dir,
            teacher_choice=teacher_choice,
            teacher_cfg=teacher_cfg,
            dataset_overrides=overrides,
            dataset_prepare={**datamodule.prepare_kwargs, "root": datamodule.root},
            seed=int(cfg.seed),
        )
    teacher_cfg["encoder_weights"] = None  # all weights come from the checkpoint
    net = hydra.utils.instantiate(teacher_cfg, num_classes=datamodule.num_classes)
    if objective.needs_teacher_aux and net.aux_head is None:
        raise ConfigError(
            f"distillation={objective.name} uses TFE-RDD, which needs a teacher with an auxiliary head; "
            f"teacher={teacher_choice} has teacher.aux_head=false"
        )
    cfg.teacher.checkpoint = str(checkpoint)
    return load_teacher(net, checkpoint)


def stage_switch_callback(objective: DistillationObjective) -> list[L.Callback]:
    """The RDD stage switch when the objective has stages (``task: rdd``), else nothing."""
    if objective.task != "rdd":
        return []
    from rdd_lightning.callbacks import RDDStageSwitch

    return [RDDStageSwitch(**objective.switch, blend=objective.blend)]


def instantiate_list(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def validated_final(
    trainer: L.Trainer, module: DistillationModule, datamodule: SegmentationDataModule
) -> dict:
    """Validation metrics of the final weights: the last validation if it saw them, else a new one."""
    last = module.last_val
    if not last or last.get("sanity") or last.get("global_step") != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    return dict(module.last_val)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train as ``cfg`` says; return (and write) the results dictionary."""
    start = time.time()
    output_dir = Path(cfg.paths.output_dir)
    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r}: file not found (resume needs an existing last.ckpt)")
    check_run_dir(output_dir)
    print_config(cfg)
    L.seed_everything(cfg.seed, workers=True)

    datamodule: SegmentationDataModule = instantiate(cfg.dataset, _convert_="all")
    datamodule.prepare_data()  # generates the synthetic data (under a file lock: safe in every DDP rank)
    datamodule.setup("fit")  # lists and pairs the files: a missing dataset fails here, before any model
    objective = DistillationObjective(**OmegaConf.to_container(cfg.distillation, resolve=True),
                                      ignore_index=datamodule.ignore_index)  # fmt: skip
    student = build_student(cfg, datamodule.num_classes)
    teacher = build_teacher(cfg, datamodule, objective) if objective.needs_teacher else None
    if objective.task != "ce" and student.aux_head is None and teacher is not None:
        log.info("student has no auxiliary head: RDD's aux terms are skipped")

    choices = HydraConfig.get().runtime.choices
    module = DistillationModule(
        student=student,
        teacher=teacher,
        objective=objective,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        num_classes=datamodule.num_classes,
        class_names=datamodule.class_names,
        ignore_index=datamodule.ignore_index,
        metadata={
            "dataset": datamodule.name,
            "student_config": choices.get("student"),
            "class_names": datamodule.class_names,
            "network": network_spec(cfg.student),
        },  # fmt: skip
        inference=OmegaConf.to_container(cfg.inference, resolve=True) if cfg.get("inference") else None,
    )
    callbacks = instantiate_list(cfg.get("callbacks")) + stage_switch_callback(objective)
    loggers = instantiate_list(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    final = validated_final(trainer, module, datamodule) if cfg.validate_final else dict(module.last_val)

    ckpt_cb = trainer.checkpoint_callback
    best_path = getattr(ckpt_cb, "best_model_path", "") or None
    best_score = getattr(ckpt_cb, "best_model_score", None)
    best_miou = float(best_score) if best_score is not None else final.get("miou")
    # best_model_score is the float32 value Lightning logged: compare with a tolerance above its rounding
    if final.get("miou") is not None and (best_miou is None or final["miou"] > best_miou + 1e-4):
        best_miou = final["miou"]  # the final weights beat every saved validation: last.ckpt holds them
        if ckpt_cb is not None:
            last = Path(ckpt_cb.dirpath) / "last.ckpt"
            trainer.save_checkpoint(last)
            best_path = str(last)
    results = {
        "task_name": cfg.task_name,
        "tags": list(cfg.tags),
        "overrides": list(HydraConfig.get().overrides.task),
        "choices": {k: v for k, v in choices.items() if not k.startswith("hydra")},
        "seed": int(cfg.seed),
        "dataset": datamodule.name,
        "distillation": objective.name,
        "best_val_miou": best_miou,
        "final_val_miou": final.get("miou"),
        "final_val_step": final.get("global_step"),
        "final_pixel_acc": final.get("pixel_acc"),
        "per_class_iou": final.get("per_class_iou"),
        "global_step": int(trainer.global_step),
        "wall_time_s": round(time.time() - start, 2),
        "best_checkpoint": best_path,
        "last_checkpoint": str(Path(ckpt_cb.dirpath) / "last.ckpt") if ckpt_cb is not None else None,
        "teacher_checkpoint": cfg.teacher.get("checkpoint") if teacher is not None else None,
        "output_dir": str(output_dir),
    }
    if trainer.is_global_zero:
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        log.info("val mIoU: best %.2f, final %.2f -> %s", best_miou or float("nan"),
                 final.get("miou") or float("nan"), output_dir / "results.json")  # fmt: skip
    return results


@hydra.main(version_base="1.3", config_path="pkg://rdd_lightning.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    torch.set_float32_matmul_precision("high")
    # the frozen teacher is in eval mode on purpose
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    results = exit_on_config_error(lambda: run(cfg), log)
    return results.get("best_val_miou")  # the value Hydra sweepers optimise


if __name__ == "__main__":
    main()
