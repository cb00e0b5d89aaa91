"""Process bookkeeping: the auto-teacher is trained by rank 0 alone in a clean environment, other ranks wait;
all ranks of a job agree on the run directory."""

from __future__ import annotations

import json
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


def test_slurm_run_directories_go_back_to_their_training_after_a_requeue(tmp_path):
    """The k-th training started in a segment of job 77 gets the k-th directory; the ranks of one launch
    (same claimant) share it; a requeue (restart count + 1) hands the directories out again in order."""
    claim = resolvers.claim_slurm_run_dir
    assert claim(tmp_path, "77", 0, "pid-10") == "slurm-77"
    assert claim(tmp_path, "77", 0, "pid-10") == "slurm-77"  # resolved again, or by another rank
    assert claim(tmp_path, "77", 0, "pid-11") == "slurm-77-2"  # the next training of the script
    assert claim(tmp_path, "77", 0, "pid-12") == "slurm-77-3"
    # requeued: the script starts its trainings again, in the same order
    assert claim(tmp_path, "77", 1, "pid-20") == "slurm-77"
    assert claim(tmp_path, "77", 1, "torchrun-a") == "slurm-77-2"
    assert claim(tmp_path, "77", 1, "torchrun-a") == "slurm-77-2"  # its other ranks
    assert claim(tmp_path, "77", 1, "pid-22") == "slurm-77-3"
    assert claim(tmp_path, "77", 1, "pid-23") == "slurm-77-4"
    assert claim(tmp_path, "78", 1, "pid-24") == "slurm-78"  # another job
    assert json.loads((tmp_path / "slurm-77-2" / ".slurm_claim.json").read_text()) == {
        "restart": 1,
        "claimant": "torchrun-a",
    }


def test_run_stamp_of_a_single_task_slurm_job_is_its_claimed_directory(monkeypatch, tmp_path):
    for key in ("RDD_RUN_STAMP", "SLURM_STEP_ID", "SLURM_ARRAY_JOB_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # what a requeued one-task sbatch job has
    assert resolvers.run_stamp("%Y", str(tmp_path)) == "slurm-4242"
    assert json.loads((tmp_path / "slurm-4242" / ".slurm_claim.json").read_text())["restart"] == 1
    assert resolvers.run_stamp("%Y") == time.strftime("%Y")  # without the folder: the time, as before


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/stat"), reason="Linux /proc only")
def test_torchrun_ranks_use_the_agents_start_time(monkeypatch):
    for key in ("RDD_RUN_STAMP", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    first = resolvers.run_stamp("%Y-%m-%d_%H-%M-%S.%f")
    time.sleep(0.05)
    assert resolvers.run_stamp("%Y-%m-%d_%H-%M-%S.%f") == first  # the parent's start, not now


class _Exited:
    """A rank process that has exited with ``status`` (``Popen.poll``'s value)."""

    def __init__(self, status):
        self.status = status

    def poll(self):
        return self.status


def test_rank_observer_blames_a_rank_only_for_its_own_failure():
    # rank 2 failed by itself (status 1): the job's failure is rank 2's, whatever rank 1 shows
    assert launch.RankObserver([_Exited(0), _Exited(1)]).failed_rank() == (2, 1)
    # ranks stopped by a pre-emption exit with 128 + signal: no failure
    assert launch.RankObserver([_Exited(128 + 15), _Exited(128 + 10)]).failed_rank() is None
    # killed with SIGKILL after the main process failed by itself (Lightning kills the others): not blamed
    assert launch.RankObserver([_Exited(-9)]).failed_rank() is None
    # ... unless the observer saw that rank die while the job ran
    observer = launch.RankObserver([_Exited(-9)])
    assert observer._check() and observer.failed_rank() == (1, -9)
    assert str(launch.RankFailed(1, -9)).startswith("rank 1 was killed by SIGKILL; its log: ")
