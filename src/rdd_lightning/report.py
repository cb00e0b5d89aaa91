"""Tables from ``results.json`` files: ``python -m rdd_lightning.report [RUN_DIR ...] [--latest DIR]``.

Each distillation run is shown with its teacher (found through the run's ``teacher_checkpoint``: the
teacher's own run directory holds its ``results.json``). A run of ``rdd_lightning.evaluate`` is shown as one
``eval <dataset>/<split>`` row (its mIoU in both mIoU columns). Nothing here parses logs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def load_results(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a finished run directory?")
    return json.loads(path.read_text())


def teacher_results(results: dict[str, Any]) -> dict[str, Any] | None:
    """The results of the run that produced ``results``' teacher checkpoint, when they can be found."""
    ckpt = results.get("teacher_checkpoint")
    if not ckpt:
        return None
    ckpt = Path(ckpt)
    for run_dir in (ckpt.parent / "run", ckpt.parent.parent):  # auto-teacher cache, or <run>/checkpoints/
        if (run_dir / "results.json").is_file():
            return load_results(run_dir)
    return None


def row(role: str, results: dict[str, Any]) -> list[str]:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    if "mIoU" in results:  # an evaluate run: one measurement of one checkpoint
        network = results.get("network") or {}
        return [
            f"eval {results.get('dataset', '?')}/{results.get('split', '?')}",
            str(network.get("encoder_name", "?")),
            "-",
            str(results.get("checkpoint_global_step", "?")),
            pct(results["mIoU"]),
            pct(results["mIoU"]),
            f"{results.get('wall_time_s', 0):.0f}",
        ]
    choices = results.get("choices", {})
    return [
        role,
        str(choices.get("student", "?")),
        str(results.get("distillation", "?")),
        str(results.get("global_step", "?")),
        pct(results.get("best_val_miou")),
        pct(results.get("final_val_miou")),
        f"{results.get('wall_time_s', 0):.0f}",
    ]


def markdown_table(rows: list[list[str]]) -> str:
    header = ["role", "network", "distillation", "steps", "best mIoU", "final mIoU", "time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def latest_run(folder: str | Path) -> Path:
    runs = sorted(p.parent for p in Path(folder).glob("*/results.json"))
    if not runs:
        raise FileNotFoundError(f"no finished run (a results.json) under {folder}")
    return runs[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="run directories holding results.json")
    parser.add_argument("--latest", metavar="DIR", help="add the newest finished run under DIR")
    args = parser.parse_args(argv)
    run_dirs = [Path(r) for r in args.runs]
    try:
        if args.latest:
            run_dirs.append(latest_run(args.latest))
        if not run_dirs:
            parser.error("give run directories or --latest DIR")
        rows = []
        for run_dir in run_dirs:
            results = load_results(run_dir)
            teacher = teacher_results(results)
            if teacher is not None:
                rows.append(row("teacher", teacher))
            rows.append(row("student" if results.get("teacher_checkpoint") else "network", results))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
