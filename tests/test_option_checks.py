"""Every distillation option is checked when the objective is built: one ConfigError naming the key, the
value and the fix, for the objective built directly and from a config composed by Hydra. The optimizer, LR
schedule and trainer options are checked before any data or network of a run is built, with the same one
line; ``trainer.deterministic=true`` asks for what the device has (bit-exact on the CPU, warn-only on CUDA)."""

from __future__ import annotations

import copy
import logging
import re
import time
from pathlib import Path
from typing import Any, get_args

import pytest
import torch
from lightning.fabric import connector
from omegaconf import OmegaConf

from rdd_lightning import builders, option_checks, rdd
from rdd_lightning.callbacks import RDDStageSwitch
from rdd_lightning.distillation import DEFAULT_SWITCH_FRACTION, DistillationObjective
from rdd_lightning.errors import ConfigError, exit_on_config_error
from rdd_lightning.models import SegOutput
from rdd_lightning.train import run
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


# ------------------------------------------------------------------------- optimizer, schedule, trainer
#: the message of trainer.precision=17, with the values Lightning lists (its own Literal types)
PRECISION_17 = (
    "trainer.precision=17: not a precision Lightning accepts; set trainer.precision to one of "
    + ", ".join(get_args(connector._PRECISION_INPUT_STR))
    + " (or the short forms 64, 32, 16, bf16)"
)

# (overrides, the exact one-line message)
TRAINING_BAD = [
    ("optimizer.lr=-1", "optimizer.lr=-1: out of range; set optimizer.lr to a number > 0"),
    ("optimizer.lr=0", "optimizer.lr=0: out of range; set optimizer.lr to a number > 0"),
    (
        "optimizer.momentum=1.5",
        "optimizer.momentum=1.5: out of range; set optimizer.momentum to a number in [0, 1)",
    ),
    (
        "optimizer.weight_decay=-1",
        "optimizer.weight_decay=-1: out of range; set optimizer.weight_decay to a number >= 0",
    ),
    (
        "dataset.recipe.lr=-0.02",
        "optimizer.lr=-0.02: out of range; set optimizer.lr to a number > 0 (or dataset.recipe.lr, which "
        "optimizer.lr is taken from)",
    ),
    ("scheduler.power=-1", "scheduler.power=-1: out of range; set scheduler.power to a number >= 0"),
    ("trainer.precision=17", PRECISION_17),
    (  # a Lightning MisconfigurationException at Trainer construction
        "trainer.val_check_interval=-1",
        "trainer.val_check_interval=-1: You have passed invalid value -1 for val_check_interval, it has to be "
        "in [0.0, 1.0] or an int; set trainer.val_check_interval to a value Lightning accepts",
    ),
    (
        "trainer.max_epochs=-5",
        "trainer.max_epochs=-5: `max_epochs` must be a non-negative integer or -1. You passed in -5; set "
        "trainer.max_epochs to a value Lightning accepts",
    ),
    (
        "++trainer.max_step=100",
        "trainer.max_step=100: not an argument of Lightning's Trainer; remove it or check its spelling",
    ),
    (
        "trainer.max_steps=-1 trainer.max_epochs=-1",
        "trainer.max_steps=-1 trainer.max_epochs=-1: the per-iteration LR schedule needs the run's length; set "
        "trainer.max_steps (or trainer.max_epochs), or scheduler=null for a constant learning rate",
    ),
]

# (overrides, parts the message must hold): messages that quote torch or Lightning, whose wording may change
TRAINING_BAD_PARTS = [
    (
        "++optimizer.nesterov_=true",
        ["optimizer.nesterov_=True: not an argument of torch.optim.SGD", "nesterov"],
    ),
    ("optimizer.momentum=-0.5", ["optimizer.momentum=-0.5: out of range", "in [0, 1)"]),
    ("optimizer.lr=fast", ["optimizer.lr='fast': not a number; set optimizer.lr to a number > 0"]),
    (
        "optimizer._target_=torch.optim.Adam",  # Adam has no momentum
        ["optimizer.momentum=0.9: not an argument of torch.optim.Adam", "betas"],
    ),
    (
        "optimizer._target_=torch.optim.Adam ~optimizer.momentum ++optimizer.betas=[2.0,0.9]",
        ["optimizer.betas=[2.0, 0.9]: refused by torch.optim.Adam (Invalid beta parameter at index 0"],
    ),
    ("optimizer._target_=torch.optim.Nope", ["optimizer._target_='torch.optim.Nope': cannot be built"]),
    (
        "scheduler._target_=torch.optim.lr_scheduler.StepLR",  # keeps power: 0.9
        ["scheduler.power=0.9: not an argument of torch.optim.lr_scheduler.StepLR", "step_size"],
    ),
    (
        "scheduler._target_=torch.optim.lr_scheduler.StepLR ~scheduler.power +scheduler.step_size=10",
        ["scheduler (torch.optim.lr_scheduler.StepLR):", "total_iters", "check the scheduler.* values"],
    ),
    ("+trainer.strategy=nope", ["trainer.strategy='nope': ", "set trainer.strategy to a value Lightning"]),
    ("trainer.max_time=soon", ["trainer.max_time='soon': ", "DD:HH:MM:SS"]),
]


def fail_if_built(monkeypatch) -> None:
    """Building the data, a network or the trainer of the run fails the test: the checks come first."""

    def built(*args, **kwargs):
        raise AssertionError("built before the options were checked")

    for name in ("build_datamodule", "build_objective", "build_trainer", "build_student", "build_teacher"):
        monkeypatch.setattr(builders, name, built)


def run_error(cfg, capsys) -> str:
    """The stderr of :func:`rdd_lightning.train.run` on ``cfg`` as the entry point runs it (one ``error:``
    line and exit status 2 on a ConfigError)."""
    capsys.readouterr()
    # a logger of its own: the root logger may still hold a console handler an earlier test's Hydra run bound to
    # a capture stream that is closed now ("--- Logging error ---" on stderr)
    log = logging.getLogger("rdd_lightning.tests.option_checks")
    log.propagate = False
    if not log.handlers:  # a handler, or logging's last resort prints the record to stderr
        log.addHandler(logging.NullHandler())
    with pytest.raises(SystemExit) as stop:
        exit_on_config_error(lambda: run(cfg), log)
    assert stop.value.code == 2
    return without_logging_errors(capsys.readouterr().err)


def without_logging_errors(stderr: str) -> str:
    """``stderr`` without the reports of Python's logging module about a handler that failed to write (from
    ``--- Logging error ---`` to its ``Arguments:`` line): a console handler of an earlier test's Hydra run may
    still be bound to a closed capture stream."""
    return re.sub(r"--- Logging error ---\n.*?^Arguments: .*?$\n?", "", stderr, flags=re.S | re.M)


@pytest.mark.parametrize("overrides,message", TRAINING_BAD, ids=[o for o, _ in TRAINING_BAD])
def test_bad_training_option_fails_before_anything_is_built(
    train_cfg, monkeypatch, capsys, overrides, message
):
    fail_if_built(monkeypatch)
    cfg = train_cfg(*overrides.split())
    assert run_error(cfg, capsys).splitlines() == [f"error: {message}"]
    assert not list(Path(cfg.paths.output_dir).rglob("*.ckpt"))


@pytest.mark.parametrize("overrides,parts", TRAINING_BAD_PARTS, ids=[o for o, _ in TRAINING_BAD_PARTS])
def test_bad_training_option_names_the_key(train_cfg, monkeypatch, capsys, overrides, parts):
    fail_if_built(monkeypatch)
    errors = run_error(train_cfg(*overrides.split()), capsys).splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    for part in parts:
        assert part in errors[0], (part, errors[0])


@pytest.mark.parametrize(
    "overrides",
    [
        "",
        "optimizer.momentum=0 optimizer.weight_decay=0",
        "scheduler.power=0",
        "scheduler=null trainer.max_steps=-1 trainer.max_epochs=-1 +trainer.max_time=00:00:01:00",
        "trainer.max_steps=-1 trainer.max_epochs=2",
        "trainer.precision=bf16-mixed",
        "trainer.precision=64-true",
        "trainer.precision=32",
        "trainer.precision=bf16",
        "optimizer._target_=torch.optim.AdamW ~optimizer.momentum",
        "trainer.max_steps=80000",
    ],
)
def test_good_training_options_pass(train_cfg, overrides):
    builders.check_options(train_cfg(*overrides.split()))


def test_schedule_is_stepped_to_its_end():
    """A schedule torch builds but that breaks on the way (here power < 0 past the named check: 0 ** -1 at
    the last step) fails with the step."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    cfg = OmegaConf.create(
        {"_target_": "torch.optim.lr_scheduler.PolynomialLR", "_partial_": True, "power": -1}
    )
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=5, power=-1.0)
    with pytest.raises(
        ConfigError, match=r"^scheduler \(torch\.optim\.lr_scheduler\.PolynomialLR\) fails at step 5 of 5"
    ):
        option_checks.check_schedule(scheduler, cfg, 5)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=-0.5)
    with pytest.raises(ConfigError, match=r"gives a learning rate of -0\.05 at step 1 of 3"):
        option_checks.check_schedule(scheduler, cfg, 3)


def test_precision_values_are_lightnings():
    accepted = option_checks.accepted_precisions()
    assert {"32-true", "16-mixed", "bf16-mixed", 32, 16, "bf16"} <= set(accepted)
    for value in accepted:
        option_checks.check_precision(value)
    for value in (17, "17", "fp16", 32.0, True):
        with pytest.raises(ConfigError, match=rf"^trainer\.precision={value!r}: not a precision"):
            option_checks.check_precision(value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU this machine lacks")
def test_device_error_keeps_its_message(train_cfg, monkeypatch, capsys):
    """An impossible device request still names the accelerator, the devices and the fix."""
    fail_if_built(monkeypatch)
    errors = run_error(train_cfg("trainer.accelerator=cuda"), capsys).splitlines()
    assert len(errors) == 1, errors
    assert errors[0].startswith("error: trainer.accelerator='cuda' trainer.devices=1 trainer.num_nodes=1: ")
    assert errors[0].endswith(
        "Ask for the devices this machine has (trainer.accelerator=cpu to run without GPUs)."
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "override,message",
    [
        ("optimizer.lr=-1", "optimizer.lr=-1: out of range; set optimizer.lr to a number > 0"),
        ("trainer.precision=17", PRECISION_17),
        (
            "trainer.val_check_interval=-1",
            "trainer.val_check_interval=-1: You have passed invalid value -1 for val_check_interval, it has to "
            "be in [0.0, 1.0] or an int; set trainer.val_check_interval to a value Lightning accepts",
        ),
    ],
)
def test_cli_bad_training_option_fails_fast(tmp_path, override, message):
    """The entry point itself, with the default distillation (rdd, whose teacher would be trained and
    cached on first use): one line, exit status 2, no data generated, no teacher, no checkpoint."""
    start = time.monotonic()
    proc = run_cli(tmp_path, override)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {message}"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists()  # neither the synthetic data nor the auto-teacher
    assert not list(tmp_path.rglob("*.ckpt"))
    print(f"{override}: exit 2 after {elapsed:.1f} s (interpreter start and imports included)")


# ------------------------------------------------------------------------- trainer.deterministic
@pytest.fixture
def restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize(
    "deterministic,on_cuda,expected",
    [
        (True, True, "warn"),
        (True, False, True),
        (False, True, False),
        (False, False, False),
        ("warn", False, "warn"),
        (None, True, None),
    ],
)
def test_deterministic_setting(deterministic, on_cuda, expected):
    assert builders.deterministic_setting(deterministic, on_cuda) == expected


def test_runs_on_cuda_follows_lightnings_choice(monkeypatch):
    assert not builders.runs_on_cuda("cpu")
    assert builders.runs_on_cuda("cuda")
    monkeypatch.setattr(builders.MPSAccelerator, "is_available", staticmethod(lambda: False))
    assert builders.runs_on_cuda("gpu")
    monkeypatch.setattr(builders, "_select_auto_accelerator", lambda: "cuda")
    assert builders.runs_on_cuda("auto") and builders.runs_on_cuda(None)
    monkeypatch.setattr(builders, "_select_auto_accelerator", lambda: "cpu")
    assert not builders.runs_on_cuda("auto")


def test_deterministic_run_on_cuda_warns_instead_of_failing(
    train_cfg, monkeypatch, caplog, restore_determinism
):
    """Where the run would be on CUDA (faked: this test runs on the CPU), trainer.deterministic=true reaches
    Lightning as "warn": torch's deterministic algorithms, warn-only, and one info line says so."""
    monkeypatch.setattr(builders, "runs_on_cuda", lambda accelerator: True)
    cfg = train_cfg("trainer.deterministic=true", "trainer.benchmark=false")
    assert builders.trainer_options(cfg)["deterministic"] == "warn"
    with caplog.at_level(logging.INFO, logger="rdd_lightning.builders"):
        builders.build_trainer(cfg)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    lines = [r.getMessage() for r in caplog.records if "trainer.deterministic=true on CUDA" in r.getMessage()]
    assert len(lines) == 1 and "not bit-exact" in lines[0]


def test_deterministic_run_on_cpu_is_bit_exact(train_cfg, caplog, restore_determinism):
    cfg = train_cfg("trainer.deterministic=true", "trainer.benchmark=false", "trainer.accelerator=cpu")
    assert builders.trainer_options(cfg)["deterministic"] is True
    with caplog.at_level(logging.INFO, logger="rdd_lightning.builders"):
        builders.build_trainer(cfg)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert not any("on CUDA" in r.getMessage() for r in caplog.records)
