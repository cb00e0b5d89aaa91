"""Runs that survive: atomic writes, pre-emption checkpoints, exact resume, and the run-directory rules.

* :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file beside it and renames it into
  place, so a job killed while saving leaves the previous checkpoint intact.
* :class:`PreemptionCheckpoint` turns SIGTERM (and SLURM's requeue signal) into a checkpoint of the current
  step in ``last.ckpt``, agreed on by every process, then stops the run (and requeues a SLURM job).
* :class:`RunCheckpoint` is Lightning's ``ModelCheckpoint`` that also keeps the best score and ``best.ckpt``
  when a run is resumed into a new directory.
* :class:`StepSeed` reseeds torch's generator (dropout) from ``(seed, global step, rank)`` before every
  training step, so a resumed run draws the same random numbers as an uninterrupted one.
* :func:`resolve_ckpt_path` decides, before anything is written, whether a run may use its directory.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from rdd_lightning.data.samplers import mix_seed
from rdd_lightning.errors import ConfigError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ files
def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``<dir>/.<name>.tmp-<pid>``, fsync, then ``os.replace`` onto the checkpoint path."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ run dir
def run_state(output_dir: Path) -> str:
    """``finished`` (has ``results.json``), ``unfinished`` (checkpoints, no results) or ``new``."""
    if (output_dir / "results.json").exists():
        return "finished"
    if any((output_dir / "checkpoints").glob("*.ckpt")):
        return "unfinished"
    return "new"


def slurm_restarted() -> bool:
    """True in a SLURM job that was requeued (pre-empted or timed out and started again)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


class RunFinished(Exception):
    """A requeued SLURM job found its run finished by an earlier segment of the job: nothing is left to do."""

    def __init__(self, output_dir: Path):
        super().__init__(
            f"{str(output_dir)!r} holds the run this job finished before it was requeued "
            f"(SLURM_RESTART_COUNT={os.environ.get('SLURM_RESTART_COUNT')}); nothing to do"
        )
        self.output_dir = output_dir


def resolve_ckpt_path(output_dir: Path, ckpt_path: str | None) -> str | None:
    """The checkpoint a run in ``output_dir`` resumes from, or ``None`` to start fresh; refuses a directory
    that belongs to another run before anything in it changes.

    * a finished run's directory (``results.json``) is never written again; in a requeued SLURM job it is
      this job's own finished run (:class:`RunFinished`: nothing to do);
    * an unfinished run's directory (checkpoints, no results) is resumed in place from its ``last.ckpt``
      when ``ckpt_path=last``, when ``ckpt_path`` is a file inside it, or in a requeued SLURM job;
    * ``ckpt_path=last`` in a new directory starts fresh (so sweeps that may be requeued pass it always);
    * ``ckpt_path=<file>`` elsewhere resumes into the new directory (best score and ``best.ckpt`` carried
      over by :class:`RunCheckpoint`).
    """
    output_dir = output_dir.resolve()
    state = run_state(output_dir)
    own_last = output_dir / "checkpoints" / "last.ckpt"
    if state == "finished":
        if slurm_restarted():
            raise RunFinished(output_dir)
        raise ConfigError(
            f"run directory {str(output_dir)!r} holds a finished run (results.json); nothing in it is "
            f"overwritten: pass a new hydra.run.dir (to train on from it: ckpt_path={own_last} hydra.run.dir=<new>)"
        )
    if ckpt_path not in (None, "", "last"):
        path = Path(str(ckpt_path)).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(
                f"ckpt_path={ckpt_path!r}: file not found (resume needs an existing checkpoint)"
            )
        if state == "unfinished" and output_dir not in path.parents:
            raise ConfigError(
                f"run directory {str(output_dir)!r} holds checkpoints of another run; resume into a new "
                f"directory (hydra.run.dir=<new>) or resume that run in place with ckpt_path=last"
            )
        return str(path)
    if state == "unfinished":
        if ckpt_path == "last" or slurm_restarted():
            if not own_last.is_file():
                raise ConfigError(
                    f"ckpt_path=last: {str(output_dir)!r} has checkpoints but no last.ckpt; pass ckpt_path=<one of "
                    f"{sorted(p.name for p in (output_dir / 'checkpoints').glob('*.ckpt'))}>"
                )
            return str(own_last)
        raise ConfigError(
            f"run directory {str(output_dir)!r} holds an unfinished run; resume it in place with ckpt_path=last, "
            f"or pass a new hydra.run.dir"
        )
    return None


# ------------------------------------------------------------------------------------------------ callbacks
class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that survives a resume into another directory.

    Lightning forgets the best score (and so overwrites ``best.ckpt`` with the next validation, however bad)
    when the checkpoint's ``dirpath`` differs from this run's. Here the previous run's best checkpoint is
    copied into this run's directory and every recorded path is mapped onto it, so the resumed run keeps
    the best score and only replaces ``best.ckpt`` with a better one.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old_dir = state_dict.get("dirpath")
        if old_dir and self.dirpath and Path(old_dir).resolve() != Path(self.dirpath).resolve():
            state_dict = dict(state_dict)
            new_dir = Path(self.dirpath)

            def moved(path: str | None) -> str | None:
                return str(new_dir / Path(path).name) if path else path

            best = state_dict.get("best_model_path")
            if best and Path(best).is_file():
                if rank_zero_only.rank == 0 and not (new_dir / Path(best).name).exists():
                    new_dir.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(best, new_dir / Path(best).name)
                    log.info(
                        "resumed into a new run directory: copied %s (best score %s) to %s",
                        best,
                        state_dict.get("best_model_score"),
                        new_dir,
                    )
            elif best:
                log.warning("the resumed run's best checkpoint %s is gone; its score is kept", best)
                state_dict["best_model_path"] = ""
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                if state_dict.get(key):
                    state_dict[key] = moved(state_dict[key])
            state_dict["best_k_models"] = {
                moved(k): v for k, v in (state_dict.get("best_k_models") or {}).items()
            }
            state_dict["dirpath"] = self.dirpath
        super().load_state_dict(state_dict)


class StepSeed(L.Callback):
    """Seed torch's generators from ``(seed, global_step, global_rank)`` before every training batch.

    Dropout (the FCN aux head) draws from torch's global generator, whose state a checkpoint does not hold;
    reseeding per step makes a resumed run, and a run on another number of processes, draw the same masks at
    the same step as an uninterrupted one. Cost: one ``manual_seed`` call per step.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ):
        torch.manual_seed(mix_seed(self.seed, trainer.global_step, trainer.global_rank))


class Preempted(Exception):
    """Raised (on every process) after :class:`PreemptionCheckpoint` saved the run: the job should stop, and
    call :meth:`requeue` once everything else (W&B, logs) is finished."""

    def __init__(self, signum: int, checkpoint: str, requeue: Callable[[], None] | None = None):
        super().__init__(f"stopped by signal {signal.Signals(signum).name}; saved {checkpoint}")
        self.signum, self.checkpoint, self._requeue = signum, checkpoint, requeue

    def requeue(self) -> None:
        """Requeue the SLURM job if the signal asked for it (may end the process: submitit's handler does)."""
        if self._requeue is not None:
            self._requeue()


class PreemptionCheckpoint(L.Callback):
    """Save ``<dirpath>/last.ckpt`` at the next step boundary after SIGTERM or a requeue signal, then stop.

    The signal only sets a flag (saving inside a signal handler could interrupt a collective). After every
    training batch the processes agree whether any of them was signalled (one all-reduce of a flag), save
    the current step together, and raise :class:`Preempted`. For a requeue signal (SLURM's ``--signal``) the
    job is requeued by :meth:`Preempted.requeue`, which the entry point calls last, after the W&B run is
    marked pre-empted and finished (a real requeue kills the job's processes): by the handler that was
    installed before (submitit's, under hydra-submitit-launcher), or by ``scontrol requeue`` from rank 0 in
    a plain SLURM job. Lightning's own SLURM handler (which would write an extra ``hpc_ckpt_<n>.ckpt`` and
    requeue a second time) is not installed: see :func:`slurm_environment`. The requeued job runs the same
    command in the same directory and resumes from ``last.ckpt`` (see :func:`resolve_ckpt_path`).

    Args:
        dirpath: the run's checkpoint folder.
        requeue_signals: names of SLURM's warning signals (``sbatch --signal``; submitit uses SIGUSR2,
            Lightning's SLURM environment SIGUSR1).
    """

    def __init__(self, dirpath: str, requeue_signals: list[str] = ("SIGUSR1", "SIGUSR2")):
        self.dirpath = Path(dirpath)
        try:
            self.requeue_signals = [signal.Signals[name] for name in requeue_signals]
        except KeyError as err:
            raise ConfigError(
                f"callbacks.preemption.requeue_signals={list(requeue_signals)}: unknown signal {err}; use names "
                f"such as SIGUSR1, SIGUSR2"
            ) from err
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def signals(self) -> list[int]:
        return [signal.SIGTERM, *self.requeue_signals]

    def _handler(self, trainer: L.Trainer):
        def handle(signum: int, frame: Any) -> None:
            if self.received is None:
                log.info("received %s: saving at the end of this step", signal.Signals(signum).name)
            self.received = signum
            launcher = trainer.strategy.launcher
            if launcher is not None and getattr(launcher, "procs", None):
                launcher.kill(signum)  # processes this one started (Lightning's DDP launcher) stop too

        return handle

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning registered its own handlers (which would stop only at the end of the epoch)
        if threading.current_thread() is not threading.main_thread():
            return
        handler = self._handler(trainer)
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, handler)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        signum = self.received if self.received is not None else signal.SIGTERM
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        log.info("saved step %d to %s", trainer.global_step, path)
        previous = self._previous.get(signum)
        self._restore()
        requeue = None
        if signum in self.requeue_signals:
            requeue = functools.partial(self._requeue, trainer.is_global_zero, signum, previous)
        raise Preempted(signum, str(path), requeue)

    @staticmethod
    def _requeue(is_global_zero: bool, signum: int, previous: Any) -> None:
        if callable(previous):  # submitit's handler: it requeues the job (and exits)
            previous(signum, None)
            return
        job = os.environ.get("SLURM_JOB_ID")
        if job is None or not is_global_zero:
            return
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        log.info("scontrol requeue %s", job)
        result = subprocess.run(["scontrol", "requeue", job], check=False)
        log.info("scontrol requeue %s: exit %d", job, result.returncode)


def slurm_environment() -> list[SLURMEnvironment]:
    """Lightning's SLURM cluster environment without its requeue handler, in a SLURM job (else nothing).

    Lightning's handler of SIGUSR1 saves ``hpc_ckpt_<n>.ckpt`` (a full checkpoint nothing removes) and runs
    ``scontrol requeue``; :class:`PreemptionCheckpoint` already saves ``last.ckpt`` and requeues once."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
