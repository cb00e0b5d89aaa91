"""Checks of the optimizer, LR-schedule and precision options, run before any data or network of a training
run is built: each bad value fails as one :class:`~rdd_lightning.errors.ConfigError` naming the key, the value
and the fix, instead of a traceback from inside ``trainer.fit`` after the teacher was built.

The optimizer and the schedule are checked by torch itself too: the configured ``optimizer`` partial is
called on a dummy parameter and the ``scheduler`` partial on that optimizer with the run's number of steps, as
:meth:`~rdd_lightning.module.DistillationModule.configure_optimizers` calls them, and the schedule is stepped
to its end. ``trainer.precision`` is checked against the values Lightning itself lists."""

from __future__ import annotations

import inspect
import math
import re
import warnings
from collections.abc import Callable
from typing import Any, get_args

import torch
from hydra.utils import get_object, instantiate
from lightning.fabric.connector import _PRECISION_INPUT_INT, _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
from omegaconf import DictConfig, OmegaConf

from rdd_lightning.distillation import check_number
from rdd_lightning.errors import ConfigError

#: (fix, test) of the optimizer values checked by name (torch.optim.SGD accepts a momentum >= 1, which
#: diverges, and a learning rate of 0, which trains nothing)
OPTIMIZER_RANGES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "lr": ("> 0", lambda v: v > 0),
    "momentum": ("in [0, 1)", lambda v: 0 <= v < 1),
    "weight_decay": (">= 0", lambda v: v >= 0),
}

#: the same for the scheduler (torch.optim.lr_scheduler.PolynomialLR takes any power; a negative one
#: raises the learning rate without bound and divides by zero at the last step)
SCHEDULER_RANGES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "power": (">= 0", lambda v: v >= 0),
}

#: words torch's and Lightning's messages use for an argument instead of its name
ARGUMENT_WORDS = {
    "lr": ("learning rate",),
    "eps": ("epsilon",),
    "betas": ("beta",),
    "max_time": ("duration",),
}

#: longest schedule stepped through by :func:`check_scheduler` (0.14 s per 40k steps on one CPU core)
MAX_SIMULATED_STEPS = 200_000


# ------------------------------------------------------------------------------------------------ precision
def accepted_precisions() -> tuple[Any, ...]:
    """Every value Lightning's ``precision`` argument accepts, as Lightning lists them: the full names
    (``32-true``, ``16-mixed``, ...), then the integers and the short strings (``16``, ``bf16``, ...)."""
    return (
        get_args(_PRECISION_INPUT_STR) + get_args(_PRECISION_INPUT_INT) + get_args(_PRECISION_INPUT_STR_ALIAS)
    )


def check_precision(value: Any) -> None:
    """A :class:`ConfigError` unless ``trainer.precision`` is ``null`` or a value Lightning accepts."""
    if value is None:
        return
    accepted = accepted_precisions()
    if isinstance(value, str | int) and not isinstance(value, bool) and value in accepted:
        return
    names = ", ".join(get_args(_PRECISION_INPUT_STR))
    short = ", ".join(dict.fromkeys(str(v) for v in accepted if v not in get_args(_PRECISION_INPUT_STR)))
    raise ConfigError(
        f"trainer.precision={value!r}: not a precision Lightning accepts; set trainer.precision to one of "
        f"{names} (or the short forms {short})"
    )


# ------------------------------------------------------------------------------------------------ helpers
def interpolation_source(group_cfg: DictConfig, key: str) -> str | None:
    """The key that ``group_cfg.<key>`` is interpolated from (``${dataset.recipe.lr}`` -> ``dataset.recipe.lr``),
    if it is a plain interpolation."""
    raw = OmegaConf.to_container(group_cfg, resolve=False).get(key)
    match = re.fullmatch(r"\$\{([\w.]+)\}", raw) if isinstance(raw, str) else None
    return match.group(1) if match else None


def check_ranges(group: str, group_cfg: DictConfig, ranges: dict[str, tuple[str, Callable]]) -> None:
    """Each of ``ranges``' keys that ``group_cfg`` sets must be a number in its range; the message of a value
    that comes from another key (``optimizer.lr: ${dataset.recipe.lr}``) names that key too."""
    values = OmegaConf.to_container(group_cfg, resolve=True)
    for key, (allowed, ok) in ranges.items():
        if values.get(key) is None:
            continue
        try:
            check_number(f"{group}.{key}", values[key], allowed, ok)
        except ConfigError as err:
            source = interpolation_source(group_cfg, key)
            if source is None:
                raise
            raise ConfigError(f"{err} (or {source}, which {group}.{key} is taken from)") from None


def target_name(group_cfg: DictConfig) -> str:
    return str(group_cfg.get("_target_", "?"))


def named_key(message: str, keys: list[str]) -> str | None:
    """The first of ``keys`` that ``message`` names, by its name or the words torch uses for it."""
    text = message.lower()
    for key in keys:
        words = (key, key.replace("_", " "), *ARGUMENT_WORDS.get(key, ()))
        if any(re.search(rf"(?<![\w.]){re.escape(word.lower())}(?!\w)", text) for word in words):
            return key
    return None


def argument_names(target: str, skip: tuple[str, ...]) -> list[str]:
    """The keyword arguments of ``target`` (a class path), ``skip`` left out; empty if it cannot be read."""
    try:
        parameters = inspect.signature(get_object(target)).parameters
    except Exception:
        return []
    return [name for name, p in parameters.items() if name not in skip and p.kind is not p.VAR_KEYWORD]


def refused(
    group: str, group_cfg: DictConfig, err: Exception, skip: tuple[str, ...], how: str
) -> ConfigError:
    """The :class:`ConfigError` of ``err``, raised by torch while calling ``group``'s partial: it names the key
    the message names (an unknown key: with the arguments ``group``'s target has), else the whole group."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    values = {
        k: v for k, v in OmegaConf.to_container(group_cfg, resolve=True).items() if not k.startswith("_")
    }
    target = target_name(group_cfg)
    key = named_key(first, list(values))
    if key is not None and "unexpected keyword argument" in first:
        known = ", ".join(argument_names(target, skip))
        return ConfigError(
            f"{group}.{key}={values[key]!r}: not an argument of {target}; remove it or check its spelling "
            f"(the arguments: {known})"
        )
    if key is not None:
        return ConfigError(
            f"{group}.{key}={values[key]!r}: refused by {target} ({first}); give {group}.{key} a value it accepts"
        )
    return ConfigError(f"{group} ({target}): {first}; check the {group}.* values ({how})")


def build_partial(group: str, group_cfg: DictConfig) -> Callable[..., Any]:
    """``group``'s ``_partial_`` object; a target that cannot be imported or configured is a ConfigError."""
    try:
        return instantiate(group_cfg)
    except Exception as err:
        cause = err.__cause__ or err
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ConfigError(
            f"{group}._target_={target_name(group_cfg)!r}: cannot be built ({first}); give {group}._target_ "
            f"an importable class and {group}._partial_=true"
        ) from err


# ------------------------------------------------------------------------------------------------ optimizer
def check_optimizer(optimizer_cfg: DictConfig) -> torch.optim.Optimizer:
    """The optimizer of ``optimizer_cfg`` over one dummy parameter, after the named ranges are checked; what
    torch refuses is a ConfigError naming ``optimizer.<key>``."""
    check_ranges("optimizer", optimizer_cfg, OPTIMIZER_RANGES)
    factory = build_partial("optimizer", optimizer_cfg)
    try:
        return factory(params=[torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise refused(
            "optimizer", optimizer_cfg, err, ("self", "params"), "it is called with params=<the student's>"
        ) from err


# ------------------------------------------------------------------------------------------------ scheduler
def scheduled_steps(trainer_cfg: DictConfig) -> int | None:
    """The number of optimizer steps the LR schedule spans: ``trainer.max_steps`` when it is set, ``None``
    when only epochs bound the run (counted from the data once it is loaded). No bound at all is a
    ConfigError: a per-iteration schedule needs an end."""
    max_steps = trainer_cfg.get("max_steps", -1)
    max_epochs = trainer_cfg.get("max_epochs")
    if isinstance(max_steps, int) and max_steps > 0:
        return max_steps
    if max_steps in (-1, None) and max_epochs == -1:
        raise ConfigError(
            "trainer.max_steps=-1 trainer.max_epochs=-1: the per-iteration LR schedule needs the run's length; "
            "set trainer.max_steps (or trainer.max_epochs), or scheduler=null for a constant learning rate"
        )
    return None


def check_schedule(scheduler: Any, scheduler_cfg: DictConfig, steps: int) -> None:
    """Step ``scheduler`` through the ``steps`` of the run: every learning rate must be a finite number
    >= 0."""
    target = target_name(scheduler_cfg)
    fix = "check the scheduler.* values, or scheduler=null for a constant learning rate"
    with warnings.catch_warnings():  # lr_scheduler.step() before optimizer.step(): no training here
        warnings.simplefilter("ignore")
        for step in range(1, steps + 1):
            try:
                scheduler.step()
            except (ArithmeticError, ValueError) as err:
                raise ConfigError(
                    f"scheduler ({target}) fails at step {step} of {steps}: {err}; {fix}"
                ) from err
            for lr in scheduler.get_last_lr():
                if not math.isfinite(float(lr)) or float(lr) < 0:
                    raise ConfigError(
                        f"scheduler ({target}) gives a learning rate of {float(lr)} at step {step} of {steps}; "
                        f"{fix}"
                    )


def check_scheduler(scheduler_cfg: DictConfig, optimizer: torch.optim.Optimizer, steps: int | None) -> None:
    """Build the schedule of ``scheduler_cfg`` on ``optimizer`` for ``steps`` steps (a stand-in count when
    the number is not known yet) and step it to its end; what torch refuses is a ConfigError."""
    check_ranges("scheduler", scheduler_cfg, SCHEDULER_RANGES)
    factory = build_partial("scheduler", scheduler_cfg)
    how = "it is called with optimizer=<the optimizer> and total_iters=<the run's steps>"
    try:
        scheduler = factory(optimizer=optimizer, total_iters=steps or 1)
    except (ValueError, TypeError) as err:
        raise refused("scheduler", scheduler_cfg, err, ("self", "optimizer", "total_iters"), how) from err
    if steps is not None and steps <= MAX_SIMULATED_STEPS:
        check_schedule(scheduler, scheduler_cfg, steps)


# ------------------------------------------------------------------------------------------------ all
def check_optimization(cfg: DictConfig) -> None:
    """``optimizer.*``, ``scheduler.*`` and ``trainer.precision`` of a training config, checked without
    building any data or network."""
    check_precision(OmegaConf.select(cfg, "trainer.precision"))
    if cfg.get("optimizer") is None:
        return
    optimizer = check_optimizer(cfg.optimizer)
    if cfg.get("scheduler"):
        check_scheduler(cfg.scheduler, optimizer, scheduled_steps(cfg.trainer))
