"""OmegaConf resolvers of the package's configs (registered when ``rdd_lightning`` is imported)."""

from __future__ import annotations

import datetime
import fcntl
import itertools
import json
import os
from pathlib import Path

from omegaconf import OmegaConf


def _parent_start_time() -> datetime.datetime | None:
    """Start time of the parent process (the torchrun agent shared by all local ranks), Linux only."""
    try:
        fields = Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat: start time in clock ticks after boot
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return datetime.datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def slurm_job() -> str | None:
    """The SLURM job this process belongs to (``<job id>``, or ``<array job id>_<task id>``), else ``None``."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]


def _claimant() -> str:
    """Who starts a training: the torchrun launch (shared by its ranks), else this process."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or f"pid-{os.getpid()}"


def claim_slurm_run_dir(parent: Path, job: str, restart: int, claimant: str) -> str:
    """The name of the run directory under ``parent`` of the training ``claimant`` starts in SLURM job ``job``.

    The k-th training started in one segment of a job (``restart`` = ``SLURM_RESTART_COUNT``) gets the k-th
    directory ``slurm-<job>``, ``slurm-<job>-2``, ...: a requeued job (the same script started again with a
    higher restart count) gets back, in the same order, the directories of its earlier segment and resumes
    there, while trainings started one after another in one segment get one each. Each directory records its
    claim (``.slurm_claim.json``: restart count and claimant); the claims are made under a file lock, so the
    ranks of one launch (same claimant) that resolve this at once agree.
    """
    parent.mkdir(parents=True, exist_ok=True)
    with open(parent / f".slurm-{job}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for k in itertools.count(1):
            name = f"slurm-{job}" if k == 1 else f"slurm-{job}-{k}"
            record = parent / name / ".slurm_claim.json"
            claim = {"restart": restart, "claimant": claimant}
            if record.is_file():
                try:
                    previous = json.loads(record.read_text())
                except ValueError:
                    previous = {"restart": -1}
                if previous == claim:
                    return name  # another rank of this launch claimed it
                if previous.get("restart", -1) >= restart:
                    continue  # an earlier training of this segment has it
            record.parent.mkdir(exist_ok=True)
            record.write_text(json.dumps(claim))
            return name
    raise AssertionError("unreachable")


def run_stamp(pattern: str = "%Y-%m-%d_%H-%M-%S", parent: str | None = None) -> str:
    """The last part of a run directory's path, the same in every process of one job.

    * ``RDD_RUN_STAMP`` if set;
    * in a job step of several SLURM tasks (``srun``), ``slurm-<job id>.<step id>``;
    * in any other SLURM job, when ``parent`` (the folder of the run directories) is given, the directory
      :func:`claim_slurm_run_dir` assigns: a requeued job gets its directory back and resumes there, and
      trainings started one after another in one job or allocation get one each;
    * under torchrun, the start time of the torchrun agent (shared by the ranks of one machine);
    * else now, formatted with ``pattern``.

    Registered as the ``${run_stamp:<pattern>[,<parent>]}`` resolver.
    """
    if os.environ.get("RDD_RUN_STAMP"):
        return os.environ["RDD_RUN_STAMP"]
    job = slurm_job()
    if (
        job is not None
        and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
        and "SLURM_STEP_ID" in os.environ
    ):
        return f"slurm-{job}.{os.environ['SLURM_STEP_ID']}"
    if job is not None and parent is not None:
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        return claim_slurm_run_dir(Path(parent), job, restart, _claimant())
    when = _parent_start_time() if "TORCHELASTIC_RUN_ID" in os.environ else None
    return (when or datetime.datetime.now()).strftime(pattern)


def register() -> None:
    OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True, replace=True)
