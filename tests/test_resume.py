"""Atomic writes and the run-directory rules (the multi-process resume paths are in test_scale_out.py)."""

from __future__ import annotations

import pytest
import torch

from rdd_lightning.errors import ConfigError
from rdd_lightning.resume import AtomicCheckpointIO, RunFinished, atomic_write_text, resolve_ckpt_path


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    def dies_halfway(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the job is killed while writing

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_atomic_text_replaces_whole_files(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def _unfinished(run_dir):
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    return run_dir


def test_run_directory_rules(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    new = tmp_path / "new"
    assert resolve_ckpt_path(new, None) is None and resolve_ckpt_path(new, "last") is None  # fresh start
    other = _unfinished(tmp_path / "other")
    assert resolve_ckpt_path(new, str(other / "checkpoints" / "last.ckpt")) == str(
        other / "checkpoints" / "last.ckpt"
    )

    run = _unfinished(tmp_path / "run")
    own_last = str((run / "checkpoints" / "last.ckpt").resolve())
    with pytest.raises(ConfigError, match="holds an unfinished run; resume it in place with ckpt_path=last"):
        resolve_ckpt_path(run, None)
    assert resolve_ckpt_path(run, "last") == own_last
    assert resolve_ckpt_path(run, own_last) == own_last
    with pytest.raises(ConfigError, match="holds checkpoints of another run"):
        resolve_ckpt_path(run, str(other / "checkpoints" / "last.ckpt"))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeued SLURM job resumes by itself
    assert resolve_ckpt_path(run, None) == own_last

    (run / "results.json").write_text("{}")
    with pytest.raises(RunFinished, match="holds the run this job finished before it was requeued"):
        resolve_ckpt_path(run, None)  # the requeued job's own finished run: nothing to do
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    with pytest.raises(ConfigError, match="holds a finished run"):
        resolve_ckpt_path(run, "last")
    with pytest.raises(ConfigError, match="file not found"):
        resolve_ckpt_path(new, str(tmp_path / "missing.ckpt"))
