"""Loading a frozen teacher (a checkpoint of this package or a CIRKD file), and the synthetic dataset's auto-teacher."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rdd_lightning import weight_formats
from rdd_lightning.data.transforms import NORMALIZATIONS, Normalization
from rdd_lightning.errors import ConfigError
from rdd_lightning.launch import clean_environment, wait_for
from rdd_lightning.models import SegmentationNet, build_model

TEACHER_RECIPE = "experiment=synthetic_teacher"


def train_teacher_command(teacher_choice: str, dataset_choice: str) -> str:
    """The command that trains a teacher of architecture ``teacher_choice`` on ``dataset_choice``."""
    return (
        f"python -m rdd_lightning.train dataset={dataset_choice} student={teacher_choice} "
        f"distillation=none task_name=teacher"
    )


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint file not found: {str(path)!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and format errors of many kinds
        raise ConfigError(f"cannot read checkpoint {str(path)!r}: {err}") from err


def network_state_dict(checkpoint: dict[str, Any], prefix: str = "student.") -> dict[str, torch.Tensor]:
    """The trained network's weights from a Lightning checkpoint of this package, or the file's state dict
    itself (a bare state dict of this package's or CIRKD's layout; see :mod:`rdd_lightning.weight_formats`)."""
    state = weight_formats.unwrap_state_dict(checkpoint)
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def is_cirkd_checkpoint(checkpoint: dict[str, Any]) -> bool:
    """The file is a whole CIRKD network (its keys say so; CIRKD's files carry no metadata)."""
    return weight_formats.is_cirkd_network_state(network_state_dict(checkpoint))


def load_teacher(
    net: SegmentationNet,
    checkpoint_path: str | os.PathLike,
    *,
    config_hint: str = "teacher",
    checkpoint_key: str | None = None,
    checkpoint: dict[str, Any] | None = None,
    choice: str | None = None,
) -> SegmentationNet:
    """Load ``checkpoint_path`` into ``net`` after checking architecture and class count; return it frozen.

    A checkpoint written by this package records the trained network's description; a mismatch with the
    ``config_hint`` config raises a :class:`ConfigError` naming both (and the key ``checkpoint_key``, default
    ``<config_hint>.checkpoint``, that gave the file). Bare state dicts (this package's or CIRKD's layout, with
    or without DDP's ``module.`` prefix) are loaded strictly: a file that does not fit raises a one-line
    :class:`ConfigError` naming the file, the config (``<config_hint>=<choice>`` when the option is known) and the
    first missing, unexpected and mismatched tensors, with the config a CIRKD file was made for. A caller that
    has already read the file passes its contents as ``checkpoint`` so it is not read twice.
    """
    key = checkpoint_key or f"{config_hint}.checkpoint"
    config = f"{config_hint}={choice}" if choice else f"the {config_hint} config"
    if checkpoint is None:
        checkpoint = read_checkpoint(checkpoint_path)
    recorded = (checkpoint.get("rdd_lightning") or {}).get("student")
    expected = net.describe()
    if recorded is not None:
        diffs = {k: (recorded.get(k), v) for k, v in expected.items() if recorded.get(k) != v}
        if diffs:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diffs.items())
            raise ConfigError(
                f"{key}={str(checkpoint_path)!r} holds a different network than {config} ({detail}). Choose "
                f"the {config_hint} config that matches the checkpoint, or a checkpoint of this architecture."
            )
    state = network_state_dict(checkpoint)
    try:
        net.load_state_dict(weight_formats.network_state(state, net))
    except weight_formats.WeightMismatch as err:
        made_for, classes = weight_formats.infer_cirkd_network(state)
        hint = (
            f"the file is CIRKD's {made_for} ({classes} classes): use {config_hint}={made_for}"
            if made_for
            else (f"choose the {config_hint} config the file was trained as")
        )
        raise ConfigError(
            f"{key}={str(checkpoint_path)!r} does not fit {config} ({expected['arch']} over "
            f"{expected['encoder_name']!r}, {expected['num_classes']} classes; {err}); {hint}"
        ) from err
    return net.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------- input normalisation
#: CIRKD trains and evaluates on BGR images minus the mean pixel, unscaled
CIRKD_NORMALIZATION = NORMALIZATIONS["caffe"]


def normalization_record(norm: Normalization) -> dict[str, Any]:
    """How a network's inputs were normalised, as checkpoints record it (``rdd_lightning.normalization``)."""
    return {"mean": [float(m) for m in norm.mean], "std": [float(s) for s in norm.std], "bgr": bool(norm.bgr)}


def trained_normalization(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The input normalisation a checkpoint's network was trained with: recorded by this package, CIRKD's for a
    CIRKD file, ``None`` when the file does not say (a checkpoint of an earlier version, a foreign state dict)."""
    recorded = (checkpoint.get("rdd_lightning") or {}).get("normalization")
    if recorded is not None:
        return recorded
    return normalization_record(CIRKD_NORMALIZATION) if is_cirkd_checkpoint(checkpoint) else None


def _describe(record: dict[str, Any]) -> str:
    for name, preset in NORMALIZATIONS.items():
        if _same(record, normalization_record(preset)):
            return name
    return f"mean={record['mean']} std={record['std']} bgr={record['bgr']}"


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    close = lambda x, y: all(abs(float(p) - float(q)) <= 1e-6 for p, q in zip(x, y, strict=True))  # noqa: E731
    return bool(a["bgr"]) == bool(b["bgr"]) and close(a["mean"], b["mean"]) and close(a["std"], b["std"])


def check_normalization(
    checkpoint: dict[str, Any], path: str | os.PathLike, key: str, dataset: Normalization
) -> None:
    """A network is only meaningful on inputs normalised as in its training: a :class:`ConfigError` naming
    both normalisations and the fix when the checkpoint's (:func:`trained_normalization`) is not the dataset's."""
    trained = trained_normalization(checkpoint)
    current = normalization_record(dataset)
    if trained is None or _same(trained, current):
        return
    want = _describe(trained)
    fix = (
        f"dataset.normalization={want}"
        if want in NORMALIZATIONS
        else f"dataset.normalization / mean / std ({want})"
    )
    raise ConfigError(
        f"{key}={str(path)!r} was trained on inputs normalised as {want}, but the dataset normalises as "
        f"{_describe(current)}; set {fix}"
    )


def auto_teacher_checkpoint(
    *,
    cache_dir: str | os.PathLike,
    teacher_choice: str,
    teacher_cfg: dict[str, Any],
    dataset_overrides: list[str],
    dataset_prepare: dict[str, Any],
    seed: int,
    rank: int = 0,
) -> Path:
    """Train (once) and cache a teacher on the synthetic dataset with the package's teacher recipe.

    The cache key covers the teacher architecture, the dataset generator parameters and root
    (whose name carries the generator version), the dataset overrides and the teacher's own seed
    (``teacher.seed``, not the student's), so a sweep over student seeds shares one teacher while a change
    of any of these trains a new one instead of reusing a wrong one.

    Only global rank 0 of a distributed job trains it, in a subprocess with a clean environment (no rank or
    SLURM variables, so it is a one-process job of its own); the other ranks wait for the file. A file lock
    makes concurrent jobs of a sweep wait for one training instead of racing.
    """
    key_src = json.dumps(
        {
            "teacher": teacher_cfg,
            "prepare": dataset_prepare,
            "overrides": sorted(dataset_overrides),
            "seed": seed,
            "recipe": TEACHER_RECIPE,
        },
        sort_keys=True,
        default=str,
    )
    key = hashlib.sha1(key_src.encode()).hexdigest()[:10]
    folder = Path(cache_dir) / "teachers" / f"synthetic-{teacher_choice}-{key}"
    target = folder / "teacher.ckpt"
    folder.mkdir(parents=True, exist_ok=True)
    if rank != 0:
        try:
            wait_for(target, failed=folder / "failed.txt")
        except RuntimeError as err:
            raise ConfigError(str(err)) from err
        return target
    with FileLock(str(folder / ".lock")):
        if target.is_file():
            return target
        run_dir = folder / "run"
        if run_dir.exists():  # an interrupted earlier attempt; keep it for inspection
            run_dir.rename(folder / f"run-interrupted-{os.getpid()}")
        cmd = [
            sys.executable,
            "-m",
            "rdd_lightning.train",
            TEACHER_RECIPE,
            f"student={teacher_choice}",
            f"seed={seed}",
            "logger=csv",
            f"hydra.run.dir={run_dir}",
            *dataset_overrides,
        ]
        print(
            f"[rdd_lightning] no cached teacher for teacher={teacher_choice}; training one: {' '.join(cmd[1:])}",
            flush=True,
        )
        (folder / "failed.txt").unlink(missing_ok=True)
        result = subprocess.run(cmd, check=False, env=clean_environment())
        best = run_dir / "checkpoints" / "best.ckpt"
        if result.returncode != 0 or not best.is_file():
            message = (
                f"training the synthetic teacher failed (exit {result.returncode}); see {run_dir}. "
                f"Train one yourself with `{train_teacher_command(teacher_choice, 'synthetic')}` and pass "
                f"teacher.checkpoint=<its checkpoints/best.ckpt>."
            )
            (folder / "failed.txt").write_text(message)
            raise ConfigError(message)
        shutil.copyfile(best, folder / "teacher.ckpt.tmp")
        os.replace(folder / "teacher.ckpt.tmp", target)
    return target


def weights_digest(net: torch.nn.Module) -> str:
    """SHA-256 of a network's state dict (names, dtypes, shapes and values in key order), first 16 hex digits:
    recorded in a student's checkpoints to tell, on resume, whether the teacher is still the same one."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ any checkpoint
def package_student_config(option: str) -> dict[str, Any]:
    """The package's ``student/<option>`` config (for checkpoints that record only the option's name), without
    encoder weights (the checkpoint has them; a weight file's path may name the run's root directory, which only
    resolves inside a Hydra app)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    overrides = [f"student={option}", "student.encoder_weights=null"]
    try:
        if GlobalHydra.instance().is_initialized():  # inside the Hydra app
            cfg = compose(config_name="evaluate", overrides=overrides)
        else:
            with initialize_config_module(config_module="rdd_lightning.conf", version_base="1.3"):
                cfg = compose(config_name="evaluate", overrides=overrides)
    except Exception as err:  # Hydra's missing-config errors
        raise ConfigError(
            f"the checkpoint was trained with student={option}, which is not a config of this package; "
            f"pass student=<the network's config>"
        ) from err
    return OmegaConf.to_container(cfg.student, resolve=True)


def rebuild_network(
    ckpt_path: Path, checkpoint: dict[str, Any], student_cfg: DictConfig | None, num_classes: int
) -> SegmentationNet:
    """The network of ``ckpt_path`` (read into ``checkpoint``) with its weights, frozen, in eval mode.

    Built from ``student_cfg`` when the user gave one (checked against the checkpoint's record: a mismatch
    raises a :class:`ConfigError` naming both), else from the network config the checkpoint records
    (``metadata["network"]``), else from the package's ``student/<metadata["student_config"]>`` config, else,
    for a CIRKD file, from the ``cirkd_*`` config its keys name.
    """
    metadata = checkpoint.get("rdd_lightning") or {}
    choice = None
    if student_cfg is not None:
        net = instantiate(student_cfg, num_classes=num_classes, encoder_weights=None)
    elif metadata.get("network"):
        net = build_model(**{**metadata["network"], "num_classes": num_classes})
    elif metadata.get("student_config") or is_cirkd_checkpoint(checkpoint):
        choice = (
            metadata.get("student_config")
            or weight_formats.infer_cirkd_network(network_state_dict(checkpoint))[0]
        )
        if choice is None:
            raise ConfigError(
                f"ckpt_path={str(ckpt_path)!r} is a CIRKD network the package has no config of; pass "
                f"student=<the network's config>"
            )
        spec = package_student_config(choice)
        net = instantiate({**spec, "num_classes": num_classes, "encoder_weights": None})
    else:
        raise ConfigError(
            f"ckpt_path={str(ckpt_path)!r} records no network (not a checkpoint of this package?); "
            f"pass student=<the network's config>, e.g. student=resnet18"
        )
    try:
        return load_teacher(
            net,
            ckpt_path,
            config_hint="student",
            checkpoint_key="ckpt_path",
            checkpoint=checkpoint,
            choice=choice,
        )
    except ConfigError as err:
        if student_cfg is None:
            raise
        raise ConfigError(f"{err} Or leave student= out: the checkpoint's own network is used.") from err
