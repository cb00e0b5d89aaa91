"""Where does RDD start to pay off? The same student distilled with KD, RDD (XOR) and RDD (OR) from teachers of
increasing strength, on the synthetic data.

Usage::

    python benchmarks/teacher_strength.py [--teacher-steps 150 400 1600 3200] [--seeds 1 2 3] [--root DIR]
        [--plot docs/teacher_strength.png] [--no-sensitivity] [--report-only] [--dry-run]
        [--override KEY=VALUE ...] [--teacher-override KEY=VALUE ...]

Teachers: the demo's auto-teacher (DeepLabV3-ResNet34, ``experiment=synthetic_teacher``) trained for each of
``--teacher-steps`` iterations (400 is the demo's own, cached teacher; the others are trained once and cached the
same way, through ``teacher.auto_overrides``). Student: the demo's (DeepLabV3-ResNet18 from scratch, the demo's
recipe of 200 iterations). Runs per teacher and seed: ``distillation=kd``, ``distillation=rdd`` (XOR, the
default) and ``distillation=rdd distillation.tse.mode=or``; once, without a teacher, ``distillation=none`` (the
student's own mIoU, to which the teacher - student gap refers). At the weakest and the strongest teacher also RDD
with ``distillation.tse.threshold`` 0.6 and 0.8 and ``distillation.tse.min_kept`` 1000 and 10000 (the demo's
defaults: 0.7 and 3000), unless ``--no-sensitivity``; the report also shows such runs of any other teacher of
``--teacher-steps`` found under ``--root`` (an earlier study's strongest, say).

Time on 2 idle CPU cores: ~50 s a student run, 63 runs, plus the teachers once (~20 min together), ~1.5 h.

Every job is an ordinary run of ``python -m rdd_lightning.train`` (a multirun over the seeds still missing) in
``<root>/<group>/attempt<n>/seed<seed>/``; a finished job (its ``results.json``) is never run again, so the
study can be stopped and started again (a new attempt folder takes the missing seeds). Nothing is tuned.

Reported per teacher: the teacher's validation mIoU (measured by each run), the student's best validation mIoU
under each method (mean ± sample std over seeds), RDD − KD per seed (the same seed gives both methods the same
data order) as mean ± std, and what TSE-RDD selected while training: the mean over the TSE steps (the CSV log,
every ``trainer.log_every_n_steps``) of the fraction of valid pixels hard for the student, for the teacher, for
both, and selected. The share hard for both follows from the logged fractions: XOR selects ``s + t − 2·both``,
OR ``s + t − both``. The plot draws RDD − KD against the teacher − student gap.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rdd_lightning.report import load_results, markdown_table, read_metrics

DEMO_TEACHER_STEPS = 400  # experiment=synthetic_teacher's trainer.max_steps: the cached demo teacher
MAIN = {
    "kd": ["distillation=kd"],
    "rdd_xor": ["distillation=rdd"],
    "rdd_or": ["distillation=rdd", "distillation.tse.mode=or"],
}
SENSITIVITY = {
    "rdd_threshold0.6": ["distillation=rdd", "distillation.tse.threshold=0.6"],
    "rdd_threshold0.8": ["distillation=rdd", "distillation.tse.threshold=0.8"],
    "rdd_min_kept1000": ["distillation=rdd", "distillation.tse.min_kept=1000"],
    "rdd_min_kept10000": ["distillation=rdd", "distillation.tse.min_kept=10000"],
}
QUIET = ["trainer.enable_progress_bar=false", "~callbacks.difficulty_maps"]


def teacher_overrides(steps: int, extra: list[str] = ()) -> list[str]:
    """The overrides that select the auto-teacher trained for ``steps`` iterations (``extra``: more overrides of
    the teacher's training command)."""
    if steps == DEMO_TEACHER_STEPS and not extra:
        return []  # the demo's cached teacher (its cache key has no extra overrides)
    recipe = [f"trainer.max_steps={steps}", f"trainer.val_check_interval={min(steps, 200)}", *extra]
    return ["teacher.auto_overrides=[" + ",".join(f"'{o}'" for o in recipe) + "]"]


def plan(
    teacher_steps: list[int], sensitivity_steps: list[int], teacher_extra: list[str] = ()
) -> list[tuple[str, int | None, list[str]]]:
    """``(group, teacher steps or None, overrides)`` of every group, in the order they run: the student alone,
    kd / rdd_xor / rdd_or per teacher, then the threshold / min_kept runs at each of ``sensitivity_steps``."""
    groups: list[tuple[str, int | None, list[str]]] = [("none", None, ["distillation=none"])]
    for steps in teacher_steps:
        teacher = teacher_overrides(steps, teacher_extra)
        groups += [(f"T{steps}_{name}", steps, [*o, *teacher]) for name, o in MAIN.items()]
    for steps in sensitivity_steps:
        teacher = teacher_overrides(steps, teacher_extra)
        groups += [(f"T{steps}_{name}", steps, [*o, *teacher]) for name, o in SENSITIVITY.items()]
    return groups


def finished(root: Path, group: str) -> dict[int, Path]:
    """``{seed: results.json}`` of the finished jobs of ``group`` (over all its attempts)."""
    done: dict[int, Path] = {}
    for path in sorted((root / group).glob("attempt*/seed*/results.json")):
        done.setdefault(int(path.parent.name.removeprefix("seed")), path)
    return done


def run_group(
    root: Path, group: str, overrides: list[str], seeds: list[int], dry_run: bool, extra: list[str] = ()
) -> None:
    """Run the seeds of ``group`` that have no ``results.json`` yet, as one multirun in a new attempt folder
    (``<root>/<group>/attempt<n>/seed<seed>``: a sweep directory is never reused; an unfinished job stays)."""
    done = finished(root, group)
    missing = [s for s in seeds if s not in done]
    if not missing:
        return
    attempt = root / group / f"attempt{len(list((root / group).glob('attempt*')))}"
    command = [
        sys.executable,
        "-m",
        "rdd_lightning.train",
        "-m",
        *overrides,
        *QUIET,
        *extra,
        "task_name=teacher_strength",
        f"seed={','.join(map(str, missing))}",
        f"hydra.sweep.dir={attempt}",
        "hydra.sweep.subdir=seed${seed}",
    ]
    print(f"[{time.strftime('%H:%M:%S')}] {group}: seeds {missing}", flush=True)
    if dry_run:
        print("  " + " ".join(command))
        return
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


# ------------------------------------------------------------------------------------------------- analysis
def load_group(root: Path, group: str) -> list[dict]:
    return [load_results(p.parent) for _, p in sorted(finished(root, group).items())]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def tse_fractions(run_dir: Path, mode: str) -> dict[str, float] | None:
    """Mean over the logged TSE-RDD steps of the fractions of valid pixels hard for the student, the teacher,
    both, and selected (from the run's CSV log, :func:`rdd_lightning.report.read_metrics`)."""
    series = read_metrics(run_dir)
    tse_steps = {step for step, stage in series.get("train/rdd_stage", []) if stage == 1.0}
    keys = (
        "train/tse_student_hard_fraction",
        "train/tse_teacher_hard_fraction",
        "train/tse_selected_fraction",
    )
    values = [[v for step, v in series.get(k, []) if step in tse_steps] for k in keys]
    if not all(values):
        return None
    s, t, sel = (statistics.fmean(v) for v in values)
    both = (s + t - sel) / 2 if mode == "xor" else s + t - sel
    return {"student_hard": s, "teacher_hard": t, "both_hard": both, "selected": sel}


def summarise(root: Path, groups: list[tuple[str, int | None, list[str]]]) -> dict:
    """Everything the table and the plot show."""
    baseline = [r["best_val_miou"] for r in load_group(root, "none")]
    base_mean, base_std = mean_std(baseline)
    rows = []
    for group, steps, overrides in groups:
        if steps is None:
            continue
        runs = load_group(root, group)
        if not runs:
            continue
        mode = "or" if "distillation.tse.mode=or" in overrides else "xor"
        mious = {r["seed"]: r["best_val_miou"] for r in runs}
        teacher = statistics.fmean(
            r["teacher_val_miou"] for r in runs if r.get("teacher_val_miou") is not None
        )
        fractions = [f for r in runs if (f := tse_fractions(Path(r["output_dir"]), mode)) is not None]
        mean, std = mean_std(list(mious.values()))
        rows.append(
            {
                "group": group,
                "teacher_steps": steps,
                "teacher_miou": teacher,
                "method": group.split("_", 1)[1],
                "n": len(mious),
                "miou_mean": mean,
                "miou_std": std,
                "mious": mious,
                "tse": {k: statistics.fmean(f[k] for f in fractions) for k in fractions[0]}
                if fractions
                else None,
            }
        )
    by_group = {r["group"]: r for r in rows}
    for r in rows:  # per seed (the same seed: the same data order and initialisation), the same teacher
        # - KD for every method but KD; - RDD (its defaults) for the threshold / min_kept runs
        references = [("kd", "kd")] if r["method"] != "kd" else []
        references += [("default", "rdd_xor")] if r["method"] in SENSITIVITY else []
        for name, ref in references:
            other = by_group.get(f"T{r['teacher_steps']}_{ref}")
            if other is None:
                continue
            diffs = [r["mious"][s] - other["mious"][s] for s in r["mious"] if s in other["mious"]]
            r[f"minus_{name}_mean"], r[f"minus_{name}_std"] = mean_std(diffs)
            r[f"minus_{name}_n"] = len(diffs)
    return {"student_alone": {"mean": base_mean, "std": base_std, "n": len(baseline)}, "rows": rows}


def fmt(mean: float | None, std: float | None, signed: bool = False) -> str:
    if mean is None:
        return "–"
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text + (f" ± {std:.2f}" if std is not None else "")


def markdown(summary: dict) -> str:
    """Two tables: kd / rdd_xor / rdd_or per teacher, then the threshold / min_kept runs of RDD (XOR)."""
    alone = summary["student_alone"]
    head = [
        "teacher (steps)",
        "teacher mIoU",
        "gap to student",
        "method",
        "n",
        "student mIoU",
        "− KD (paired)",
    ]
    tse_head = ["TSE: student hard", "teacher hard", "both hard", "selected"]

    def cells(r: dict, *middle: str) -> list[str]:
        gap = "–" if alone["mean"] is None else f"{r['teacher_miou'] - alone['mean']:+.2f}"
        tse = r["tse"]
        return [
            str(r["teacher_steps"]),
            f"{r['teacher_miou']:.2f}",
            gap,
            r["method"],
            str(r["n"]),
            fmt(r["miou_mean"], r["miou_std"]),
            fmt(r.get("minus_kd_mean"), r.get("minus_kd_std"), True),
            *middle,
            *(
                "–" if tse is None else f"{tse[k]:.1%}"
                for k in ("student_hard", "teacher_hard", "both_hard", "selected")
            ),
        ]

    main_rows = [cells(r) for r in summary["rows"] if r["method"] in MAIN]
    lines = [
        f"Student alone (distillation=none): {fmt(alone['mean'], alone['std'])} (n={alone['n']})",
        "",
        markdown_table([*head, *tse_head], main_rows),
    ]
    other = sorted(
        (r for r in summary["rows"] if r["method"] in SENSITIVITY),
        key=lambda r: (r["teacher_steps"], r["method"]),
    )
    if other:
        head[3] = "setting"
        rows = [cells(r, fmt(r.get("minus_default_mean"), r.get("minus_default_std"), True)) for r in other]
        lines += [
            "",
            "RDD (XOR) with another TSE threshold or min_kept (defaults 0.7 and the dataset's min_kept):",
            "",
            markdown_table([*head, "− RDD defaults (paired)", *tse_head], rows),
        ]
    return "\n".join(lines)


def plot(summary: dict, out: Path) -> None:
    """RDD − KD (mean ± std over paired seeds) against the teacher − student gap, XOR and OR."""
    from matplotlib.figure import Figure

    alone = summary["student_alone"]["mean"]
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for method, colour, marker in (("rdd_xor", "tab:blue", "o"), ("rdd_or", "tab:orange", "s")):
        rows = [r for r in summary["rows"] if r["method"] == method and r.get("minus_kd_mean") is not None]
        if not rows or alone is None:
            continue
        x = [r["teacher_miou"] - alone for r in rows]
        y = [r["minus_kd_mean"] for r in rows]
        err = [r["minus_kd_std"] or 0.0 for r in rows]
        ax.errorbar(
            x,
            y,
            yerr=err,
            color=colour,
            marker=marker,
            capsize=4,
            label=f"RDD ({method.split('_')[1].upper()}) − KD",
        )
        if method == "rdd_xor":  # one label per teacher (both curves share the x of each teacher)
            for xi, yi, r in zip(x, y, rows, strict=True):
                ax.annotate(
                    f"{r['teacher_steps']} it., {r['teacher_miou']:.1f}",
                    (xi, yi),
                    textcoords="offset points",
                    xytext=(6, -12),
                    fontsize=8,
                )
    ax.axhline(0.0, color="grey", linewidth=1)
    ax.margins(x=0.15)
    ax.set_xlabel(
        "teacher − student mIoU gap (student trained alone)\npoint labels: teacher iterations, teacher mIoU"
    )
    ax.set_ylabel("student mIoU: RDD − KD (paired seeds, mean ± std)")
    ax.set_title("Synthetic data: does RDD beat KD as the teacher gets stronger?")
    ax.legend(loc="center left")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-steps", type=int, nargs="+", default=[150, 400, 1600, 3200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--root", type=Path, default=Path("logs/teacher_strength"))
    parser.add_argument("--plot", type=Path, default=Path("docs/teacher_strength.png"))
    parser.add_argument("--no-sensitivity", action="store_true", help="skip the threshold / min_kept runs")
    parser.add_argument(
        "--override",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="more overrides of every student run (e.g. a smaller recipe)",
    )
    parser.add_argument(
        "--teacher-override",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="more overrides of every teacher's training command",
    )
    parser.add_argument("--report-only", action="store_true", help="train nothing; report what has finished")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args()
    root = args.root.resolve()
    extremes = [] if args.no_sensitivity else sorted({min(args.teacher_steps), max(args.teacher_steps)})
    groups = plan(args.teacher_steps, extremes, args.teacher_override)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if not args.report_only:
        for group, _, overrides in groups:
            run_group(root, group, overrides, args.seeds, args.dry_run, args.override)
    if args.dry_run:
        return
    # the threshold / min_kept runs of every teacher that has them (an earlier study's extremes too)
    summary = summarise(root, plan(args.teacher_steps, args.teacher_steps))
    text = markdown(summary)
    print(text)
    (root / "teacher_strength.md").write_text(text + "\n")
    (root / "teacher_strength.json").write_text(json.dumps(summary, indent=1))
    plot(summary, args.plot)
    print(f"\nplot: {args.plot}; table: {root / 'teacher_strength.md'}")


if __name__ == "__main__":
    main()
