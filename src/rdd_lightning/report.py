"""Tables and plots of runs and sweeps: ``python -m rdd_lightning.report PATH ... [--latest DIR] [--format
table|markdown|csv|json] [--plot out.png]``.

A PATH is a run directory, a sweep directory (``logs/<task>/multiruns/<time>``), any folder above them, or a
glob of those. Every job under it is found: a directory with ``results.json`` is a finished run; a Hydra job
directory (``.hydra/``) without one is listed as incomplete or failed (never dropped silently), and so is a job
whose ``results.json`` cannot be used (empty, truncated or corrupt, not a JSON object, or without the keys the
report reads): its reason stands in the ``state`` column and every other job is reported as usual.

Grouping rule: finished training runs whose Hydra task overrides are equal once ``seed`` and the overrides that do
not change the experiment are removed form one group (the seeds of one setting). Overrides are compared as a set
of ``key=value`` in one spelling: in any order, ``+``/``++`` dropped, numbers by value (``0.70`` is ``0.7``, ``1.0``
is ``1``), ``true``/``false``/``null`` in any case; other values as written. Removed: ``seed``, bookkeeping
(``task_name``, ``tags``, ``ckpt_path``, ``paths.*``, ``hydra.*``), logging and display (``logger*``,
``callbacks.progress_bar``, ``callbacks.difficulty_maps*``, ``trainer.enable_progress_bar``,
``trainer.enable_model_summary``, ``trainer.log_every_n_steps``) and placement (``trainer.accelerator``,
``trainer.devices``, ``trainer.num_nodes``, ``dataset.num_workers``): see :data:`NOT_EXPERIMENT`. Each group shows
the mean ± sample standard deviation (ddof=1) and the best of its runs' ``best_val_miou``, its teacher's mIoU
(``teacher_val_miou``, else the teacher run's own ``results.json`` found by :func:`teacher_results`), the
published number when the experiment's ``paper`` table has an entry matching the group (its values compared in
the same spelling), and its compute. A group is named by its overrides sorted by key. A run of
``rdd_lightning.evaluate`` (``results.json`` with ``mIoU``) is listed in its own table. Nothing here parses logs,
except the last error line of an incomplete job's log.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import re
import statistics
import sys
import textwrap
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from rdd_lightning.errors import ConfigError

# Override keys (after any ``+``/``++``/``~`` prefix) that do not change the experiment: an exact key, or a
# prefix when it ends with "." or "*".
NOT_EXPERIMENT = (
    "seed",
    "task_name",
    "tags",
    "ckpt_path",
    "paths.",
    "hydra.",
    "logger*",
    "callbacks.progress_bar",
    "callbacks.difficulty_maps*",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "dataset.num_workers",
)


# ------------------------------------------------------------------------------------------ results files
# What the report reads from a results.json besides ``overrides`` (a list): keys whose value, when present and
# not null, must be a number, an object or a string ("compute.x" is the key x of the "compute" object).
NUMBER_KEYS = (
    "best_val_miou",
    "final_val_miou",
    "teacher_val_miou",
    "wall_time_s",
    "mIoU",
    "aAcc",
    "compute.wall_time_s",
    "compute.device_hours",
    "compute.train_images_per_s",
    "compute.peak_memory_mb",
)
OBJECT_KEYS = ("choices", "compute", "network", "paper")
STRING_KEYS = ("experiment", "paper.table", "paper.split")
# The keys a training run's results.json must have (an evaluation's has ``mIoU``).
REQUIRED_KEYS = ("overrides", "best_val_miou")


class ResultsFileError(ConfigError):
    """A ``results.json`` that is not a readable JSON object; ``reason`` says why in a few words."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}; move it aside and rerun (or resume) the run that wrote it")
        self.path, self.reason = path, reason


def json_kind(value: Any) -> str:
    """The JSON name of a parsed value's type: ``"array"`` for a list, ``"number"`` for a float."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    kinds = {dict: "object", list: "array", str: "string", int: "number", float: "number"}
    return next(name for kind, name in kinds.items() if isinstance(value, kind))


def parse_results(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; :class:`ResultsFileError` when it is unreadable, empty, not JSON or not
    an object."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ResultsFileError(path, f"cannot be read ({err.strerror or err})") from err
    except UnicodeDecodeError as err:
        raise ResultsFileError(path, "not UTF-8 text") from err
    if not text.strip():
        raise ResultsFileError(path, "empty file")
    try:
        results = json.loads(text)
    except json.JSONDecodeError as err:
        reason = f"not valid JSON (truncated or corrupt): {err.msg}: line {err.lineno} column {err.colno}"
        raise ResultsFileError(path, reason) from err
    if not isinstance(results, dict):
        raise ResultsFileError(path, f"a JSON {json_kind(results)}, not an object")
    return results


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """The ``results.json`` of ``run_dir``; ``FileNotFoundError`` when the run has none,
    :class:`ResultsFileError` (a one-line :class:`~rdd_lightning.errors.ConfigError`) when it is not a readable
    JSON object."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a finished run directory?")
    return parse_results(path)


def lookup(results: dict[str, Any], dotted: str) -> Any:
    """``results["a"]["b"]`` for ``"a.b"``; ``None`` where a level is missing or not an object."""
    value: Any = results
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def type_problem(results: dict[str, Any]) -> str | None:
    """The first value the report reads that has the wrong type (``"best_val_miou is "high", not a number"``),
    or ``None``."""
    expected = (
        [(key, "a list", list) for key in ("overrides", "paper.results")]
        + [(key, "an object", dict) for key in OBJECT_KEYS]
        + [(key, "a string", str) for key in STRING_KEYS]
        + [(key, "a number", (int, float)) for key in NUMBER_KEYS]
    )
    for key, name, kind in expected:
        value = lookup(results, key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            return f"{key} is {json.dumps(value)[:40]}, not {name}"
    return None


def results_problem(results: dict[str, Any]) -> str | None:
    """Why the report cannot use a run's results object: the keys a training run must have
    (:data:`REQUIRED_KEYS`) that it lacks, else :func:`type_problem`; ``None`` when it can."""
    missing = [] if "mIoU" in results else [k for k in REQUIRED_KEYS if k not in results]
    if missing:
        return f"missing key{'s' if len(missing) > 1 else ''} " + ", ".join(map(repr, missing))
    return type_problem(results)


def read_job_results(job_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(results, None)`` for a usable ``results.json``, else ``(None, reason)``; never raises."""
    try:
        results = load_results(job_dir)
    except ResultsFileError as err:
        return None, err.reason
    problem = results_problem(results)
    return (None, problem) if problem else (results, None)


def teacher_results(results: dict[str, Any]) -> dict[str, Any] | None:
    """The results of the run that produced ``results``' teacher checkpoint, when they can be found (and
    used: an unreadable one counts as not found)."""
    ckpt = results.get("teacher_checkpoint")
    return _teacher_results_of(str(ckpt)) if ckpt else None


@lru_cache(maxsize=256)
def _teacher_results_of(ckpt: str) -> dict[str, Any] | None:
    path = Path(ckpt)
    for run_dir in (path.parent / "run", path.parent.parent):  # auto-teacher cache, or <run>/checkpoints/
        if (run_dir / "results.json").is_file():
            try:
                results = load_results(run_dir)
            except ResultsFileError:
                return None
            return None if type_problem(results) else results
    return None


def latest_run(folder: str | Path) -> Path:
    """The newest (by name: run directories are timestamps) finished run directly under ``folder``."""
    runs = sorted(p.parent for p in Path(folder).glob("*/results.json"))
    if not runs:
        raise FileNotFoundError(f"no finished run (a results.json) under {folder}")
    return runs[-1]


# ------------------------------------------------------------------------------------------ finding jobs
@dataclass
class Job:
    """One run directory: finished (``results`` read from its ``results.json``) or not (``results`` None;
    ``problem`` says why when it has a ``results.json`` that cannot be used, or an unreadable overrides file)."""

    path: Path
    overrides: list[str]
    results: dict[str, Any] | None
    problem: str | None = None

    @property
    def is_evaluation(self) -> bool:
        return self.results is not None and "mIoU" in self.results


def is_job_dir(path: Path) -> bool:
    """A finished run, or a Hydra job directory (finished or not)."""
    hydra = path / ".hydra"
    return (
        (path / "results.json").is_file()
        or (hydra / "config.yaml").is_file()
        or (hydra / "overrides.yaml").is_file()
    )


def natural_key(path: Path) -> list[tuple[int, int | str]]:
    """Sort key putting job ``10`` after job ``9``."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in path.parts]


def job_dirs_under(root: Path) -> list[Path]:
    """``root`` if it is a job directory, else every job directory below it."""
    if is_job_dir(root):
        return [root]
    found = {p.parent for p in root.rglob("results.json")}
    found |= {
        p.parent.parent
        for pattern in (".hydra/config.yaml", ".hydra/overrides.yaml")
        for p in root.rglob(pattern)
    }
    return sorted(found, key=natural_key)


def expand_paths(paths: list[str]) -> list[Path]:
    """Paths with globs expanded; ``FileNotFoundError`` for a path or glob that matches nothing."""
    expanded = []
    for pattern in paths:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [Path(m) for m in matches if Path(m).exists()]
        if not matches:
            raise FileNotFoundError(f"{pattern} matches no file or directory")
        expanded += matches
    return expanded


def read_overrides(job_dir: Path, results: dict[str, Any] | None) -> list[str]:
    """The job's Hydra task overrides: from ``results.json``, else ``.hydra/overrides.yaml``."""
    if results is not None:
        return [str(o) for o in results.get("overrides") or []]
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    return [str(o) for o in yaml.safe_load(path.read_text()) or []]


def read_job(job_dir: Path) -> Job:
    """The job in ``job_dir``; a bad ``results.json`` or ``.hydra/overrides.yaml`` makes it an unfinished job
    with a ``problem`` instead of an error."""
    import yaml

    results, problem = None, None
    if (job_dir / "results.json").is_file():
        results, reason = read_job_results(job_dir)
        problem = f"bad results.json ({reason}): move it aside" if reason else None
    try:
        overrides = read_overrides(job_dir, results)
    except (OSError, ValueError, TypeError, yaml.YAMLError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        overrides, problem = [], problem or f"bad .hydra/overrides.yaml ({reason}): overrides unknown"
    return Job(job_dir, overrides, results, problem)


def discover_jobs(paths: list[str | Path]) -> list[Job]:
    """Every job directory under ``paths`` (directories or globs), each once, in path order. A job whose
    ``results.json`` cannot be used is listed as unfinished with its ``problem``; it never stops the others."""
    jobs, seen = [], set()
    for root in expand_paths([str(p) for p in paths]):
        for job_dir in job_dirs_under(root):
            if job_dir.resolve() in seen:
                continue
            seen.add(job_dir.resolve())
            jobs.append(read_job(job_dir))
    return jobs


# ------------------------------------------------------------------------------------------ grouping
def override_key(override: str) -> str:
    """``"++trainer.max_steps=2"`` -> ``"trainer.max_steps"``."""
    return override.lstrip("+~").split("=", 1)[0]


def normal_number(text: str) -> str | None:
    """A finite number written in one way (``"0.70"``, ``"7e-1"`` -> ``"0.7"``; ``"1.0"``, ``"+1"`` -> ``"1"``),
    ``None`` when ``text`` is not a number."""
    try:
        return str(int(text))
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    return str(int(number)) if number.is_integer() and abs(number) < 1e15 else repr(number)


def normal_value(value: Any) -> str:
    """An override's value (as written, or as a config holds it) in one spelling: numbers by value
    (:func:`normal_number`), ``true``/``false``/``null`` in lower case, any other value as written."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    text = str(value).strip()
    if text.lower() in ("true", "false", "null"):
        return text.lower()
    number = normal_number(text)
    return text if number is None else number


def normal_override(override: str) -> str:
    """``key=value`` in one spelling: ``+``/``++`` dropped, the value by :func:`normal_value`
    (``"++distillation.tse.threshold=0.70"`` -> ``"distillation.tse.threshold=0.7"``); a deletion (``~key``)
    as written."""
    override = override.strip()
    if override.startswith("~") or "=" not in override:
        return override
    key, value = override.split("=", 1)
    return f"{key.lstrip('+').strip()}={normal_value(value)}"


def override_items(overrides: list[str]) -> dict[str, str]:
    """``{key: value}`` of ``key=value`` overrides (prefixes dropped, values as written by Hydra)."""
    return {override_key(o): o.split("=", 1)[1] for o in overrides if "=" in o}


def changes_experiment(override: str) -> bool:
    """False for ``seed`` and the keys of :data:`NOT_EXPERIMENT`."""
    key = override_key(override)
    for rule in NOT_EXPERIMENT:
        if rule.endswith((".", "*")):
            if key.startswith(rule.rstrip("*")):
                return False
        elif key == rule:
            return False
    return True


def sorted_overrides(overrides: set[str] | list[str]) -> tuple[str, ...]:
    """``overrides`` sorted by key (then value): the one order of a set of overrides."""
    return tuple(sorted(overrides, key=lambda o: (override_key(o), o)))


def group_key(overrides: list[str]) -> tuple[str, ...]:
    """The overrides that define the experiment (all but seed and :data:`NOT_EXPERIMENT`) as
    :func:`normal_override` writes them, sorted by key: equal for the same setting whatever the order or
    spelling of the command line."""
    return sorted_overrides({normal_override(o) for o in overrides if changes_experiment(o)})


@dataclass
class Group:
    """Finished training runs of one setting (equal :func:`group_key`)."""

    key: tuple[str, ...]
    runs: list[Job] = field(default_factory=list)


def group_runs(jobs: list[Job]) -> list[Group]:
    """Finished training runs (not evaluations) grouped by :func:`group_key`, in order of first appearance."""
    groups: dict[tuple[str, ...], Group] = {}
    for job in jobs:
        if job.results is None or job.is_evaluation:
            continue
        key = group_key(job.overrides)
        groups.setdefault(key, Group(key)).runs.append(job)
    return list(groups.values())


def shared_overrides(keys: list[tuple[str, ...]]) -> list[str]:
    """The overrides present in every key (in the first key's order); none when there are no keys."""
    if not keys:
        return []
    return [o for o in keys[0] if all(o in k for k in keys[1:])]


def short_label(key: tuple[str, ...], shared: list[str]) -> str:
    """``key`` without the overrides ``shared`` by all groups: what tells this group apart."""
    distinct = [o for o in key if o not in shared]
    if distinct:
        return " ".join(distinct)
    return "(shared overrides)" if key else "defaults"


# ------------------------------------------------------------------------------------------ summaries
def mean_or_none(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def run_miou(results: dict[str, Any]) -> float | None:
    """A run's best validation mIoU (the final one when it recorded no best)."""
    value = results.get("best_val_miou")
    return value if value is not None else results.get("final_val_miou")


def run_teacher_miou(results: dict[str, Any]) -> float | None:
    """The teacher's mIoU of a distillation run: measured in the run, else the teacher run's best."""
    if results.get("teacher_val_miou") is not None:
        return results["teacher_val_miou"]
    teacher = teacher_results(results)
    return run_miou(teacher) if teacher else None


def paper_entry(paper: dict[str, Any] | None, overrides: tuple[str, ...]) -> dict[str, Any] | None:
    """The entry of ``paper["results"]`` whose every non-``miou`` ``key: value`` is among ``overrides``
    (values compared by :func:`normal_value`, so ``0.70`` in the config matches ``0.7`` on the command line);
    the most specific one when several match. Entries that are not objects with a numeric ``miou`` are
    skipped."""
    if not paper:
        return None
    given = override_items([normal_override(o) for o in overrides])
    entries = [
        entry
        for entry in paper.get("results") or []
        if isinstance(entry, dict) and type(entry.get("miou")) in (int, float)
    ]
    matches = [
        entry
        for entry in entries
        if all(k in given and given[k] == normal_value(v) for k, v in entry.items() if k != "miou")
    ]
    return max(matches, key=len) if matches else None


def paper_split_mismatch(paper: dict[str, Any] | None, runs: list[dict[str, Any]]) -> str | None:
    """Why a group's published number must not stand beside it: the paper states the split its numbers are on
    (``paper.split``) and a run was validated on another one, or does not record its split (results of an
    earlier version); ``None`` when they agree or the paper states no split."""
    published = (paper or {}).get("split")
    if not published:
        return None
    validated = sorted({str(r.get("val_split")) for r in runs})
    if validated == [published]:
        return None
    return f"published on {published}, runs on {'/'.join(validated).replace('None', 'unrecorded')}"


def compute_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Compute of a group: mean wall time, total device-hours, mean training throughput, max peak memory."""

    def values(name: str) -> list[float]:
        found = [(r.get("compute") or {}).get(name) for r in runs]
        return [v for v in found if v is not None]

    wall = [(r.get("compute") or {}).get("wall_time_s", r.get("wall_time_s")) for r in runs]
    devices = sorted({str(d) for r in runs if (d := (r.get("compute") or {}).get("device"))})
    return {
        "wall_time_s_mean": mean_or_none([w for w in wall if w is not None]),
        "device_hours_total": sum(values("device_hours")) if values("device_hours") else None,
        "train_images_per_s_mean": mean_or_none(values("train_images_per_s")),
        "peak_memory_mb_max": max(values("peak_memory_mb"), default=None),
        "device": ", ".join(devices) or None,
    }


def summarise_group(group: Group, label: str) -> dict[str, Any]:
    """One group as a flat dict (what every output format shows)."""
    runs = [job.results for job in group.runs]
    mious = [m for r in runs if (m := run_miou(r)) is not None]
    teachers = [t for r in runs if (t := run_teacher_miou(r)) is not None]
    paper = next((r["paper"] for r in runs if r.get("paper")), None)
    entry = paper_entry(paper, group.key)
    mismatch = paper_split_mismatch(paper, runs) if entry else None
    first = runs[0]
    return {
        "group": label,
        "overrides": list(group.key),
        "network": (first.get("choices") or {}).get("student"),
        "distillation": first.get("distillation"),
        "dataset": first.get("dataset"),
        "experiment": first.get("experiment"),
        "n": len(mious),
        "miou_mean": mean_or_none(mious),
        "miou_std": statistics.stdev(mious) if len(mious) > 1 else None,
        "miou_best": max(mious, default=None),
        "mious": mious,
        "seeds": [r.get("seed") for r in runs],
        "teacher_miou": mean_or_none(teachers),
        "paper_table": paper.get("table") if paper else None,
        "paper_miou": entry["miou"] if entry and not mismatch else None,
        "paper_split_mismatch": mismatch,
        "paper_teacher_miou": paper.get("teacher_miou") if paper else None,
        **compute_summary(runs),
        "runs": [str(job.path) for job in group.runs],
    }


def summarise_evaluation(job: Job) -> dict[str, Any]:
    """One ``rdd_lightning.evaluate`` run as a flat dict."""
    r = job.results
    return {
        "run": str(job.path),
        "network": (r.get("network") or {}).get("encoder_name"),
        "dataset": r.get("dataset"),
        "split": r.get("split"),
        "checkpoint": r.get("checkpoint"),
        "checkpoint_global_step": r.get("checkpoint_global_step"),
        "miou": r.get("mIoU"),
        "pixel_acc": r.get("aAcc"),
        "wall_time_s": r.get("wall_time_s"),
    }


def last_error_line(job_dir: Path) -> str | None:
    """The last line of the job's logs that mentions an error, if any (an unreadable log is skipped)."""
    found = None
    for log_file in sorted(job_dir.glob("*.log")):
        try:
            text = log_file.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if re.search(r"error|exception|traceback", line, re.IGNORECASE):
                found = line.strip()
    return found


def summarise_incomplete(job: Job, label: str) -> dict[str, Any]:
    """A job without a usable ``results.json``: its overrides, what is wrong with its files (``problem``) and
    what can be resumed."""
    last = job.path / "checkpoints" / "last.ckpt"
    state = "last.ckpt present: resume with ckpt_path=last" if last.is_file() else "no checkpoint"
    return {
        "job": str(job.path),
        "group": label,
        "overrides": job.overrides,
        "state": f"{job.problem}; {state}" if job.problem else state,
        "problem": job.problem,
        "error": last_error_line(job.path),
    }


@dataclass
class Report:
    """Everything an output format shows."""

    groups: list[dict[str, Any]]
    evaluations: list[dict[str, Any]]
    incomplete: list[dict[str, Any]]
    shared: list[str]

    @property
    def title(self) -> str:
        tables = sorted({g["paper_table"] for g in self.groups if g["paper_table"]})
        if tables:
            return " / ".join(tables)
        experiments = sorted({g["experiment"] for g in self.groups if g.get("experiment")})
        return "experiment=" + ", ".join(experiments) if experiments else "rdd-lightning results"

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "shared_overrides": self.shared,
            "groups": self.groups,
            "evaluations": self.evaluations,
            "incomplete": self.incomplete,
        }


def job_key(job: Job) -> tuple[str, ...]:
    """A single job's :func:`group_key` plus its seed (what names it among the jobs of its group)."""
    seeds = [normal_override(o) for o in job.overrides if override_key(o) == "seed"]
    return group_key(job.overrides) + tuple(seeds)


def build_report(jobs: list[Job]) -> Report:
    """Group and summarise ``jobs``; labels drop the overrides shared by every group and unfinished job."""
    groups = group_runs(jobs)
    unfinished = [job for job in jobs if job.results is None]
    shared = shared_overrides([g.key for g in groups] + [group_key(j.overrides) for j in unfinished])
    return Report(
        groups=[summarise_group(g, short_label(g.key, shared)) for g in groups],
        evaluations=[summarise_evaluation(j) for j in jobs if j.is_evaluation],
        incomplete=[summarise_incomplete(j, short_label(job_key(j), shared)) for j in unfinished],
        shared=shared,
    )


# ------------------------------------------------------------------------------------------ rendering
def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def mean_std(group: dict[str, Any]) -> str:
    """``"73.00 ± 3.61"``; the std is ``-`` for a single run."""
    return f"{fmt(group['miou_mean'])} ± {fmt(group['miou_std'])}"


# (header, cell) of the group tables; a column whose cells are all "-" is left out
GROUP_COLUMNS = [
    ("group", lambda g: g["group"]),
    ("network", lambda g: str(g["network"] or "-")),
    ("distillation", lambda g: str(g["distillation"] or "-")),
    ("n", lambda g: str(g["n"])),
    ("mIoU mean ± std", mean_std),
    ("best", lambda g: fmt(g["miou_best"])),
    ("teacher", lambda g: fmt(g["teacher_miou"])),
    ("paper", lambda g: g.get("paper_split_mismatch") or fmt(g["paper_miou"])),
    ("wall time (s)", lambda g: fmt(g["wall_time_s_mean"], 0)),
    ("device-h", lambda g: fmt(g["device_hours_total"], 3)),
    ("img/s", lambda g: fmt(g["train_images_per_s_mean"], 1)),
    ("peak MB", lambda g: fmt(g["peak_memory_mb_max"], 0)),
]
EVALUATION_COLUMNS = [
    ("evaluation", lambda e: f"eval {e['dataset'] or '?'}/{e['split'] or '?'}"),
    ("network", lambda e: str(e["network"] or "-")),
    (
        "checkpoint step",
        lambda e: str(e["checkpoint_global_step"] if e["checkpoint_global_step"] is not None else "-"),
    ),
    ("mIoU", lambda e: fmt(e["miou"])),
    ("wall time (s)", lambda e: fmt(e["wall_time_s"], 0)),
    ("run", lambda e: e["run"]),
]
INCOMPLETE_COLUMNS = [
    ("job", lambda j: j["job"]),
    ("overrides", lambda j: j["group"]),
    ("state", lambda j: j["state"]),
    ("last error in log", lambda j: j["error"] or "-"),
]
ALWAYS_SHOWN = {"group", "n", "mIoU mean ± std", "best", "evaluation", "mIoU", "job", "overrides", "state"}


def cells(columns: list, items: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of ``items``, without the optional columns that are empty in every row."""
    rows = [[cell(item) for _, cell in columns] for item in items]
    keep = [
        i for i, (name, _) in enumerate(columns) if name in ALWAYS_SHOWN or any(r[i] != "-" for r in rows)
    ]
    return [columns[i][0] for i in keep], [[r[i] for i in keep] for r in rows]


def incomplete_title(report: Report) -> str:
    """The title of the unfinished jobs' table; it names bad ``results.json`` files only when there are some."""
    if any(j.get("problem") for j in report.incomplete):
        return "incomplete or failed jobs (no usable results.json)"
    return "incomplete or failed jobs (no results.json)"


def sections(report: Report) -> list[tuple[str, list, list[dict[str, Any]]]]:
    """(title, columns, items) of each non-empty table."""
    found = [
        (report.title, GROUP_COLUMNS, report.groups),
        ("evaluations", EVALUATION_COLUMNS, report.evaluations),
        (incomplete_title(report), INCOMPLETE_COLUMNS, report.incomplete),
    ]
    return [s for s in found if s[2]]


def render_rich(report: Report, console=None) -> None:
    """The report as ``rich`` tables on ``console`` (a wide one when the output is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=max(console.width, 200))
    for title, columns, items in sections(report):
        header, rows = cells(columns, items)
        caption = (
            f"shared by all: {' '.join(report.shared)}"
            if columns is GROUP_COLUMNS and report.shared
            else None
        )
        table = Table(title=title, caption=caption, caption_justify="left")
        for name in header:
            numeric = name not in {
                "group",
                "network",
                "distillation",
                "evaluation",
                "run",
                "job",
                "overrides",
                "state",
                "last error in log",
            }
            table.add_column(name, justify="right" if numeric else "left", overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table (``|`` inside cells escaped)."""

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)])


def render_markdown(report: Report) -> str:
    """Each table under a bold title; the overrides shared by all groups below the group table."""
    parts = []
    for title, columns, items in sections(report):
        parts.append(f"**{title}**\n\n" + markdown_table(*cells(columns, items)))
        if columns is GROUP_COLUMNS and report.shared:
            parts.append("Shared by all groups: " + " ".join(f"`{o}`" for o in report.shared))
    return "\n\n".join(parts)


CSV_FIELDS = [
    "kind",
    "group",
    "n",
    "miou_mean",
    "miou_std",
    "miou_best",
    "teacher_miou",
    "paper_miou",
    "wall_time_s_mean",
    "device_hours_total",
    "train_images_per_s_mean",
    "peak_memory_mb_max",
    "overrides",
    "note",
    "paths",
]


def render_csv(report: Report) -> str:
    """One row per group, then one per evaluation and per incomplete job (``kind`` says which)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for g in report.groups:
        writer.writerow(
            {**g, "kind": "group", "overrides": " ".join(g["overrides"]), "paths": " ".join(g["runs"])}
        )
    for e in report.evaluations:
        writer.writerow(
            {
                "kind": "evaluation",
                "group": f"eval {e['dataset']}/{e['split']} {e['network']}",
                "n": 1,
                "miou_mean": e["miou"],
                "miou_best": e["miou"],
                "paths": e["run"],
            }
        )
    for j in report.incomplete:
        note = j["state"] + (f"; {j['error']}" if j["error"] else "")
        writer.writerow(
            {
                "kind": "incomplete",
                "group": j["group"],
                "n": 0,
                "overrides": " ".join(j["overrides"]),
                "note": note,
                "paths": j["job"],
            }
        )
    return out.getvalue()


def render_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2)


# ------------------------------------------------------------------------------------------ plots
def wrapped(label: str, width: int = 22) -> str:
    """An x tick label: one override per line, long ones wrapped."""
    return "\n".join(line for part in label.split(" ") for line in textwrap.wrap(part, width) or [""])


def plot_groups(groups: list[dict[str, Any]]):
    """Bars of the groups' mean mIoU with ± std error bars, each run as a dot, the paper's number (star) and
    the teacher's (bar marker) where known. Returns a ``matplotlib.figure.Figure`` (Agg, no pyplot)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 1.3 * len(groups) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = list(range(len(groups)))
    means = [g["miou_mean"] if g["miou_mean"] is not None else 0.0 for g in groups]
    stds = [g["miou_std"] or 0.0 for g in groups]
    ax.bar(x, means, yerr=stds, capsize=5, color="C0", alpha=0.6, label="mean ± std over seeds")
    for i, g in enumerate(groups):
        offsets = [
            0.15 * (k - (len(g["mious"]) - 1) / 2) / max(1, len(g["mious"]) - 1)
            for k in range(len(g["mious"]))
        ]
        ax.scatter(
            [i + o for o in offsets],
            g["mious"],
            color="black",
            s=16,
            zorder=3,
            label="runs (seeds)" if i == 0 else None,
        )
    for name, marker, color, size in (("paper_miou", "*", "C3", 160), ("teacher_miou", "_", "C2", 400)):
        points = [(i, g[name]) for i, g in enumerate(groups) if g[name] is not None]
        if points:
            label = "paper" if name == "paper_miou" else "teacher"
            ax.scatter(*zip(*points, strict=True), marker=marker, color=color, s=size, zorder=4, label=label)
    ax.set_xticks(x, [wrapped(g["group"]) for g in groups], fontsize=8)
    ax.set_ylabel("val mIoU (%)")
    ax.set_title(groups[0]["paper_table"] or "val mIoU per group" if groups else "no groups")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def read_metrics(job_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from the job's CSV logger file (``<job>/csv/metrics.csv``, or any
    ``metrics.csv`` below the job); empty when there is none."""
    job_dir = Path(job_dir)
    files = [job_dir / "csv" / "metrics.csv"] + sorted(job_dir.rglob("metrics.csv"))
    path = next((f for f in files if f.is_file()), None)
    if path is None:
        return {}
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("step"):
                continue
            for name, value in row.items():
                if name not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(name, []).append((int(float(row["step"])), float(value)))
    return series


def plot_learning_curves(groups: list[dict[str, Any]], metrics: tuple[str, ...] = ("val/mIoU", "train/loss")):
    """One panel per metric, one colour per group, one line per run (from :func:`read_metrics`)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(metrics), 4), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for colour, g in enumerate(groups):
        for k, run_dir in enumerate(g["runs"]):
            series = read_metrics(run_dir)
            for ax, metric in zip(axes, metrics, strict=True):
                if series.get(metric):
                    steps, values = zip(*series[metric], strict=True)
                    ax.plot(
                        steps,
                        values,
                        color=f"C{colour % 10}",
                        marker=".",
                        alpha=0.8,
                        label=g["group"] if k == 0 else None,
                    )
    for ax, metric in zip(axes, metrics, strict=True):
        ax.set_xlabel("step")
        ax.set_title(metric)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return fig


# ------------------------------------------------------------------------------------------ command line
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rdd_lightning.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("paths", nargs="*", help="run or sweep directories, folders above them, or globs")
    parser.add_argument("--latest", metavar="DIR", help="add the newest finished run directly under DIR")
    parser.add_argument("--format", choices=["table", "markdown", "csv", "json"], default="table")
    parser.add_argument("--plot", metavar="PNG", help="also save a bar plot of the groups' mIoU")
    args = parser.parse_args(argv)
    if not args.paths and not args.latest:
        parser.error("give run or sweep directories, or --latest DIR")
    return args


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 (a job with a bad ``results.json`` is listed, with a ``note:`` line on stderr), or 2 with
    one ``error:`` line when nothing is found."""
    args = parse_args(argv)
    try:
        paths = list(args.paths) + ([latest_run(args.latest)] if args.latest else [])
        jobs = discover_jobs(paths)
        if not jobs:
            raise FileNotFoundError(
                f"no results.json or Hydra job directory under {' '.join(map(str, paths))}"
            )
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = build_report(jobs)
    if args.format == "table":
        render_rich(report)
    else:
        render = {"markdown": render_markdown, "csv": render_csv, "json": render_json}[args.format]
        print(render(report).rstrip("\n"))
    bad = sum(1 for j in report.incomplete if j["problem"])
    if bad:
        print(
            f"note: {bad} job(s) with a bad file, listed with the incomplete or failed jobs", file=sys.stderr
        )
    if args.plot:
        if report.groups:
            plot_groups(report.groups).savefig(args.plot, dpi=120)
        else:
            print(f"note: no finished training run to plot; {args.plot} not written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
