"""The training objective: task loss (plain CE, TFE-RDD, TSE-RDD or the RDD schedule) plus pixel KD.

Built from the ``distillation`` config group. Pure torch; the LightningModule calls it and the
:class:`~rdd_lightning.callbacks.RDDStageSwitch` callback sets :attr:`DistillationObjective.stage` and
:attr:`DistillationObjective.blend_lambda`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from rdd_lightning import rdd
from rdd_lightning.errors import ConfigError
from rdd_lightning.losses import pixel_kd_loss, segmentation_ce_loss
from rdd_lightning.models import SegOutput

TASKS = ("ce", "tfe", "tse", "rdd")
BLENDS = ("none", "linear")
TFE, TSE = 0, 1

#: The keys each option group of the ``distillation`` config may hold.
KD_KEYS = ("weight", "temperature")
TFE_KEYS = ("kl_direction",)
TSE_KEYS = ("mode", "threshold", "min_kept", "confidence", "normalize", "class_weight")
SWITCH_KEYS = ("fraction", "epoch", "step")

#: Switch point used when none of ``distillation.switch.{fraction,epoch,step}`` is given: the paper's best
#: TFE-RDD share, the first 10 % of the planned training steps.
DEFAULT_SWITCH_FRACTION = 0.1


# ------------------------------------------------------------------------------------------- option checks
def _is_number(value: Any) -> bool:
    """``value`` is a finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_choice(key: str, value: Any, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed``; else a :class:`ConfigError` naming ``key``, the value and the
    allowed values."""
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{key}={value!r}: not a known value; choose one of {', '.join(allowed)}")
    return value


def check_number(key: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> float:
    """``value`` as a float if it is a finite number with ``ok(value)``; else a :class:`ConfigError` whose
    fix says ``allowed`` (e.g. ``">= 0"``)."""
    if not _is_number(value):
        raise ConfigError(f"{key}={value!r}: not a number; set {key} to a number {allowed}")
    if not ok(float(value)):
        raise ConfigError(f"{key}={value!r}: out of range; set {key} to a number {allowed}")
    return float(value)


def check_count(key: str, value: Any, meaning: str = "") -> int:
    """``value`` as an int if it is a whole number >= 0 (integral floats such as ``1e5`` are accepted);
    else a :class:`ConfigError`. ``meaning`` is appended to the fix (e.g. ``" (0: no minimum)"``)."""
    if not _is_number(value) or value < 0 or float(value) != int(value):
        raise ConfigError(f"{key}={value!r}: not an integer >= 0; set {key} to a whole number >= 0{meaning}")
    return int(value)


def check_known_keys(group: str, options: Mapping[str, Any] | None, known: Sequence[str]) -> dict[str, Any]:
    """``options`` (``None``: empty) as a dict if every key is in ``known``; else a :class:`ConfigError`
    naming the unknown ``<group>.<key>`` (a typo given with ``++``) and the known keys."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ConfigError(
            f"{group}={options!r}: not a mapping; give {group} as keys among {', '.join(known)}"
        )
    for key, value in options.items():
        if key not in known:
            raise ConfigError(
                f"{group}.{key}={value!r}: unknown key; the keys of {group} are {', '.join(known)} "
                f"(check the spelling)"
            )
    return dict(options)


def check_class_weight(
    key: str, value: Any, num_classes: int | None, *, presets: bool
) -> str | list[float] | None:
    """A ``class_weight`` setting: ``None``, a preset name of :data:`rdd_lightning.rdd.NAMED_CLASS_WEIGHTS`
    (only if ``presets``) or a list of ``num_classes`` floats > 0. Returns ``None``, the name, or the floats.
    With ``num_classes=None`` the length is not checked. Anything else raises :class:`ConfigError`."""
    if value is None:
        return None
    names = ", ".join(sorted(rdd.NAMED_CLASS_WEIGHTS))
    count = "C" if num_classes is None else str(num_classes)
    preset_form = f", a preset ({names})" if presets else ""
    forms = f"null (no weights){preset_form} or a list of {count} weights > 0"
    if isinstance(value, str):
        if not presets:
            raise ConfigError(f"{key}={value!r}: a preset name is not accepted here; give {forms}")
        preset = rdd.NAMED_CLASS_WEIGHTS.get(value.lower())
        if preset is None:
            raise ConfigError(f"{key}={value!r}: unknown preset; give {forms}")
        if num_classes is not None and len(preset) != num_classes:
            raise ConfigError(
                f"{key}={value!r}: the preset has {len(preset)} weights but the dataset has {num_classes} "
                f"classes; set {key}=null or give a list of {num_classes} weights > 0"
            )
        return value
    if isinstance(value, Tensor):
        value = value.tolist()
    if not isinstance(value, Sequence) or not value or not all(_is_number(w) and w > 0 for w in value):
        raise ConfigError(f"{key}={value!r}: not a list of weights > 0; give {forms}")
    if num_classes is not None and len(value) != num_classes:
        raise ConfigError(
            f"{key}={list(value)!r}: {len(value)} weights but the dataset has {num_classes} classes; "
            f"give one weight > 0 per class ({num_classes}), or null"
        )
    return [float(w) for w in value]


def resolve_switch(
    fraction: float | None = None, epoch: int | None = None, step: int | None = None
) -> dict[str, float | int]:
    """The one switch point of ``distillation.switch`` as ``{"fraction": f}``, ``{"epoch": e}`` or
    ``{"step": s}``.

    ``None`` means "not given". None given: the paper's ``fraction`` :data:`DEFAULT_SWITCH_FRACTION`; one
    given: that one (``fraction`` in [0, 1], ``epoch``/``step`` whole numbers >= 0); two or more given: a
    :class:`ConfigError` naming them.
    """
    given = {k: v for k, v in zip(SWITCH_KEYS, (fraction, epoch, step), strict=True) if v is not None}
    if len(given) > 1:
        named = " and ".join(f"distillation.switch.{k}={v!r}" for k, v in given.items())
        drop = " ".join(f"distillation.switch.{k}=null" for k in list(given)[:-1])
        others = "others" if len(given) > 2 else "other"
        raise ConfigError(
            f"{named}: more than one switch point given; keep one and set the {others} to null, e.g. {drop}"
        )
    if not given:
        return {"fraction": DEFAULT_SWITCH_FRACTION}
    ((key, value),) = given.items()
    if key == "fraction":
        allowed = "in [0, 1] (0: TSE-RDD only, 1: TFE-RDD only)"
        return {key: check_number("distillation.switch.fraction", value, allowed, lambda x: 0.0 <= x <= 1.0)}
    unit = " (0-based epoch)" if key == "epoch" else " (global optimizer step)"
    return {key: check_count(f"distillation.switch.{key}", value, unit)}


def check_tfe_options(tfe: Mapping[str, Any] | None) -> dict[str, Any]:
    """The checked ``distillation.tfe`` options (keyword options of :func:`rdd.tfe_task_loss`)."""
    options = check_known_keys("distillation.tfe", tfe, TFE_KEYS)
    if "kl_direction" in options:
        check_choice("distillation.tfe.kl_direction", options["kl_direction"], rdd.KL_DIRECTIONS)
    return options


def check_tse_options(tse: Mapping[str, Any] | None, num_classes: int | None = None) -> dict[str, Any]:
    """The checked ``distillation.tse`` options (keyword options of :func:`rdd.tse_task_loss`);
    ``threshold`` becomes a float, ``min_kept`` an int, a ``class_weight`` list floats. Keys not given keep
    the function's defaults. ``num_classes`` (``None``: unchecked) is the length a weight list must have."""
    options = check_known_keys("distillation.tse", tse, TSE_KEYS)
    choices = {"mode": rdd.MASK_MODES, "confidence": rdd.CONFIDENCES, "normalize": rdd.NORMALIZATIONS}
    for key, allowed in choices.items():
        if key in options:
            check_choice(f"distillation.tse.{key}", options[key], allowed)
    if "threshold" in options:
        between = "strictly between 0 and 1 (default 0.7)"
        options["threshold"] = check_number(
            "distillation.tse.threshold", options["threshold"], between, lambda x: 0.0 < x < 1.0
        )
    if "min_kept" in options:
        options["min_kept"] = check_count(
            "distillation.tse.min_kept",
            options["min_kept"],
            " (hard pixels per head and batch; 0: no minimum)",
        )
    if "class_weight" in options:
        options["class_weight"] = check_class_weight(
            "distillation.tse.class_weight", options["class_weight"], num_classes, presets=True
        )
    return options


class DistillationObjective:
    """Loss of one training step.

    Args:
        name: the config's name (``none``, ``kd``, ``rdd``, ``tfe``, ``tse``, ...), for logs.
        task: ``ce`` (CE + aux_weight * aux CE), ``tfe`` (TFE-RDD throughout), ``tse`` (TSE-RDD throughout) or
            ``rdd`` (TFE-RDD, then TSE-RDD after the switch point).
        aux_weight: weight of the auxiliary head's task loss (0.4).
        kd: ``{"weight": λ_kd, "temperature": T}`` of the pixel KD term; weight 0 disables it.
        tfe: keyword options of :func:`rdd_lightning.rdd.tfe_task_loss` (``kl_direction``).
        tse: keyword options of :func:`rdd_lightning.rdd.tse_task_loss` (``mode``, ``threshold``, ``min_kept``,
            ``confidence``, ``normalize``, ``class_weight``).
        switch: when ``task: rdd`` switches stage (used by the callback): at most one of
            ``fraction``/``epoch``/``step`` not ``None``; none given means ``fraction`` 0.1 (the paper's).
        blend: ``none`` (hard switch) or ``linear`` (λ·TFE + (1-λ)·TSE after the switch, λ from 1 to 0;
            ``task: rdd`` only).
        class_weight: per-class weights of the plain CE task loss (``task: ce``), or ``None``.
        ignore_index: void label value.
        num_classes: the dataset's number of classes, the length of class weights (``None``: unchecked).

    Every option is checked here, whatever the task (a ``tfe`` config still carries valid ``tse`` options):
    a bad value or an unknown key of ``kd``/``tfe``/``tse``/``switch`` raises one :class:`ConfigError` naming
    the full config key (``distillation.tse.mode``), the value and the fix. :attr:`switch` holds the resolved
    switch point, exactly one key (see :func:`resolve_switch`).
    """

    def __init__(
        self,
        name: str = "kd",
        task: str = "ce",
        aux_weight: float = 0.4,
        kd: Mapping[str, Any] | None = None,
        tfe: Mapping[str, Any] | None = None,
        tse: Mapping[str, Any] | None = None,
        switch: Mapping[str, Any] | None = None,
        blend: str = "none",
        class_weight: Sequence[float] | None = None,
        ignore_index: int = 255,
        *,
        num_classes: int | None = None,
    ):
        self.name = name
        self.task = check_choice("distillation.task", task, TASKS)
        self.blend = check_choice("distillation.blend", blend, BLENDS)
        if blend == "linear" and task != "rdd":
            raise ConfigError(
                f"distillation.blend={blend!r} needs distillation=rdd (it blends TFE-RDD into TSE-RDD "
                f"after the switch), but distillation.task={task!r}; use distillation=rdd "
                f"distillation.blend=linear, or distillation.blend=none"
            )
        self.aux_weight = check_number("distillation.aux_weight", aux_weight, ">= 0", lambda x: x >= 0)
        kd = check_known_keys("distillation.kd", kd, KD_KEYS)
        self.kd_weight = check_number(
            "distillation.kd.weight", kd.get("weight", 0.0), ">= 0 (0 disables pixel KD)", lambda x: x >= 0
        )
        self.kd_temperature = check_number(
            "distillation.kd.temperature", kd.get("temperature", 1.0), "> 0 (default 1)", lambda x: x > 0
        )
        self.tfe_options = check_tfe_options(tfe)
        self.tse_options = check_tse_options(tse, num_classes)
        self.switch = resolve_switch(**check_known_keys("distillation.switch", switch, SWITCH_KEYS))
        self.class_weight = check_class_weight(
            "distillation.class_weight", class_weight, num_classes, presets=False
        )
        self.ignore_index = ignore_index
        # Stage state, driven by RDDStageSwitch for task "rdd"; fixed otherwise.
        self.stage = TSE if task == "tse" else TFE
        self.blend_lambda = 1.0

    @property
    def needs_teacher(self) -> bool:
        return self.task != "ce" or self.kd_weight > 0

    @property
    def needs_teacher_aux(self) -> bool:
        return self.task in ("tfe", "rdd")

    def task_loss(
        self, student: SegOutput, teacher: SegOutput | None, target: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Task loss of the current stage and its statistics (detached 0-dim tensors)."""
        if self.task == "ce":
            loss = segmentation_ce_loss(
                student.logits, student.aux_logits, target, aux_weight=self.aux_weight,
                ignore_index=self.ignore_index, class_weight=self.class_weight,
            )  # fmt: skip
            return loss, {}
        assert teacher is not None, "RDD task losses need the teacher's outputs"
        heads = (student.logits, student.aux_logits, teacher.logits, teacher.aux_logits, target)
        common = {"ignore_index": self.ignore_index, "aux_weight": self.aux_weight, "return_stats": True}
        use_tfe = self.stage == TFE or (self.blend == "linear" and self.blend_lambda > 0)
        use_tse = self.stage == TSE
        stats: dict[str, Tensor] = {}
        loss = target.new_zeros((), dtype=torch.float32)
        if use_tfe:
            tfe_loss, tfe_stats = rdd.tfe_task_loss(*heads, **common, **self.tfe_options)
            stats.update(tfe_stats)
            weight = 1.0 if self.stage == TFE else self.blend_lambda
            loss = loss + weight * tfe_loss
        if use_tse:
            tse_loss, tse_stats = rdd.tse_task_loss(*heads, **common, **self.tse_options)
            stats.update(tse_stats)
            weight = 1.0 - self.blend_lambda if (self.blend == "linear" and use_tfe) else 1.0
            loss = loss + weight * tse_loss
        stats["rdd_stage"] = torch.tensor(float(self.stage))
        if self.blend == "linear":
            stats["blend_lambda"] = torch.tensor(float(self.blend_lambda if self.stage == TSE else 1.0))
        return loss, stats

    def __call__(self, student: SegOutput, teacher: SegOutput | None, target: Tensor) -> dict[str, Tensor]:
        """``{"loss", "loss_task", "loss_kd", ...stats}`` of one batch; ``loss`` carries the gradient."""
        loss_task, stats = self.task_loss(student, teacher, target)
        out = {"loss_task": loss_task}
        loss = loss_task
        if self.kd_weight > 0:
            assert teacher is not None, "pixel KD needs the teacher's outputs"
            loss_kd = self.kd_weight * pixel_kd_loss(
                student.logits, teacher.logits, temperature=self.kd_temperature
            )
            out["loss_kd"] = loss_kd
            loss = loss + loss_kd
        out["loss"] = loss
        out.update(stats)
        return out
