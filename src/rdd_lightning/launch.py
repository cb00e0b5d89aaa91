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

A failing rank fails its job, not the sweep: Lightning's own observer of the ranks it started SIGKILLs the
main process (and with it every later job of a sweep) as soon as one rank exits non-zero. Within
:func:`ddp_job`, :class:`RankObserver` watches them instead: it stops the job's other ranks, aborts the
process group so that the main process's pending collective returns with an error, and that error fails
this job with :class:`RankFailed` (its log line names the rank and its exit status); the sweep goes on. A
rank that exits with a pre-emption status (``128 + SIGTERM/SIGUSR1/SIGUSR2``) is stopping with its job,
not failing.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.strategies.launchers import subprocess_script

log = logging.getLogger(__name__)

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


#: exit statuses of a rank that stopped because its job was pre-empted (saved, then ``sys.exit(128 + signum)``)
PREEMPTED_STATUSES = frozenset(128 + s for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2))


class RankFailed(RuntimeError):
    """A rank that Lightning started for this job exited with an error status."""

    def __init__(self, local_rank: int, status: int, cause: BaseException | None = None):
        how = (
            f"was killed by {signal.Signals(-status).name}" if status < 0 else f"exited with status {status}"
        )
        detail = f" (in the main process: {type(cause).__name__})" if cause is not None else ""
        super().__init__(f"rank {local_rank} {how}; its log: <run dir>/*_rank{local_rank}.log{detail}")
        self.local_rank, self.status = local_rank, status


class RankFailureInterrupt(RuntimeError):
    """Raised in the main thread by :class:`RankObserver` when it did not fail by itself after a rank died."""

    def __init__(self) -> None:
        super().__init__("a rank of this job failed")


class RankObserver(threading.Thread):
    """Watch the ranks Lightning started for one job; when one fails, stop the job but not this process.

    On the first rank that exits with an error status (not a pre-emption status), the other started ranks
    are killed (they may hang in a collective), the process group is aborted (an NCCL collective waiting for
    the dead rank returns with an error instead of waiting for the watchdog, which would kill this process),
    and, if the main thread has not failed by itself after ``grace_s`` (it was not in a collective), a
    :class:`RankFailureInterrupt` is raised in it. :func:`ddp_job` then fails the job with :class:`RankFailed`.

    Args:
        procs: the processes of ranks ``1..N-1`` (Lightning's launcher's ``procs``).
        poll_s: how often their status is read.
        grace_s: how long the main thread may take to fail by itself before an exception is raised in it.
    """

    def __init__(self, procs: list[subprocess.Popen], poll_s: float = 1.0, grace_s: float = 30.0):
        super().__init__(daemon=True, name="rdd-rank-observer")
        self.procs, self.poll_s, self.grace_s = procs, poll_s, grace_s
        self.failure: tuple[int, int] | None = None  # (local rank, exit status)
        self._main_thread = threading.main_thread().ident
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def failed_rank(self) -> tuple[int, int] | None:
        """``(local rank, status)`` of the first rank that failed, if one did (read once more now). A rank
        found killed by SIGKILL only now is not counted: when the main process fails by itself, Lightning
        kills the other ranks with SIGKILL, and the job's error is then the main process's own."""
        if self.failure is None and self._check() and self.failure[1] == -signal.SIGKILL:
            self.failure = None
        return self.failure

    def run(self) -> None:
        while not self._stopped.wait(self.poll_s):
            if self._check():
                self._stop_job()
                return

    def _check(self) -> bool:
        for local_rank, proc in enumerate(self.procs, start=1):
            status = proc.poll()
            if status not in (None, 0) and status not in PREEMPTED_STATUSES:
                self.failure = (local_rank, status)
                return True
        return False

    def _stop_job(self) -> None:
        local_rank, status = self.failure
        log.error("rank %d exited with status %d: stopping this job's other ranks", local_rank, status)
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.kill()
        _abort_process_group()
        if not self._stopped.wait(self.grace_s) and not self._stopped.is_set():
            # the main thread is not in a collective (which would have failed): interrupt it
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(self._main_thread), ctypes.py_object(RankFailureInterrupt)
            )


def _abort_process_group() -> None:
    """Abort the default process group's communicators (NCCL: pending collectives fail); no-op elsewhere
    (gloo's collectives fail by themselves once the peer's connection closes)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() != "nccl":
        return
    with contextlib.suppress(Exception):
        dist.distributed_c10d._abort_process_group()


@contextlib.contextmanager
def ddp_job(module: str, output_dir: str | os.PathLike) -> Iterator[None]:
    """Within this context, Lightning's DDP launcher starts this job's ranks with :func:`job_command` and
    :class:`RankObserver` watches them; on exit, the ranks are waited for and the process is left as it was
    for the next job of a sweep. An error while a started rank had failed is raised as :class:`RankFailed`."""
    if started_by_external_launcher():
        yield
        return
    _restore_rank_variables()  # a previous job of this process may have left them
    original = subprocess_script._hydra_subprocess_cmd, subprocess_script._launch_process_observer
    observers: list[RankObserver] = []

    def observe(procs: list[subprocess.Popen]) -> None:
        observers.append(RankObserver(procs))
        observers[-1].start()

    subprocess_script._hydra_subprocess_cmd = lambda local_rank: job_command(
        module, str(output_dir), local_rank
    )
    subprocess_script._launch_process_observer = observe
    try:
        yield
    except BaseException as err:
        failure = next(filter(None, (o.failed_rank() for o in observers)), None)
        if failure is None:
            raise
        raise RankFailed(*failure, cause=None if isinstance(err, RankFailureInterrupt) else err) from err
    finally:
        subprocess_script._hydra_subprocess_cmd, subprocess_script._launch_process_observer = original
        for observer in observers:
            observer.stop()
        for proc in _children():
            with contextlib.suppress(Exception):
                proc.wait(timeout=300)
        if dist.is_available() and dist.is_initialized():
            with contextlib.suppress(Exception):  # after a failed rank the group may be broken
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
