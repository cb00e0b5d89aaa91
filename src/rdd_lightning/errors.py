"""Errors raised for bad user input; entry points print them as one line and exit non-zero."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


class ConfigError(ValueError):
    """A config value, file or dataset that cannot be used. The message names the key, the value and the fix."""


def find_cause(err: BaseException | None, kind: type[E]) -> E | None:
    """The first exception of type ``kind`` in ``err``'s chain of causes (Hydra wraps errors raised while
    instantiating), if any."""
    while err is not None:
        if isinstance(err, kind):
            return err
        err = err.__cause__ or err.__context__
    return None


def find_config_error(err: BaseException | None) -> ConfigError | None:
    """The :class:`ConfigError` behind ``err``, if any."""
    return find_cause(err, ConfigError)


def exit_on_config_error(fn: Callable[[], T], log: logging.Logger) -> T:
    """``fn()``; a :class:`ConfigError` behind any exception it raises is logged, printed to stderr as one
    ``error: ...`` line (no traceback) and ends the process with exit status 2 (in a job of a sweep, it
    fails that job only). Other errors are logged as one line (so a failed job's log says why; the
    traceback follows from Hydra) and propagate."""
    try:
        return fn()
    except Exception as err:
        config_error = find_config_error(err)
        if config_error is None:  # into the job's log too (a sweep's report lists it), then Hydra's handling
            log.error(
                "failed: %s: %s", type(err).__name__, str(err).strip().splitlines()[0] if str(err) else ""
            )
            raise
        log.error("%s", config_error)
        print(f"error: {config_error}", file=sys.stderr)
        if in_sweep():  # this job fails, the sweep goes on (its exit status says a job failed)
            raise config_error from None
        sys.exit(2)


def in_sweep() -> bool:
    """True inside a job of a Hydra multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
