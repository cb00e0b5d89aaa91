"""DistillationModule: the teacher is frozen, and the training loop, metrics and checkpoints behave."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from rdd_lightning.distillation import DistillationObjective
from rdd_lightning.models import build_model
from rdd_lightning.module import DistillationModule, segmentation_metrics

NUM_CLASSES = 3


class RandomScenes(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        mask = torch.randint(0, NUM_CLASSES, (32, 32), generator=g)
        mask[:2] = 255
        return {"image": torch.randn(3, 32, 32, generator=g), "mask": mask, "name": str(i)}


def tiny_net(seed: int, aux: bool = True):
    torch.manual_seed(seed)
    return build_model(
        "DeepLabV3",
        "resnet18",
        NUM_CLASSES,
        aux_head=aux,
        encoder_output_stride=8,
        decoder_channels=16,
        upsampling=1,
    )


def make_module(task: str = "ce", kd_weight: float = 1.0) -> DistillationModule:
    return DistillationModule(
        student=tiny_net(0),
        teacher=tiny_net(1),
        objective=DistillationObjective(name="kd", task=task, kd={"weight": kd_weight}),
        optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
        scheduler=functools.partial(torch.optim.lr_scheduler.PolynomialLR, power=0.9),
        num_classes=NUM_CLASSES,
        class_names=["a", "b", "c"],
    )


def fit(module: DistillationModule, tmp_path, steps: int = 3, **trainer_kwargs) -> L.Trainer:
    loader = DataLoader(RandomScenes(), batch_size=2, shuffle=True, drop_last=True)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=DataLoader(RandomScenes(), batch_size=4))
    return trainer


def test_teacher_is_frozen_and_unchanged(tmp_path):
    module = make_module()
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in module.student.state_dict().items()}
    seen_modes = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen_modes.append((pl_module.teacher.training, pl_module.student.training))

    trainer = fit(module, tmp_path, steps=4, val_check_interval=2, callbacks=[Spy()])
    assert seen_modes and all(t is False and s is True for t, s in seen_modes)  # also after validation
    assert all(not p.requires_grad for p in module.teacher.parameters())
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in module.teacher.parameters()}
    assert optimised == {id(p) for p in module.student.parameters()}
    for key, value in module.teacher.state_dict().items():  # BN running stats too
        assert torch.equal(value, before[key]), key
    assert any(not torch.equal(v, student_before[k]) for k, v in module.student.state_dict().items())


def test_teacher_forward_builds_no_graph():
    module = make_module()
    out = module.teacher_forward(torch.randn(2, 3, 32, 32))
    assert not out.logits.requires_grad and out.logits.grad_fn is None


def test_plain_training_needs_no_teacher():
    module = make_module(task="ce", kd_weight=0.0)
    assert module.teacher_forward(torch.randn(2, 3, 32, 32)) is None


def test_checkpoint_leaves_teacher_out_and_resumes(tmp_path):
    module = make_module()
    trainer = fit(module, tmp_path, steps=2)
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert any(k.startswith("student.") for k in ckpt["state_dict"])
    assert ckpt["rdd_lightning"]["student"]["encoder_name"] == "resnet18"
    resumed = make_module()
    trainer2 = fit(resumed, tmp_path, steps=4, limit_val_batches=0)  # fresh
    assert trainer2.global_step == 4
    resumed = make_module()
    loader = DataLoader(RandomScenes(), batch_size=2, shuffle=True, drop_last=True)
    trainer3 = L.Trainer(
        accelerator="cpu",
        max_steps=5,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    trainer3.fit(resumed, train_dataloaders=loader, ckpt_path=path)
    assert trainer3.global_step == 5


def test_validation_logs_miou_and_per_class(tmp_path):
    module = make_module()
    fit(module, tmp_path, steps=2, val_check_interval=2)
    assert 0.0 <= module.last_val["miou"] <= 100.0
    assert set(module.last_val["per_class_iou"]) == {"a", "b", "c"}


def test_segmentation_metrics_count_by_hand_and_leave_absent_classes_out():
    # true class 0: 3 pixels -> 0, 1 -> 1; true class 1: 1 -> 0, 5 -> 1; class 2 absent; 2 void pixels
    target = torch.tensor([[0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 255, 255]])
    preds = torch.tensor([[0, 0, 0, 1, 0, 1], [1, 1, 1, 1, 2, 0]])
    metrics = segmentation_metrics(3, ignore_index=255)
    metrics.update(preds[None], target[None])
    out = metrics.compute()
    iou, acc = out["iou"], out["acc"]
    assert iou[0] == pytest.approx(3 / 5) and iou[1] == pytest.approx(5 / 7) and torch.isnan(iou[2])
    assert acc == pytest.approx(8 / 10)


def test_predict_logits_pads_to_the_stride():
    module = make_module().eval()
    images = torch.randn(1, 3, 30, 45)
    logits = module.predict_logits(images)
    assert logits.shape == (1, NUM_CLASSES, 30, 45)


def _hand_miou(net, dataset, num_classes: int = NUM_CLASSES, ignore: int = 255) -> float:
    """mIoU (percent) of ``net`` on ``dataset`` by a confusion matrix counted with numpy."""
    import numpy as np

    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    net.eval()
    with torch.no_grad():
        for i in range(len(dataset)):
            sample = dataset[i]
            logits = net(sample["image"][None]).logits
            logits = torch.nn.functional.interpolate(
                logits, size=sample["mask"].shape, mode="bilinear", align_corners=False
            )
            pred = logits.argmax(1)[0].numpy().ravel()
            mask = sample["mask"].numpy().ravel()
            keep = mask != ignore
            np.add.at(confusion, (mask[keep], pred[keep]), 1)
    inter = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - inter
    iou = [inter[c] / union[c] for c in range(num_classes) if union[c] > 0]
    return float(np.mean(iou) * 100)


def test_teacher_miou_is_measured_once_on_the_validation_images(tmp_path):
    module = make_module()
    expected = _hand_miou(tiny_net(1), RandomScenes())
    calls = []
    module.teacher.register_forward_hook(lambda *args: calls.append(module.trainer.validating))
    trainer = fit(module, tmp_path, steps=4, val_check_interval=2)  # two validations
    assert module.teacher_val["miou"] == pytest.approx(expected, abs=1e-4)
    assert sum(calls) == 2  # the 8 validation images in 2 batches, at the first validation only
    assert float(trainer.callback_metrics["val/teacher_mIoU"]) == pytest.approx(expected, abs=1e-3)
