"""Hydra callbacks of the package (``hydra.callbacks`` in ``conf/hydra/default.yaml``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from rdd_lightning.errors import ConfigError
from rdd_lightning.resume import RunFinished, resolve_ckpt_path, run_state, slurm_restarted


class RunDirGuard(Callback):
    """Refuse a run or sweep directory that belongs to another run *before* Hydra writes ``.hydra/`` into it.

    The task function checks again (see :func:`rdd_lightning.resume.resolve_ckpt_path`); this hook only runs
    earlier. The DDP ranks a job starts itself (``hydra.output_subdir=null``) are not checked: their job was.
    A requeued SLURM job's own directories are its to resume: a run it had finished ends the process with
    status 0 (nothing to do), a sweep of it goes on (each job resumes or finds its run finished).
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.output_subdir is None:
            return
        HydraConfig.instance().set_config(config)  # for ${hydra:...} in the run dir; Hydra sets it next
        try:
            self._check(lambda: resolve_ckpt_path(Path(str(config.hydra.run.dir)), config.get("ckpt_path")))
        except RunFinished as done:
            print(f"rdd_lightning: {done}", file=sys.stderr)
            sys.exit(0)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)
        sweep_dir = Path(str(config.hydra.sweep.dir))

        def check() -> None:
            if slurm_restarted():
                return
            used = [p.name for p in sorted(sweep_dir.glob("*")) if p.is_dir() and run_state(p) != "new"]
            if used:
                raise ConfigError(
                    f"hydra.sweep.dir={str(sweep_dir)!r} already holds runs ({', '.join(used[:5])}); pass a new "
                    f"hydra.sweep.dir (a job of it is resumed with its own run directory and ckpt_path=last)"
                )

        self._check(check)

    @staticmethod
    def _check(fn) -> None:
        try:
            fn()
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
