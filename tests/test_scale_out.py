"""Runs at scale, for real: 2-process DDP (gloo), Hydra multiruns of DDP jobs, W&B per job, one auto-teacher
per sweep, a run killed with SIGTERM and resumed, resume into a new directory, and the run-directory rules."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rdd_lightning.errors import ConfigError
from rdd_lightning.train import run
from tests.conftest import cli_env

pytestmark = pytest.mark.slow

# the tiny data of conftest.TINY, with an odd number of validation images and a global batch of 4
CLI_TINY = [
    "dataset.prepare.image_size=32",
    "dataset.prepare.num_train=8",
    "dataset.prepare.num_val=5",
    "dataset.prepare.num_test=2",
    "dataset.crop_size=[32,32]",
    "dataset.batch_size=4",
    "dataset.val_batch_size=2",
    "trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "callbacks.difficulty_maps.indices=[0]",
]
DDP2 = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


def cli(tmp_path: Path, module: str, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"rdd_lightning.{module}", *args],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def student_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("student.")}


def test_ddp_run_writes_one_result_and_counts_each_validation_image_once(tmp_path):
    run_dir = tmp_path / "ddp"
    proc = ok(
        cli(
            tmp_path,
            "train",
            *CLI_TINY,
            *DDP2,
            "distillation=none",
            "trainer.max_steps=3",
            "trainer.val_check_interval=2",
            f"hydra.run.dir={run_dir}",
        )
    )
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("results.json")] == [Path("ddp/results.json")]
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["world_size"], results["global_batch_size"], results["per_process_batch_size"]) == (
        2,
        4,
        2,
    )
    assert "sync_batchnorm=true needs GPUs" in proc.stderr + proc.stdout  # trainer=ddp asks for it; CPU can't
    assert (run_dir / "train_rank1.log").is_file() and not (
        tmp_path / "logs"
    ).exists()  # rank 1 used the job dir

    last = run_dir / "checkpoints" / "last.ckpt"
    evals = {}
    for name, extra in (("one", []), ("two", DDP2)):
        data = [a for a in CLI_TINY if a.startswith("dataset.")]
        ok(cli(tmp_path, "evaluate", *data, *extra, f"ckpt_path={last}", f"hydra.run.dir={tmp_path / name}"))
        evals[name] = json.loads((tmp_path / name / "results.json").read_text())
    # 5 images on 2 processes: 3 + 2, none repeated, so the same confusion matrix as one process
    assert evals["one"]["num_images"] == evals["two"]["num_images"] == 5
    assert evals["two"]["mIoU"] == pytest.approx(evals["one"]["mIoU"], abs=1e-9)
    assert evals["two"]["per_class_iou"] == pytest.approx(
        evals["one"]["per_class_iou"], abs=1e-9, nan_ok=True
    )
    # the run's own final validation (2 processes) saw the same final weights
    assert results["final_val_miou"] == pytest.approx(evals["one"]["mIoU"], abs=1e-6)


def test_torchrun_started_ranks_share_one_run_directory(tmp_path):
    """torchrun starts both ranks (Lightning re-spawns nothing); each composes its own config, and the run
    directory's time stamp (the torchrun agent's start) is the same in both."""
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "rdd_lightning.train",
            *CLI_TINY,
            *DDP2,
            "distillation=none",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
        ],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=400,
    )
    ok(proc)
    runs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1 and [p.parent for p in tmp_path.rglob("results.json")] == runs
    assert json.loads((runs[0] / "results.json").read_text())["world_size"] == 2
    assert not (runs[0] / "train_rank1.log").exists()  # rank 1 was torchrun's, not a Lightning re-spawn


def test_multirun_of_ddp_jobs_gives_one_run_and_one_wandb_run_per_job(tmp_path):
    """The sweep comes from an experiment file (``hydra.mode: MULTIRUN``, as the paper-table experiments do):
    each job's extra rank gets ``experiment=...`` among the job's overrides and must still run that one job."""
    experiments = tmp_path / "extra_conf" / "experiment"
    experiments.mkdir(parents=True)
    (experiments / "seeds.yaml").write_text(
        "# @package _global_\nhydra:\n  mode: MULTIRUN\n  sweeper:\n    params:\n      seed: 1,2\n"
    )
    sweep = tmp_path / "sweep"
    proc = ok(
        cli(
            tmp_path,
            "train",
            "--config-dir",
            str(tmp_path / "extra_conf"),
            "experiment=seeds",
            *CLI_TINY,
            *DDP2,
            "distillation=none",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "logger=wandb",
            f"hydra.sweep.dir={sweep}",
        )
    )
    results = sorted(tmp_path.rglob("results.json"))
    assert results == [sweep / "0" / "results.json", sweep / "1" / "results.json"], proc.stderr[-2000:]
    seeds = [json.loads(p.read_text())["seed"] for p in results]
    assert seeds == [1, 2] and all(json.loads(p.read_text())["world_size"] == 2 for p in results)
    assert not (tmp_path / "logs").exists()  # no rank started a sweep (or a run) of its own
    wandb_runs = sorted(p.parents[2].name for p in sweep.glob("*/wandb/offline-run-*/run-*.wandb"))
    assert wandb_runs == ["0", "1"]  # each job its own W&B run, not job 2 logging into job 1's


def test_a_failing_rank_fails_its_job_and_the_sweep_goes_on(tmp_path, repo_root):
    """Job 2 of 3 DDP jobs raises on rank 1 only (an out-of-memory error on one GPU): Lightning's own observer
    would SIGKILL the sweep's process; here job 2 is recorded as failed (its log line, the report) and jobs 1
    and 3 run to their results; the sweep's exit status says a job failed."""
    sweep = tmp_path / "sweep"
    env = {**cli_env(tmp_path), "PYTHONPATH": str(repo_root)}  # tests.faults for every rank
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rdd_lightning.train",
            "-m",
            *CLI_TINY,
            *DDP2,
            "distillation=none",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "seed=1,2,3",
            "+callbacks.fault._target_=tests.faults.RankFault",
            "+callbacks.fault.rank=1",
            "+callbacks.fault.fail_seed=2",
            "+callbacks.fault.seed=${seed}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # Hydra's status for a sweep with a failed job
    assert sorted(p.parent.name for p in sweep.glob("*/results.json")) == ["0", "2"], proc.stderr[-3000:]
    assert [json.loads((sweep / j / "results.json").read_text())["seed"] for j in ("0", "2")] == [1, 3]
    main_log = (sweep / "1" / "train.log").read_text()
    assert "failed: RankFailed: rank 1 exited with status 1" in main_log, main_log[-2000:]
    assert "injected fault on rank 1" in (sweep / "1" / "train_rank1.log").read_text()

    report = subprocess.run(
        [sys.executable, "-m", "rdd_lightning.report", str(sweep), "--format", "json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    listed = json.loads(report.stdout)["incomplete"]
    assert [Path(j["job"]).name for j in listed] == ["1"]
    assert "injected fault on rank 1" in listed[0]["error"]


def test_preempted_ddp_job_saves_finishes_w_and_b_and_exits_with_the_signal(tmp_path):
    """SIGTERM to a 2-process DDP job started by Lightning: both ranks save the step together and exit with
    128 + SIGTERM; the rank's pre-emption status is no failure (Lightning's observer would SIGKILL the main
    process for it, before W&B finished)."""
    run_dir = tmp_path / "ddp"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rdd_lightning.train",
            *CLI_TINY,
            *DDP2,
            "distillation=none",
            "trainer.max_steps=400",
            "trainer.val_check_interval=2",
            "logger=wandb",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while not (run_dir / "checkpoints" / "last.ckpt").exists() and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    main_log, rank1_log = (run_dir / "train.log").read_text(), (run_dir / "train_rank1.log").read_text()
    assert "stopped by signal SIGTERM" in main_log and "stopped by signal SIGTERM" in rank1_log
    assert "RankFailed" not in main_log and not (run_dir / "results.json").exists()
    assert len(list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))) == 1


def test_submitit_local_sweep_of_ddp_jobs(tmp_path):
    """hydra-submitit-launcher's local executor runs each job in a worker whose argv is submitit's, not ours:
    the job's DDP ranks must still be started with the job's own command."""
    sweep = tmp_path / "sweep"
    ok(
        cli(
            tmp_path,
            "train",
            "-m",
            *CLI_TINY,
            *DDP2,
            "distillation=none",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "seed=1,2",
            "hydra/launcher=submitit_local",
            f"hydra.sweep.dir={sweep}",
        )
    )
    results = sorted(tmp_path.rglob("results.json"))
    assert results == [sweep / "0" / "results.json", sweep / "1" / "results.json"]
    assert [json.loads(p.read_text())["world_size"] for p in results] == [2, 2]


def test_submitit_slurm_sweep_runs_srun_tasks_and_survives_preemption(tmp_path):
    """hydra/launcher=submitit_slurm against a one-machine stand-in for sbatch/srun/scontrol (tests/fake_slurm.py):
    each job is one sbatch job whose 2 srun tasks Lightning's SLURM environment takes as the DDP ranks (nothing
    re-spawned); SLURM's warning signal (USR2) to job 0's tasks saves the step, submitit requeues the job, and
    the requeued job resumes from last.ckpt in the same directory and finishes the sweep."""
    from tests.fake_slurm import install

    install(tmp_path / "bin")
    env = cli_env(tmp_path)
    env.update({"PATH": f"{tmp_path / 'bin'}:{env['PATH']}", "FAKE_SLURM_STATE": str(tmp_path / "slurm")})
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        "-m",
        "rdd_lightning.train",
        "-m",
        *CLI_TINY,
        *DDP2,
        "distillation=none",
        "trainer.max_steps=16",
        "trainer.val_check_interval=4",
        "seed=1,2",
        "hydra/launcher=submitit_slurm",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    first = sweep / "0" / "checkpoints" / "last.ckpt"
    try:
        deadline = time.time() + 300
        while not first.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.exists(), [p.read_text()[-2000:] for p in (tmp_path / "slurm" / "logs").glob("*")]
        pids = (tmp_path / "slurm" / "pids" / "1000_0.0").read_text().split()
        assert len(pids) == 2  # srun started 2 tasks for the job: its 2 DDP ranks
        for pid in pids:
            os.kill(int(pid), signal.SIGUSR2)
        output, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:  # never leave a sweep waiting on a job behind
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert (tmp_path / "slurm" / "requeued.log").read_text().split() == ["1000_0"]
    results = [json.loads((sweep / str(j) / "results.json").read_text()) for j in (0, 1)]
    assert [r["seed"] for r in results] == [1, 2] and [r["world_size"] for r in results] == [2, 2]
    assert [r["global_step"] for r in results] == [16, 16]
    assert results[0]["resumed_from"] == str(first.resolve()) and results[1]["resumed_from"] is None
    assert not list(sweep.glob("*/*_rank1.log"))  # Lightning started no ranks itself: srun did


def test_seed_sweep_trains_one_auto_teacher(tmp_path):
    sweep = tmp_path / "sweep"
    teacher_recipe = '["trainer.max_steps=2","trainer.val_check_interval=2","trainer.accelerator=cpu","trainer.enable_progress_bar=false","~callbacks.progress_bar"]'
    proc = ok(
        cli(
            tmp_path,
            "train",
            "-m",
            *CLI_TINY,
            "teacher=resnet18",
            f"teacher.auto_overrides={teacher_recipe}",
            "distillation=kd",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "seed=1,2",
            f"hydra.sweep.dir={sweep}",
        )
    )
    teachers = list((tmp_path / "cache" / "teachers").glob("*/teacher.ckpt"))
    assert len(teachers) == 1, teachers
    assert proc.stdout.count("no cached teacher") == 1
    used = {json.loads(p.read_text())["teacher_checkpoint"] for p in sweep.glob("*/results.json")}
    assert used == {str(teachers[0].resolve())}


def _tiny_teacher(train_cfg) -> Path:
    """The best checkpoint of a 2-step ResNet-18 run: a teacher for the tests' distillation runs."""
    return Path(
        run(
            train_cfg(
                "distillation=none",
                "student=resnet18_scratch",
                "trainer.max_steps=2",
                "trainer.val_check_interval=2",
            )
        )["best_checkpoint"]
    )


def _train_args(run_dir: Path, teacher: Path) -> list[str]:
    return [
        *CLI_TINY,
        "dataset.batch_size=2",
        "distillation=rdd",
        "teacher=resnet18",
        f"teacher.checkpoint={teacher}",
        "distillation.switch.step=5",
        "distillation.tse.min_kept=100",
        "trainer.max_steps=30",
        "trainer.val_check_interval=4",
        "trainer.deterministic=true",
        f"hydra.run.dir={run_dir}",
    ]


def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights(tmp_path, train_cfg):
    teacher = _tiny_teacher(train_cfg)
    ok(cli(tmp_path, "train", *_train_args(tmp_path / "whole", teacher)))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdd_lightning.train", *_train_args(killed, teacher)],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while (
        not (killed / "checkpoints" / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None
    ):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)  # after the step-4 validation, mid-run
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert not (killed / "results.json").exists()
    saved = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert 4 < saved["global_step"] < 30  # the step the signal interrupted, not the last validation's

    # resumed in place, the way a requeued job resumes (its directory holds an unfinished run)
    ok(cli(tmp_path, "train", *_train_args(killed, teacher), "ckpt_path=last"))
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    resumed = json.loads((killed / "results.json").read_text())
    assert resumed["global_step"] == whole["global_step"] == 30
    a, b = (
        student_weights(tmp_path / "whole" / "checkpoints" / "last.ckpt"),
        student_weights(killed / "checkpoints" / "last.ckpt"),
    )
    assert a.keys() == b.keys()
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    print(f"killed at step {saved['global_step']}, resumed: max |w_resumed - w_whole| = {diff:.3g}")
    assert diff <= 1e-6
    assert resumed["best_val_miou"] == pytest.approx(whole["best_val_miou"], abs=1e-6)
    assert resumed["final_val_miou"] == pytest.approx(whole["final_val_miou"], abs=1e-6)


def test_requeued_single_task_sbatch_job_resumes_in_its_own_directory_and_w_and_b_run(tmp_path, train_cfg):
    """A plain one-task sbatch job (no srun, no submitit, no hydra.run.dir) with the variables SLURM sets:
    USR1 before the time limit -> save the step, finish the W&B run, `scontrol requeue <job>` (which kills
    the job, as SLURM does); the requeued job (SLURM_RESTART_COUNT=1) runs the same command, gets the same
    run directory (derived from the job id, not the time) and the same W&B run id, and resumes. Lightning's
    own SLURM handler writes no hpc_ckpt; a second training of the segment gets a directory of its own; the
    finished run started again by a later requeue is left as it is."""
    teacher = _tiny_teacher(train_cfg)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\nkill -TERM $PPID\n'
    )
    (bin_dir / "scontrol").chmod(0o755)
    env = cli_env(tmp_path)
    env.update(
        {
            "PATH": f"{bin_dir}:{env['PATH']}",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "train.sh",
            "SLURM_NTASKS": "1",
            "SLURM_NNODES": "1",
            "SLURM_NODEID": "0",
            "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0",
            "SLURM_JOB_NODELIST": "localhost",
        }
    )
    args = [a for a in _train_args(tmp_path / "unused", teacher) if not a.startswith("hydra.run.dir")]
    command = [sys.executable, "-m", "rdd_lightning.train", *args, "logger=wandb"]
    run_dir = tmp_path / "logs" / "train" / "runs" / "slurm-4242"
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGTERM, output[-3000:]  # killed by the requeue, after saving
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
        "global_step"
    ]
    assert not list(tmp_path.rglob("hpc_ckpt_*.ckpt"))

    requeued = subprocess.run(
        command,
        cwd=tmp_path,
        env={**env, "SLURM_RESTART_COUNT": "1"},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert [p.name for p in run_dir.parent.glob("slurm-*")] == ["slurm-4242"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["resumed_from"] == str((run_dir / "checkpoints" / "last.ckpt").resolve())
    assert results["global_step"] == 30 and 4 < step < 30
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and len({p.name.rsplit("-", 1)[1] for p in segments}) == 1  # one run id

    # a second training in the same segment: a directory of its own
    other = [a for a in args if not a.startswith(("trainer.max_steps", "trainer.val_check"))]
    other += ["trainer.max_steps=1", "trainer.val_check_interval=1", "seed=7"]
    second = subprocess.run(
        [sys.executable, "-m", "rdd_lightning.train", *other],
        cwd=tmp_path,
        env={**env, "SLURM_RESTART_COUNT": "1"},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((run_dir.parent / "slurm-4242-2" / "results.json").read_text())["seed"] == 7

    # requeued once more, the script starts the finished training again: nothing to do, nothing changed
    def files(folder: Path) -> dict[Path, int]:  # but the claim record, which the requeue renews
        return {
            p: p.stat().st_mtime_ns
            for p in folder.rglob("*")
            if p.is_file() and p.name != ".slurm_claim.json"
        }

    before = files(run_dir)
    again = subprocess.run(
        command,
        cwd=tmp_path,
        env={**env, "SLURM_RESTART_COUNT": "2"},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr[-3000:]
    assert files(run_dir) == before


def test_new_run_in_a_finished_run_directory_is_refused_before_anything_changes(tmp_path):
    run_dir = tmp_path / "done"
    ok(
        cli(
            tmp_path,
            "train",
            *CLI_TINY,
            "distillation=none",
            "trainer.max_steps=1",
            "trainer.val_check_interval=1",
            f"hydra.run.dir={run_dir}",
        )
    )

    def files(folder: Path) -> dict[Path, int]:  # but the claim record, which the requeue renews
        return {
            p: p.stat().st_mtime_ns
            for p in folder.rglob("*")
            if p.is_file() and p.name != ".slurm_claim.json"
        }

    before = files(run_dir)
    proc = cli(tmp_path, "train", *CLI_TINY, "distillation=none", "seed=7", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "holds a finished run" in errors[0] and "Traceback" not in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before


def test_resume_into_a_new_directory_keeps_best_score_and_checkpoint(train_cfg):
    """The resumed run's student is scrambled, so every later validation is worse than the first run's best:
    the best score and best.ckpt must still be the first run's (Lightning alone would forget them when the
    checkpoint's directory differs, and save the worse weights as best)."""
    first = run(train_cfg("distillation=none", "trainer.max_steps=12", "trainer.val_check_interval=6"))
    resumed = run(
        train_cfg(
            "distillation=none",
            "trainer.max_steps=14",
            "trainer.val_check_interval=2",
            f"ckpt_path={first['last_checkpoint']}",
            "+callbacks.scramble._target_=tests.faults.ScrambleStudent",
        )
    )
    assert resumed["global_step"] == 14 and resumed["resumed_from"] == first["last_checkpoint"]
    print(
        f"first run's best {first['best_val_miou']:.2f}, scrambled and resumed {resumed['final_val_miou']:.2f}"
    )
    assert resumed["final_val_miou"] < first["best_val_miou"] - 1.0  # the premise: later is worse
    new_dir = Path(resumed["output_dir"])
    assert resumed["best_checkpoint"] == str(new_dir / "checkpoints" / "best.ckpt")
    assert resumed["best_val_miou"] == pytest.approx(first["best_val_miou"], abs=1e-4)
    copied, original = (
        student_weights(new_dir / "checkpoints" / "best.ckpt"),
        student_weights(Path(first["best_checkpoint"])),
    )
    assert all(torch.equal(copied[k], original[k]) for k in original)


def test_resume_with_another_teacher_is_refused(train_cfg):
    teachers = [
        Path(
            run(
                train_cfg(
                    "distillation=none",
                    "student=resnet18_scratch",
                    f"seed={s}",
                    "trainer.max_steps=1",
                    "trainer.val_check_interval=1",
                )
            )["best_checkpoint"]
        )
        for s in (1, 2)
    ]
    first = run(
        train_cfg(
            "distillation=kd",
            "teacher=resnet18",
            f"teacher.checkpoint={teachers[0]}",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
        )
    )
    resume = train_cfg(
        "distillation=kd",
        "teacher=resnet18",
        f"teacher.checkpoint={teachers[1]}",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        f"ckpt_path={first['last_checkpoint']}",
    )
    with pytest.raises(ConfigError, match=r"distilled from teacher .* resume with teacher\.checkpoint="):
        run(resume)


def test_global_batch_that_does_not_split_is_refused(train_cfg):
    cfg = train_cfg("distillation=none", "dataset.batch_size=6", *DDP2[:2], "trainer.devices=4")
    with pytest.raises(
        ConfigError, match=r"dataset\.batch_size=6 \(the global batch\) cannot be split over 4"
    ):
        run(cfg)


def test_gpu_request_without_gpu_is_one_config_error(train_cfg):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = train_cfg("distillation=none", "trainer.accelerator=gpu")
    with pytest.raises(ConfigError, match=r"trainer\.accelerator='gpu' trainer\.devices=1"):
        run(cfg)


def test_logger_none_trains(train_cfg):
    results = run(
        train_cfg("distillation=none", "logger=none", "trainer.max_steps=1", "trainer.val_check_interval=1")
    )
    assert results["global_step"] == 1 and not (Path(results["output_dir"]) / "csv").exists()


def test_finished_run_extended_from_its_last_checkpoint_matches_the_longer_run(train_cfg):
    """A run stopped by max_steps mid-epoch and continued with a larger max_steps sees the batches an
    uninterrupted longer run sees (Lightning counts the stopped epoch as complete; the data order must not)."""
    common = [
        "distillation=none",
        "scheduler=null",
        "trainer.deterministic=true",
        "trainer.val_check_interval=3",
    ]
    longer = run(train_cfg(*common, "trainer.max_steps=9"))  # 8 images, batch 2: 4 steps an epoch
    short = run(train_cfg(*common, "trainer.max_steps=6"))
    extended = run(train_cfg(*common, "trainer.max_steps=9", f"ckpt_path={short['last_checkpoint']}"))
    a, b = (
        student_weights(Path(longer["last_checkpoint"])),
        student_weights(Path(extended["last_checkpoint"])),
    )
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6
