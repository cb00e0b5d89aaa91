"""Process bookkeeping for DDP inside Hydra runs and sweeps.

Lightning's DDP launcher starts ranks ``1..N-1`` by running the script again with the parent's
``sys.argv`` plus ``hydra.run.dir=<hydra.run.dir>``. Inside a Hydra multirun that argv still holds ``-m``
and the sweep lists, so every child would start a sweep of its own (Lightning#11300, Hydra#2070), and the
run dir it passes is ``hydra.run.dir``, not the job's sweep sub-directory. Under hydra-submitit-launcher
``sys.argv`` is submitit's worker, not this program. And Lightning leaves ``LOCAL_RANK``, ``WORLD_SIZE`` and
the process group behind, so the next job of a sequential sweep would believe it was started by an external
launcher and wait forever for ranks that never come.

:func:`ddp_job` fixes all three for the duration of one job: the children receive exactly this job's
overrides and run directory (``python -m <entry point> <job overrides> hydra.run.dir=<job dir>``, no ``-m``),
and when the job ends they are waited for, the process group is destroyed and the variables the launcher
set are removed. Processes started by ``torchrun`` or ``srun`` are not re-spawned (Lightning sees their
rank variables) and need none of this; :func:`rdd_lightning.resolvers.run_stamp` gives all of them the same
run directory.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.strategies.launchers import subprocess_script

#: rank variables Lightning's launcher writes into this process's environment
RANK_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
#: variables of an external launcher (torchrun, SLURM, Lightning's own) that make a process a rank
EXTERNAL_RANK_VARIABLES = (
    *RANK_VARIABLES,
    "RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_WORLD_SIZE",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "PL_GLOBAL_SEED",
    "PL_SEED_WORKERS",
)
_STARTED_AS_RANK = "LOCAL_RANK" in os.environ  # set by torchrun / srun / a Lightning parent before we ran
_ORIGINAL_RANK_VARIABLES = {key: os.environ.get(key) for key in RANK_VARIABLES}


def _restore_rank_variables() -> None:
    for key, value in _ORIGINAL_RANK_VARIABLES.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def started_by_external_launcher() -> bool:
    """True in a process that torchrun, srun or a Lightning DDP parent started as one rank of a job."""
    return _STARTED_AS_RANK


def clean_environment() -> dict[str, str]:
    """This process's environment without any launcher's rank variables or SLURM's job variables: for a
    subprocess that must run as a job of its own (the auto-teacher's training)."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in EXTERNAL_RANK_VARIABLES and not k.startswith(("SLURM_", "SUBMITIT_", "TORCHELASTIC_"))
    }


def job_command(module: str, output_dir: str, local_rank: int) -> tuple[list[str], str]:
    """The command (and working directory) that starts rank ``local_rank`` of the current Hydra job."""
    hydra_cfg = HydraConfig.get()
    command = [sys.executable, "-m", module, "--config-name", hydra_cfg.job.config_name]
    for source in hydra_cfg.runtime.config_sources:
        if source.provider == "command-line":  # --config-dir / hydra.searchpath additions
            command += ["--config-dir", source.path.removeprefix("file://")]
    command += list(hydra_cfg.overrides.task)
    log_file = Path(output_dir) / f"{hydra_cfg.job.name}_rank{local_rank}.log"
    command += [
        "hydra.mode=RUN",  # one run, also when the job's config asks for a sweep (experiment=<paper table>)
        f"hydra.run.dir='{output_dir}'",
        "hydra.output_subdir=null",  # only the job itself writes .hydra/
        f"hydra.job.name={hydra_cfg.job.name}",
        f"hydra.job_logging.handlers.file.filename='{log_file}'",
    ]
    return command, hydra_cfg.runtime.cwd


@contextlib.contextmanager
def ddp_job(module: str, output_dir: str | os.PathLike) -> Iterator[None]:
    """Within this context, Lightning's DDP launcher starts this job's ranks with :func:`job_command`; on
    exit, the ranks are waited for and the process is left as it was for the next job of a sweep."""
    if started_by_external_launcher():
        yield
        return
    _restore_rank_variables()  # a previous job of this process may have left them
    original = subprocess_script._hydra_subprocess_cmd
    subprocess_script._hydra_subprocess_cmd = lambda local_rank: job_command(
        module, str(output_dir), local_rank
    )
    try:
        yield
    finally:
        subprocess_script._hydra_subprocess_cmd = original
        for proc in _children():
            with contextlib.suppress(Exception):
                proc.wait(timeout=300)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        _restore_rank_variables()


_LAUNCHED: list = []


def track_children(trainer) -> None:
    """Remember the processes ``trainer``'s launcher started, so :func:`ddp_job` waits for them."""
    procs = getattr(trainer.strategy.launcher, "procs", None) or []
    _LAUNCHED.extend(p for p in procs if p not in _LAUNCHED)


def _children() -> list:
    children = list(_LAUNCHED)
    _LAUNCHED.clear()
    return children


def wait_for(path: Path, failed: Path, poll_s: float = 2.0) -> None:
    """Block until ``path`` exists; raise ``RuntimeError`` if ``failed`` appears first."""
    while not path.exists():
        if failed.exists():
            raise RuntimeError(failed.read_text())
        time.sleep(poll_s)
