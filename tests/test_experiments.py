"""The paper's tables as `experiment=<name>` multiruns, their `synthetic_<name>` twins and the Optuna search:
each file composes with its sweep, a twin sweeps exactly what its paper experiment sweeps, every published number
equals RDD_SPEC's (typed again below, on purpose), each twin trains, `experiment=synthetic_<name>` alone
launches a multirun, and `hparams_search=rdd_optuna` runs trials."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from rdd_lightning.train import run
from tests.conftest import TINY, cli_env, compose_train_cfg, train_once

PAPER = ["ade20k", "camvid", "cityscapes", "integrations", "mask_modes", "tfe_share", "thresholds", "voc"]
TWINS = [f"synthetic_{name}" for name in PAPER]
SWEEPS = PAPER + TWINS
STUDIES = ["synthetic_table", "demo"]  # the package's own evidence and `make demo` (no paper counterpart)

#: jobs of each sweep: seeds x students x methods, or seeds x ablation values
JOBS = {
    "cityscapes": 72,
    "camvid": 12,
    "voc": 12,
    "ade20k": 6,
    "tfe_share": 15,
    "mask_modes": 12,
    "thresholds": 15,
    "integrations": 24,
}

# ------------------------------------------------------------------ RDD_SPEC "Published results", typed again
_TABLE1 = {  # student: baseline, SKD, IFVD, CWD, CIRKD, RDD (Cityscapes val, T: DeepLabV3-R101 78.07)
    "cirkd_deeplabv3_resnet18": [74.21, 75.42, 75.59, 75.55, 76.38, 77.18],
    "cirkd_deeplabv3_resnet18_scratch": [65.17, 67.08, 65.96, 67.74, 68.18, 69.78],
    "cirkd_deeplabv3_mobilenetv2": [73.12, 73.82, 73.50, 74.66, 75.42, 76.38],
    "cirkd_pspnet_resnet18": [72.55, 73.29, 73.71, 74.36, 74.73, 75.88],
}
_METHODS = ["none", "skd", "ifvd", "cwd", "cirkd", "rdd"]


def _pairs(rows: dict[str, list[float]], methods: list[str]) -> dict[frozenset, float]:
    return {
        frozenset({("student", s), ("distillation", m)}): v
        for s, values in rows.items()
        for m, v in zip(methods, values, strict=True)
    }


def _one(key: str, values: dict[str, float]) -> dict[frozenset, float]:
    return {frozenset({(key, k)}): v for k, v in values.items()}


#: name -> (teacher mIoU, {frozenset of (override key, value as in the job's overrides): mIoU})
PUBLISHED = {
    "cityscapes": (78.07, _pairs(_TABLE1, _METHODS)),
    "camvid": (
        69.84,
        _pairs(
            {"cirkd_deeplabv3_resnet18": [66.92, 68.55], "cirkd_pspnet_resnet18": [66.73, 68.77]},
            ["none", "rdd"],
        ),
    ),
    "voc": (
        77.67,
        _pairs(
            {"cirkd_deeplabv3_resnet18": [73.21, 74.88], "cirkd_pspnet_resnet18": [73.33, 74.82]},
            ["none", "rdd"],
        ),
    ),
    "ade20k": (42.70, _one("distillation", {"none": 36.52, "rdd": 38.04})),
    # TSE only = share 0, TFE only = share 1.0
    "tfe_share": (
        78.07,
        _one(
            "distillation.switch.fraction",
            {"0": 76.34, "0.1": 77.18, "0.2": 76.77, "0.3": 76.58, "1.0": 74.43},
        ),
    ),
    "mask_modes": (78.07, _one("distillation.tse.mode", {"and": 70.01, "or": 75.32, "xor": 77.18})),
    "thresholds": (
        78.07,
        _one(
            "distillation.tse.threshold",
            {"0.6": 76.47, "0.65": 76.88, "0.7": 76.95, "0.75": 76.66, "0.8": 76.32},
        ),
    ),
    "integrations": (
        78.07,
        _one(
            "distillation",
            {
                "at": 76.21,
                "at_rdd": 77.11,
                "dsd": 74.42,
                "dsd_rdd": 75.72,
                "cirkd": 76.38,
                "cirkd_rdd": 76.69,
                "kd": 74.82,
                "rdd": 77.18,
            },
        ),
    ),
}

#: the combination of its axes each twin trains in test_twin_trains (cover the students and modes)
TWIN_JOB = {
    "synthetic_cityscapes": ["student=cirkd_deeplabv3_mobilenetv2", "distillation=cwd", "seed=2"],
    "synthetic_camvid": ["student=cirkd_pspnet_resnet18", "distillation=rdd", "seed=1"],
    "synthetic_voc": ["student=cirkd_deeplabv3_resnet18", "distillation=none", "seed=3"],
    "synthetic_ade20k": ["distillation=rdd", "seed=1"],
    "synthetic_tfe_share": ["distillation.switch.fraction=1.0", "seed=1"],
    "synthetic_mask_modes": ["distillation.tse.mode=and", "seed=1"],
    "synthetic_thresholds": ["distillation.tse.threshold=0.65", "seed=1"],
    "synthetic_integrations": ["distillation=cirkd_rdd", "seed=1"],
    "synthetic_table": ["distillation=dsd_rdd", "seed=3"],
    "demo": ["distillation=rdd"],
}
SMALL_MEMORY = [
    "distillation.terms.cirkd_memory.pixel_memory_size=500",
    "distillation.terms.cirkd_memory.region_memory_size=50",
]
TINY_STEPS = ["trainer.max_steps=2", "trainer.val_check_interval=2", "distillation.tse.min_kept=100"]


@functools.cache
def compose_with_hydra(*overrides: str) -> DictConfig:
    """``conf/train.yaml`` with ``overrides`` and its ``hydra`` node (sweeper, mode), unresolved (cached: callers
    only read it)."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="rdd_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    GlobalHydra.instance().clear()
    return cfg


def axes(cfg: DictConfig) -> dict[str, list[str]]:
    """``hydra.sweeper.params`` parsed as Hydra's sweeper does: ``{key: [value as in a job's overrides]}``."""
    parser = OverridesParser.create()
    out = {}
    for key, value in cfg.hydra.sweeper.params.items():
        (override,) = parser.parse_overrides([f"{key}={value}"])
        out[key] = (
            list(override.sweep_string_iterator())
            if override.is_sweep_override()
            else [override.get_value_element_as_str()]
        )
    return out


def jobs_of(cfg: DictConfig, *arguments: str) -> list[list[str]]:
    """The jobs Hydra's basic sweeper launches for ``cfg`` with command-line ``arguments``."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    overrides = OverridesParser.create().parse_overrides([*params, *arguments])
    (batch,) = BasicSweeper.split_arguments(overrides, None)
    return batch


def experiment_names() -> list[str]:
    folder = files("rdd_lightning.conf").joinpath("experiment")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


# -------------------------------------------------------------------------------------- the files themselves
def test_the_experiments_are_exactly_these():
    assert experiment_names() == sorted([*SWEEPS, *STUDIES, "synthetic_teacher"])


@pytest.mark.parametrize("method", ["none", "kd", "rdd"])
def test_the_demo_jobs_are_seed_1_of_the_table(method):
    """`make demo` (experiment=demo) runs none, kd and rdd with seed 1: each job is the table's seed-1 job of the
    same method, key for key (only the run's name and tags differ), so the demo prints the table's seed-1 numbers."""
    demo, table = compose_with_hydra("experiment=demo"), compose_with_hydra("experiment=synthetic_table")
    assert demo.hydra.mode == RunMode.MULTIRUN and axes(demo) == {"distillation": ["none", "kd", "rdd"]}
    assert "1" in axes(table)["seed"] and method in axes(table)["distillation"]

    def job(*overrides: str) -> dict:
        cfg = OmegaConf.to_container(compose_with_hydra(*overrides))
        return {k: v for k, v in cfg.items() if k not in ("hydra", "task_name", "tags")}

    assert job("experiment=demo", f"distillation={method}") == job(
        "experiment=synthetic_table", f"distillation={method}", "seed=1"
    )
    assert job("experiment=demo", f"distillation={method}")["seed"] == 1


@pytest.mark.parametrize("name", SWEEPS)
def test_experiment_is_a_multirun_over_seeds(name):
    """Composes with its sweep parsed; `experiment=<name>` alone is a multirun (hydra.mode) of JOBS jobs."""
    cfg = compose_with_hydra(f"experiment={name}")
    sweep = axes(cfg)
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert cfg.task_name == name  # logs/<name>/multiruns/...
    assert sweep["seed"] == ["1", "2", "3"]
    assert len(jobs_of(cfg)) == JOBS[name.removeprefix("synthetic_")]
    text = files("rdd_lightning.conf").joinpath("experiment", f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n# RDD paper," if name in PAPER else "# @package _global_\n")
    assert f"experiment={name}" in text  # the header shows the launch command


@pytest.mark.parametrize("name", PAPER)
def test_every_axis_value_composes_and_sets_its_key(name, tmp_path):
    """Each value of each axis, applied as a job would apply it, composes and resolves, and sets what it names
    (a twin's axes are the same: test_twin_sweeps_the_same_axes_on_synthetic_data)."""
    sweep = axes(compose_with_hydra(f"experiment={name}"))
    for key, values in sweep.items():
        for value in values:
            cfg = compose_with_hydra(f"experiment={name}", f"{key}={value}")
            if key in cfg.hydra.runtime.choices:  # a config group (student, distillation)
                assert cfg.hydra.runtime.choices[key] == value
            else:
                assert str(OmegaConf.select(cfg, key)) == value, key
    OmegaConf.to_container(compose_train_cfg(tmp_path, [f"experiment={name}"]), resolve=True)


@pytest.mark.parametrize("name", PAPER)
def test_twin_sweeps_the_same_axes_on_synthetic_data(name):
    paper, twin = compose_with_hydra(f"experiment={name}"), compose_with_hydra(f"experiment=synthetic_{name}")
    assert axes(twin) == axes(paper)  # same keys, same values, same order
    for group in ("student", "distillation"):  # what the sweep fixes, the twin fixes too
        assert twin.hydra.runtime.choices[group] == paper.hydra.runtime.choices[group]
    assert twin.dataset.name == "synthetic" and twin.teacher.checkpoint == "auto"
    assert twin.student.encoder_weights is None and twin.paper is None
    assert twin.task_name == f"synthetic_{name}"
    assert (
        60 <= twin.trainer.max_steps <= 100 and twin.trainer.val_check_interval == twin.trainer.max_steps // 2
    )
    text = files("rdd_lightning.conf").joinpath("experiment", f"synthetic_{name}.yaml").read_text()
    # names the table it mirrors, and its cost
    assert "RDD paper" in text and "Time on 2 idle CPU cores" in text


@pytest.mark.parametrize("name", PAPER)
def test_paper_numbers_are_rdd_spec(name):
    teacher_miou, expected = PUBLISHED[name]
    paper = compose_with_hydra(f"experiment={name}").paper
    assert isinstance(paper.table, str) and paper.table
    assert paper.teacher_miou == teacher_miou
    got = {frozenset((k, str(v)) for k, v in e.items() if k != "miou"): e["miou"] for e in paper.results}
    assert len(got) == len(paper.results)  # no two entries for one group
    assert got == expected


@pytest.mark.parametrize("name", PAPER)
def test_paper_entries_name_axes_of_the_sweep(name):
    """`report` matches an entry to the jobs whose overrides equal its keys: each key is an axis, each value one
    of the axis's values exactly as it is written in a job's overrides."""
    cfg = compose_with_hydra(f"experiment={name}")
    sweep = axes(cfg)
    jobs = [set(job) for job in jobs_of(cfg)]
    for entry in cfg.paper.results:
        keys = {k: str(v) for k, v in entry.items() if k != "miou"}
        assert keys and all(k in sweep and v in sweep[k] for k, v in keys.items()), keys
        matched = [job for job in jobs if {f"{k}={v}" for k, v in keys.items()} <= job]
        assert len(matched) == 3  # one group: the three seeds


@pytest.mark.parametrize("name", PAPER)
def test_paper_experiment_has_the_paper_recipe(name, tmp_path):
    cfg = compose_train_cfg(tmp_path, [f"experiment={name}"])
    assert cfg.dataset.batch_size == 16 and cfg.optimizer.lr == 0.02 and cfg.optimizer.weight_decay == 1e-4
    assert cfg.trainer.max_steps == (80000 if name == "ade20k" else 40000)
    assert cfg.trainer.precision == "16-mixed" and cfg.trainer.devices == 1
    dataset = name if name in ("ade20k", "camvid", "voc") else "cityscapes"
    assert cfg.dataset.name == dataset
    # the paper's setting: CIRKD's networks, their released teacher and ImageNet files, CIRKD's inputs
    released = {"cityscapes": "citys", "camvid": "camvid", "voc": "voc", "ade20k": "ade20k"}[dataset]
    assert cfg.teacher.encoder_name == "tu-resnet101s" and cfg.teacher.decoder_channels == 256
    assert cfg.teacher.checkpoint == str(
        tmp_path / "weights" / f"deeplabv3_resnet101_{released}_best_model.pth"
    )
    assert cfg.student.encoder_name == "tu-resnet18" and cfg.student.stem_type == "deep"
    assert cfg.student.encoder_weights == str(tmp_path / "weights" / "resnet18-imagenet.pth")
    assert cfg.dataset.normalization == "caffe" and cfg.distillation.tse.min_kept_per_image == 25000
    # CamVid's published numbers are test-split numbers: it validates on test, and its paper block says so
    assert cfg.dataset.val_split == cfg.paper.split == ("test" if name == "camvid" else "val")
    assert cfg.trainer.val_check_interval == {"cityscapes": 1600, "ade20k": 8000}.get(dataset, 4000)
    ddp = compose_train_cfg(tmp_path, [f"experiment={name}", "trainer=ddp", "trainer.devices=4"])
    assert ddp.trainer.strategy == "ddp" and ddp.trainer.devices == 4  # the command line's trainer wins


def test_an_axis_on_the_command_line_replaces_the_files():
    """What the headers promise: `seed=1` (or `hydra.sweeper.params.seed=1`) restricts the sweep."""
    cfg = compose_with_hydra("experiment=cityscapes")
    assert len(jobs_of(cfg, "seed=1")) == 24
    assert len(jobs_of(cfg, "seed=1", "student=cirkd_deeplabv3_resnet18", "distillation=none,rdd")) == 2
    restricted = compose_with_hydra("experiment=cityscapes", "hydra.sweeper.params.seed=1")
    assert len(jobs_of(restricted)) == 24


# ------------------------------------------------------------------------------------------- Optuna search
def test_optuna_search_config():
    cfg = compose_with_hydra("hparams_search=rdd_optuna")
    sweeper = cfg.hydra.sweeper
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed is not None
    assert sweeper.n_trials >= 10 and sweeper.storage is None
    assert dict(sweeper.params) == {
        "distillation.tse.threshold": "interval(0.6, 0.85)",
        "distillation.switch.fraction": "choice(0.0, 0.1, 0.2, 0.3)",
    }


def test_optuna_database_storage_works(tmp_path):
    """optuna 2.10 (hydra-optuna-sweeper needs optuna<3) fails on SQLAlchemy 2 with a database storage
    (`hydra.sweeper.storage=sqlite:///...`): pyproject pins sqlalchemy<2."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials=1)
    assert len(optuna.load_study(storage=storage, study_name="s").trials) == 1


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
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


def tiny_teacher(ckpt: Path) -> list[str]:
    return ["teacher=resnet18", f"teacher.checkpoint={ckpt}"]


@pytest.mark.slow
@pytest.mark.parametrize("twin", [*TWINS, *STUDIES])
def test_twin_trains(twin, teacher_ckpt, tmp_path):
    """One job of each twin (one combination of its axes, applied as overrides) trains 2 steps on tiny data."""
    job = TWIN_JOB[twin]
    cfg = compose_with_hydra(f"experiment={twin}")
    sweep = axes(cfg)
    assert {o.split("=")[0] for o in job} == set(sweep) and all(
        o.split("=")[1] in sweep[o.split("=")[0]] for o in job
    )
    has_tse = OmegaConf.select(compose_with_hydra(f"experiment={twin}", *job), "distillation.tse") is not None
    extra = list(
        TINY_STEPS if has_tse else TINY_STEPS[:2]
    )  # tiny batches: a min_kept below their pixel count
    extra += SMALL_MEMORY if "distillation=cirkd_rdd" in job else []
    run_cfg = compose_train_cfg(
        tmp_path, [f"experiment={twin}", *TINY, *job, *tiny_teacher(teacher_ckpt), *extra]
    )
    results = run(run_cfg)
    assert results["global_step"] == 2 and results["task_name"] == twin and results["dataset"] == "synthetic"
    assert set(job) <= set(results["overrides"]) and results["best_val_miou"] is not None


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rdd_lightning.train", *args],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


def sweep_jobs(tmp_path: Path, task_name: str) -> tuple[Path, list[dict]]:
    (sweep_dir,) = (tmp_path / "logs" / task_name / "multiruns").iterdir()
    job_dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    return sweep_dir, [json.loads((d / "results.json").read_text()) for d in job_dirs]


@pytest.mark.slow
def test_experiment_alone_launches_its_multirun(teacher_ckpt, tmp_path):
    """`python -m rdd_lightning.train experiment=synthetic_ade20k` (no -m) runs the file's sweep; `seed=1` on the
    command line replaces the file's seed axis: two jobs, 0/ and 1/, one per method."""
    proc = run_cli(
        tmp_path, "experiment=synthetic_ade20k", "seed=1", *TINY, *tiny_teacher(teacher_ckpt), *TINY_STEPS[:2]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir, jobs = sweep_jobs(tmp_path, "synthetic_ade20k")
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()) == ["0", "1"]
    assert (sweep_dir / "multirun.yaml").is_file()
    assert [(j["distillation"], j["seed"], j["global_step"]) for j in jobs] == [("none", 1, 2), ("rdd", 1, 2)]


@pytest.mark.slow
def test_optuna_search_runs(teacher_ckpt, tmp_path):
    """A 2-trial search on tiny data: each trial a job, the sweeper reads best_val_miou back from the task."""
    proc = run_cli(
        tmp_path,
        "hparams_search=rdd_optuna",
        "hydra.sweeper.n_trials=2",
        "task_name=optuna",
        *TINY,
        *tiny_teacher(teacher_ckpt),
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
        "distillation.tse.min_kept=100",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir, jobs = sweep_jobs(tmp_path, "optuna")
    assert len(jobs) == 2
    for job in jobs:
        params = dict(o.split("=", 1) for o in job["overrides"])
        assert 0.6 <= float(params["distillation.tse.threshold"]) <= 0.85
        assert params["distillation.switch.fraction"] in ("0.0", "0.1", "0.2", "0.3")
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(j["best_val_miou"] for j in jobs))
    assert set(best["best_params"]) == {"distillation.tse.threshold", "distillation.switch.fraction"}
