"""OmegaConf resolvers of the package's configs (registered when ``rdd_lightning`` is imported)."""

from __future__ import annotations

import datetime
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


def run_stamp(pattern: str = "%Y-%m-%d_%H-%M-%S") -> str:
    """The time stamp of a run directory, the same in every process of one job.

    ``RDD_RUN_STAMP`` if set; in a job step of several SLURM tasks (``srun``), ``slurm-<job id>.<step id>``
    (a requeued job gets the same directory back and resumes there); under torchrun, the start time of the torchrun agent
    (shared by the ranks of one machine); else now. Registered as the ``${run_stamp:...}`` resolver.
    """
    if os.environ.get("RDD_RUN_STAMP"):
        return os.environ["RDD_RUN_STAMP"]
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_ID" in os.environ:
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]
        return f"slurm-{job}.{os.environ['SLURM_STEP_ID']}"
    when = _parent_start_time() if "TORCHELASTIC_RUN_ID" in os.environ else None
    return (when or datetime.datetime.now()).strftime(pattern)


def register() -> None:
    OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True, replace=True)
