"""Shared fixtures: Hydra configs composed like the CLI does, on tiny synthetic data under tmp_path."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

# Tiny, fast settings: 32 px scenes, a handful of images, CPU, no progress bars.
TINY = [
    "dataset.prepare.image_size=32",
    "dataset.prepare.num_train=8",
    "dataset.prepare.num_val=4",
    "dataset.prepare.num_test=2",
    "dataset.crop_size=[32,32]",
    "dataset.batch_size=2",
    "dataset.val_batch_size=4",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "trainer.log_every_n_steps=1",
    "callbacks.difficulty_maps.indices=[0]",  # one drawing per validation (tests/test_difficulty_maps.py: more)
]


@pytest.fixture(autouse=True)
def _offline_and_quiet(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RDD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    yield
    # A test that calls train.run (not run_job, which finishes it) leaves its W&B run active, and Lightning's
    # WandbLogger would log the next test's run into it.
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
    # A Hydra run inside a test binds console handlers to that test's capture stream, closed after the test:
    # a later log call through them prints "--- Logging error ---" into another test's stderr.
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in list(getattr(logger, "handlers", [])):
            if getattr(getattr(handler, "stream", None), "closed", False):
                logger.removeHandler(handler)


def compose_train_cfg(
    tmp_path: Path, overrides: list[str], config_name: str = "train", run_dir: Path | None = None
) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with ``overrides`` as ``python -m rdd_lightning.train`` would,
    with the run directory at ``run_dir`` (default ``tmp_path/run``) and HydraConfig set (for
    ``${hydra:...}`` interpolations and the group choices)."""
    GlobalHydra.instance().clear()
    run_dir = run_dir or tmp_path / "run"
    with initialize_config_module(config_module="rdd_lightning.conf", version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.runtime.cwd = str(tmp_path)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture
def train_cfg(tmp_path):
    """``train_cfg(*overrides)`` -> composed tiny config (TINY overrides first, yours win), each call with a
    run directory of its own (``tmp_path/run0``, ``run1``, ...)."""
    calls = []

    def make(*overrides: str) -> DictConfig:
        calls.append(None)
        return compose_train_cfg(tmp_path, [*TINY, *overrides], run_dir=tmp_path / f"run{len(calls) - 1}")

    yield make
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "WANDB_MODE": "offline",
            "HF_HUB_OFFLINE": "1",
            "RDD_ROOT": str(tmp_path),
            "RDD_CACHE_DIR": str(tmp_path / "cache"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def train_once(tmp_path_factory, name: str, overrides: list[str]) -> dict:
    """``rdd_lightning.train.run`` of a tiny config (TINY + ``overrides``) in a folder of its own, for
    module-scoped fixtures (a teacher trained once for a whole test module): the environment conftest's
    autouse fixture sets for each test is set here too."""
    from rdd_lightning.train import run

    base = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("RDD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        results = run(compose_train_cfg(base, [*TINY, *overrides], run_dir=base / "run"))
    GlobalHydra.instance().clear()
    return results
