"""Process bookkeeping: the auto-teacher is trained by rank 0 alone in a clean environment, other ranks wait;
all ranks of a job agree on the run directory."""

from __future__ import annotations

import threading
import time

import pytest

from rdd_lightning import launch, resolvers
from rdd_lightning.errors import ConfigError
from rdd_lightning.teacher import auto_teacher_checkpoint

AUTO = dict(
    teacher_choice="resnet18",
    teacher_cfg={"arch": "DeepLabV3"},
    dataset_overrides=[],
    dataset_prepare={"root": "x"},
    seed=0,
)


def _folder(cache):
    return next((cache / "teachers").glob("synthetic-resnet18-*"))


def test_other_ranks_wait_for_rank_zeros_teacher(tmp_path):
    got = {}
    waiter = threading.Thread(
        target=lambda: got.update(path=auto_teacher_checkpoint(cache_dir=tmp_path, rank=1, **AUTO))
    )
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive()  # rank 1 does not train it
    (_folder(tmp_path) / "teacher.ckpt").write_bytes(b"weights")  # what rank 0 leaves when done
    waiter.join(timeout=10)
    assert got["path"] == _folder(tmp_path) / "teacher.ckpt"


def test_other_ranks_fail_when_rank_zeros_training_failed(tmp_path):
    folder = tmp_path / "teachers"
    errors = []

    def wait():
        try:
            auto_teacher_checkpoint(cache_dir=tmp_path, rank=2, **AUTO)
        except ConfigError as err:
            errors.append(str(err))

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.5)
    (next(folder.glob("synthetic-resnet18-*")) / "failed.txt").write_text(
        "training the synthetic teacher failed"
    )
    waiter.join(timeout=10)
    assert errors == ["training the synthetic teacher failed"]


def test_clean_environment_drops_rank_and_slurm_variables(monkeypatch):
    for key, value in {
        "LOCAL_RANK": "1",
        "RANK": "3",
        "WORLD_SIZE": "4",
        "MASTER_PORT": "1234",
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "TORCHELASTIC_RUN_ID": "x",
        "HOME_OK": "1",
    }.items():
        monkeypatch.setenv(key, value)
    env = launch.clean_environment()
    assert env["HOME_OK"] == "1"
    assert not {"LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"} & set(env)
    assert "TORCHELASTIC_RUN_ID" not in env


def test_run_stamp_is_shared_by_the_ranks_of_a_job(monkeypatch):
    for key in (
        "RDD_RUN_STAMP",
        "SLURM_NTASKS",
        "SLURM_STEP_ID",
        "SLURM_JOB_ID",
        "SLURM_ARRAY_JOB_ID",
        "TORCHELASTIC_RUN_ID",
    ):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RDD_RUN_STAMP", "exp7")
    assert resolvers.run_stamp() == "exp7"
    monkeypatch.delenv("RDD_RUN_STAMP")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert (
        resolvers.run_stamp() == "slurm-4242.0"
    )  # every srun task, and the requeued job, get this directory
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert resolvers.run_stamp() == "slurm-100_3.0"


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/stat"), reason="Linux /proc only")
def test_torchrun_ranks_use_the_agents_start_time(monkeypatch):
    for key in ("RDD_RUN_STAMP", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    first = resolvers.run_stamp("%Y-%m-%d_%H-%M-%S.%f")
    time.sleep(0.05)
    assert resolvers.run_stamp("%Y-%m-%d_%H-%M-%S.%f") == first  # the parent's start, not now
