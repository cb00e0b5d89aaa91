"""Difficulty maps: TSE categories and selections against hand computations, the figure, the callback's files,
W&B media, rank-0 only, runs without a teacher or without a teacher aux head."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from rdd_lightning.data.transforms import resolve_normalization
from rdd_lightning.difficulty_maps import (
    CATEGORY_NAMES,
    DifficultyMapLogger,
    RDDOptions,
    denormalize,
    difficulty_maps,
    render_difficulty_maps,
    selected_categories,
)
from rdd_lightning.distillation import DistillationObjective
from rdd_lightning.errors import ConfigError
from rdd_lightning.models import SegOutput
from rdd_lightning.module import DistillationModule
from rdd_lightning.train import run
from tests.conftest import train_once
from tests.test_module import NUM_CLASSES, RandomScenes, tiny_net

SURE, UNSURE = [5.0, 0.0], [0.0, 5.0]  # class-0 logits: q = 0.993 / 0.0067 for label 0


def logits(*pixels: list[float]) -> torch.Tensor:
    """``[1, 2, 1, P]`` logits, one pixel per argument (a row of pixels)."""
    return torch.tensor(pixels).T.reshape(1, 2, 1, len(pixels))


# one row of five pixels: neither hard, student only, teacher only, both, ignored (label 255)
TARGET = torch.tensor([[[0, 0, 0, 0, 255]]])
STUDENT = logits(SURE, UNSURE, SURE, UNSURE, UNSURE)
TEACHER = logits(SURE, SURE, UNSURE, UNSURE, UNSURE)


def maps_of(mode: str, teacher_aux: torch.Tensor | None = None) -> dict:
    teacher = SegOutput(TEACHER, teacher_aux, [])
    return difficulty_maps(
        SegOutput(STUDENT, None, []), teacher, TARGET, threshold=0.7, min_kept=0, mode=mode
    )


# ------------------------------------------------------------------------------------------------ maps
@pytest.mark.parametrize(
    "mode, selected",
    [
        ("xor", [False, True, True, False, False]),
        ("or", [False, True, True, True, False]),
        ("and", [False, False, False, True, False]),
        ("student", [False, True, False, True, False]),
    ],
)
def test_categories_and_selection_by_hand(mode, selected):
    maps = maps_of(mode)
    assert maps["category"].tolist() == [[[0, 1, 2, 3, 255]]]
    assert maps["student_hard"].tolist() == [[[False, True, False, True, False]]]
    assert maps["teacher_hard"].tolist() == [[[False, False, True, True, False]]]
    assert maps["selected"].tolist() == [[selected]]
    # the categories a mode selects are exactly those of its selected pixels
    assert maps["selected_categories"] == tuple(c for c, s in enumerate(selected[:4]) if s)
    assert maps["student_pred"].tolist() == [[[0, 1, 0, 1, 1]]]
    assert maps["teacher_pred"].tolist() == [[[0, 0, 1, 1, 1]]]
    assert maps["tfe_weight"] is None  # the teacher has no aux head


def test_selected_categories_of_each_mode():
    assert selected_categories("xor") == (1, 2)
    assert selected_categories("or") == (1, 2, 3)
    assert selected_categories("and") == (3,)
    assert selected_categories("student") == (1, 3)


def test_tfe_weight_is_exp_of_minus_aux_to_main_kl():
    aux = logits(SURE, [2.0, 0.0], UNSURE, [0.0, 0.0], UNSURE)  # the main head's at pixels 0, 2 and 4
    weight = maps_of("xor", teacher_aux=aux)["tfe_weight"][0, 0]

    def kl(p_logits, q_logits):  # KL(softmax(p) || softmax(q)) of two logits
        lp = [x - math.log(sum(math.exp(v) for v in p_logits)) for x in p_logits]
        lq = [x - math.log(sum(math.exp(v) for v in q_logits)) for x in q_logits]
        return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq, strict=True))

    expected = [
        math.exp(-kl(a, m)) for a, m in zip(aux[0, :, 0].T.tolist(), TEACHER[0, :, 0].T.tolist(), strict=True)
    ]
    assert weight[[0, 2, 4]].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert weight.tolist() == pytest.approx(expected, abs=1e-6)
    assert 0 < weight[3] < weight[1] < 1  # a uniform aux head disagrees more than a less sure one


def test_no_teacher_gives_student_prediction_only():
    maps = difficulty_maps(SegOutput(STUDENT, None, []), None, TARGET)
    assert maps["student_pred"].shape == (1, 1, 5)
    assert all(maps[k] is None for k in ("teacher_pred", "tfe_weight", "category", "selected"))


def test_options_from_objective():
    rdd = DistillationObjective(
        name="rdd",
        task="rdd",
        tse={"mode": "or", "threshold": 0.6, "min_kept": 7},
        tfe={"kl_direction": "main_to_aux"},
    )
    options = RDDOptions.from_objective(rdd)
    assert (options.mode, options.threshold, options.min_kept, options.kl_direction) == (
        "or",
        0.6,
        7,
        "main_to_aux",
    )
    assert options.from_run and "defaults" not in options.describe()
    kd = RDDOptions.from_objective(DistillationObjective(name="kd", task="ce", kd={"weight": 1.0}))
    assert (kd.mode, kd.threshold, kd.from_run) == ("xor", 0.7, False) and "RDD defaults" in kd.describe()


# ------------------------------------------------------------------------------------------------ figure
def legend_texts(fig) -> list[str]:
    return [text.get_text() for legend in fig.legends for text in legend.get_texts()]


def render(maps: dict, mode: str = "xor"):
    images = torch.zeros(1, 1, 5, 3, dtype=torch.uint8).numpy()
    return render_difficulty_maps(images, TARGET, maps, class_names=["a", "b"], mode=mode, title="t")


def test_figure_panels_legend_and_png_size(tmp_path):
    fig = render(maps_of("xor", teacher_aux=TEACHER))
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["image", "ground truth", "teacher", "student", "TFE weight", "TSE selection"]
    texts = legend_texts(fig)
    for name, verdict in zip(CATEGORY_NAMES, ["dropped", "trained", "trained", "dropped"], strict=True):
        assert f"{name}: {verdict}" in texts
    assert {"a", "b", "void (ignored)"} <= set(texts)
    path = tmp_path / "maps.png"
    fig.savefig(path)
    width, height = (fig.get_size_inches() * fig.dpi).round().astype(int)
    assert Image.open(path).size == (width, height)
    assert "and" in render(maps_of("and"), mode="and").legends[-1].get_title().get_text()
    assert "both: trained" in legend_texts(render(maps_of("and"), mode="and"))


def test_figure_without_teacher_aux_head_or_teacher():
    fig = render(maps_of("xor"))  # no teacher aux head: no TFE panel, a note says why
    assert "TFE weight" not in [ax.get_title() for ax in fig.axes]
    assert "no auxiliary head" in fig.get_suptitle()
    fig = render(difficulty_maps(SegOutput(STUDENT, None, []), None, TARGET))
    assert [ax.get_title() for ax in fig.axes] == ["image", "ground truth", "student"]
    assert not any("student only" in t for t in legend_texts(fig))


def test_denormalize_inverts_the_eval_normalization():
    norm = resolve_normalization("caffe")
    rgb = torch.randint(0, 256, (4, 5, 3), dtype=torch.uint8)
    bgr = rgb.flip(-1).float() / 255
    x = ((bgr - torch.tensor(norm.mean)) / torch.tensor(norm.std)).permute(2, 0, 1)
    assert (denormalize(x, norm.mean, norm.std, norm.bgr) == rgb.numpy()).all()


# ------------------------------------------------------------------------------------------------ callback
@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"every_n_validations": 0}, "every_n_validations=0"),
        ({"every_n_validations": 1.5}, "every_n_validations"),
        ({"indices": [0, -1]}, "indices=[0, -1]"),
        ({"indices": []}, "indices=[]"),
    ],
)
def test_bad_options_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=f"callbacks.difficulty_maps.{key}".replace("[", r"\[")):
        DifficultyMapLogger(**kwargs)


class ValData:
    """What the callback reads of a datamodule: the validation dataset and how to draw it."""

    class_names, palette, ignore_index = ["a", "b", "c"], None, 255
    normalization = resolve_normalization("imagenet")

    def dataset(self, stage: str):
        return RandomScenes()  # 8 images of 32 x 32, two void rows


def stub_trainer(tmp_path: Path, rank0: bool = True, loggers=()) -> SimpleNamespace:
    return SimpleNamespace(
        sanity_checking=False,
        is_global_zero=rank0,
        datamodule=ValData(),
        loggers=list(loggers),
        global_step=7,
        default_root_dir=str(tmp_path),
    )


def module(teacher_aux: bool | None, task: str = "tse") -> DistillationModule:
    objective = DistillationObjective(name=task, task=task, kd={"weight": 1.0}, tse={"min_kept": 10})
    return DistillationModule(
        student=tiny_net(0),
        teacher=None if teacher_aux is None else tiny_net(1, aux=teacher_aux),
        objective=objective,
        optimizer=functools.partial(torch.optim.SGD, lr=0.01),
        scheduler=None,
        num_classes=NUM_CLASSES,
        class_names=ValData.class_names,
    )


def test_other_ranks_do_nothing(tmp_path):
    callback = DifficultyMapLogger(indices=[0, 1], dirpath=str(tmp_path / "maps"))
    callback.on_validation_epoch_end(stub_trainer(tmp_path, rank0=False), module(teacher_aux=True))
    assert callback.validations == 1 and not list(tmp_path.rglob("*.png"))


def test_every_nth_validation_and_indices_beyond_the_set(tmp_path):
    callback = DifficultyMapLogger(every_n_validations=2, indices=[3, 0, 99], dirpath=str(tmp_path / "maps"))
    pl_module = module(teacher_aux=True, task="ce").train()
    trainer = stub_trainer(tmp_path)
    callback.on_validation_epoch_end(trainer, pl_module)
    assert not (tmp_path / "maps").exists()  # the first validation does not draw
    with pytest.warns(UserWarning, match="has 8 images; drawing \\[3, 0\\] only"):
        callback.on_validation_epoch_end(trainer, pl_module)
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == [
        "step000007_img0.png",
        "step000007_img3.png",
    ]
    assert pl_module.student.training and not pl_module.teacher.training  # modes restored
    assert callback.state_dict() == {"validations": 2}


@pytest.mark.parametrize("teacher_aux", [None, False])
def test_runs_without_teacher_or_teacher_aux_head(tmp_path, teacher_aux):
    callback = DifficultyMapLogger(indices=[1])  # no dirpath: <default_root_dir>/difficulty_maps
    [path] = callback.log_maps(stub_trainer(tmp_path), module(teacher_aux=teacher_aux))
    assert path == tmp_path / "difficulty_maps" / "step000007_img1.png"
    assert Image.open(path).size[0] == (720 if teacher_aux is None else 1160)  # 3 panels / 5 panels, 100 dpi


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A tiny supervised run (resnet18 with its aux head, 2 steps), the teacher of this module's runs."""
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


def rdd_run(train_cfg, teacher_ckpt, *overrides: str) -> Path:
    """A tiny RDD run of 4 steps validated at steps 2 and 4 (4 validation images); returns its run dir."""
    cfg = train_cfg(
        "distillation=rdd",
        "teacher=resnet18",
        f"teacher.checkpoint={teacher_ckpt}",
        "distillation.switch.step=1",
        "distillation.tse.min_kept=100",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "callbacks.difficulty_maps.indices=[0,1,2,3]",
        *overrides,
    )
    run(cfg)
    return Path(cfg.paths.output_dir)


@pytest.mark.slow
@pytest.mark.parametrize("every_n, steps", [(1, [2, 4]), (2, [4])])
def test_training_run_writes_one_png_per_image_and_drawing(train_cfg, teacher_ckpt, every_n, steps):
    out = rdd_run(train_cfg, teacher_ckpt, f"callbacks.difficulty_maps.every_n_validations={every_n}")
    expected = [f"step{s:06d}_img{i}.png" for s in steps for i in range(4)]
    assert sorted(p.name for p in (out / "difficulty_maps").iterdir()) == expected


@pytest.mark.slow
def test_wandb_offline_run_logs_media(train_cfg, teacher_ckpt):
    out = rdd_run(train_cfg, teacher_ckpt, "logger=wandb", "trainer.max_steps=2")
    [wandb_run] = list((out / "wandb").glob("offline-run-*"))
    media = wandb_run / "files" / "media" / "images"
    # <key>_<step>_<content hash>.png (identical images are stored once), the masks of the segmentation key apart
    keys = {p.name.rsplit("_", 2)[0] for p in (media / "val" / "difficulty_maps").glob("*.png")}
    assert keys == {"segmentation", "tfe_weight", "tse_selection"}
    assert list((media / "mask" / "val" / "difficulty_maps").glob("segmentation_*.mask.png"))
    assert len(list((out / "difficulty_maps").glob("*.png"))) == 4  # logger=wandb keeps the CSV logger too
