"""The dataset configs: the paper's recipe, the official class names and palettes, and 2-step training runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from rdd_lightning.data.voc import voc_colormap
from rdd_lightning.evaluate import run as evaluate
from rdd_lightning.train import run
from tests.conftest import TINY, compose_train_cfg
from tests.test_data import CLASSES, WRITERS

# RDD_SPEC's recipe: crop [h, w], iterations, validation interval (Cityscapes: the authors' 1600; else a tenth
# of the run); all: SGD lr 0.02, wd 1e-4, global batch 16, TSE min_kept 100000 per 4-image GPU batch = 25000 per
# image.
RECIPES = {
    "camvid": ([360, 360], 40000, 4000),
    "cityscapes": ([512, 1024], 40000, 1600),
    "voc": ([512, 512], 40000, 4000),
    "ade20k": ([512, 512], 80000, 8000),
}
SEGNET_CAMVID_COLOURS = [
    [128, 128, 128],
    [128, 0, 0],
    [192, 192, 128],
    [128, 64, 128],
    [60, 40, 222],
    [128, 128, 0],
    [192, 128, 128],
    [64, 64, 128],
    [64, 0, 128],
    [64, 64, 0],
    [0, 128, 192],
]


@pytest.mark.parametrize("name", list(RECIPES))
def test_config_has_the_paper_recipe_and_the_dataset_metadata(tmp_path, name, monkeypatch):
    monkeypatch.delenv("RDD_DATA_DIR", raising=False)
    cfg = compose_train_cfg(tmp_path, [f"dataset={name}"])
    ds, cls = cfg.dataset, CLASSES[name]
    crop, steps, interval = RECIPES[name]
    assert list(ds.crop_size) == crop and list(ds.scale_range) == [0.5, 2.0] and ds.hflip == 0.5
    assert cfg.trainer.max_steps == steps and cfg.trainer.val_check_interval == interval
    assert cfg.optimizer.lr == 0.02 and cfg.optimizer.weight_decay == 1e-4 and cfg.scheduler.power == 0.9
    assert ds.batch_size == 16 and cfg.distillation.tse.min_kept_per_image == 25000
    assert cfg.distillation.tse.min_kept is None
    assert ds.normalization == "imagenet" and ds.mean is None and ds.std is None
    assert ds.root == str(tmp_path / "data" / name) and ds.ignore_index == 255
    assert ds.num_classes == cls.NUM_CLASSES == len(ds.class_names) == len(ds.palette)
    assert list(ds.class_names) == list(cls.CLASS_NAMES)
    assert OmegaConf.to_container(ds.palette) == [list(c) for c in cls.PALETTE]
    monkeypatch.setenv("RDD_DATA_DIR", "/datasets")
    assert compose_train_cfg(tmp_path, [f"dataset={name}"]).dataset.root == f"/datasets/{name}"


def test_palettes_are_the_official_ones(tmp_path):
    assert [list(c) for c in CLASSES["camvid"].PALETTE] == SEGNET_CAMVID_COLOURS
    assert [list(c) for c in CLASSES["voc"].PALETTE] == [list(c) for c in voc_colormap()[:21]]
    assert CLASSES["voc"].PALETTE[15] == (192, 128, 128) and voc_colormap()[255] == (224, 224, 192)
    ade = CLASSES["ade20k"].PALETTE
    assert ade[0] == (120, 120, 120) and ade[12] == (150, 5, 61) and ade[149] == (92, 0, 255)
    assert CLASSES["ade20k"].CLASS_NAMES[12] == "person" and CLASSES["ade20k"].CLASS_NAMES[-1] == "flag"


def test_caffe_normalization_from_the_config(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["dataset=camvid", "dataset.normalization=caffe"])
    dm = instantiate(cfg.dataset, _convert_="all")
    assert dm.normalization.bgr and abs(dm.normalization.mean[0] * 255 - 104.00698793) < 1e-6


# ------------------------------------------------------------------------------------ 2-step training runs
REAL_TINY = [o for o in TINY if not o.startswith("dataset.prepare.")] + [
    "dataset.val_batch_size=1",
    "dataset.num_workers=0",
    "distillation=none",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(WRITERS))
def test_two_training_steps_then_evaluate(tmp_path, name):
    root = WRITERS[name](tmp_path / name)
    cfg = compose_train_cfg(tmp_path, [*REAL_TINY, f"dataset={name}", f"dataset.root={root}"])
    results = run(cfg)
    assert results["global_step"] == 2 and results["dataset"] == name
    assert len(results["per_class_iou"]) == CLASSES[name].NUM_CLASSES
    assert Path(results["best_checkpoint"]).is_file()
    # the evaluate entry point reads the same layout and reproduces the run's final validation
    eval_overrides = [o for o in REAL_TINY if o.startswith(("dataset.", "trainer."))]
    eval_cfg = compose_train_cfg(
        tmp_path,
        [
            *eval_overrides,
            f"dataset={name}",
            f"dataset.root={root}",
            f"ckpt_path={results['last_checkpoint']}",
            "save_predictions=true",
        ],
        config_name="evaluate",
        run_dir=tmp_path / "eval",
    )
    evaluated = evaluate(eval_cfg)
    assert evaluated["mIoU"] == pytest.approx(results["final_val_miou"], abs=1e-6)
    assert len(list((tmp_path / "eval" / "predictions").glob("*.png"))) == evaluated["num_images"]


def test_tse_class_weights_follow_the_dataset_recipe(tmp_path):
    """RDD_SPEC: the authors' fixed class weights are a Cityscapes setting; other datasets use none."""
    assert compose_train_cfg(tmp_path, ["dataset=cityscapes"]).distillation.tse.class_weight == "cityscapes"
    off = ["dataset=cityscapes", "dataset.recipe.tse_class_weight=null"]
    assert compose_train_cfg(tmp_path, off).distillation.tse.class_weight is None
    for name in ("camvid", "voc", "ade20k", "synthetic"):
        assert compose_train_cfg(tmp_path, [f"dataset={name}"]).distillation.tse.class_weight is None
