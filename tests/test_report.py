"""report: tables from results.json, teacher found through the student's teacher_checkpoint."""

from __future__ import annotations

import json

from rdd_lightning.report import main


def write_run(folder, **results):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))


def test_report_shows_teacher_and_student(tmp_path, capsys):
    teacher = tmp_path / "teacher" / "runs" / "t1"
    write_run(teacher, choices={"student": "resnet34"}, distillation="none", global_step=400,
              best_val_miou=50.0, final_val_miou=49.5, wall_time_s=300)  # fmt: skip
    (teacher / "checkpoints").mkdir()
    student = tmp_path / "demo" / "runs" / "s1"
    write_run(student, choices={"student": "resnet18_scratch"}, distillation="kd", global_step=200,
              best_val_miou=40.0, final_val_miou=39.0, wall_time_s=200,
              teacher_checkpoint=str(teacher / "checkpoints" / "best.ckpt"))  # fmt: skip
    assert main(["--latest", str(tmp_path / "demo" / "runs")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith("| teacher | resnet34 | none | 400 | 50.00 | 49.50 |")
    assert out[3].startswith("| student | resnet18_scratch | kd | 200 | 40.00 | 39.00 |")


def test_report_without_runs(tmp_path, capsys):
    assert main(["--latest", str(tmp_path)]) == 2
    assert "no finished run" in capsys.readouterr().err


def test_report_shows_an_evaluate_run(tmp_path, capsys):
    run = tmp_path / "evaluate" / "runs" / "e1"
    write_run(run, network={"encoder_name": "resnet18"}, dataset="camvid", split="test",
              checkpoint_global_step=40000, mIoU=68.5, aAcc=92.0, wall_time_s=60)  # fmt: skip
    assert main([str(run)]) == 0
    assert "| eval camvid/test | resnet18 | - | 40000 | 68.50 | 68.50 | 60 |" in capsys.readouterr().out
