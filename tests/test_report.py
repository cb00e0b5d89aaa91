"""report: jobs found under sweeps, grouped over seeds, mean ± sample std, teacher and paper numbers,
incomplete jobs, the output formats and the plot; one real multirun end to end."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from rdd_lightning.errors import ConfigError
from rdd_lightning.report import (
    ResultsFileError,
    build_report,
    discover_jobs,
    group_key,
    load_results,
    main,
    paper_entry,
    plot_groups,
    read_metrics,
)
from tests.conftest import TINY, cli_env

SHARED = ["experiment=cityscapes", "trainer.max_steps=100"]
PAPER = {
    "table": "Table 2 (Cityscapes val)",
    "teacher_miou": 78.07,
    "results": [
        {"student": "resnet18", "distillation": "none", "miou": 74.21},
        {"student": "resnet18", "distillation": "kd", "teacher": "resnet50", "miou": 75.0},
    ],
}


def write_run(folder: Path, **results) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def write_job(folder: Path, overrides: list[str], miou: float, **extra) -> Path:
    """A finished job of a multirun: ``.hydra/overrides.yaml`` and ``results.json``."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    seed = next((int(o.split("=")[1]) for o in overrides if o.startswith("seed=")), 42)
    results = {
        "overrides": overrides,
        "seed": seed,
        "best_val_miou": miou,
        "final_val_miou": miou - 1,
        "distillation": "none",
        "choices": {"student": "resnet18"},
        "wall_time_s": 10.0,
        **extra,
    }
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A hand-made sweep: ``distillation=none`` over seeds 1..3 (mIoU 70, 72, 77; the third job also
    changes keys that do not define the experiment), ``distillation=kd`` once (60), and job 4 that never
    finished."""
    root = tmp_path / "multiruns" / "2026-01-01_00-00-00"
    none = ["student=resnet18", "distillation=none", *SHARED]
    compute = {
        "wall_time_s": 100.0,
        "device_hours": 0.5,
        "train_images_per_s": 20.0,
        "peak_memory_mb": 1000.0,
    }
    write_job(root / "0", [*none, "seed=1"], 70.0, paper=PAPER, teacher_val_miou=78.0, compute=compute)
    write_job(
        root / "1",
        [*none, "seed=2"],
        72.0,
        paper=PAPER,
        teacher_val_miou=79.0,
        compute={**compute, "wall_time_s": 200.0, "peak_memory_mb": 3000.0},
    )
    write_job(
        root / "2",
        [
            *none,
            "seed=3",
            "trainer.devices=4",
            "paths.log_dir=/elsewhere",
            "ckpt_path=last",
            "hydra.job.name=x",
            "logger=wandb",
        ],
        77.0,
        paper=PAPER,
        compute={**compute, "wall_time_s": 300.0, "train_images_per_s": 50.0},
    )
    write_job(root / "3", ["student=resnet18", "distillation=kd", *SHARED, "seed=1"], 60.0, paper=PAPER)
    (root / "4" / ".hydra").mkdir(parents=True)
    overrides = ["student=resnet18", "distillation=kd", *SHARED, "seed=2"]
    (root / "4" / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def report_json(capsys, *args: str) -> dict:
    assert main([*args, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------- grouping
def test_group_key_drops_seed_and_keys_that_do_not_change_the_experiment():
    overrides = [
        "distillation=rdd",
        "seed=3",
        "++trainer.devices=2",
        "paths.log_dir=/x",
        "+logger=wandb",
        "ckpt_path=last",
        "task_name=t",
        "hydra.launcher.timeout_min=5",
        "trainer.num_nodes=2",
        "logger.wandb.project=p",
        "optimizer.lr=0.01",
        "trainer.max_steps=10",
        "~callbacks.difficulty_maps",
        "callbacks.difficulty_maps.indices=[0]",
    ]
    assert group_key(overrides) == ("distillation=rdd", "optimizer.lr=0.01", "trainer.max_steps=10")


def test_runs_differing_only_by_seed_form_one_group_with_mean_and_sample_std(sweep, capsys):
    report = report_json(capsys, str(sweep))
    groups = {g["group"]: g for g in report["groups"]}
    assert set(groups) == {"distillation=none", "distillation=kd"}  # labels without the shared overrides
    none = groups["distillation=none"]
    assert none["n"] == 3 and sorted(none["seeds"]) == [1, 2, 3]
    # 70, 72, 77: mean 73; deviations -3, -1, 4 -> squares 9 + 1 + 16 = 26, / (3 - 1) = 13
    assert none["miou_mean"] == pytest.approx(73.0)
    assert none["miou_std"] == pytest.approx(math.sqrt(13))  # 3.6056, the sample (ddof=1) std
    assert none["miou_best"] == 77.0
    kd = groups["distillation=kd"]
    assert (kd["n"], kd["miou_mean"], kd["miou_std"]) == (1, 60.0, None)
    assert report["shared_overrides"] == [
        "experiment=cityscapes",
        "student=resnet18",
        "trainer.max_steps=100",
    ]


def test_table_shows_mean_std_teacher_paper_and_title(sweep, capsys):
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "Table 2 (Cityscapes val)" in out  # the paper's table is the title
    rows = {
        line.split("│")[1].strip(): [c.strip() for c in line.split("│")[1:-1]]
        for line in out.splitlines()
        if line.startswith("│")
    }
    header = [c.strip() for c in next(ln for ln in out.splitlines() if ln.startswith("┃")).split("┃")[1:-1]]
    none = dict(zip(header, rows["distillation=none"], strict=True))
    kd = dict(zip(header, rows["distillation=kd"], strict=True))
    assert none["mIoU mean ± std"] == "73.00 ± 3.61" and kd["mIoU mean ± std"] == "60.00 ± -"
    assert none["teacher"] == "78.50"  # mean of the runs' teacher_val_miou (78, 79)
    assert none["paper"] == "74.21"  # entry {student: resnet18, distillation: none} matches
    assert kd["paper"] == "-"  # the kd entry also needs teacher=resnet50, which this group lacks
    # compute: mean wall time (100 + 200 + 300) / 3, device-hours 3 x 0.5, mean img/s (20 + 20 + 50) / 3, max MB
    assert (none["wall time (s)"], none["device-h"], none["img/s"], none["peak MB"]) == (
        "200",
        "1.500",
        "30.0",
        "3000",
    )
    assert kd["wall time (s)"] == "10" and kd["device-h"] == "-"  # an old results.json: top-level wall time


def test_incomplete_job_is_listed_with_its_overrides_and_state(sweep, capsys):
    (sweep / "5" / ".hydra").mkdir(parents=True)
    overrides = ["student=resnet18", "distillation=none", *SHARED, "seed=9"]
    (sweep / "5" / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (sweep / "5" / "checkpoints").mkdir()
    (sweep / "5" / "checkpoints" / "last.ckpt").write_bytes(b"")
    (sweep / "5" / "train.log").write_text("[INFO] - start\n[ERROR] - CUDA out of memory\n[INFO] - bye\n")
    incomplete = {Path(j["job"]).name: j for j in report_json(capsys, str(sweep))["incomplete"]}
    assert set(incomplete) == {"4", "5"}
    assert incomplete["4"]["overrides"] == ["student=resnet18", "distillation=kd", *SHARED, "seed=2"]
    assert incomplete["4"]["group"] == "distillation=kd seed=2"
    assert incomplete["4"]["state"] == "no checkpoint" and incomplete["4"]["error"] is None
    assert "resume with ckpt_path=last" in incomplete["5"]["state"]
    assert incomplete["5"]["error"] == "[ERROR] - CUDA out of memory"
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "incomplete or failed jobs" in out and "seed=9" in out


def test_group_key_ignores_order_and_spelling_of_the_overrides():
    """The same setting gives one key: any order, ``+``/``++`` dropped, numbers by value; strings as written."""
    one = ["seed=1", "optimizer.lr=1e-2", "++trainer.max_steps=100", "student=resnet18", "+flag=True"]
    other = ["student=resnet18", "flag=true", "trainer.max_steps=100.0", "seed=2", "optimizer.lr=0.010"]
    assert group_key(one) == group_key(other)
    assert group_key(one) == ("flag=true", "optimizer.lr=0.01", "student=resnet18", "trainer.max_steps=100")
    assert group_key(["distillation.tse.threshold=0.70"]) == group_key(["distillation.tse.threshold=0.7"])
    assert group_key(["name=abc"]) != group_key(["name=ABC"])  # strings stay strings
    assert group_key(["dataset.root='0.70'"]) == ("dataset.root='0.70'",)  # quoted: a string, not a number
    assert group_key(["~callbacks.early_stopping", "a=nan"]) == ("a=nan", "~callbacks.early_stopping")


def test_jobs_whose_overrides_differ_only_in_order_or_spelling_form_one_group(tmp_path, capsys):
    root = tmp_path / "multiruns" / "t"
    write_job(root / "0", ["dataset=camvid", "distillation=kd", "seed=1"], 70.0)
    write_job(root / "1", ["distillation=kd", "dataset=camvid", "seed=2"], 73.5)
    write_job(root / "2", ["+distillation.tse.threshold=0.70", "distillation=rdd", "seed=1"], 60.0)
    write_job(root / "3", ["distillation=rdd", "++distillation.tse.threshold=0.7", "seed=2"], 62.0)
    groups = {g["group"]: g for g in report_json(capsys, str(root))["groups"]}
    assert set(groups) == {  # labels: the overrides sorted by key, numbers in one spelling
        "dataset=camvid distillation=kd",
        "distillation=rdd distillation.tse.threshold=0.7",
    }
    kd = groups["dataset=camvid distillation=kd"]
    # 70 and 73.5: mean 71.75; deviations -1.75, 1.75 -> squares 3.0625 + 3.0625 = 6.125, / (2 - 1)
    assert (kd["n"], sorted(kd["seeds"])) == (2, [1, 2])
    assert kd["miou_mean"] == pytest.approx(71.75)
    assert kd["miou_std"] == pytest.approx(math.sqrt(6.125))  # 2.4749
    rdd = groups["distillation=rdd distillation.tse.threshold=0.7"]
    assert (rdd["n"], rdd["miou_mean"]) == (2, pytest.approx(61.0))
    assert rdd["overrides"] == ["distillation=rdd", "distillation.tse.threshold=0.7"]
    proc = subprocess.run(
        [sys.executable, "-m", "rdd_lightning.report", str(root), "--format", "markdown"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "| dataset=camvid distillation=kd | resnet18 | none | 2 | 71.75 ± 2.47 | 73.50 |" in proc.stdout


def test_paper_entry_matches_values_in_any_spelling(tmp_path, capsys):
    """``0.70`` on the command line matches the config's ``0.7``; ``True`` matches ``true``; ints by value."""
    entry = {"distillation": "rdd", "distillation.tse.threshold": 0.7, "miou": 61.5}
    paper = {"table": "T", "results": [entry, "not an entry", {"distillation": "rdd"}]}  # the bad two skipped
    assert paper_entry(paper, ("distillation.tse.threshold=0.70", "distillation=rdd")) == entry
    assert paper_entry(paper, ("distillation.tse.threshold=0.75", "distillation=rdd")) is None
    flags = {"results": [{"student.pretrained": True, "trainer.max_steps": 40000, "miou": 1.0}]}
    assert paper_entry(flags, ("student.pretrained=True", "trainer.max_steps=40000.0")) is not None
    write_job(
        tmp_path / "0", ["distillation=rdd", "distillation.tse.threshold=0.70", "seed=1"], 60.0, paper=paper
    )
    (group,) = report_json(capsys, str(tmp_path))["groups"]
    assert group["paper_miou"] == 61.5


def test_paper_entry_needs_every_key(tmp_path, capsys):
    paper = {"table": "T", "results": [{"student": "resnet18", "distillation": "none", "miou": 74.21}]}
    write_job(tmp_path / "a", ["student=resnet18", "distillation=none", "seed=1"], 70.0, paper=paper)
    write_job(tmp_path / "b", ["student=resnet18", "seed=1"], 71.0, paper=paper)  # no distillation override
    write_job(tmp_path / "c", ["student=mobilenet_v2", "distillation=none", "seed=1"], 72.0, paper=paper)
    papers = {tuple(g["overrides"]): g["paper_miou"] for g in report_json(capsys, str(tmp_path))["groups"]}
    assert papers == {
        ("distillation=none", "student=resnet18"): 74.21,  # sorted by key
        ("student=resnet18",): None,
        ("distillation=none", "student=mobilenet_v2"): None,
    }


def test_a_published_number_stands_only_beside_runs_of_its_split(tmp_path, capsys):
    """CamVid's published numbers are test-split numbers: runs validated on val (or that do not record their
    split) get no published number, the markdown cell says why; runs on test get it."""
    paper = {"table": "CamVid", "split": "test", "results": [{"distillation": "none", "miou": 66.92}]}
    for name, split in (("on_test", "test"), ("on_val", "val"), ("unrecorded", None)):
        extra = {"val_split": split} if split else {}
        write_job(
            tmp_path / name / "0",
            ["distillation=none", f"dataset.root=/{name}", "seed=1"],
            66.0,
            paper=paper,
            **extra,
        )
    groups = {g["overrides"][0]: g for g in report_json(capsys, str(tmp_path))["groups"]}  # sorted by key
    assert groups["dataset.root=/on_test"]["paper_miou"] == 66.92
    assert groups["dataset.root=/on_test"]["paper_split_mismatch"] is None
    assert groups["dataset.root=/on_val"]["paper_miou"] is None
    assert groups["dataset.root=/on_val"]["paper_split_mismatch"] == "published on test, runs on val"
    assert (
        groups["dataset.root=/unrecorded"]["paper_split_mismatch"] == "published on test, runs on unrecorded"
    )
    assert main([str(tmp_path), "--format", "markdown"]) == 0
    assert "| published on test, runs on val |" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- bad files
TRUNCATED = '{"overrides": ["distillation=kd", "seed=2"], "best_val'  # cut while writing, inside a key
BAD_FILES = {  # job: (results.json text, the problem the report shows)
    "2": (
        TRUNCATED,
        "bad results.json (not valid JSON (truncated or corrupt): Unterminated string starting at: line 1 "
        "column 46): move it aside",
    ),
    "3": ("", "bad results.json (empty file): move it aside"),
    "4": ("[70.0, 72.0]", "bad results.json (a JSON array, not an object): move it aside"),
    "5": (
        json.dumps({"seed": 5, "final_val_miou": 70.0}),
        "bad results.json (missing keys 'overrides', 'best_val_miou'): move it aside",
    ),
    "6": (
        json.dumps({"overrides": ["distillation=kd", "seed=6"], "best_val_miou": "high"}),
        'bad results.json (best_val_miou is "high", not a number): move it aside',
    ),
}


@pytest.fixture
def bad_sweep(tmp_path) -> Path:
    """Two good jobs (``distillation=kd`` 70, ``distillation=none`` 65; the kd one's teacher run has a corrupt
    results.json) and, for seeds 2..6 of ``distillation=kd``, one job per entry of :data:`BAD_FILES`; job 7's
    ``.hydra/overrides.yaml`` is not YAML."""
    root = tmp_path / "multiruns" / "t"
    teacher = tmp_path / "teacher"
    (teacher / "checkpoints").mkdir(parents=True)
    (teacher / "results.json").write_text('{"best_val_miou": 8')
    ckpt = str(teacher / "checkpoints" / "best.ckpt")
    write_job(root / "0", ["distillation=kd", "seed=1"], 70.0, teacher_checkpoint=ckpt)
    write_job(root / "1", ["distillation=none", "seed=1"], 65.0)
    for job, (text, _) in BAD_FILES.items():
        write_job(root / job, ["distillation=kd", f"seed={job}"], 1.0)
        (root / job / "results.json").write_text(text)
    (root / "7" / ".hydra").mkdir(parents=True)
    (root / "7" / ".hydra" / "overrides.yaml").write_text("- [unclosed\n")
    return root


def test_bad_results_files_are_listed_with_their_reason_and_the_other_jobs_reported(bad_sweep, capsys):
    report = report_json(capsys, str(bad_sweep))
    groups = {g["group"]: g for g in report["groups"]}
    assert set(groups) == {"distillation=kd", "distillation=none"}
    assert (groups["distillation=kd"]["n"], groups["distillation=kd"]["miou_mean"]) == (1, 70.0)
    assert groups["distillation=kd"]["teacher_miou"] is None  # its teacher's results.json is corrupt
    assert (groups["distillation=none"]["n"], groups["distillation=none"]["miou_mean"]) == (1, 65.0)
    listed = {Path(j["job"]).name: j for j in report["incomplete"]}
    assert set(listed) == {*BAD_FILES, "7"}
    for job, (_, problem) in BAD_FILES.items():
        assert listed[job]["problem"] == problem
        assert listed[job]["state"] == f"{problem}; no checkpoint"
        assert listed[job]["group"] == f"distillation=kd seed={job}"  # overrides from .hydra/overrides.yaml
    assert listed["7"]["problem"].startswith("bad .hydra/overrides.yaml (while parsing a flow sequence")
    assert listed["7"]["problem"].endswith("): overrides unknown") and listed["7"]["overrides"] == []


def test_report_cli_with_bad_results_files_prints_the_table_and_exits_0(bad_sweep):
    proc = subprocess.run(
        [sys.executable, "-m", "rdd_lightning.report", str(bad_sweep), "--format", "markdown"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "note: 6 job(s) with a bad file, listed with the incomplete or failed jobs\n"
    lines = proc.stdout.splitlines()
    assert "| distillation=kd | resnet18 | none | 1 | 70.00 ± - | 70.00 | 10 |" in lines
    assert "| distillation=none | resnet18 | none | 1 | 65.00 ± - | 65.00 | 10 |" in lines
    assert "**incomplete or failed jobs (no usable results.json)**" in lines
    for job, (_, problem) in BAD_FILES.items():
        assert f"| {bad_sweep / job} | distillation=kd seed={job} | {problem}; no checkpoint |" in lines
    table = subprocess.run(
        [sys.executable, "-m", "rdd_lightning.report", str(bad_sweep)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert table.returncode == 0 and "incomplete or failed jobs (no usable results.json)" in table.stdout
    assert "distillation=none" in table.stdout and "65.00 ± -" in table.stdout


def test_a_bad_results_file_of_a_resumed_run_says_to_move_it_aside_then_resume(bad_sweep, capsys):
    (bad_sweep / "3" / "checkpoints").mkdir()
    (bad_sweep / "3" / "checkpoints" / "last.ckpt").write_bytes(b"")
    (bad_sweep / "3" / "train.log").write_text("[INFO] - start\n[ERROR] - failed: OSError: No space left\n")
    listed = {Path(j["job"]).name: j for j in report_json(capsys, str(bad_sweep))["incomplete"]}
    assert listed["3"]["state"] == (
        "bad results.json (empty file): move it aside; last.ckpt present: resume with ckpt_path=last"
    )
    assert listed["3"]["error"] == "[ERROR] - failed: OSError: No space left"
    assert main([str(bad_sweep), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["kind"] for r in rows].count("incomplete") == 6 and [r["kind"] for r in rows].count(
        "group"
    ) == 2


def test_only_bad_results_files_is_still_a_report(tmp_path, capsys):
    write_run(tmp_path / "run", overrides=["seed=1"])  # no best_val_miou
    assert main([str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert "missing key 'best_val_miou'" in out and err.startswith("note: 1 job(s) with a bad file")


def test_load_results_of_a_bad_file_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "results.json").write_text(TRUNCATED)
    with pytest.raises(ResultsFileError) as caught:
        load_results(tmp_path)
    assert isinstance(caught.value, ConfigError) and "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"{tmp_path / 'results.json'}: not valid JSON (truncated or corrupt)")
    assert str(caught.value).endswith("move it aside and rerun (or resume) the run that wrote it")
    (tmp_path / "results.json").write_text('"text"')
    with pytest.raises(ResultsFileError, match="a JSON string, not an object"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text("{}")
    assert load_results(tmp_path) == {}  # partial objects are the caller's to judge


# ---------------------------------------------------------------------------------------------- formats
def test_markdown_output(sweep, capsys):
    assert main([str(sweep), "--format", "markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[2 : lines.index("", 2)]  # the group table: from its header to the blank line after it
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows = {
        r[0]: dict(zip(header, r, strict=True))
        for r in ([c.strip() for c in line.strip("|").split("|")] for line in table[1:])
    }
    assert rows["distillation=none"]["mIoU mean ± std"] == "73.00 ± 3.61"
    assert rows["distillation=none"]["n"] == "3" and rows["distillation=kd"]["best"] == "60.00"
    assert lines[0] == "**Table 2 (Cityscapes val)**" and "|---|" in lines[3]
    assert "**incomplete or failed jobs (no results.json)**" in lines
    assert f"| {sweep / '4'} | distillation=kd seed=2 | no checkpoint |" in lines


def test_csv_output(sweep, capsys):
    assert main([str(sweep), "--format", "csv"]) == 0
    header, *rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    by_group = {r[header.index("group")]: dict(zip(header, r, strict=True)) for r in rows}
    none = by_group["distillation=none"]
    assert none["kind"] == "group" and float(none["miou_mean"]) == pytest.approx(73.0)
    assert float(none["miou_std"]) == pytest.approx(3.605551, abs=1e-6)
    assert float(none["paper_miou"]) == 74.21 and by_group["distillation=kd"]["miou_std"] == ""
    assert [r["kind"] for r in by_group.values()].count("incomplete") == 1


def test_json_output_lists_groups_and_incomplete_jobs(sweep, capsys):
    report = report_json(capsys, str(sweep))
    assert report["title"] == "Table 2 (Cityscapes val)"
    assert sorted(g["n"] for g in report["groups"]) == [1, 3]
    assert [Path(j["job"]).name for j in report["incomplete"]] == ["4"]


def test_glob_and_several_paths_find_each_job_once(sweep, capsys):
    report = report_json(capsys, str(sweep.parent / "*"), str(sweep / "0"))
    assert sum(g["n"] for g in report["groups"]) == 4 and len(report["incomplete"]) == 1


def test_nothing_found_is_exit_2_with_one_error_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith("error: no results.json")
    assert main([str(tmp_path / "nope*")]) == 2
    assert "matches no file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- plot
def test_plot_has_a_bar_per_group_dots_per_run_and_paper_marker(sweep, tmp_path, capsys):
    report = build_report(discover_jobs([sweep]))
    fig = plot_groups(report.groups)
    ax = fig.axes[0]
    assert len(ax.patches) == 2  # one bar per group
    assert [p.get_height() for p in ax.patches] == pytest.approx([73.0, 60.0])
    labels = ax.get_legend_handles_labels()[1]
    assert "paper" in labels and "teacher" in labels and "runs (seeds)" in labels
    out = tmp_path / "plot.png"
    assert main([str(sweep), "--plot", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0


def test_read_metrics(tmp_path):
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text(
        "epoch,step,train/loss,val/mIoU\n0,0,3.5,\n0,0,,1.25\n0,1,3.0,\n0,1,,2.5\n"
    )
    assert read_metrics(tmp_path) == {"train/loss": [(0, 3.5), (1, 3.0)], "val/mIoU": [(0, 1.25), (1, 2.5)]}
    assert read_metrics(tmp_path / "csv" / "nothing") == {}


# ---------------------------------------------------------------------------------------------- single runs
def test_single_run_with_teacher_found_through_its_checkpoint(tmp_path, capsys):
    teacher = tmp_path / "teacher" / "runs" / "t1"
    write_run(
        teacher,
        choices={"student": "resnet34"},
        distillation="none",
        global_step=400,
        best_val_miou=50.0,
        final_val_miou=49.5,
        wall_time_s=300,
    )
    (teacher / "checkpoints").mkdir()
    student = tmp_path / "demo" / "runs" / "s1"
    write_run(
        student,
        choices={"student": "resnet18_scratch"},
        distillation="kd",
        global_step=200,
        best_val_miou=40.0,
        final_val_miou=39.0,
        wall_time_s=200,
        overrides=["task_name=demo"],
        teacher_checkpoint=str(teacher / "checkpoints" / "best.ckpt"),
    )
    (group,) = report_json(capsys, "--latest", str(tmp_path / "demo" / "runs"))["groups"]
    assert (group["group"], group["network"], group["distillation"]) == ("defaults", "resnet18_scratch", "kd")
    assert (group["n"], group["miou_mean"], group["miou_std"], group["teacher_miou"]) == (1, 40.0, None, 50.0)
    assert main(["--latest", str(tmp_path / "demo" / "runs")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "defaults" in line)
    assert [c.strip() for c in row.split("│")[1:-1]][:7] == [
        "defaults",
        "resnet18_scratch",
        "kd",
        "1",
        "40.00 ± -",
        "40.00",
        "50.00",
    ]


def test_report_without_runs(tmp_path, capsys):
    assert main(["--latest", str(tmp_path)]) == 2
    assert "no finished run" in capsys.readouterr().err


def test_report_shows_an_evaluate_run(tmp_path, capsys):
    run = tmp_path / "evaluate" / "runs" / "e1"
    write_run(
        run,
        network={"encoder_name": "resnet18"},
        dataset="camvid",
        split="test",
        checkpoint_global_step=40000,
        mIoU=68.5,
        aAcc=92.0,
        wall_time_s=60,
    )
    assert main([str(run), "--format", "markdown"]) == 0
    assert f"| eval camvid/test | resnet18 | 40000 | 68.50 | 60 | {run} |" in capsys.readouterr().out
    report = report_json(capsys, str(run))
    assert report["groups"] == [] and report["evaluations"][0]["miou"] == 68.5


# ---------------------------------------------------------------------------------------------- end to end
def run_tiny_sweep(folder: Path) -> Path:
    """A real 3 x 2 multirun of tiny ``distillation=none`` runs: ``optimizer.lr=0.01,0.02`` train, the
    ``optimizer.lr=-1`` jobs fail the option checks after Hydra made their directories (each job fails, the
    sweep goes on), seeds 1 and 2. Returns the sweep directory."""
    sweep_dir = folder / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rdd_lightning.train",
            "-m",
            *TINY,
            "distillation=none",
            "student=resnet18_scratch",
            "trainer.max_steps=2",
            "trainer.val_check_interval=1",
            "optimizer.lr=0.01,0.02,-1",
            "seed=1,2",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=folder,
        env=cli_env(folder),
        capture_output=True,
        text=True,
        timeout=300,
    )
    bad_rate = "error: optimizer.lr=-1: out of range; set optimizer.lr to a number > 0"
    assert proc.returncode != 0 and proc.stderr.count(bad_rate) == 2, proc.stderr[-3000:]
    assert sorted(p.parent.name for p in sweep_dir.glob("*/results.json")) == ["0", "1", "2", "3"]
    return sweep_dir


@pytest.mark.slow
def test_report_of_a_real_sweep_with_a_failed_setting(tmp_path):
    sweep_dir = run_tiny_sweep(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "rdd_lightning.report", str(sweep_dir), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    groups = {g["group"]: g for g in report["groups"]}
    assert set(groups) == {"optimizer.lr=0.01", "optimizer.lr=0.02"}
    for group, jobs in (("optimizer.lr=0.01", ["0", "1"]), ("optimizer.lr=0.02", ["2", "3"])):
        mious = [json.loads((sweep_dir / j / "results.json").read_text())["best_val_miou"] for j in jobs]
        assert groups[group]["n"] == 2 and sorted(groups[group]["seeds"]) == [1, 2]
        assert groups[group]["miou_mean"] == pytest.approx((mious[0] + mious[1]) / 2)
        assert groups[group]["miou_std"] == pytest.approx(abs(mious[0] - mious[1]) / math.sqrt(2))
        assert groups[group]["miou_std"] == pytest.approx(statistics.stdev(mious))
    failed = {Path(j["job"]).name: j for j in report["incomplete"]}
    assert set(failed) == {"4", "5"}
    assert failed["4"]["group"] == "optimizer.lr=-1 seed=1" and failed["4"]["state"] == "no checkpoint"
    assert "optimizer.lr=-1: out of range" in failed["4"]["error"]  # the job's own log says why it failed
