"""Every option of every config group composes, and the keys other code relies on exist."""

from __future__ import annotations

from importlib.resources import files

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import compose_train_cfg

CONF = files("rdd_lightning.conf")
GROUPS = [
    "dataset",
    "student",
    "teacher",
    "distillation",
    "trainer",
    "logger",
    "callbacks",
    "debug",
    "experiment",
]


def options(group: str) -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in CONF.joinpath(group).iterdir() if p.name.endswith(".yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(tmp_path, group, option):
    cfg = compose_train_cfg(tmp_path, [f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_required_keys(tmp_path):
    cfg = compose_train_cfg(tmp_path, [])
    for key in [
        "dataset.root",
        "dataset.crop_size",
        "dataset.batch_size",
        "dataset.num_workers",
        "teacher.checkpoint",
        "seed",
        "ckpt_path",
        "task_name",
        "trainer.max_steps",
    ]:
        assert OmegaConf.select(cfg, key, throw_on_missing=True) is not None or key == "ckpt_path", key
    assert cfg.dataset.name == "synthetic" and cfg.teacher.checkpoint == "auto"


def test_defaults_are_the_demo(tmp_path):
    cfg = compose_train_cfg(tmp_path, [])
    assert cfg.distillation.kd.weight > 0  # the default run distils
    assert cfg.student.encoder_weights is None  # runs offline
    assert cfg.trainer.max_steps == cfg.dataset.recipe.max_steps


def test_real_dataset_has_paper_recipe(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["dataset=camvid", "student=resnet18", "teacher=resnet101"])
    assert list(cfg.dataset.crop_size) == [360, 360]
    assert cfg.trainer.max_steps == 40000 and cfg.optimizer.lr == 0.02 and cfg.optimizer.weight_decay == 1e-4
    assert cfg.teacher.checkpoint is None and cfg.teacher.encoder_name == "resnet101"
    assert cfg.student.encoder_weights == "imagenet"


def test_unknown_option_is_named(tmp_path):
    with pytest.raises(ConfigCompositionException, match="student"):
        compose_train_cfg(tmp_path, ["student=resnet9000"])


@pytest.mark.parametrize("name", ["default", "cpu", "gpu", "ddp"])
def test_trainer_configs_instantiate_their_target(tmp_path, name):
    cfg = compose_train_cfg(tmp_path, [f"trainer={name}"])
    assert cfg.trainer._target_ == "lightning.pytorch.trainer.Trainer"
    if name == "ddp":
        assert cfg.trainer.sync_batchnorm and cfg.trainer.strategy == "ddp"


def test_callbacks_and_loggers_instantiate(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["logger=tensorboard"])
    for group in (cfg.callbacks, cfg.logger):
        for node in group.values():
            instantiate(node)


def test_every_config_folder_is_a_listed_package(repo_root):
    """An installed wheel only ships the config folders pyproject.toml lists (a new group must be added)."""
    import tomllib

    listed = set(tomllib.loads((repo_root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {
        "rdd_lightning." + str(p.relative_to(repo_root)).replace("/", ".")
        for p in (repo_root / "conf").rglob("*")
        if p.is_dir() and p.name != "__pycache__"
    }
    assert folders - listed == set()


@pytest.mark.parametrize("dataset", ["camvid", "cityscapes", "voc", "ade20k"])
def test_real_datasets_default_to_the_papers_teacher(tmp_path, dataset):
    cfg = compose_train_cfg(tmp_path, [f"dataset={dataset}"])
    assert cfg.teacher.encoder_name == "resnet101" and cfg.teacher.decoder_channels == 256
    assert (
        compose_train_cfg(tmp_path, [f"dataset={dataset}", "teacher=resnet50"]).teacher.encoder_name
        == "resnet50"
    )
    assert compose_train_cfg(tmp_path, []).teacher.encoder_name == "resnet34"  # the synthetic demo's


def test_slurm_launcher_follows_the_trainer(tmp_path):
    """Each SLURM job is one DDP run: one task per GPU on every node, as Lightning's SLURM environment needs."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    overrides = [
        "hydra/launcher=submitit_slurm",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.account=lab",
        "hydra.launcher.qos=high",
    ]
    with initialize_config_module(config_module="rdd_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["tasks_per_node"], launcher["gpus_per_node"], launcher["nodes"]) == (4, 4, 2)
    assert (launcher["partition"], launcher["account"], launcher["qos"]) == ("gpu", "lab", "high")
    assert launcher["max_num_timeout"] > 0 and launcher["signal_delay_s"] > 0  # pre-empted jobs requeue
    GlobalHydra.instance().clear()
