"""Draw docs/difficulty_maps.png: TFE weights and TSE selections of a trained student and its teacher.

    python docs/make_difficulty_map.py --student logs/docs_maps/runs/<time>/checkpoints/best.ckpt \\
        --teacher <the run's results.json teacher_checkpoint> --out docs/difficulty_maps.png

The validation data and the RDD options are those of the student's run (see
:func:`rdd_lightning.difficulty_maps.run_datamodule`); one row per validation image.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rdd_lightning.difficulty_maps import (
    image_maps,
    load_network,
    render_difficulty_maps,
    run_datamodule,
    stack_maps,
)


def make_figure(student_ckpt: Path, teacher_ckpt: Path, indices: list[int]):
    """The figure of ``indices`` (validation images of one size) for the two checkpoints."""
    student, teacher = load_network(student_ckpt), load_network(teacher_ckpt)
    datamodule, options = run_datamodule(student_ckpt)
    dataset = datamodule.dataset("val")
    rows = [image_maps(student, teacher, dataset, i, options, datamodule.normalization) for i in indices]
    return render_difficulty_maps(
        torch.cat([torch.as_tensor(rgb) for rgb, _, _ in rows]).numpy(),
        torch.cat([target for _, target, _ in rows]),
        stack_maps([maps for _, _, maps in rows]),
        class_names=datamodule.class_names,
        palette=datamodule.palette,
        mode=options.mode,
        title=f"RDD difficulty maps on {datamodule.name} validation images ({options.describe()})",
        row_labels=[f"val image {i}" for i in indices],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, required=True, help="a student run's checkpoint")
    parser.add_argument("--teacher", type=Path, required=True, help="its teacher's checkpoint")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("difficulty_maps.png"))
    parser.add_argument("--indices", type=int, nargs="+", default=[0, 1, 2], help="validation images")
    args = parser.parse_args()
    fig = make_figure(args.student, args.teacher, args.indices)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
