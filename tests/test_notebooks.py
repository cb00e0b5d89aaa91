"""Every notebook in notebooks/ runs top to bottom (nbclient, the python3 kernel of this environment) on tiny
synthetic runs made here. A notebook is found by globbing, so a new one fails until it has a setup below."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import train_once
from tests.test_report import run_tiny_sweep

pytestmark = pytest.mark.slow

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory) -> Path:
    """A real multirun: 2 settings x 2 seeds that finish and 1 setting whose jobs fail (see run_tiny_sweep)."""
    return run_tiny_sweep(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory) -> dict[str, Path]:
    """A tiny teacher (2 steps, supervised) and a tiny RDD student distilled from it: their best checkpoints."""
    teacher = train_once(
        tmp_path_factory,
        "nb_teacher",
        [
            "distillation=none",
            "student=resnet18_scratch",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "task_name=teacher",
        ],
    )
    student = train_once(
        tmp_path_factory,
        "nb_student",
        [
            "distillation=rdd",
            "teacher=resnet18",
            f"teacher.checkpoint={teacher['best_checkpoint']}",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
        ],
    )
    return {"teacher": Path(teacher["best_checkpoint"]), "student": Path(student["best_checkpoint"])}


# notebook file name -> environment variables it needs, made from this module's fixtures
SETUPS: dict[str, Callable[[pytest.FixtureRequest], dict[str, str]]] = {
    "sweep_results.ipynb": lambda request: {"RDD_SWEEP_DIR": str(request.getfixturevalue("tiny_sweep"))},
    "difficulty_maps.ipynb": lambda request: {
        "RDD_STUDENT_CKPT": str(request.getfixturevalue("distilled_run")["student"]),
        "RDD_TEACHER_CKPT": str(request.getfixturevalue("distilled_run")["teacher"]),
    },
}


def execute(path: Path, env: dict[str, str], monkeypatch) -> nbformat.NotebookNode:
    """Run the notebook in its own folder with ``env`` added to the kernel's environment."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    return nb


def outputs(nb: nbformat.NotebookNode) -> tuple[str, list[str]]:
    """All text the notebook printed or displayed, and the MIME types of its rich outputs."""
    texts, types = [], []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            texts.append(out.get("text", ""))
            data = out.get("data", {})
            texts += [data.get("text/plain", ""), data.get("text/markdown", "")]
            types += list(data)
    return "\n".join(texts), types


def test_notebooks_are_committed_without_outputs():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: clear its outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, request, monkeypatch):
    if path.name not in SETUPS:
        pytest.fail(f"{path.name} has no setup in tests/test_notebooks.py::SETUPS: add the runs it needs")
    nb = execute(path, SETUPS[path.name](request), monkeypatch)
    text, types = outputs(nb)
    assert "image/png" in types, f"{path.name} showed no figure"
    if path.name == "sweep_results.ipynb":
        sweep = request.getfixturevalue("tiny_sweep")
        assert "6 jobs: 2 groups, 0 evaluations, 2 incomplete or failed" in text
        assert "| optimizer.lr=0.01 |" in text and "| optimizer.lr=0.02 |" in text
        assert f"| {sweep / '4'} | optimizer.lr=-1 seed=1 |" in text
        assert types.count("image/png") == 2  # the bars and the learning curves
