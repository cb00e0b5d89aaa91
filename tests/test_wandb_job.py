"""One W&B run per sweep job: the run is finished with the job's outcome, and named after its overrides."""

from __future__ import annotations

import sys
import types

import pytest

from rdd_lightning import wandb_job
from rdd_lightning.resume import Preempted


class FakeWandb(types.ModuleType):
    """Records what the job does with the active run (the real one needs a W&B run in progress)."""

    def __init__(self):
        super().__init__("wandb")
        self.run, self.calls = object(), []

    def finish(self, exit_code=None):
        self.calls.append(("finish", exit_code))
        self.run = None

    def mark_preempting(self):
        self.calls.append(("mark_preempting", None))


@pytest.fixture
def fake_wandb(monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


def test_finished_job_finishes_its_run_with_exit_code_0(fake_wandb):
    with wandb_job.wandb_job():
        pass
    assert fake_wandb.calls == [("finish", 0)] and fake_wandb.run is None


def test_crashed_job_finishes_its_run_as_failed(fake_wandb):
    with pytest.raises(RuntimeError), wandb_job.wandb_job():
        raise RuntimeError("out of memory")
    assert fake_wandb.calls == [("finish", 1)]


def test_preempted_job_is_marked_preempting(fake_wandb):
    with pytest.raises(Preempted), wandb_job.wandb_job():
        raise Preempted(15, "last.ckpt")
    assert fake_wandb.calls == [("mark_preempting", None), ("finish", 1)]


def test_no_active_run_is_left_alone(fake_wandb):
    fake_wandb.run = None
    with wandb_job.wandb_job():
        pass
    assert fake_wandb.calls == []


def test_job_name_is_the_overrides_without_paths():
    overrides = ["distillation=kd", "seed=2", "hydra.run.dir=/x", "paths.root_dir=/y", "logger=wandb"]
    assert wandb_job.job_name(overrides) == "distillation=kd,seed=2"
    assert wandb_job.job_name([]) == "defaults"


def test_summary_holds_the_mious_and_the_compute_of_a_run():
    from rdd_lightning.wandb_job import summary

    results = {
        "best_val_miou": 40.0,
        "final_val_miou": 39.5,
        "teacher_val_miou": 61.0,
        "global_step": 10,
        "wall_time_s": 12.0,
        "per_class_iou": {"a": 1.0},
        "compute": {"device": "cpu", "train_images_per_s": 8.5, "peak_memory_mb": None},
    }
    assert summary(results) == {
        "best_val_miou": 40.0,
        "final_val_miou": 39.5,
        "teacher_val_miou": 61.0,
        "global_step": 10,
        "wall_time_s": 12.0,
        "compute/device": "cpu",
        "compute/train_images_per_s": 8.5,
    }


def test_run_id_follows_the_run_directory(tmp_path):
    a, b = tmp_path / "multiruns" / "x" / "0", tmp_path / "multiruns" / "x" / "1"
    expected = __import__("hashlib").sha1(str(a.resolve()).encode()).hexdigest()[:16]
    assert (
        wandb_job.run_id(a) == expected == wandb_job.run_id(tmp_path / "multiruns" / "x" / ".." / "x" / "0")
    )
    assert wandb_job.run_id(b) != expected
