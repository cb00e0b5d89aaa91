"""Every distillation option is checked when the objective is built: one ConfigError naming the key, the
value and the fix, for the objective built directly and from a config composed by Hydra."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from rdd_lightning import rdd
from rdd_lightning.callbacks import RDDStageSwitch
from rdd_lightning.distillation import DEFAULT_SWITCH_FRACTION, DistillationObjective
from rdd_lightning.errors import ConfigError
from rdd_lightning.models import SegOutput
from tests.test_train import run_cli

NUM_CLASSES = 11  # the synthetic dataset's

#: conf/distillation/rdd.yaml as the objective receives it (synthetic dataset: 375 per image, no weights).
RDD_OPTIONS: dict[str, Any] = {
    "name": "rdd",
    "task": "rdd",
    "aux_weight": 0.4,
    "class_weight": None,
    "kd": {"weight": 1.0, "temperature": 1.0},
    "switch": {"fraction": None, "epoch": None, "step": None},
    "blend": "none",
    "tfe": {"kl_direction": "aux_to_main"},
    "tse": {
        "mode": "xor",
        "threshold": 0.7,
        "min_kept_per_image": 375,
        "min_kept": None,
        "confidence": "gt_prob",
        "normalize": "selected",
        "class_weight": None,
    },
}


def with_options(**dotted: Any) -> dict[str, Any]:
    """:data:`RDD_OPTIONS` with ``{"tse.mode": "or"}``-style keys (written ``tse__mode="or"``) set."""
    options = copy.deepcopy(RDD_OPTIONS)
    for key, value in dotted.items():
        *groups, last = key.split("__")
        node = options
        for group in groups:
            node = node[group]
        node[last] = value
    return options


def build(options: dict[str, Any], num_classes: int | None = NUM_CLASSES) -> DistillationObjective:
    return DistillationObjective(**options, num_classes=num_classes)


def build_from_cfg(cfg) -> DistillationObjective:
    """The objective of a composed config, built as the entry point builds it."""
    return DistillationObjective(
        **OmegaConf.to_container(cfg.distillation, resolve=True),
        ignore_index=cfg.dataset.ignore_index,
        num_classes=cfg.dataset.num_classes,
    )


def hydra_value(value: Any) -> str:
    """``value`` written as a Hydra command-line override value."""
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def assert_names(err: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)


# (key under `distillation`, bad value, text of the fix the message must hold)
BAD = [
    ("task", "distill", "ce, tfe, tse, rdd"),
    ("blend", "cubic", "none, linear"),
    ("aux_weight", -0.4, "a number >= 0"),
    ("kd.weight", -1.0, "a number >= 0"),
    ("kd.temperature", 0.0, "a number > 0"),
    ("kd.temperature", "hot", "a number > 0"),
    ("tfe.kl_direction", "both", "aux_to_main, main_to_aux"),
    ("tse.mode", "nand", "xor, or, and, student"),
    ("tse.threshold", 0.0, "strictly between 0 and 1"),
    ("tse.threshold", 1.0, "strictly between 0 and 1"),
    ("tse.threshold", 70, "strictly between 0 and 1"),
    ("tse.min_kept", -1, "whole number >= 0"),
    ("tse.min_kept", 2.5, "whole number >= 0"),
    ("tse.min_kept_per_image", -5, "whole number >= 0"),
    ("tse.min_kept_per_image", 0.5, "whole number >= 0"),
    ("tse.confidence", "entropy", "gt_prob, max_prob"),
    ("tse.normalize", "mean", "selected, all_pixels"),
    ("tse.class_weight", "camvid", "a preset (cityscapes)"),
    ("tse.class_weight", "cityscapes", "distillation.tse.class_weight=null"),  # 19 weights, 11 classes
    ("tse.class_weight", [1.0, 2.0], "one weight > 0 per class (11)"),
    ("tse.class_weight", [1.0] * 10 + [0.0], "a list of 11 weights > 0"),
    ("class_weight", [1.0, 2.0], "one weight > 0 per class (11)"),
    ("class_weight", [-1.0] * 11, "a list of 11 weights > 0"),
    ("class_weight", "cityscapes", "a list of 11 weights > 0"),
    ("switch.fraction", 1.5, "in [0, 1]"),
    ("switch.epoch", -1, "whole number >= 0"),
    ("switch.step", 2.5, "whole number >= 0"),
    ("switch.step", "later", "whole number >= 0"),
]
BAD_IDS = [f"{key}={value}" for key, value, _ in BAD]

# (typo given with ++, its value, a known key the message must list)
TYPOS = [
    ("tse.treshold", 0.6, "threshold"),
    ("tfe.direction", "main_to_aux", "kl_direction"),
    ("kd.temprature", 2.0, "temperature"),
    ("switch.steps", 5, "step"),
]


@pytest.mark.parametrize("key,value,fix", BAD, ids=BAD_IDS)
def test_bad_option_is_refused_by_the_constructor(key, value, fix):
    with pytest.raises(ConfigError) as err:
        build(with_options(**{key.replace(".", "__"): value}))
    assert_names(err, f"distillation.{key}=", str(value), fix)


@pytest.mark.parametrize("key,value,fix", BAD, ids=BAD_IDS)
def test_bad_option_is_refused_from_the_composed_config(train_cfg, key, value, fix):
    cfg = train_cfg("distillation=rdd", f"distillation.{key}={hydra_value(value)}")
    with pytest.raises(ConfigError) as err:
        build_from_cfg(cfg)
    assert_names(err, f"distillation.{key}=", str(value), fix)


@pytest.mark.parametrize("key,value,known", TYPOS)
def test_unknown_key_is_refused(train_cfg, key, value, known):
    group, name = key.split(".")
    options = with_options()
    options[group][name] = value
    with pytest.raises(ConfigError) as err:
        build(options)
    assert_names(err, f"distillation.{key}={value!r}", "unknown key", known)
    with pytest.raises(ConfigError) as err:
        build_from_cfg(train_cfg("distillation=rdd", f"++distillation.{key}={value}"))
    assert_names(err, f"distillation.{key}={value!r}", "unknown key", known)


@pytest.mark.parametrize("distillation", ["tse", "tfe"])
def test_blend_needs_the_rdd_schedule(train_cfg, distillation):
    cfg = train_cfg(f"distillation={distillation}", "distillation.blend=linear")
    with pytest.raises(ConfigError) as err:
        build_from_cfg(cfg)
    assert_names(
        err, "distillation.blend='linear'", f"distillation.task={distillation!r}", "distillation=rdd"
    )
    with pytest.raises(ConfigError, match=r"distillation\.blend='linear' needs distillation=rdd"):
        build(with_options(task=distillation, blend="linear"))


def test_options_of_the_other_stage_are_checked_too(train_cfg):
    """A tfe run never uses the TSE options, but a bad one is still refused (before the run, not later)."""
    with pytest.raises(ConfigError) as err:
        build_from_cfg(train_cfg("distillation=tfe", "distillation.tse.mode=nand"))
    assert_names(err, "distillation.tse.mode='nand'")


def test_two_switch_points_are_refused(train_cfg):
    cfg = train_cfg("distillation=rdd", "distillation.switch.fraction=0.2", "distillation.switch.step=3")
    with pytest.raises(ConfigError) as err:
        build_from_cfg(cfg)
    assert_names(err, "distillation.switch.fraction=0.2", "distillation.switch.step=3", "to null")
    with pytest.raises(ConfigError) as err:
        build(with_options(switch={"fraction": 0.2, "epoch": 1, "step": 3}))
    assert_names(err, "switch.fraction=0.2", "switch.epoch=1", "switch.step=3", "set the others to null")


@pytest.mark.parametrize(
    "overrides,switch",
    [
        ([], {"fraction": DEFAULT_SWITCH_FRACTION}),  # none given: the paper's first 10 %
        (["distillation.switch.epoch=5"], {"epoch": 5}),
        (["distillation.switch.step=7"], {"step": 7}),
        (["distillation.switch.fraction=0.2"], {"fraction": 0.2}),
        (["distillation.switch.step=0"], {"step": 0}),
        (["distillation.switch.fraction=1.0"], {"fraction": 1.0}),
    ],
)
def test_one_switch_point_replaces_the_default(train_cfg, overrides, switch):
    objective = build_from_cfg(train_cfg("distillation=rdd", *overrides))
    assert objective.switch == switch
    callback = RDDStageSwitch(**objective.switch, blend=objective.blend)
    assert {k: getattr(callback, k) for k in switch} == switch


GOOD = [
    *[f"distillation.tse.mode={mode}" for mode in rdd.MASK_MODES],
    *[f"distillation.tse.confidence={c}" for c in rdd.CONFIDENCES],
    *[f"distillation.tse.normalize={n}" for n in rdd.NORMALIZATIONS],
    *[f"distillation.tfe.kl_direction={d}" for d in rdd.KL_DIRECTIONS],
    "distillation.tse.threshold=0.6",
    "distillation.tse.min_kept=0",
    "distillation.tse.min_kept=1e5",
    "distillation.tse.class_weight=[" + ",".join(["1.5"] * NUM_CLASSES) + "]",
    "distillation.class_weight=[" + ",".join(["0.5"] * NUM_CLASSES) + "]",
    "distillation.blend=linear",
    "distillation.kd.weight=0",
    "distillation.kd.temperature=4",
    "distillation.aux_weight=0",
]


@pytest.mark.parametrize("override", GOOD)
def test_good_option_passes(train_cfg, override):
    build_from_cfg(train_cfg("distillation=rdd", override))


@pytest.mark.parametrize("distillation", ["none", "kd", "rdd", "tfe", "tse"])
def test_every_distillation_config_builds(train_cfg, distillation):
    objective = build_from_cfg(train_cfg(f"distillation={distillation}"))
    assert objective.task == {"none": "ce", "kd": "ce"}.get(distillation, distillation)


def test_checked_values_are_normalised():
    objective = build(
        with_options(tse__min_kept=1e5, tse__threshold=1 / 2, tse__class_weight=[1] * NUM_CLASSES)
    )
    assert objective.tse_options["min_kept"] == 100000 and isinstance(objective.tse_options["min_kept"], int)
    assert objective.tse_options["class_weight"] == [1.0] * NUM_CLASSES


def test_class_weight_length_needs_num_classes():
    """Without num_classes only the length checks are skipped: values must still be positive numbers."""
    build(with_options(tse__class_weight=[1.0, 2.0], class_weight=[1.0]), num_classes=None)
    build(with_options(tse__class_weight="cityscapes"), num_classes=None)
    build(with_options(tse__class_weight="Cityscapes"), num_classes=19)
    with pytest.raises(ConfigError, match=r"distillation\.tse\.class_weight=\[1\.0, -2\.0\]"):
        build(with_options(tse__class_weight=[1.0, -2.0]), num_classes=None)
    with pytest.raises(ConfigError, match=r"distillation\.class_weight=\[\]"):
        build(with_options(class_weight=[]), num_classes=None)


def test_defaults_of_the_constructor_pass():
    objective = DistillationObjective()
    assert objective.switch == {"fraction": DEFAULT_SWITCH_FRACTION} and objective.tse_options == {}


@pytest.mark.slow
def test_cli_bad_option_is_one_line_without_traceback(tmp_path):
    proc = run_cli(tmp_path, "distillation.tse.mode=nand")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "distillation.tse.mode='nand'" in errors[0] and "xor" in errors[0]
    assert "Traceback" not in proc.stderr


def _student_hard_fraction(objective: DistillationObjective, batch: int) -> float:
    """TSE's student-hard fraction on ``batch`` 8x8 images whose every pixel is confidently right (q > 0.7),
    so only the OHEM minimum selects pixels: exactly the ``min_kept`` least confident of the batch."""
    generator = torch.Generator().manual_seed(batch)
    target = torch.randint(0, NUM_CLASSES, (batch, 8, 8), generator=generator)
    logits = torch.nn.functional.one_hot(target, NUM_CLASSES).permute(0, 3, 1, 2).float() * 10
    logits = logits + torch.rand(logits.shape, generator=generator)  # distinct confidences, all > 0.99
    heads = SegOutput(logits, None, []), SegOutput(logits.clone(), None, [])
    return float(objective(*heads, target)["tse_student_hard_fraction"])


def test_min_kept_per_image_selects_the_same_density_for_any_split_of_the_batch():
    """The authors' 100000 per 4-image GPU batch: per image it is the same share of the pixels whether one
    process holds 4 images or each of 2 processes holds 2 (an absolute min_kept halves it instead)."""
    per_image = build(with_options(tse__min_kept_per_image=10, tse__min_kept=None, switch__step=0))
    per_image.stage = 1  # TSE-RDD
    assert _student_hard_fraction(per_image, 4) == pytest.approx(10 / 64)
    assert _student_hard_fraction(per_image, 2) == pytest.approx(10 / 64)
    absolute = build(with_options(tse__min_kept=20, switch__step=0))
    absolute.stage = 1
    assert _student_hard_fraction(absolute, 4) == pytest.approx(20 / 256)
    assert _student_hard_fraction(absolute, 2) == pytest.approx(20 / 128)
    # the paper's batches: one GPU x 16 images and 4 GPUs x 4 both keep 25000 hard pixels per image
    paper = build(with_options(tse__min_kept_per_image=25000, tse__min_kept=None))
    assert paper.tse_min_kept(16) == 400000 and paper.tse_min_kept(4) == 100000
