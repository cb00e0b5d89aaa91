"""RDDStageSwitch: switches at the configured epoch/step/fraction, drives the blend, survives resume."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from rdd_lightning.callbacks import RDDStageSwitch
from rdd_lightning.distillation import DistillationObjective
from rdd_lightning.errors import ConfigError
from rdd_lightning.module import DistillationModule
from tests.test_module import NUM_CLASSES, RandomScenes, tiny_net


def rdd_module(blend: str = "none") -> DistillationModule:
    return DistillationModule(
        student=tiny_net(0),
        teacher=tiny_net(1),
        objective=DistillationObjective(
            name="rdd", task="rdd", kd={"weight": 1.0}, blend=blend, tse={"min_kept": 10}
        ),
        optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
        scheduler=None,
        num_classes=NUM_CLASSES,
        class_names=["a", "b", "c"],
    )


class StageRecorder(L.Callback):
    """Records (global_step, stage, λ, logged stage) as the objective sees them in each training step."""

    def __init__(self):
        self.seen: list[tuple[int, int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        obj = pl_module.objective
        logged = trainer.callback_metrics.get("train/rdd_stage")
        self.seen.append(
            (trainer.global_step - 1, obj.stage, obj.blend_lambda, None if logged is None else float(logged))
        )


def fit(
    module, tmp_path, switch: RDDStageSwitch, max_steps: int, ckpt_path=None
) -> tuple[L.Trainer, StageRecorder]:
    recorder = StageRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
        callbacks=[switch, recorder],
        log_every_n_steps=1,
    )
    loader = DataLoader(RandomScenes(), batch_size=2, shuffle=False, drop_last=True)  # 4 batches / epoch
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer, recorder


def stages(recorder: StageRecorder) -> list[int]:
    return [s for _, s, _, _ in recorder.seen]


def test_switch_at_step(tmp_path):
    _, rec = fit(rdd_module(), tmp_path, RDDStageSwitch(step=2), max_steps=5)
    assert stages(rec) == [0, 0, 1, 1, 1]
    assert [logged for *_, logged in rec.seen] == [0.0, 0.0, 1.0, 1.0, 1.0]  # logged as train/rdd_stage


def test_switch_at_fraction_of_planned_steps(tmp_path):
    _, rec = fit(rdd_module(), tmp_path, RDDStageSwitch(fraction=0.1), max_steps=10)
    assert stages(rec) == [0] + [1] * 9  # round(0.1 * 10) = 1


def test_switch_at_epoch(tmp_path):
    _, rec = fit(rdd_module(), tmp_path, RDDStageSwitch(epoch=1), max_steps=6)
    assert stages(rec) == [0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize(
    "switch,expected", [(RDDStageSwitch(step=0), [1, 1, 1]), (RDDStageSwitch(fraction=1.0), [0, 0, 0])]
)
def test_switch_at_the_ends(tmp_path, switch, expected):
    _, rec = fit(rdd_module(), tmp_path, switch, max_steps=3)
    assert stages(rec) == expected


def test_linear_blend_lambda(tmp_path):
    _, rec = fit(rdd_module(blend="linear"), tmp_path, RDDStageSwitch(step=2, blend="linear"), max_steps=6)
    lambdas = [lam for _, _, lam, _ in rec.seen]
    assert lambdas == pytest.approx([1.0, 1.0, 1.0, 0.75, 0.5, 0.25])  # 1 at the switch, -> 0 at the end


@pytest.mark.parametrize("stop,switch_at", [(3, 2), (2, 3)])  # resumed after / before the switch
def test_resume_continues_the_schedule(tmp_path, stop, switch_at):
    trainer, first = fit(rdd_module(), tmp_path, RDDStageSwitch(step=switch_at), max_steps=stop)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=True)["callbacks"]["RDDStageSwitch"]["switch_step"] == switch_at
    _, resumed = fit(rdd_module(), tmp_path, RDDStageSwitch(step=switch_at), max_steps=6, ckpt_path=ckpt)
    _, straight = fit(rdd_module(), tmp_path / "b", RDDStageSwitch(step=switch_at), max_steps=6)
    assert [g for g, *_ in resumed.seen] == list(range(stop, 6))
    assert stages(first) + stages(resumed) == stages(straight)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fraction": 0.1, "step": 3},
        {"fraction": 1.5},
        {"step": -1},
        {"epoch": 1.5},
        {"step": 1, "blend": "cubic"},
    ],
)
def test_bad_switch_settings(kwargs):
    with pytest.raises(ConfigError, match="distillation"):
        RDDStageSwitch(**kwargs)


def test_no_switch_setting_is_the_papers_fraction():
    switch = RDDStageSwitch()
    assert (switch.fraction, switch.epoch, switch.step) == (0.1, None, None)


@pytest.mark.parametrize("blend", ["none", "linear"])
def test_resume_with_longer_training_keeps_the_saved_switch_step(tmp_path, blend):
    """Fraction 0.5 of 4 steps switches at step 2; resumed at step 4 with max_steps 12 (where 0.5 would give
    6), the run stays in TSE-RDD at the saved step 2 and a linear blend runs to the new end, step 12."""
    trainer, first = fit(rdd_module(blend), tmp_path, RDDStageSwitch(fraction=0.5, blend=blend), max_steps=4)
    assert stages(first) == [0, 0, 1, 1]
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    switch = RDDStageSwitch(fraction=0.5, blend=blend)
    _, resumed = fit(rdd_module(blend), tmp_path, switch, max_steps=12, ckpt_path=ckpt)
    assert [g for g, *_ in resumed.seen] == list(range(4, 12))
    assert stages(resumed) == [1] * 8
    assert (switch.switch_step, switch.total_steps) == (2, 12)
    if blend == "linear":
        assert [lam for _, _, lam, _ in resumed.seen] == pytest.approx(
            [1 - (g - 2) / 10 for g in range(4, 12)]
        )


def test_tse_stats_are_logged(tmp_path):
    trainer, _ = fit(rdd_module(), tmp_path, RDDStageSwitch(step=1), max_steps=2)
    for key in ("train/loss_task", "train/loss_kd", "train/tse_selected_fraction", "train/rdd_stage"):
        assert key in trainer.callback_metrics, key
    _ = fit(module := rdd_module(), tmp_path, RDDStageSwitch(step=5), max_steps=1)
    assert module.trainer.callback_metrics["train/tfe_weight_mean"] <= 1.0


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _drive(monitor, events, accumulate: int = 1):
    """Feed ``monitor`` ``(time, global_step)`` batch starts and ``("val", time, global_step)`` validations."""
    clock = _Clock()
    trainer = type("T", (), {"accumulate_grad_batches": accumulate, "global_step": 0})()
    import rdd_lightning.callbacks as callbacks

    original = callbacks.time.perf_counter
    callbacks.time.perf_counter = clock
    try:
        for event in events:
            if event[0] == "val":
                _, clock.now, trainer.global_step = event
                monitor.on_validation_start(trainer, None)
                continue
            clock.now, trainer.global_step = event
            monitor.on_train_batch_start(trainer, None, None, 0)
    finally:
        callbacks.time.perf_counter = original
    return monitor


def test_compute_monitor_counts_training_intervals_only():
    from rdd_lightning.callbacks import ComputeMonitor

    # steps 0->1 (1 s), 1->2 (2 s), 2->3 ends at the validation (1 s), the next batch at 10 s restarts the
    # clock, 3->4 (0.5 s): 4.5 s, 4 steps of 4 images
    events = [(0, 0), (1, 1), (3, 2), ("val", 4, 3), (10, 3), (10.5, 4)]
    monitor = _drive(ComputeMonitor(global_batch_size=4), events)
    assert monitor.train_time_s == pytest.approx(4.5)
    assert monitor.train_images == 16
    assert monitor.images_per_s == pytest.approx(16 / 4.5)


def test_compute_monitor_counts_whole_accumulated_steps():
    from rdd_lightning.callbacks import ComputeMonitor

    # accumulate 2: a step every 2 batches; 2 steps of 2 x 4 images in 2 s (the micro-batch in between counts)
    monitor = _drive(ComputeMonitor(4), [(0, 0), (0.5, 0), (1, 1), (1.5, 1), (2, 2)], accumulate=2)
    assert monitor.train_time_s == pytest.approx(2.0)
    assert monitor.train_images == 16


def test_compute_monitor_totals_survive_a_resume():
    from rdd_lightning.callbacks import ComputeMonitor

    first = _drive(ComputeMonitor(2), [(0, 0), (2, 1)])
    resumed = ComputeMonitor(2)
    resumed.load_state_dict(first.state_dict())
    _drive(resumed, [(100, 1), (101, 2)])  # the first interval after the restart starts the clock only
    assert resumed.train_time_s == pytest.approx(3.0) and resumed.train_images == 4
