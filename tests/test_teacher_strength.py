"""benchmarks/teacher_strength.py: the teacher-strength study's bookkeeping (which seeds still run, the paired
RDD - KD, the share of pixels hard for both) and one real, tiny study end to end, stopped and started again."""

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, cli_env

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "teacher_strength", REPO / "benchmarks" / "teacher_strength.py"
)
ts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ts)


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    names = sorted({k for r in rows for k in r})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)


def _result(
    root: Path, group: str, seed: int, miou: float, teacher: float | None = 40.0, attempt: int = 0
) -> Path:
    run = root / group / f"attempt{attempt}" / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "results.json").write_text(
        json.dumps({"seed": seed, "best_val_miou": miou, "teacher_val_miou": teacher, "output_dir": str(run)})
    )
    return run


def test_hard_for_both_follows_from_the_logged_fractions_of_the_tse_steps_only(tmp_path):
    tse = "train/tse_{}_fraction"
    _write_csv(
        tmp_path / "csv" / "metrics.csv",
        [
            {"step": 1, "train/rdd_stage": 0.0, tse.format("selected"): 0.9},  # TFE step: not counted
            {
                "step": 3,
                "train/rdd_stage": 1.0,
                tse.format("student_hard"): 0.5,
                tse.format("teacher_hard"): 0.4,
                tse.format("selected"): 0.3,
            },
            {
                "step": 5,
                "train/rdd_stage": 1.0,
                tse.format("student_hard"): 0.3,
                tse.format("teacher_hard"): 0.2,
                tse.format("selected"): 0.1,
            },
            {"step": 5, "val/mIoU": 12.0},
        ],
    )
    # means over steps 3 and 5: student 0.4, teacher 0.3, selected 0.2
    # XOR selects s + t - 2 both -> both = (0.4 + 0.3 - 0.2) / 2; OR selects s + t - both -> both = 0.5
    xor = ts.tse_fractions(tmp_path, "xor")
    assert xor == pytest.approx(
        {"student_hard": 0.4, "teacher_hard": 0.3, "both_hard": 0.25, "selected": 0.2}
    )
    assert ts.tse_fractions(tmp_path, "or")["both_hard"] == pytest.approx(0.5)
    assert ts.tse_fractions(tmp_path / "nothing", "xor") is None


def test_rdd_minus_kd_pairs_the_seeds_both_methods_finished(tmp_path):
    for seed, miou in {1: 30.0, 2: 31.0, 3: 29.0}.items():
        _result(tmp_path, "none", seed, miou - 4, teacher=None)
        _result(tmp_path, "T10_kd", seed, miou)
    for seed, miou in {1: 32.0, 3: 28.0, 4: 50.0}.items():  # seed 2 not done, seed 4 has no KD twin
        _result(tmp_path, "T10_rdd_xor", seed, miou)
    groups = ts.plan([10], [])
    summary = ts.summarise(tmp_path, groups)
    assert summary["student_alone"] == pytest.approx({"mean": 26.0, "std": 1.0, "n": 3})
    rows = {r["group"]: r for r in summary["rows"]}
    assert set(rows) == {"T10_kd", "T10_rdd_xor"}  # no run of rdd_or yet: no row
    xor = rows["T10_rdd_xor"]
    # pairs: seed 1: 32 - 30 = +2, seed 3: 28 - 29 = -1 -> mean 0.5, sample std sqrt(((1.5)^2 + (1.5)^2) / 1)
    assert (xor["minus_kd_n"], xor["minus_kd_mean"]) == (2, pytest.approx(0.5))
    assert xor["minus_kd_std"] == pytest.approx(2.1213203)
    assert (xor["n"], xor["miou_mean"]) == (3, pytest.approx(110 / 3))  # its own mean keeps every seed
    # 32, 28, 50: deviations -14/3, -26/3, +40/3 -> std sqrt((196 + 676 + 1600) / 9 / 2) = 11.72
    assert "| 10 | 40.00 | +14.00 | rdd_xor | 3 | 36.67 ± 11.72 | +0.50 ± 2.12 |" in ts.markdown(summary)


def test_a_group_runs_only_its_missing_seeds_in_a_new_attempt_folder(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ts.subprocess, "run", lambda command, **kw: calls.append(command))
    _result(tmp_path, "T10_kd", 2, 30.0)
    (tmp_path / "T10_kd" / "attempt1" / "seed3").mkdir(parents=True)  # a killed job: no results.json
    ts.run_group(tmp_path, "T10_kd", ["distillation=kd"], [1, 2, 3], dry_run=False, extra=["a.b=1"])
    (command,) = calls
    assert "seed=1,3" in command and f"hydra.sweep.dir={tmp_path / 'T10_kd' / 'attempt2'}" in command
    assert command.index("distillation=kd") < command.index("a.b=1")  # the user's overrides come last
    _result(tmp_path, "T10_kd", 1, 30.0, attempt=2)
    _result(tmp_path, "T10_kd", 3, 30.0, attempt=2)
    ts.run_group(tmp_path, "T10_kd", ["distillation=kd"], [1, 2, 3], dry_run=False)
    assert len(calls) == 1  # all done: nothing runs


def test_teacher_overrides_select_a_recipe_of_their_own_and_the_demo_teacher_as_it_is():
    assert ts.teacher_overrides(ts.DEMO_TEACHER_STEPS) == []
    assert ts.teacher_overrides(1600) == [
        "teacher.auto_overrides=['trainer.max_steps=1600','trainer.val_check_interval=200']"
    ]
    assert ts.teacher_overrides(150, ["x=1"]) == [
        "teacher.auto_overrides=['trainer.max_steps=150','trainer.val_check_interval=150','x=1']"
    ]


@pytest.mark.slow
def test_a_tiny_study_runs_end_to_end_and_resumes(tmp_path):
    """Two auto-teachers (2 and 3 steps) x kd / rdd xor / rdd or x one seed, plus the student alone: real runs of
    ``python -m rdd_lightning.train``; then one result is deleted and the study started again."""
    root, png = tmp_path / "study", tmp_path / "docs" / "strength.png"
    student = [o for o in TINY if "difficulty_maps" not in o and "progress_bar" not in o]
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "teacher_strength.py"),
        "--teacher-steps",
        "2",
        "3",
        "--seeds",
        "1",
        "--no-sensitivity",
        "--root",
        str(root),
        "--plot",
        str(png),
        "--override",
        *student,
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "--teacher-override",
        "trainer.accelerator=cpu",
        "~callbacks.progress_bar",
    ]

    def study() -> str:
        proc = subprocess.run(
            command, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    out = study()
    teachers = sorted((tmp_path / "cache" / "teachers").glob("*/teacher.ckpt"))
    assert len(teachers) == 2  # one auto-teacher per strength, trained once, used by its three groups
    summary = json.loads((root / "teacher_strength.json").read_text())
    rows = {r["group"]: r for r in summary["rows"]}
    assert set(rows) == {f"T{s}_{m}" for s in (2, 3) for m in ("kd", "rdd_xor", "rdd_or")}
    results = {g: json.loads(next((root / g).glob("attempt*/seed1/results.json")).read_text()) for g in rows}
    for steps in (2, 3):
        used = {results[f"T{steps}_{m}"]["teacher_checkpoint"] for m in ("kd", "rdd_xor", "rdd_or")}
        assert (
            len(used) == 1
            and rows[f"T{steps}_kd"]["teacher_miou"] == results[f"T{steps}_kd"]["teacher_val_miou"]
        )
        for method in ("rdd_xor", "rdd_or"):
            diff = results[f"T{steps}_{method}"]["best_val_miou"] - results[f"T{steps}_kd"]["best_val_miou"]
            assert rows[f"T{steps}_{method}"]["minus_kd_mean"] == pytest.approx(diff)
            assert rows[f"T{steps}_{method}"]["tse"] is not None  # TSE steps were logged and read
        assert rows[f"T{steps}_kd"]["tse"] is None
    assert results["T2_rdd_or"]["teacher_checkpoint"] != results["T3_rdd_or"]["teacher_checkpoint"]
    assert "| rdd_or | 1 |" in out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    (root / "T3_rdd_or" / "attempt0" / "seed1" / "results.json").unlink()  # as if killed before its end
    out = study()
    assert "T3_rdd_or: seeds [1]" in out and out.count("seeds [") == 1  # nothing else ran again
    assert (root / "T3_rdd_or" / "attempt1" / "seed1" / "results.json").is_file()
