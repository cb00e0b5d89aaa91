"""`python -m rdd_lightning.train` end to end on tiny synthetic data, resume, and bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from rdd_lightning.errors import ConfigError
from rdd_lightning.train import run
from tests.conftest import cli_env, compose_train_cfg

pytestmark = pytest.mark.slow

TEACHER_FAST = ["teacher=resnet18"]


def teacher_checkpoint(train_cfg) -> Path:
    """Train a tiny supervised network to use as a teacher checkpoint."""
    cfg = train_cfg(
        "distillation=none",
        "student=resnet18_scratch",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "task_name=teacher",
    )
    results = run(cfg)
    return Path(results["best_checkpoint"])


def test_plain_run_writes_results(train_cfg, tmp_path):
    cfg = train_cfg("distillation=none", "trainer.max_steps=3", "trainer.val_check_interval=2")
    results = run(cfg)
    out = Path(cfg.paths.output_dir)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    for key in (
        "overrides",
        "seed",
        "best_val_miou",
        "final_val_miou",
        "per_class_iou",
        "wall_time_s",
        "best_checkpoint",
    ):
        assert key in on_disk, key
    assert on_disk["global_step"] == 3
    assert 0.0 <= on_disk["final_val_miou"] <= 100.0 and on_disk["best_val_miou"] >= on_disk["final_val_miou"]
    assert len(on_disk["per_class_iou"]) == 11
    assert Path(on_disk["best_checkpoint"]).is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "csv" / "metrics.csv").is_file()
    assert "dataset.batch_size=2" in on_disk["overrides"]
    compute = on_disk["compute"]
    assert compute["device"] == "cpu" and compute["world_size"] == 1
    assert compute["device_hours"] == pytest.approx(compute["wall_time_s"] / 3600, abs=1e-5)
    # 3 steps of 2 images, each timed (the validation after step 2 and the final save are not)
    assert compute["train_images"] == 6 and compute["train_images_per_s"] > 0
    assert on_disk["teacher_val_miou"] is None and on_disk["paper"] is None


@pytest.mark.slow
def test_wandb_logger_runs_offline(train_cfg):
    """logger=wandb (W&B offline, as conftest sets WANDB_MODE) logs metrics and the config beside the CSV."""
    cfg = train_cfg(
        "distillation=none", "logger=wandb", "trainer.max_steps=2", "trainer.val_check_interval=2"
    )
    results = run(cfg)
    out = Path(cfg.paths.output_dir)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (out / "csv" / "metrics.csv").is_file() and results["global_step"] == 2


def test_stopped_by_max_steps_validates_final_weights(train_cfg):
    # validation every 2 steps, stop at 3: the final weights were never validated during fit
    cfg = train_cfg("distillation=none", "trainer.max_steps=3", "trainer.val_check_interval=2")
    results = run(cfg)
    assert results["final_val_miou"] is not None and results["global_step"] == 3
    assert results["final_val_step"] == 3  # validated again after the stop, not the step-2 numbers


def test_kd_run_with_teacher_checkpoint_and_resume(train_cfg, tmp_path):
    ckpt = teacher_checkpoint(train_cfg)
    cfg = train_cfg(
        "distillation=kd",
        *TEACHER_FAST,
        f"teacher.checkpoint={ckpt}",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
    )
    results = run(cfg)
    assert results["teacher_checkpoint"] == str(ckpt)
    teacher_run = json.loads((ckpt.parent.parent / "results.json").read_text())  # same images, same weights
    assert results["teacher_val_miou"] == pytest.approx(teacher_run["best_val_miou"], abs=1e-3)
    saved = torch.load(results["last_checkpoint"], map_location="cpu", weights_only=True)
    assert not any(k.startswith("teacher.") for k in saved["state_dict"])  # checkpoints stay small

    resume = train_cfg(
        "distillation=kd",
        *TEACHER_FAST,
        f"teacher.checkpoint={ckpt}",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        f"ckpt_path={results['last_checkpoint']}",
    )
    resumed = run(resume)
    assert resumed["global_step"] == 4


def test_distillation_without_teacher_checkpoint_names_the_fix(tmp_path):
    camvid = tmp_path / "camvid"
    for split in ("train", "trainannot", "val", "valannot"):
        (camvid / split).mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(camvid / "train" / "a.png")
    Image.new("L", (32, 32)).save(camvid / "trainannot" / "a.png")
    Image.new("RGB", (32, 32)).save(camvid / "val" / "b.png")
    Image.new("L", (32, 32)).save(camvid / "valannot" / "b.png")
    cfg = compose_train_cfg(
        tmp_path, ["dataset=camvid", f"dataset.root={camvid}", "distillation=kd", "student=resnet18_scratch"]
    )
    # on a real dataset the default teacher is the paper's ResNet-101, and the suggested command trains it
    with pytest.raises(
        ConfigError,
        match=r"teacher\.checkpoint=.*python -m rdd_lightning\.train dataset=camvid student=resnet101 ",
    ):
        run(cfg)


def test_missing_teacher_checkpoint_file(train_cfg, tmp_path):
    cfg = train_cfg("distillation=kd", "teacher=resnet18", f"teacher.checkpoint={tmp_path / 'nope.ckpt'}")
    with pytest.raises(ConfigError, match="checkpoint file not found"):
        run(cfg)


def test_wrong_teacher_architecture_names_both(train_cfg, tmp_path):
    ckpt = teacher_checkpoint(train_cfg)  # a resnet18 run
    cfg = train_cfg("distillation=kd", "teacher=resnet34", f"teacher.checkpoint={ckpt}")
    with pytest.raises(ConfigError, match=r"encoder_name: checkpoint 'resnet18' vs config 'resnet34'"):
        run(cfg)


def test_wrong_teacher_class_count(train_cfg, tmp_path):
    ckpt = teacher_checkpoint(train_cfg)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["rdd_lightning"]["student"]["num_classes"] = 19
    bad = tmp_path / "nineteen.ckpt"
    torch.save(state, bad)
    cfg = train_cfg("distillation=kd", *TEACHER_FAST, f"teacher.checkpoint={bad}")
    with pytest.raises(ConfigError, match=r"num_classes: checkpoint 19 vs config 11"):
        run(cfg)


def test_existing_run_directory_is_not_overwritten(train_cfg):
    cfg = train_cfg("distillation=none", "trainer.max_steps=1", "trainer.val_check_interval=1")
    (Path(cfg.paths.output_dir) / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds a finished run"):
        run(cfg)
    assert (Path(cfg.paths.output_dir) / "results.json").read_text() == "{}"


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rdd_lightning.train", *args],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_unknown_option(tmp_path):
    proc = run_cli(tmp_path, "student=resnet9000")
    assert proc.returncode != 0
    assert "Could not find 'student/resnet9000'" in proc.stderr and "resnet18" in proc.stderr


def test_cli_config_error_is_one_line_without_traceback(tmp_path):
    proc = run_cli(tmp_path, "dataset=camvid", f"dataset.root={tmp_path / 'no-camvid'}")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no-camvid" in errors[0] and "trainannot" in errors[0]
    assert "Traceback" not in proc.stderr


def test_cli_offline_imagenet_weights(tmp_path):
    proc = run_cli(
        tmp_path,
        "student=resnet18",
        "distillation=none",
        "++hydra.job.env_set.HF_HUB_CACHE=/nonexistent",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )
    assert proc.returncode == 2
    assert "encoder_weights='imagenet'" in proc.stderr and "encoder_weights=null" in proc.stderr


@pytest.mark.parametrize("distillation", ["rdd", "tse"])
def test_rdd_run_end_to_end(train_cfg, distillation):
    ckpt = teacher_checkpoint(train_cfg)
    cfg = train_cfg(
        f"distillation={distillation}",
        *TEACHER_FAST,
        f"teacher.checkpoint={ckpt}",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "distillation.switch.step=1",
        "distillation.switch.fraction=null",
        "distillation.tse.min_kept=100",
    )
    results = run(cfg)
    assert results["distillation"] == distillation and results["global_step"] == 3
    metrics = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/tse_selected_fraction" in metrics and "train/loss_kd" in metrics


def test_tfe_needs_a_teacher_aux_head(train_cfg):
    cfg = train_cfg(
        "distillation=none",
        "student=resnet18_scratch",
        "student.aux_head=false",
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
    )
    ckpt = run(cfg)["best_checkpoint"]
    cfg = train_cfg("distillation=rdd", *TEACHER_FAST, f"teacher.checkpoint={ckpt}", "teacher.aux_head=false")
    with pytest.raises(ConfigError, match="TFE-RDD, which needs a teacher with an auxiliary head"):
        run(cfg)


def test_progress_bar_off_needs_no_callback_removal(tmp_path):
    """trainer.enable_progress_bar=false alone works (the default progress-bar callback is dropped)."""
    from tests.conftest import TINY

    overrides = [o for o in TINY if o != "~callbacks.progress_bar"]
    cfg = compose_train_cfg(
        tmp_path, [*overrides, "distillation=none", "trainer.max_steps=1", "trainer.val_check_interval=1"]
    )
    assert run(cfg)["global_step"] == 1
