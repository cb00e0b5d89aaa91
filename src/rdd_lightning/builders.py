"""From a composed config to the objects of a run: datamodule, objective, trainer, networks, module.

Shared by the entry points (``train``, ``evaluate``); each builder fails with a one-line
:class:`~rdd_lightning.errors.ConfigError` on input it cannot use, before any training starts.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.fabric.utilities.device_parser import _select_auto_accelerator
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import Accelerator, CUDAAccelerator, MPSAccelerator
from lightning.pytorch.callbacks import DeviceStatsMonitor, LearningRateMonitor, ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from rdd_lightning.callbacks import ComputeMonitor, RDDStageSwitch
from rdd_lightning.data import SegmentationDataModule
from rdd_lightning.distillation import DistillationObjective
from rdd_lightning.errors import ConfigError, find_cause, find_config_error
from rdd_lightning.models import SegmentationNet, to_sync_batchnorm
from rdd_lightning.module import DistillationModule
from rdd_lightning.option_checks import check_optimization, check_precision, named_key
from rdd_lightning.resume import AtomicCheckpointIO, StepSeed, slurm_environment
from rdd_lightning.teacher import (
    auto_teacher_checkpoint,
    check_normalization,
    load_teacher,
    normalization_record,
    read_checkpoint,
    train_teacher_command,
    weights_digest,
)

log = logging.getLogger(__name__)

#: callbacks that only make sense with a logger (dropped, with a log line, under ``logger=none``)
LOGGER_CALLBACKS = (LearningRateMonitor, DeviceStatsMonitor)


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


def instantiate_list(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


# ------------------------------------------------------------------------------------------------ data
def build_datamodule(cfg: DictConfig, stage: str = "fit") -> SegmentationDataModule:
    """The dataset's datamodule with its files listed (a missing dataset fails here, before any model)."""
    datamodule: SegmentationDataModule = instantiate(
        cfg.dataset, _convert_="all", seed=int(cfg.get("seed", 0))
    )
    datamodule.prepare_data()  # generates the synthetic data (under a file lock: safe in every DDP rank)
    datamodule.setup(stage)
    return datamodule


def build_objective(cfg: DictConfig, datamodule: SegmentationDataModule) -> DistillationObjective:
    """The training objective; every ``distillation.*`` option is checked here."""
    options = OmegaConf.to_container(cfg.distillation, resolve=True)
    return DistillationObjective(
        **options, num_classes=datamodule.num_classes, ignore_index=datamodule.ignore_index
    )


# ------------------------------------------------------------------------------------------------ trainer
def stage_switch_callback(objective: DistillationObjective) -> list[L.Callback]:
    """The RDD stage switch when the objective has stages (``task: rdd``), else nothing."""
    if objective.task != "rdd":
        return []
    return [RDDStageSwitch(**objective.switch, blend=objective.blend)]


def runs_on_cuda(accelerator: Any) -> bool:
    """Whether Lightning's ``accelerator`` choice (``auto``, ``gpu``, ``cuda``, ``cpu``, ... or an instance)
    puts the run on CUDA on this machine, decided as Lightning decides it."""
    if isinstance(accelerator, Accelerator):
        return isinstance(accelerator, CUDAAccelerator)
    name = str(accelerator or "auto").lower()
    if name == "auto":
        name = _select_auto_accelerator()
    elif name == "gpu":
        name = "mps" if MPSAccelerator.is_available() else "cuda"
    return name == "cuda"


def deterministic_setting(deterministic: Any, on_cuda: bool) -> Any:
    """Lightning's ``deterministic`` for ``trainer.deterministic``: on CUDA ``true`` becomes ``"warn"``
    (``torch.use_deterministic_algorithms(True, warn_only=True)``), because CUDA has no deterministic backward
    of bilinear upsampling or adaptive average pooling and ``true`` would fail at the first backward; on the
    CPU ``true`` stays (bit-exact). Any other value is passed on as it is."""
    if deterministic is True and on_cuda:
        return "warn"
    return deterministic


def trainer_options(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.trainer`` as the Trainer's arguments: checked (``use_distributed_sampler``, ``precision``),
    ``sync_batchnorm`` left to :func:`apply_sync_batchnorm`, ``deterministic`` as :func:`deterministic_setting`
    makes it for the device the run will use."""
    options = OmegaConf.to_container(cfg.trainer, resolve=True)
    options.pop("sync_batchnorm", None)
    if options.get("use_distributed_sampler"):
        raise ConfigError(
            "trainer.use_distributed_sampler=true: the datamodule shards data itself (exact resume, every "
            "validation image once); leave it false"
        )
    check_precision(options.get("precision"))
    if "deterministic" in options:
        on_cuda = runs_on_cuda(options.get("accelerator", "auto"))
        options["deterministic"] = deterministic_setting(options["deterministic"], on_cuda)
    return options


def trainer_error(err: BaseException, options: dict[str, Any]) -> ConfigError | None:
    """The one-line :class:`ConfigError` of what Lightning raised while constructing the Trainer from
    ``options`` (wrapped by Hydra), naming the ``trainer.*`` key its message names; ``None`` if ``err`` is not
    about the options (or already holds a ConfigError). A ValueError or TypeError counts only when its message
    names a key (``strategy``, an unexpected keyword argument): other ones may be bugs, and keep their
    traceback."""
    misconfiguration = find_cause(err, MisconfigurationException)
    cause = misconfiguration or find_cause(err, ValueError) or find_cause(err, TypeError)
    if cause is None or find_config_error(err) is not None:
        return None
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if any(word in first.lower() for word in ("accelerator", "device", "gpu", "cuda")):
        return ConfigError(
            f"trainer.accelerator={options.get('accelerator')!r} trainer.devices={options.get('devices')!r}"
            f" trainer.num_nodes={options.get('num_nodes', 1)}: {first} Ask for the devices this machine "
            f"has (trainer.accelerator=cpu to run without GPUs)."
        )
    key = named_key(first, [k for k in options if not k.startswith("_")])
    if key is None:
        return ConfigError(f"trainer: {first}") if misconfiguration is not None else None
    first = first.rstrip(".")
    if "unexpected keyword argument" in first:
        return ConfigError(
            f"trainer.{key}={options[key]!r}: not an argument of Lightning's Trainer; remove it or check its "
            f"spelling"
        )
    return ConfigError(
        f"trainer.{key}={options[key]!r}: {first}; set trainer.{key} to a value Lightning accepts"
    )


def construct_trainer(options: dict[str, Any], callbacks: list[L.Callback], loggers: list[Any]) -> L.Trainer:
    """The Trainer of ``options`` with this package's checkpoint writer (atomic); options Lightning refuses
    fail as one-line :class:`ConfigError` (:func:`trainer_error`)."""
    try:
        return instantiate(
            options,
            callbacks=callbacks,
            logger=loggers or False,
            plugins=[AtomicCheckpointIO(), *slurm_environment()],
        )
    except Exception as err:
        config_error = trainer_error(err, options)
        if config_error is None:
            raise
        raise config_error from err


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's info lines and warnings held back (a Trainer constructed only to check options)."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def check_trainer(cfg: DictConfig) -> None:
    """Lightning's own checks of every ``trainer.*`` option before any data or network is built: a Trainer is
    constructed from the options alone (no callbacks, loggers or model) and dropped."""
    with quiet_lightning():
        construct_trainer(trainer_options(cfg), callbacks=[], loggers=[])


def check_options(cfg: DictConfig) -> None:
    """Every optimizer, LR-schedule and trainer option of a training config, checked before anything is built
    (:mod:`rdd_lightning.option_checks`, :func:`check_trainer`)."""
    check_optimization(cfg)
    check_trainer(cfg)


def build_trainer(
    cfg: DictConfig, extra_callbacks: list[L.Callback] = (), *, with_loggers: bool = True
) -> L.Trainer:
    """The Trainer of ``cfg.trainer`` with the configured callbacks and loggers, this package's checkpoint
    writer (atomic) and per-step seeding. ``trainer.sync_batchnorm`` is left to :func:`apply_sync_batchnorm`
    (the student only); ``trainer.deterministic=true`` on CUDA warns where CUDA has no deterministic kernel
    (:func:`deterministic_setting`); an option Lightning refuses fails as a :class:`ConfigError`."""
    options = trainer_options(cfg)
    if options.get("deterministic") == "warn" and cfg.trainer.get("deterministic") is True:
        log.info(
            "trainer.deterministic=true on CUDA: deterministic algorithms where CUDA has them, a warning where it "
            "has none (the backward of bilinear upsampling and adaptive average pooling): the same data order "
            "and random numbers, not bit-exact kernels"
        )
    loggers = instantiate_list(cfg.get("logger")) if with_loggers else []
    callbacks = instantiate_list(cfg.get("callbacks")) + list(extra_callbacks)
    if not loggers:
        dropped = [type(c).__name__ for c in callbacks if isinstance(c, LOGGER_CALLBACKS)]
        if dropped:
            log.info("no logger: callbacks %s are dropped", dropped)
        callbacks = [c for c in callbacks if not isinstance(c, LOGGER_CALLBACKS)]
    if options.get("enable_progress_bar") is False:  # instead of Lightning's error about the callback
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    callbacks.append(StepSeed(int(cfg.get("seed", 0))))
    batch_size = OmegaConf.select(cfg, "dataset.batch_size")
    if batch_size is not None:  # results.json's "compute" (training runs)
        callbacks.append(ComputeMonitor(int(batch_size)))
    return construct_trainer(options, callbacks, loggers)


def apply_sync_batchnorm(cfg: DictConfig, trainer: L.Trainer, student: SegmentationNet) -> SegmentationNet:
    """Convert the student's BatchNorm layers to SyncBatchNorm when ``trainer.sync_batchnorm`` asks for it and
    several GPU processes run. The frozen teacher keeps plain BatchNorm in eval mode. On CPU (gloo), where
    SyncBatchNorm cannot run, each process keeps its own statistics and a line says so."""
    if not cfg.trainer.get("sync_batchnorm") or trainer.world_size == 1:
        return student
    if not isinstance(trainer.accelerator, CUDAAccelerator):
        log.info(
            "trainer.sync_batchnorm=true needs GPUs: on %s each process keeps its own BatchNorm statistics",
            type(trainer.accelerator).__name__,
        )
        return student
    return to_sync_batchnorm(student)


# ------------------------------------------------------------------------------------------------ networks
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
    cfg: DictConfig, datamodule: SegmentationDataModule, objective: DistillationObjective, rank: int = 0
) -> tuple[SegmentationNet, dict[str, str]]:
    """The frozen teacher of a distillation run and its record (``checkpoint`` path, ``sha256`` of its
    weights); fails before training when no usable checkpoint is given."""
    choices = HydraConfig.get().runtime.choices
    teacher_choice, dataset_choice = choices.get("teacher"), choices.get("dataset")
    teacher_cfg = OmegaConf.to_container(cfg.teacher, resolve=True)
    checkpoint = teacher_cfg.pop("checkpoint", None)
    teacher_seed = int(teacher_cfg.pop("seed", 0))
    auto_overrides = [str(o) for o in teacher_cfg.pop("auto_overrides", None) or []]
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
            dataset_overrides=overrides + auto_overrides,
            dataset_prepare={**datamodule.prepare_kwargs, "root": datamodule.root},
            seed=teacher_seed,
            rank=rank,
        )
    teacher_cfg["encoder_weights"] = None  # all weights come from the checkpoint
    net = instantiate(teacher_cfg, num_classes=datamodule.num_classes)
    if objective.needs_teacher_aux and net.aux_head is None:
        raise ConfigError(
            f"distillation={objective.name} uses TFE-RDD, which needs a teacher with an auxiliary head; "
            f"teacher={teacher_choice} has teacher.aux_head=false"
        )
    cfg.teacher.checkpoint = str(checkpoint)
    contents = read_checkpoint(checkpoint)
    check_normalization(contents, checkpoint, "teacher.checkpoint", datamodule.normalization)
    net = load_teacher(net, checkpoint, checkpoint=contents, choice=teacher_choice)
    return net, {"checkpoint": str(Path(checkpoint).resolve()), "sha256": weights_digest(net)}


def build_module(
    cfg: DictConfig,
    datamodule: SegmentationDataModule,
    objective: DistillationObjective,
    student: SegmentationNet,
    teacher: SegmentationNet | None,
    teacher_record: dict[str, str] | None,
) -> DistillationModule:
    """The LightningModule of a training run; its checkpoints record what ``evaluate`` and a resume check."""
    choices = HydraConfig.get().runtime.choices
    return DistillationModule(
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
            "normalization": normalization_record(datamodule.normalization),
            "teacher": teacher_record,
        },
        inference=OmegaConf.to_container(cfg.inference, resolve=True) if cfg.get("inference") else None,
    )
