"""The KD methods as training objectives: every shipped `distillation` config composes with its published
weights and trains; gradients reach the student and its modules only; the discriminator has an optimizer of
its own (manual optimization with accumulation, clipping, AMP and exact resume); CIRKD under 2-process DDP
sees the global batch. The loss functions themselves are tested in tests/test_losses_*.py."""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from rdd_lightning.builders import build_datamodule
from rdd_lightning.distillation import DistillationObjective, network_channels
from rdd_lightning.errors import ConfigError
from rdd_lightning.models import build_model
from rdd_lightning.module import DistillationModule
from rdd_lightning.resume import Preempted
from rdd_lightning.train import run
from tests.conftest import TINY, cli_env, compose_train_cfg, train_once
from tests.test_data import write_camvid

CONFIGS = sorted(
    p.name[: -len(".yaml")]
    for p in files("rdd_lightning.conf").joinpath("distillation").iterdir()
    if p.name.endswith(".yaml")
)
METHODS = ["cwd", "at", "fitnet", "dist", "skd", "ifvd", "dsd", "cirkd"]
NUM_CLASSES = 3

#: The published default of every method (issue 9 / the recipes the RDD paper compares with), written out
#: here, not read from the package: {weighted loss: weight}. "kd" is pixel KD.
PUBLISHED = {
    "none": {},
    "kd": {"kd": 1.0},
    "cwd": {"kd": 1.0, "adversarial": 0.001, "cwd_feature": 50.0, "cwd_logits": 3.0},
    "at": {"kd": 1.0, "at": 1e4},
    "fitnet": {"kd": 1.0, "fitnet": 10.0},
    "dist": {"dist": 1.0},
    "skd": {"kd": 1.0, "skd_pairwise": 10.0, "adversarial": 0.001},
    "ifvd": {"kd": 1.0, "adversarial": 0.001, "ifv": 20.0},
    "dsd": {"dsd_pixel": 1000.0, "dsd_category": 10.0},
    "cirkd": {"kd": 1.0, "cirkd_minibatch": 1.0, "cirkd_memory_pixel": 0.1, "cirkd_memory_region": 0.1},
}
#: small CIRKD queues for the runs that do not test the shipped sizes (fast, small checkpoints)
SMALL_MEMORY = [
    "distillation.terms.cirkd_memory.pixel_memory_size=500",
    "distillation.terms.cirkd_memory.region_memory_size=50",
]


def small_memory(name: str) -> list[str]:
    return SMALL_MEMORY if name.startswith("cirkd") else []


def weights(objective: DistillationObjective) -> dict[str, float]:
    """``{loss name without "loss_": weight}`` of every active weighted loss of ``objective``."""
    out = {"kd": objective.kd_weight} if objective.kd_weight > 0 else {}
    for term, options in objective.active_terms.items():
        for key, value in options.items():
            if key.endswith("weight") and key not in ("discriminator_weight", "aux_weight") and value > 0:
                out[term if key == "weight" else f"{term}_{key[: -len('_weight')]}"] = value
    return out


def objective_of(tmp_path: Path, name: str, *overrides: str, num_classes: int = 11) -> DistillationObjective:
    cfg = compose_train_cfg(tmp_path, [f"distillation={name}", *overrides])
    options = OmegaConf.to_container(cfg.distillation, resolve=True)
    return DistillationObjective(**options, num_classes=num_classes, ignore_index=255)


# ------------------------------------------------------------------------------------------ the configs
def test_the_shipped_configs_are_exactly_these():
    rdd_family = {"rdd", "tfe", "tse", "at_rdd", "dsd_rdd", "cirkd_rdd"}
    assert set(CONFIGS) == {"none", "kd", *METHODS, *rdd_family, *(f"{m}_rdd" for m in METHODS)}
    assert len(CONFIGS) == 21


@pytest.mark.parametrize("name", ["none", "kd", *METHODS])
def test_each_method_has_its_published_weights_and_its_rdd_twin_only_changes_the_task(tmp_path, name):
    objective = objective_of(tmp_path, name)
    assert objective.task == "ce" and weights(objective) == PUBLISHED[name]
    if name in ("none", "kd"):
        return
    twin = objective_of(tmp_path, f"{name}_rdd")
    rdd = objective_of(tmp_path, "rdd")
    assert twin.task == "rdd" and twin.name == f"{name}_rdd"
    assert twin.terms == objective.terms and weights(twin) == PUBLISHED[name]
    assert (twin.tfe_options, twin.tse_options, twin.switch) == (rdd.tfe_options, rdd.tse_options, rdd.switch)


def test_published_options_of_the_methods(tmp_path):
    cwd = objective_of(tmp_path, "cwd").terms
    assert cwd["cwd_feature"]["temperature"] == cwd["cwd_logits"]["temperature"] == 4.0
    adversarial = objective_of(tmp_path, "skd").terms["adversarial"]
    assert (adversarial["lr"], adversarial["betas"], adversarial["discriminator_weight"]) == (
        4e-4,
        (0.9, 0.99),
        0.1,
    )
    dist = objective_of(tmp_path, "dist").terms["dist"]
    assert (dist["beta"], dist["gamma"]) == (1.0, 1.0)
    memory = objective_of(tmp_path, "cirkd").terms["cirkd_memory"]
    assert (memory["pixel_memory_size"], memory["region_memory_size"]) == (20000, 2000)
    assert objective_of(tmp_path, "cirkd", "dataset=voc").terms["cirkd_memory"]["region_weight"] == 0.01
    assert objective_of(tmp_path, "cirkd_rdd", "dataset=voc").terms["cirkd_memory"]["pixel_weight"] == 0.01
    assert objective_of(tmp_path, "cirkd", "dataset=camvid").terms["cirkd_memory"]["region_weight"] == 0.1


# key set under distillation (with ++), bad value, the key the message names, text of the fix it must hold
BAD_TERMS = [
    ("terms.attention.weight", 1.0, "terms.attention", "the keys of distillation.terms are cwd_feature"),
    ("terms.at.wieght", 1.0, "terms.at.wieght", "the keys of distillation.terms.at are weight, p"),
    ("terms.at.weight", -1.0, "terms.at.weight", "a number >= 0 (0 disables the term)"),
    ("terms.cwd_logits.temperature", 0.0, "terms.cwd_logits.temperature", "a number > 0"),
    ("terms.skd_pairwise.pool_size", 1.5, "terms.skd_pairwise.pool_size", "a whole number >= 1"),
    ("terms.fitnet.norm", "yes", "terms.fitnet.norm", "true or false"),
    ("terms.adversarial.betas", [0.9, 1.5], "terms.adversarial.betas", "[0.9, 0.99]"),
    (
        "terms.cirkd_memory.pixel_memory_size",
        0,
        "terms.cirkd_memory.pixel_memory_size",
        "a whole number >= 1",
    ),
    ("feature", "stage5", "feature", "decoder, encoder"),
    ("kd_weight", 1.0, "kd_weight", "the keys of distillation are name, task"),
]


@pytest.mark.parametrize("key,value,named,fix", BAD_TERMS, ids=[k for k, *_ in BAD_TERMS])
def test_bad_term_option_is_one_line_naming_key_value_and_fix(train_cfg, key, value, named, fix):
    hydra_value = "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(value)
    cfg = train_cfg("distillation=at", f"++distillation.{key}={hydra_value}")
    with pytest.raises(ConfigError) as err:
        DistillationObjective(**OmegaConf.to_container(cfg.distillation, resolve=True), num_classes=11)
    message = str(err.value)
    assert "\n" not in message and f"distillation.{named}=" in message and fix in message, message
    assert str(value) in message or repr(value) in message, message


def test_weight_zero_disables_a_term(tmp_path):
    objective = objective_of(
        tmp_path, "cwd", "distillation.terms.adversarial.weight=0", "distillation.terms.cwd_feature.weight=0"
    )
    assert weights(objective) == {"kd": 1.0, "cwd_logits": 3.0} and not objective.has_discriminator
    module = tiny_module(objective)
    assert len(module.distill_modules) == 0  # no connector, no discriminator
    losses = objective(*forward(module), module.distill_modules)
    assert {k for k in losses if k.startswith("loss")} == {"loss", "loss_task", "loss_kd", "loss_cwd_logits"}
    assert not objective_of(tmp_path, "none").needs_teacher and objective_of(tmp_path, "dsd").needs_teacher


# ------------------------------------------------------------------------------------- tiny networks
class Scenes(Dataset):
    """8 random 32x32 images with 3-class block labels and a void border row."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        mask = (
            torch.randint(0, NUM_CLASSES, (4, 4), generator=g).repeat_interleave(8, 0).repeat_interleave(8, 1)
        )
        mask[:1] = 255
        return {"image": torch.randn(3, 32, 32, generator=g) + mask.clamp(max=3)[None], "mask": mask}


def tiny_net(seed: int, channels: int, aux: bool = True):
    torch.manual_seed(seed)
    return build_model(
        "DeepLabV3",
        "resnet18",
        NUM_CLASSES,
        aux_head=aux,
        encoder_output_stride=8,
        decoder_channels=channels,
        upsampling=1,
    )


def tiny_module(objective, *, lr=0.01, momentum=0.9, weight_decay=0.0, scheduler=True, aux=True):
    """A student (16 decoder channels) and a random teacher (24: connectors are needed)."""
    return DistillationModule(
        student=tiny_net(0, 16, aux),
        teacher=tiny_net(1, 24, aux),
        objective=objective,
        optimizer=functools.partial(torch.optim.SGD, lr=lr, momentum=momentum, weight_decay=weight_decay),
        scheduler=functools.partial(torch.optim.lr_scheduler.PolynomialLR, power=0.9) if scheduler else None,
        num_classes=NUM_CLASSES,
        class_names=["a", "b", "c"],
    )


def forward(module: DistillationModule):
    batch = next(iter(DataLoader(Scenes(), batch_size=2)))
    return module.student(batch["image"]), module.teacher_forward(batch["image"]), batch["mask"]


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def fit(module, tmp_path, steps: int, callbacks=(), **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
        **trainer_kwargs,
    )
    trainer.fit(module, train_dataloaders=DataLoader(Scenes(), batch_size=2))
    return trainer


def skd(**adversarial) -> DistillationObjective:
    return DistillationObjective(
        name="skd",
        kd={"weight": 1.0},
        terms={"skd_pairwise": {"weight": 10.0}, "adversarial": {"weight": 0.001, **adversarial}},
    )


# --------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_reach_the_student_and_its_modules_only(tmp_path, name):
    objective = objective_of(tmp_path, name, *small_memory(name), num_classes=NUM_CLASSES)
    module = tiny_module(objective)
    out, teacher_out, target = forward(module)
    losses = objective(out, teacher_out, target, module.distill_modules)
    terms = {k: v for k, v in losses.items() if k.startswith("loss_")}
    assert set(terms) == {"loss_task", *(f"loss_{w}" for w in weights(objective))}
    assert losses["loss"].item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-5)
    outputs = [out.logits, out.aux_logits, out.decoder_features, out.features[-1]]
    for key, value in terms.items():  # each term on its own reaches the student's outputs
        if key == "loss_task" and value.item() == 0:  # TSE-RDD with no pixel hard for exactly one network
            continue
        grads = torch.autograd.grad(value, outputs, retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads), key
    losses["loss"].backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert teacher_out is None or teacher_out.logits.grad_fn is None
    side = list(objective.student_side_parameters(module.distill_modules))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in side)
    if objective.has_discriminator:
        discriminator = module.distill_modules["adversarial"]
        assert all(p.grad is None for p in discriminator.parameters())  # not from the student's loss
        before = {k: p.grad.clone() for k, p in module.student.named_parameters()}
        objective.discriminator_loss(out, teacher_out, module.distill_modules).backward()
        assert all(p.grad is not None for p in discriminator.parameters())
        assert all(torch.equal(p.grad, before[k]) for k, p in module.student.named_parameters())
    assert all(p.grad is None for p in module.teacher.parameters())


def independent_at(fs: torch.Tensor, ft: torch.Tensor) -> float:
    """AT written out: channel mean of f^2 per position, L2-normalised per image, mean squared difference."""
    fs, ft = fs.detach().double(), ft.detach().double()
    total, count = 0.0, 0
    for b in range(fs.shape[0]):
        a_s = [float((fs[b, :, i, j] ** 2).mean()) for i in range(fs.shape[2]) for j in range(fs.shape[3])]
        a_t = [float((ft[b, :, i, j] ** 2).mean()) for i in range(ft.shape[2]) for j in range(ft.shape[3])]
        ns, nt = math.sqrt(sum(v * v for v in a_s)), math.sqrt(sum(v * v for v in a_t))
        total += sum((x / ns - y / nt) ** 2 for x, y in zip(a_s, a_t, strict=True))
        count += len(a_s)
    return total / count


@pytest.mark.parametrize("feature", ["decoder", "encoder"])
def test_feature_terms_read_the_configured_map(feature):
    objective = DistillationObjective(name="at", feature=feature, terms={"at": {"weight": 100.0}})
    module = tiny_module(objective)
    out, teacher_out, target = forward(module)
    fs, ft = (
        (out.decoder_features, teacher_out.decoder_features)
        if feature == "decoder"
        else (out.features[-1], teacher_out.features[-1])
    )
    assert fs.shape[1] == (16 if feature == "decoder" else 512)
    losses = objective(out, teacher_out, target, module.distill_modules)
    assert losses["loss_at"].item() == pytest.approx(100.0 * independent_at(fs, ft), rel=1e-4)


def test_connectors_are_sized_from_the_networks_and_stay_out_of_the_student():
    objective = DistillationObjective(
        name="x",
        feature="decoder",
        terms={
            "cwd_feature": {"weight": 1.0},
            "fitnet": {"weight": 1.0},
            "cirkd_memory": {"pixel_weight": 1.0, "pixel_memory_size": 10, "region_memory_size": 5},
        },
    )
    module = tiny_module(objective)
    connector, regressor, memory = (
        module.distill_modules[k] for k in ("cwd_feature", "fitnet", "cirkd_memory")
    )
    assert (connector.in_channels, connector.out_channels) == (16, 24) and not connector.is_identity
    assert (memory.student_channels, memory.teacher_channels, memory.num_classes) == (16, 24, NUM_CLASSES)
    assert not any(k.startswith("distill_modules") for k in module.student.state_dict())
    state = module.state_dict()
    assert (
        "distill_modules.cirkd_memory.pixel_queue" in state
        and "distill_modules.fitnet.body.0.weight" in state
    )
    # the queues stay out of DDP's broadcast (every process enqueues the gathered global batch itself)
    assert set(module._ddp_params_and_buffers_to_ignore) == {
        f"distill_modules.cirkd_memory.{b}"
        for b in ("pixel_queue", "pixel_queue_ptr", "region_queue", "region_queue_ptr")
    }
    assert regressor.in_channels == 16


def test_channels_of_another_network_come_from_one_forward():
    """A network without ``feature_channels`` (any module returning SegOutput) is sized by one eval forward."""

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_net(0, 16)

        def forward(self, x):
            return self.inner(x)

    net = Wrapped().train()
    assert network_channels(net) == {"classes": NUM_CLASSES, "decoder": 16, "encoder": 512}
    assert net.training and network_channels(tiny_net(1, 24)) == {
        "classes": NUM_CLASSES,
        "decoder": 24,
        "encoder": 512,
    }


# ------------------------------------------------------------------------------- the discriminator
def test_the_discriminator_has_its_own_optimizer_and_steps_once_per_student_step(tmp_path):
    module = tiny_module(skd())
    lrs, steps = [], []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
            steps.append(trainer.global_step)

    trainer = fit(module, tmp_path, steps=3, callbacks=[Record()])
    assert not module.automatic_optimization and trainer.global_step == 3 and steps == [1, 2, 3]
    student_optimizer, discriminator_optimizer = trainer.optimizers

    def ids(optimizer):
        return {id(p) for group in optimizer.param_groups for p in group["params"]}

    discriminator = module.distill_modules["adversarial"]
    assert ids(discriminator_optimizer) == {id(p) for p in discriminator.parameters()}
    assert ids(student_optimizer) == {id(p) for p in module.student.parameters()}
    assert isinstance(discriminator_optimizer, torch.optim.Adam)
    assert all(discriminator_optimizer.state[p]["step"] == 3 for p in discriminator.parameters())
    # the student's poly schedule steps once per step, as under automatic optimization
    assert lrs == pytest.approx([0.01 * (1 - k / 3) ** 0.9 for k in (1, 2, 3)])


@pytest.mark.parametrize("frozen", ["discriminator", "student"])
def test_each_optimizer_moves_only_its_own_parameters(tmp_path, frozen):
    objective = skd(lr=0.0) if frozen == "discriminator" else skd()
    module = tiny_module(objective, lr=0.0 if frozen == "student" else 0.05, momentum=0.0)
    discriminator = module.distill_modules["adversarial"]
    before = {"student": params(module.student), "discriminator": params(discriminator)}
    teacher = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    fit(module, tmp_path, steps=2)
    after = {"student": params(module.student), "discriminator": params(discriminator)}
    moved = {k: any(not torch.equal(v, before[k][n]) for n, v in after[k].items()) for k in after}
    # both had gradients at every step; the frozen side's optimizer (lr 0) is the only one that could move it
    assert moved == {"student": frozen != "student", "discriminator": frozen != "discriminator"}
    assert all(torch.equal(v, teacher[k]) for k, v in module.teacher.state_dict().items())


def test_gradient_accumulation_steps_both_optimizers_every_k_batches(tmp_path):
    module = tiny_module(skd())
    steps = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            steps.append(trainer.global_step)

    trainer = fit(module, tmp_path, steps=2, callbacks=[Record()], accumulate_grad_batches=2)
    assert steps == [0, 1, 1, 2]
    discriminator = module.distill_modules["adversarial"]
    assert all(trainer.optimizers[1].state[p]["step"] == 2 for p in discriminator.parameters())
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2


def test_gradient_clipping_applies_to_the_student_under_manual_optimization(tmp_path):
    module = tiny_module(skd(), lr=1.0, momentum=0.0, scheduler=False)
    before = params(module.student)
    fit(module, tmp_path, steps=1, gradient_clip_val=1e-6)
    change = math.sqrt(sum(float((v - before[k]).pow(2).sum()) for k, v in params(module.student).items()))
    assert 0 < change <= 1.01e-6  # one SGD step of lr 1 with the gradient norm clipped to 1e-6


def test_mixed_precision_scales_both_optimizers_and_updates_the_scale_once_per_step(tmp_path):
    """16-bit AMP's loss scaler (on CPU through Lightning's plugin): the discriminator's gradients are unscaled
    before its Adam step (its first moment matches a 32-bit run's, not 2^10 times it)."""
    first_moment = {}
    for precision in ("32-true", "16-mixed"):
        module = tiny_module(skd())
        if precision == "32-true":
            trainer = fit(module, tmp_path, steps=2)
        else:
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # no overflow on the first steps
            trainer = fit(
                module, tmp_path, steps=2, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]
            )
            assert scaler.state_dict()["_growth_tracker"] == 2  # one update per step, after both steps
        discriminator = module.distill_modules["adversarial"]
        state = trainer.optimizers[1].state
        first_moment[precision] = math.sqrt(
            sum(float(state[p]["exp_avg"].pow(2).sum()) for p in discriminator.parameters())
        )
        assert trainer.global_step == 2
    assert 0.5 < first_moment["16-mixed"] / first_moment["32-true"] < 2.0


def test_bf16_autocast_trains_a_discriminator_config(tmp_path):
    module = tiny_module(skd())
    trainer = fit(module, tmp_path, steps=2, precision="bf16-mixed")
    assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in module.distill_modules.parameters())


# ------------------------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A tiny supervised run (resnet18, 2 steps) used as the teacher of every run of this module."""
    results = train_once(
        tmp_path_factory,
        "teacher",
        [
            "distillation=none",
            "student=resnet18_scratch",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "task_name=teacher",
        ],
    )
    return Path(results["best_checkpoint"])


@pytest.fixture(scope="module")
def camvid_root(tmp_path_factory) -> Path:
    return write_camvid(
        tmp_path_factory.mktemp("camvid") / "camvid", {"train": 4, "val": 2, "test": 1}, hw=(32, 32)
    )


def rdd_switch(name: str) -> list[str]:
    """RDD configs switch after step 1 (TFE-RDD first, then TSE-RDD) and select from tiny batches."""
    has_rdd = name in ("rdd", "tfe", "tse") or name.endswith("_rdd")
    return ["distillation.switch.step=1", "distillation.tse.min_kept=100"] if has_rdd else []


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_trains_on_the_synthetic_data(train_cfg, teacher_ckpt, name):
    cfg = train_cfg(
        f"distillation={name}",
        "teacher=resnet18",
        f"teacher.checkpoint={teacher_ckpt}",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        *rdd_switch(name),
    )
    results = run(cfg)
    assert results["global_step"] == 2 and results["distillation"] == name
    objective = DistillationObjective(**OmegaConf.to_container(cfg.distillation, resolve=True))
    header = (Path(results["output_dir"]) / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    expected = {"train/loss", "train/loss_task", *(f"train/loss_{w}" for w in weights(objective))}
    if objective.has_discriminator:
        expected.add("train/loss_discriminator")
    assert expected <= set(header), sorted(expected - set(header))
    saved = torch.load(results["last_checkpoint"], map_location="cpu", weights_only=True)
    modules = {k.split(".")[1] for k in saved["state_dict"] if k.startswith("distill_modules.")}
    # student and teacher both have 128 decoder channels, so CWD's connector is the identity (no state)
    assert modules == {t for t in ("fitnet", "adversarial", "cirkd_memory") if t in objective.active_terms}
    assert len(saved["optimizer_states"]) == (2 if objective.has_discriminator else 1)
    assert not any(k.startswith("teacher.") for k in saved["state_dict"])


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_trains_on_a_real_layout_dataset(tmp_path, teacher_ckpt, camvid_root, name):
    """CamVid's file layout (11 classes, void 11 -> 255), one step, no validation or checkpoints."""
    trainer = [o for o in TINY if o.startswith("trainer.")]
    cfg = compose_train_cfg(
        tmp_path,
        [
            "dataset=camvid",
            f"dataset.root={camvid_root}",
            "dataset.crop_size=[32,32]",
            "dataset.batch_size=2",
            "dataset.num_workers=0",
            "student=resnet18_scratch",
            "teacher=resnet18",
            f"teacher.checkpoint={teacher_ckpt}",
            *trainer,
            "trainer.max_steps=1",
            "+trainer.limit_val_batches=0",
            "validate_final=false",
            "trainer.val_check_interval=1",
            "callbacks=none",
            "logger=none",
            f"distillation={name}",
            *rdd_switch(name),
            *small_memory(name),
        ],
    )
    results = run(cfg)
    assert results["global_step"] == 1 and results["dataset"] == "camvid"


def student_and_modules(ckpt: str) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    return {k: v for k, v in state["state_dict"].items() if k.startswith(("student.", "distill_modules."))}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["skd", "cirkd"])
def test_preempted_and_resumed_run_ends_with_the_uninterrupted_weights(tmp_path, teacher_ckpt, name):
    """skd (manual optimization: both optimizers' states, the discriminator's spectral-norm vectors) and cirkd
    (the memory queues and their pointers) pre-empted during step 3 (after the step-2 validation) and resumed in place end where an uninterrupted
    run ends."""
    common = [
        *TINY,
        f"distillation={name}",
        "teacher=resnet18",
        f"teacher.checkpoint={teacher_ckpt}",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.deterministic=true",
        *small_memory(name),
    ]
    whole = run(compose_train_cfg(tmp_path, common, run_dir=tmp_path / "whole"))
    stop = ["+callbacks.signal._target_=tests.test_kd_methods.SignalAtStep", "+callbacks.signal.step=2"]
    with pytest.raises(Preempted):
        run(compose_train_cfg(tmp_path, [*common, *stop], run_dir=tmp_path / "killed"))
    saved = torch.load(
        tmp_path / "killed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert saved["global_step"] == 3
    if name == "skd":
        adam = saved["optimizer_states"][1]
        assert adam["state"] and all(int(s["step"]) == 3 for s in adam["state"].values())
    resumed = run(compose_train_cfg(tmp_path, [*common, "ckpt_path=last"], run_dir=tmp_path / "killed"))
    assert resumed["global_step"] == whole["global_step"] == 4
    a, b = student_and_modules(whole["last_checkpoint"]), student_and_modules(resumed["last_checkpoint"])
    assert a.keys() == b.keys() and any(k.startswith("distill_modules.") for k in a)
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6


# --------------------------------------------------------------------------------------------- DDP
def expected_queue_pointers(
    labels: torch.Tensor, stride: int, per_update: int
) -> tuple[list[int], list[int]]:
    """Queue pointers after one enqueue of ``labels [B, H, W]`` (11 classes) written out with loops: labels
    sampled at the teacher feature's stride (nearest = every ``stride``-th pixel); per image and class
    present, one region entry and ``min(count, per_update)`` pixel entries."""
    pixel, region = [0] * 11, [0] * 11
    for image in labels[:, ::stride, ::stride]:
        values = [int(v) for v in image.flatten() if 0 <= int(v) < 11]
        for c in set(values):
            region[c] += 1
            pixel[c] += min(values.count(c), per_update)
    return pixel, region


#: the tiny data with a global batch of 4 (2 per process)
DDP_DATA = [o for o in TINY if o.startswith("dataset.") and "batch_size" not in o] + ["dataset.batch_size=4"]


def train_ddp(tmp_path: Path, run_dir: Path, *overrides: str) -> dict:
    """``python -m rdd_lightning.train`` as 2 CPU processes (gloo); its results.json."""
    args = [
        *DDP_DATA,
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "trainer.enable_model_summary=false",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "rdd_lightning.train", *args],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["world_size"], results["per_process_batch_size"]) == (2, 2)
    return results


@pytest.mark.slow
def test_discriminator_config_under_two_process_ddp(tmp_path, teacher_ckpt):
    """One backward per step gives the student its gradient and the discriminator its own, so DDP reduces both:
    with find_unused_parameters=False a parameter left without gradient would stop the second step. The
    discriminator's optimizer steps once per student step."""
    run_dir = tmp_path / "ddp"
    results = train_ddp(
        tmp_path,
        run_dir,
        "distillation=skd",
        "teacher=resnet18",
        f"teacher.checkpoint={teacher_ckpt}",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
    )
    assert results["global_step"] == 2
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    adam = saved["optimizer_states"][1]["state"]
    assert adam and all(int(s["step"]) == 2 for s in adam.values())


@pytest.mark.slow
def test_cirkd_under_two_process_ddp_enqueues_the_global_batch(tmp_path, teacher_ckpt):
    data = DDP_DATA
    run_dir = tmp_path / "ddp"
    train_ddp(
        tmp_path,
        run_dir,
        "distillation=cirkd",
        "teacher=resnet18",
        f"teacher.checkpoint={teacher_ckpt}",
        *SMALL_MEMORY,
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
    )

    # the global batch of step 1 (the same for any number of processes), loaded on one process
    cfg = compose_train_cfg(tmp_path, [*data, "distillation=cirkd"], run_dir=tmp_path / "data")
    labels = next(iter(build_datamodule(cfg).train_dataloader()))["mask"]
    assert labels.shape == (4, 32, 32)
    pixel, region = expected_queue_pointers(labels, stride=8, per_update=16)
    halves = [expected_queue_pointers(labels[i : i + 2], 8, 16) for i in (0, 2)]
    assert all((p, r) != (pixel, region) for p, r in halves)  # one process's own images would give others
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
        "state_dict"
    ]
    assert state["distill_modules.cirkd_memory.region_queue_ptr"].tolist() == region
    assert state["distill_modules.cirkd_memory.pixel_queue_ptr"].tolist() == pixel


class SignalAtStep(L.Callback):
    """Sends this process SIGTERM when the batch after ``step`` optimizer steps starts: a pre-emption, in-process
    (the pre-emption callback saves at the end of that batch)."""

    def __init__(self, step: int):
        self.step = int(step)

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
