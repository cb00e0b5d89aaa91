"""`python -m rdd_lightning.evaluate` on a tiny synthetic run: checkpoints, splits, inference settings,
predictions, and bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from rdd_lightning.drawing import class_palette, generated_palette
from rdd_lightning.errors import ConfigError
from rdd_lightning.evaluate import iou_table, run
from tests.conftest import TINY, cli_env, compose_train_cfg, train_once

# the dataset and trainer settings of the tiny training runs (evaluate.yaml has no logger/callbacks groups)
EVAL_TINY = [o for o in TINY if o.startswith(("dataset.", "trainer."))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny supervised run, as a teacher is trained (2 steps; decoder_channels=32, which no student config
    of the package has, so only the checkpoint's own record rebuilds its network)."""
    results = train_once(
        tmp_path_factory,
        "trained",
        [
            "distillation=none",
            "student.decoder_channels=32",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "task_name=teacher",
        ],
    )
    return results


@pytest.fixture
def evaluate_cfg(tmp_path):
    """``evaluate_cfg(*overrides)`` -> a composed evaluate config on the tiny dataset, own run dir each call."""
    calls = []

    def make(*overrides: str):
        calls.append(None)
        return compose_train_cfg(
            tmp_path,
            [*EVAL_TINY, *overrides],
            config_name="evaluate",
            run_dir=tmp_path / f"eval{len(calls) - 1}",
        )

    yield make
    GlobalHydra.instance().clear()


def edited_checkpoint(src: str, dst: Path, edit) -> Path:
    checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, dst)
    return dst


# ------------------------------------------------------------------------------------------------ config
DATASETS = sorted(
    p.name[: -len(".yaml")]
    for p in files("rdd_lightning.conf").joinpath("dataset").iterdir()
    if p.name.endswith(".yaml")
)


@pytest.mark.parametrize("dataset", DATASETS)
def test_evaluate_config_composes_with_every_dataset(tmp_path, dataset):
    cfg = compose_train_cfg(tmp_path, [f"dataset={dataset}", "student=resnet18", "split=test"], "evaluate")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["task_name"] == "evaluate" and resolved["inference"]["mode"] == "whole"
    assert resolved["student"]["encoder_name"] == "resnet18"  # an optional student= override is accepted


# ------------------------------------------------------------------------------------------------ results
@pytest.mark.slow
@pytest.mark.parametrize("which", ["last_checkpoint", "best_checkpoint"])
def test_checkpoint_reproduces_the_training_validation(trained, evaluate_cfg, which):
    assert trained["final_val_step"] == 2  # one validation, of the final weights: best and last hold them
    cfg = evaluate_cfg(f"ckpt_path={trained[which]}")
    results = run(cfg)
    on_disk = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert results["mIoU"] == pytest.approx(trained["final_val_miou"], abs=1e-9)
    assert results["aAcc"] == pytest.approx(trained["final_pixel_acc"], abs=1e-9)
    assert results["per_class_iou"] == pytest.approx(trained["per_class_iou"], abs=1e-9)
    assert results["num_images"] == 4 and results["split"] == "val" and results["dataset"] == "synthetic"
    assert results["inference"] == {
        "mode": "whole",
        "window": None,
        "stride": None,
        "scales": [1.0],
        "flip": False,
    }
    assert (
        results["checkpoint"] == str(Path(trained[which]).resolve())
        and results["checkpoint_global_step"] == 2
    )
    assert results["network"]["encoder_name"] == "resnet18" and results["wall_time_s"] > 0


@pytest.mark.slow
def test_test_split_sliding_window_and_predictions(trained, evaluate_cfg):
    cfg = evaluate_cfg(
        f"ckpt_path={trained['last_checkpoint']}",
        "split=test",
        "save_predictions=true",
        "inference.mode=slide",
        "inference.window=[24,24]",
    )
    results = run(cfg)
    assert results["split"] == "test" and results["num_images"] == 2 and 0 <= results["mIoU"] <= 100
    assert results["inference"] == {
        "mode": "slide",
        "window": [24, 24],
        "stride": [16, 16],
        "scales": [1.0],
        "flip": False,
    }
    pngs = sorted((Path(cfg.paths.output_dir) / "predictions").glob("*.png"))
    assert len(pngs) == 2 and results["predictions_dir"] == str(pngs[0].parent)
    image = np.asarray(Image.open(pngs[0]))
    assert image.shape == (32, 32, 3)
    palette = class_palette(instantiate(cfg.dataset, _convert_="all"))  # the dataset's, or generated
    assert {tuple(c) for c in image.reshape(-1, 3)} <= {tuple(c) for c in palette}


def test_checkpoint_that_records_only_the_config_name(evaluate_cfg, tmp_path):
    # checkpoints written before the network config was recorded name the student option they were trained with
    net = instantiate(compose_train_cfg(tmp_path, ["student=resnet18_scratch"]).student, num_classes=11)
    path = tmp_path / "old.ckpt"
    torch.save(
        {
            "state_dict": {f"student.{k}": v for k, v in net.state_dict().items()},
            "rdd_lightning": {
                "student": net.describe(),
                "student_config": "resnet18_scratch",
                "dataset": "synthetic",
            },
        },
        path,
    )
    results = run(evaluate_cfg(f"ckpt_path={path}"))
    assert results["network"] == net.describe() and results["num_images"] == 4


# ------------------------------------------------------------------------------------------------ errors
def test_missing_ckpt_path(evaluate_cfg):
    with pytest.raises(ConfigError, match=r"ckpt_path is required"):
        run(evaluate_cfg())


def test_checkpoint_file_not_found(evaluate_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"ckpt_path=.*nope\.ckpt'?: file not found"):
        run(evaluate_cfg(f"ckpt_path={tmp_path / 'nope.ckpt'}"))


@pytest.mark.slow
def test_class_count_mismatch(trained, evaluate_cfg, tmp_path):
    def nineteen(checkpoint):
        checkpoint["rdd_lightning"]["student"]["num_classes"] = 19

    bad = edited_checkpoint(trained["last_checkpoint"], tmp_path / "c19.ckpt", nineteen)
    with pytest.raises(ConfigError, match=r"predicts 19 classes .* dataset=synthetic has 11"):
        run(evaluate_cfg(f"ckpt_path={bad}"))


@pytest.mark.slow
def test_student_option_that_disagrees_names_both(trained, evaluate_cfg):
    cfg = evaluate_cfg(f"ckpt_path={trained['last_checkpoint']}", "student=resnet34")
    with pytest.raises(
        ConfigError, match=r"ckpt_path=.*encoder_name: checkpoint 'resnet18' vs config 'resnet34'"
    ):
        run(cfg)
    assert not (Path(cfg.paths.output_dir) / "results.json").exists()


@pytest.mark.slow
def test_recorded_config_name_that_does_not_fit(trained, evaluate_cfg, tmp_path):
    # without its network record the decoder_channels=32 run falls back to student/resnet18_scratch (128)
    old = edited_checkpoint(
        trained["last_checkpoint"], tmp_path / "old.ckpt", lambda c: c["rdd_lightning"].pop("network")
    )
    # the one line names the file, the config it was read as, the first differing shape and the fix
    with pytest.raises(
        ConfigError,
        match=r"ckpt_path=.*old\.ckpt' does not fit student=resnet18_scratch .*"
        r"net\.decoder\.aspp\.convs\.0\.0\.weight file \[32, 512, 1, 1\] vs network \[128, 512, 1, 1\].*"
        r"choose the student config the file was trained as",
    ):
        run(evaluate_cfg(f"ckpt_path={old}"))


@pytest.mark.slow
def test_bad_split_and_used_run_dir(trained, evaluate_cfg):
    ckpt = trained["last_checkpoint"]
    with pytest.raises(ConfigError, match=r"split='train'"):
        run(evaluate_cfg(f"ckpt_path={ckpt}", "split=train"))
    cfg = evaluate_cfg(f"ckpt_path={ckpt}")
    (Path(cfg.paths.output_dir) / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds results"):
        run(cfg)
    assert (Path(cfg.paths.output_dir) / "results.json").read_text() == "{}"


# ------------------------------------------------------------------------------------------------ output
def test_generated_palette_is_fixed_and_distinct():
    palette = generated_palette(21)
    assert palette.shape == (21, 3) and palette.dtype == np.uint8
    assert len({tuple(c) for c in palette}) == 21 and np.array_equal(palette, generated_palette(21))


def test_iou_table_names_every_class():
    table = iou_table({"road": 91.5, "sky": None}, miou=91.5, acc=95.0)
    assert "road" in table and "91.50" in table and "sky" in table and "mIoU" in table and "aAcc" in table


@pytest.mark.slow
def test_cli_writes_results_into_its_own_run_dir(trained, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rdd_lightning.evaluate",
            f"ckpt_path={trained['last_checkpoint']}",
            *EVAL_TINY,
        ],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = (tmp_path / "logs" / "evaluate" / "runs").glob("*/results.json")
    results = json.loads(results_file.read_text())
    assert results["mIoU"] == pytest.approx(trained["final_val_miou"], abs=1e-9)
    output = proc.stdout + proc.stderr
    assert "mIoU" in output and "hexagon" in output  # the per-class table names the classes
