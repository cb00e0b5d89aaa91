"""The training objective: a task loss (plain CE, TFE-RDD, TSE-RDD or the RDD schedule) plus weighted KD terms.

Built from the ``distillation`` config group: ``task`` picks the task loss, ``kd`` the pixel KD term, and
``terms`` any set of the other methods' terms (:data:`TERMS`), each with its weight (0 disables it). RDD only
ever re-weights the task loss; the terms are added as they are. Pure torch; the LightningModule calls it and
the :class:`~rdd_lightning.callbacks.RDDStageSwitch` callback sets :attr:`DistillationObjective.stage` and
:attr:`DistillationObjective.blend_lambda`.

The objective is built from the config alone, before any network exists (so a bad option fails first). What
learns or remembers (connectors, the CIRKD memory and projection head, the SKD discriminator) is created by
:meth:`DistillationObjective.build_modules` once the student and the teacher exist; the caller owns those
modules (trains them, saves them) and passes them back to every call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rdd_lightning import rdd
from rdd_lightning.errors import ConfigError
from rdd_lightning.losses import (
    CIRKDMemory,
    FeatureConnector,
    SKDDiscriminator,
    attention_transfer_loss,
    category_similarity_loss,
    channel_wise_divergence,
    discriminator_loss,
    dist_loss,
    generator_loss,
    hint_loss,
    ifv_loss,
    minibatch_pixel_relation_loss,
    pairwise_similarity_loss,
    pixel_kd_loss,
    pixel_similarity_loss,
    segmentation_ce_loss,
)
from rdd_lightning.models import SegOutput

TASKS = ("ce", "tfe", "tse", "rdd")
BLENDS = ("none", "linear")
FEATURES = ("decoder", "encoder")
TFE, TSE = 0, 1

#: The keys each option group of the ``distillation`` config may hold.
KD_KEYS = ("weight", "temperature")
TFE_KEYS = ("kl_direction",)
TSE_KEYS = ("mode", "threshold", "min_kept", "min_kept_per_image", "confidence", "normalize", "class_weight")
SWITCH_KEYS = ("fraction", "epoch", "step")
TOP_KEYS = (
    "name",
    "task",
    "aux_weight",
    "feature",
    "kd",
    "terms",
    "tfe",
    "tse",
    "switch",
    "blend",
    "class_weight",
)

# Kinds of term options: (fix text, test). Weights are ">= 0" (0 disables); the rest as named.
_WEIGHT = (">= 0 (0 disables the term)", lambda x: x >= 0)
_NONNEG = (">= 0", lambda x: x >= 0)
_POSITIVE = ("> 0", lambda x: x > 0)
_COUNT = "count"  # a whole number >= 1
_FLAG = "flag"  # true or false
_BETAS = "betas"  # two numbers in [0, 1)

#: The KD terms a ``distillation.terms`` mapping may hold: ``{term: {option: (default, kind)}}``. An option
#: of kind ``_WEIGHT`` named ``weight`` gives the logged loss ``loss_<term>``; one named ``<x>_weight`` gives
#: ``loss_<term>_<x>``. Sources, published defaults and deliberate differences are in each loss module.
TERMS: dict[str, dict[str, tuple[Any, Any]]] = {
    # CWD (losses/cwd.py) on the distilled feature (through a connector) and on the main logits
    "cwd_feature": {"weight": (0.0, _WEIGHT), "temperature": (4.0, _POSITIVE)},
    "cwd_logits": {"weight": (0.0, _WEIGHT), "temperature": (4.0, _POSITIVE)},
    # attention transfer (losses/at.py) on the distilled feature
    "at": {"weight": (0.0, _WEIGHT), "p": (2.0, _POSITIVE)},
    # FitNet hint (losses/fitnet.py): a 1x1 regressor (+ BN if norm) to the teacher's feature, then MSE
    "fitnet": {"weight": (0.0, _WEIGHT), "norm": (True, _FLAG)},
    # DIST (losses/dist.py) on the main logits, plus aux_weight x the same on the aux logits
    "dist": {
        "weight": (0.0, _WEIGHT),
        "beta": (1.0, _NONNEG),
        "gamma": (1.0, _NONNEG),
        "temperature": (1.0, _POSITIVE),
        "aux_weight": (0.4, _NONNEG),
    },
    # SKD pair-wise similarity (losses/skd.py) on the distilled feature
    "skd_pairwise": {"weight": (0.0, _WEIGHT), "pool_size": (2, _COUNT)},
    # holistic adversarial term (losses/skd.py): the student's generator loss; the discriminator trains with
    # its own Adam (lr, betas) on discriminator_weight x its hinge loss
    "adversarial": {
        "weight": (0.0, _WEIGHT),
        "lr": (4e-4, _NONNEG),
        "betas": ((0.9, 0.99), _BETAS),
        "discriminator_weight": (0.1, _POSITIVE),
        "base_channels": (64, _COUNT),
    },
    # IFVD (losses/ifvd.py) on the distilled feature
    "ifv": {"weight": (0.0, _WEIGHT)},
    # DSD (losses/dsd.py): pixel similarity of [aux logits, feature, logits], category similarity of logits
    "dsd_pixel": {"weight": (0.0, _WEIGHT)},
    "dsd_category": {"weight": (0.0, _WEIGHT), "temperature": (4.0, _POSITIVE), "pool_size": (2, _COUNT)},
    # CIRKD (losses/cirkd.py): mini-batch pixel relations over the global batch, and the memory terms
    "cirkd_minibatch": {
        "weight": (0.0, _WEIGHT),
        "temperature": (0.1, _POSITIVE),
        "pool_size": (1, _COUNT),
        "gather": (True, _FLAG),
        "chunk_rows": (512, _COUNT),
    },
    "cirkd_memory": {
        "pixel_weight": (0.0, _WEIGHT),
        "region_weight": (0.0, _WEIGHT),
        "pixel_memory_size": (20000, _COUNT),
        "region_memory_size": (2000, _COUNT),
        "pixel_contrast_size": (4096, _COUNT),
        "region_contrast_size": (1024, _COUNT),
        "pixels_per_update": (16, _COUNT),
        "temperature": (0.1, _POSITIVE),
        "kd_temperature": (1.0, _POSITIVE),
    },
}

#: The term whose module is the discriminator (trained by its own optimizer, never the student's).
DISCRIMINATOR_TERM = "adversarial"

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
    """The checked ``distillation.tse`` options (keyword options of :func:`rdd.tse_task_loss`, plus
    ``min_kept_per_image``); ``threshold`` becomes a float, ``min_kept`` / ``min_kept_per_image`` ints (``None``
    drops them), a ``class_weight`` list floats. Keys not given keep the function's defaults. ``num_classes``
    (``None``: unchecked) is the length a weight list must have."""
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
    if options.get("min_kept") is None:
        options.pop("min_kept", None)  # null: from min_kept_per_image (or rdd's default)
    else:
        options["min_kept"] = check_count(
            "distillation.tse.min_kept",
            options["min_kept"],
            " (hard pixels per head and per-process batch, replacing min_kept_per_image; 0: no minimum), or null",
        )
    if options.get("min_kept_per_image") is None:
        options.pop("min_kept_per_image", None)
    else:
        options["min_kept_per_image"] = check_count(
            "distillation.tse.min_kept_per_image",
            options["min_kept_per_image"],
            " (hard pixels per head and image of the per-process batch; 0: no minimum), or null",
        )
    if "class_weight" in options:
        options["class_weight"] = check_class_weight(
            "distillation.tse.class_weight", options["class_weight"], num_classes, presets=True
        )
    return options


def _check_term_option(key: str, value: Any, kind: Any) -> Any:
    """One term option, checked and normalised as its ``kind`` says (see :data:`TERMS`)."""
    if kind == _COUNT:
        if not _is_number(value) or value < 1 or float(value) != int(value):
            raise ConfigError(f"{key}={value!r}: not an integer >= 1; set {key} to a whole number >= 1")
        return int(value)
    if kind == _FLAG:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: not a boolean; set {key} to true or false")
        return value
    if kind == _BETAS:
        pair = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
        if pair is None or len(pair) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in pair):
            raise ConfigError(f"{key}={value!r}: not two numbers in [0, 1); set {key} to e.g. [0.9, 0.99]")
        return (float(pair[0]), float(pair[1]))
    allowed, ok = kind
    return check_number(key, value, allowed, ok)


def check_terms(terms: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The checked ``distillation.terms``: every term of :data:`TERMS` that is given, with all its options
    (defaults filled in, values normalised), in :data:`TERMS` order. An unknown term, an unknown option or a
    bad value raises one :class:`ConfigError` naming the full key, the value and the fix."""
    given = check_known_keys("distillation.terms", terms, tuple(TERMS))
    checked: dict[str, dict[str, Any]] = {}
    for term, spec in TERMS.items():
        if term not in given:
            continue
        options = check_known_keys(f"distillation.terms.{term}", given[term], tuple(spec))
        checked[term] = {
            key: _check_term_option(f"distillation.terms.{term}.{key}", options.get(key, default), kind)
            for key, (default, kind) in spec.items()
        }
    return checked


def loss_name(term: str, weight_key: str) -> str:
    """Logged name of one weighted loss of a term: ``loss_<term>`` or ``loss_<term>_<x>`` for ``<x>_weight``."""
    return f"loss_{term}" if weight_key == "weight" else f"loss_{term}_{weight_key.removesuffix('_weight')}"


def network_channels(net: nn.Module) -> dict[str, int]:
    """``{"classes", "decoder", "encoder"}`` channel counts of a network's logits and distilled features.

    Networks of this package say it (:meth:`rdd_lightning.models.SegmentationNet.feature_channels`); any other
    network returning :class:`SegOutput` is run once on a small input in eval mode, without gradient.
    """
    if hasattr(net, "feature_channels") and hasattr(net, "num_classes"):
        return {"classes": int(net.num_classes), **net.feature_channels()}
    was_training = net.training
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        with torch.no_grad():
            out = net.eval()(torch.zeros(2, 3, 64, 64, device=device))
    finally:
        net.train(was_training)
    decoder = out.decoder_features.shape[1] if out.decoder_features is not None else 0
    return {
        "classes": int(out.logits.shape[1]),
        "decoder": int(decoder),
        "encoder": int(out.features[-1].shape[1]),
    }


class DistillationObjective:
    """Loss of one training step: the task loss plus every weighted KD term.

    Args:
        name: the config's name (``none``, ``kd``, ``rdd``, ``tfe``, ``tse``, ``cwd``, ``cirkd_rdd``, ...), for
            logs.
        task: ``ce`` (CE + aux_weight * aux CE), ``tfe`` (TFE-RDD throughout), ``tse`` (TSE-RDD throughout) or
            ``rdd`` (TFE-RDD, then TSE-RDD after the switch point).
        aux_weight: weight of the auxiliary head's task loss (0.4).
        kd: ``{"weight": λ_kd, "temperature": T}`` of the pixel KD term; weight 0 disables it.
        feature: the map the feature terms distil: ``decoder`` (:attr:`SegOutput.decoder_features`, the
            decoder's output before the classifier, which the published recipes distil) or ``encoder`` (the
            encoder's last stage, ``SegOutput.features[-1]``).
        terms: ``{term: {option: value}}``, any of :data:`TERMS` (``cwd_feature``, ``at``, ``adversarial``,
            ``cirkd_memory``, ...); options not given keep their published defaults, and a term whose weight
            options are all 0 is off.
        tfe: keyword options of :func:`rdd_lightning.rdd.tfe_task_loss` (``kl_direction``).
        tse: keyword options of :func:`rdd_lightning.rdd.tse_task_loss` (``mode``, ``threshold``, ``min_kept``,
            ``confidence``, ``normalize``, ``class_weight``), and ``min_kept_per_image``: the OHEM minimum per
            image, applied to each process's batch as ``min_kept_per_image x its images`` (so one GPU x 16
            images and 4 GPUs x 4 select the same density) unless ``min_kept`` (an absolute count per
            per-process batch) is given (:meth:`tse_min_kept`).
        switch: when ``task: rdd`` switches stage (used by the callback): at most one of
            ``fraction``/``epoch``/``step`` not ``None``; none given means ``fraction`` 0.1 (the paper's).
        blend: ``none`` (hard switch) or ``linear`` (λ·TFE + (1-λ)·TSE after the switch, λ from 1 to 0;
            ``task: rdd`` only).
        class_weight: per-class weights of the plain CE task loss (``task: ce``), or ``None``.
        ignore_index: void label value.
        num_classes: the dataset's number of classes, the length of class weights (``None``: unchecked).
        **unknown: any other key (a typo given with ``++``) is refused.

    Every option is checked here, whatever the task (a ``tfe`` config still carries valid ``tse`` options):
    a bad value or an unknown key of ``distillation``, ``kd``/``tfe``/``tse``/``switch`` or ``terms`` (an
    unknown term, or an unknown option of a term) raises one :class:`ConfigError` naming the full config key
    (``distillation.tse.mode``, ``distillation.terms.at.weight``), the value and the fix. :attr:`switch` holds
    the resolved switch point, exactly one key (see :func:`resolve_switch`); :attr:`terms` every given term
    with all its options, :attr:`active_terms` those with a weight > 0.

    Terms that learn or remember need modules: :meth:`build_modules` creates them from the two networks'
    channel counts; pass its result to every call. The discriminator (term ``adversarial``) is trained by its
    own optimizer (:meth:`discriminator_optimizer`) on :meth:`discriminator_loss`; every other module trains
    with the student (:meth:`student_side_parameters`).
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
        feature: str = "decoder",
        terms: Mapping[str, Any] | None = None,
        num_classes: int | None = None,
        **unknown: Any,
    ):
        for key, value in unknown.items():
            raise ConfigError(
                f"distillation.{key}={value!r}: unknown key; the keys of distillation are {', '.join(TOP_KEYS)} "
                f"(check the spelling; a KD term goes under distillation.terms)"
            )
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
        self.feature = check_choice("distillation.feature", feature, FEATURES)
        self.terms = check_terms(terms)
        self.active_terms = {
            term: options
            for term, options in self.terms.items()
            if any(options[key] > 0 for key, (_, kind) in TERMS[term].items() if kind is _WEIGHT)
        }
        # Stage state, driven by RDDStageSwitch for task "rdd"; fixed otherwise.
        self.stage = TSE if task == "tse" else TFE
        self.blend_lambda = 1.0

    def tse_min_kept(self, batch_size: int) -> int | None:
        """TSE's OHEM minimum of hard pixels for a per-process batch of ``batch_size`` images:
        ``tse.min_kept`` when given, else ``tse.min_kept_per_image * batch_size``, else ``None`` (rdd's
        default)."""
        if "min_kept" in self.tse_options:
            return int(self.tse_options["min_kept"])
        per_image = self.tse_options.get("min_kept_per_image")
        return None if per_image is None else int(per_image) * int(batch_size)

    def tse_loss_options(self, batch_size: int) -> dict[str, Any]:
        """The keyword options of :func:`rdd_lightning.rdd.tse_task_loss` for a per-process batch of
        ``batch_size`` images (``min_kept`` resolved by :meth:`tse_min_kept`)."""
        options = {k: v for k, v in self.tse_options.items() if k != "min_kept_per_image"}
        min_kept = self.tse_min_kept(batch_size)
        if min_kept is not None:
            options["min_kept"] = min_kept
        return options

    @property
    def needs_teacher(self) -> bool:
        return self.task != "ce" or self.kd_weight > 0 or bool(self.active_terms)

    @property
    def needs_teacher_aux(self) -> bool:
        return self.task in ("tfe", "rdd")

    @property
    def has_discriminator(self) -> bool:
        """The objective has an adversarial term, whose discriminator needs an optimizer of its own."""
        return DISCRIMINATOR_TERM in self.active_terms

    @property
    def discriminator_weight(self) -> float:
        """Weight of the discriminator's own loss (``λ_d``, 0.1 as published); 0 without a discriminator."""
        options = self.active_terms.get(DISCRIMINATOR_TERM)
        return float(options["discriminator_weight"]) if options else 0.0

    # ------------------------------------------------------------------------------- learnable modules
    def build_modules(self, student: nn.Module, teacher: nn.Module | None) -> nn.ModuleDict:
        """The modules of the active terms that learn or remember, keyed by term, on the CPU.

        ``cwd_feature``: a :class:`~rdd_lightning.losses.FeatureConnector` from the student's feature channels to
        the teacher's (the identity when they agree); ``fitnet``: the hint regressor (always a 1x1 conv, + BN
        when ``norm``); ``adversarial``: the :class:`~rdd_lightning.losses.SKDDiscriminator` on the teacher's
        class scores; ``cirkd_memory``: the :class:`~rdd_lightning.losses.CIRKDMemory` (projection head and
        teacher-embedding queues). Channel counts come from the networks (:func:`network_channels`). Terms
        without parameters get no module; with none of these terms the dict is empty.
        """
        modules = nn.ModuleDict()
        wanted = [
            t for t in self.active_terms if t in ("cwd_feature", "fitnet", DISCRIMINATOR_TERM, "cirkd_memory")
        ]
        if not wanted:
            return modules
        if teacher is None:
            raise ValueError(
                f"distillation={self.name}: terms {wanted} need the teacher network to size their modules"
            )
        s_channels, t_channels = network_channels(student), network_channels(teacher)
        cs, ct = s_channels[self.feature], t_channels[self.feature]
        if not cs or not ct:
            raise ConfigError(
                f"distillation.feature={self.feature!r}: the {'student' if not cs else 'teacher'} network returns "
                f"no decoder features; set distillation.feature=encoder"
            )
        for term in wanted:
            options = self.active_terms[term]
            if term == "cwd_feature":
                modules[term] = FeatureConnector(cs, ct)
            elif term == "fitnet":
                modules[term] = FeatureConnector(cs, ct, always=True, norm=options["norm"])
            elif term == DISCRIMINATOR_TERM:
                modules[term] = SKDDiscriminator(
                    t_channels["classes"], base_channels=options["base_channels"]
                )
            else:
                memory = {k: v for k, v in options.items() if not k.endswith("_weight")}
                modules[term] = CIRKDMemory(
                    t_channels["classes"], cs, ct, **memory, ignore_index=self.ignore_index
                )
        return modules

    def student_side_parameters(self, modules: nn.ModuleDict) -> Iterator[nn.Parameter]:
        """Parameters of ``modules`` that train with the student (connectors, CIRKD projection head): all but
        the discriminator's."""
        for term, module in modules.items():
            if term != DISCRIMINATOR_TERM:
                yield from module.parameters()

    def discriminator_optimizer(self, modules: nn.ModuleDict) -> torch.optim.Optimizer:
        """The discriminator's own optimizer: Adam with the ``adversarial`` term's ``lr`` and ``betas``
        (4e-4, (0.9, 0.99) as published), over the discriminator's parameters only."""
        options = self.active_terms[DISCRIMINATOR_TERM]
        discriminator = self._module(modules, DISCRIMINATOR_TERM)
        return torch.optim.Adam(discriminator.parameters(), lr=options["lr"], betas=options["betas"])

    @staticmethod
    def process_local_buffers(modules: nn.ModuleDict) -> list[str]:
        """Names (within ``modules``) of buffers each process keeps for itself under DDP: the CIRKD queues.

        Every process enqueues the whole gathered global batch, so the queues need no broadcast (the published
        code keeps them outside DDP too); broadcasting them from rank 0 before every forward, as DDP does with
        buffers, would move ``C * (P + R) * D`` floats per step.
        """
        return [
            f"{prefix}.{name}"
            for prefix, module in modules.named_modules()
            if isinstance(module, CIRKDMemory)
            for name, _ in module.named_buffers(recurse=False)
        ]

    def task_loss(
        self, student: SegOutput, teacher: SegOutput | None, target: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Task loss of the current stage and its statistics (detached 0-dim tensors)."""
        if self.task == "ce":
            loss = segmentation_ce_loss(
                student.logits,
                student.aux_logits,
                target,
                aux_weight=self.aux_weight,
                ignore_index=self.ignore_index,
                class_weight=self.class_weight,
            )
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
            tse_options = self.tse_loss_options(int(target.shape[0]))
            tse_loss, tse_stats = rdd.tse_task_loss(*heads, **common, **tse_options)
            stats.update(tse_stats)
            weight = 1.0 - self.blend_lambda if (self.blend == "linear" and use_tfe) else 1.0
            loss = loss + weight * tse_loss
        stats["rdd_stage"] = torch.tensor(float(self.stage))
        if self.blend == "linear":
            stats["blend_lambda"] = torch.tensor(float(self.blend_lambda if self.stage == TSE else 1.0))
        return loss, stats

    def __call__(
        self,
        student: SegOutput,
        teacher: SegOutput | None,
        target: Tensor,
        modules: nn.ModuleDict | None = None,
    ) -> dict[str, Tensor]:
        """``{"loss", "loss_task", "loss_kd", "loss_<term>", ...stats}`` of one batch.

        ``loss`` (with gradient) is ``loss_task`` plus every weighted term; each ``loss_<term>`` is that term's
        weighted contribution (so they add up to ``loss``), present only when its weight is > 0. ``modules``:
        what :meth:`build_modules` returned (needed by ``cwd_feature``, ``fitnet``, ``adversarial``,
        ``cirkd_memory``). The discriminator gets no gradient from ``loss``.
        """
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
        for term, options in self.active_terms.items():
            assert teacher is not None, f"the {term} term needs the teacher's outputs"
            losses = getattr(self, f"_term_{term}")(student, teacher, target, modules, options)
            for weight_key, value in losses.items():
                if options[weight_key] > 0:
                    weighted = options[weight_key] * value
                    out[loss_name(term, weight_key)] = weighted
                    loss = loss + weighted
        out["loss"] = loss
        out.update(stats)
        return out

    def discriminator_loss(self, student: SegOutput, teacher: SegOutput, modules: nn.ModuleDict) -> Tensor:
        """The discriminator's hinge loss on this batch (unweighted; its optimizer minimises
        :attr:`discriminator_weight` times it). Both score maps are detached: it trains the discriminator only."""
        return discriminator_loss(self._module(modules, DISCRIMINATOR_TERM), student.logits, teacher.logits)

    # ----------------------------------------------------------------------------------------- the terms
    # Each returns the term's unweighted losses keyed by its weight option(s).
    def _module(self, modules: nn.ModuleDict | None, term: str) -> nn.Module:
        if modules is None or term not in modules:
            raise ValueError(
                f"the {term} term needs its module: build them with objective.build_modules(student, teacher) "
                f"and pass the result to every call"
            )
        return modules[term]

    def _feature(self, out: SegOutput, network: str) -> Tensor:
        """The distilled feature map of one network's output (:attr:`feature`)."""
        if self.feature == "encoder":
            return out.features[-1]
        if out.decoder_features is None:
            raise ConfigError(
                f"distillation.feature='decoder': the {network} network returns no decoder features; set "
                f"distillation.feature=encoder"
            )
        return out.decoder_features

    def _term_cwd_feature(self, s: SegOutput, t: SegOutput, y: Tensor, modules, o) -> dict[str, Tensor]:
        connector = self._module(modules, "cwd_feature")  # applied inside: the normaliser is the student's
        return {
            "weight": channel_wise_divergence(
                self._feature(s, "student"),
                self._feature(t, "teacher"),
                temperature=o["temperature"],
                connector=connector,
            )
        }

    def _term_cwd_logits(self, s: SegOutput, t: SegOutput, y: Tensor, modules, o) -> dict[str, Tensor]:
        return {"weight": channel_wise_divergence(s.logits, t.logits, temperature=o["temperature"])}

    def _term_at(self, s: SegOutput, t: SegOutput, y: Tensor, modules, o) -> dict[str, Tensor]:
        return {
            "weight": attention_transfer_loss(
                self._feature(s, "student"), self._feature(t, "teacher"), p=o["p"]
            )
        }

    def _term_fitnet(self, s: SegOutput, t: SegOutput, y: Tensor, modules, o) -> dict[str, Tensor]:
        hint = self._module(modules, "fitnet")(self._feature(s, "student"))
        return {"weight": hint_loss(hint, self._feature(t, "teacher"))}

    def _term_dist(self, s: SegOutput, t: SegOutput, y: Tensor, modules, o) -> dict[str, Tensor]:
        options = {"beta": o["beta"], "gamma": o["gamma"], "temperature": o["temperature"]}
        loss = dist_loss(s.logits, t.logits, **options)
        if o["aux_weight"] > 0 and s.aux_logits is not None and t.aux_logits is not None:
            loss = loss + o["aux_weight"] * dist_loss(s.aux_logits, t.aux_logits, **options)
        return {"weight": loss}

    def _term_skd_pairwise(self, s: SegOutput, t: SegOutput, y: Tensor, modules, o) -> dict[str, Tensor]:
        fs, ft = self._feature(s, "student"), self._feature(t, "teacher")
        return {"weight": pairwise_similarity_loss(fs, ft, pool_size=o["pool_size"])}

    def _term_adversarial(self, s: SegOutput, t: SegOutput, y: Tensor, modules, o) -> dict[str, Tensor]:
        discriminator = self._module(modules, DISCRIMINATOR_TERM)
        return {"weight": generator_loss(discriminator, s.logits, size=tuple(t.logits.shape[-2:]))}

    def _term_ifv(self, s: SegOutput, t: SegOutput, y: Tensor, modules, o) -> dict[str, Tensor]:
        fs, ft = self._feature(s, "student"), self._feature(t, "teacher")
        return {"weight": ifv_loss(fs, ft, y, num_classes=t.logits.shape[1])}

    def _term_dsd_pixel(self, s: SegOutput, t: SegOutput, y: Tensor, modules, o) -> dict[str, Tensor]:
        """Residual attention across ``[aux logits, feature, logits]`` (the aux layer only when both networks
        have an aux head), as the published DSD code's layer list."""
        s_layers, t_layers = [self._feature(s, "student"), s.logits], [self._feature(t, "teacher"), t.logits]
        if s.aux_logits is not None and t.aux_logits is not None:
            s_layers.insert(0, s.aux_logits)
            t_layers.insert(0, t.aux_logits)
        return {"weight": pixel_similarity_loss(s_layers, t_layers)}

    def _term_dsd_category(self, s: SegOutput, t: SegOutput, y: Tensor, modules, o) -> dict[str, Tensor]:
        options = {"temperature": o["temperature"], "pool_size": o["pool_size"]}
        return {"weight": category_similarity_loss(s.logits, t.logits, **options)}

    def _term_cirkd_minibatch(self, s: SegOutput, t: SegOutput, y: Tensor, modules, o) -> dict[str, Tensor]:
        fs, ft = self._feature(s, "student"), self._feature(t, "teacher")
        keys = ("temperature", "pool_size", "gather", "chunk_rows")
        return {"weight": minibatch_pixel_relation_loss(fs, ft, **{k: o[k] for k in keys})}

    def _term_cirkd_memory(self, s: SegOutput, t: SegOutput, y: Tensor, modules, o) -> dict[str, Tensor]:
        memory = self._module(modules, "cirkd_memory")
        pixel, region = memory(self._feature(s, "student"), self._feature(t, "teacher"), y)
        return {"pixel_weight": pixel, "region_weight": region}
