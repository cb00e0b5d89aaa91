"""Cost of one full training step of every ``distillation`` config, as ratios to ``kd``.

Usage::

    python benchmarks/kd_step.py                                   # CPU, small input (a few minutes, 2 cores)
    python benchmarks/kd_step.py --device cuda --size 512 1024 --amp   # a GPU at Cityscapes crop size
    python benchmarks/kd_step.py --configs kd rdd cirkd --steps 10     # a subset, more steps

Setting: the paper's networks, DeepLabV3-ResNet18 student (128 decoder channels, aux head) and a frozen
DeepLabV3-ResNet101 teacher (256 decoder channels, aux head), output stride 8, 19 classes, random weights;
random images with blocky labels (about 5 % void). Each config's objective is built from its shipped yaml
(composed with ``dataset=cityscapes``, so the dataset-level keys are Cityscapes': ``min_kept_per_image`` 25000, the
TSE class weights, CIRKD's memory weights) and gets its own copy of the student, its own modules (connectors,
CIRKD memory, discriminator) and optimizers; the teacher is shared. RDD configs are measured in their TSE-RDD
stage (90 % of a run; the ``tfe`` row is the first 10 %).

One step = what ``DistillationModule`` does per batch: teacher forward under ``no_grad``, student forward,
the objective (task loss and every term; plus the discriminator's loss when there is one), one backward, the
discriminator's Adam step and the student's SGD step (momentum 0.9, weight decay 1e-4), gradients set to
``None``. ``--amp``: float16 autocast with a loss scaler on CUDA, bfloat16 autocast on CPU. Lightning's own
per-step overhead (logging, callbacks) is the same for every config and is left out.

Timing: all configs live in this one process and run interleaved, one step of each per round (the order
rotates every round), ``--warmup`` rounds first; the table reports the median of ``--steps`` timed rounds.

Peak memory of a step = the config's resident state (teacher, student, its modules and buffers such as
CIRKD's queues, its optimizer states) + the transient peak of one more step. Transient peak: on CUDA
``max_memory_allocated`` minus the allocation before the step; on CPU the rise of the peak resident set
(``VmHWM`` after ``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) over the resident set before the step, with
glibc's ``M_MMAP_THRESHOLD`` at 64 KiB so freed tensor buffers go back to the OS (see
``benchmarks/rdd_losses.py`` for the method).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import functools
import json
import os
import platform
import re
import statistics
import sys
import time
from importlib.resources import files
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hydra import compose, initialize_config_module  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from rdd_lightning.distillation import TSE, DistillationObjective  # noqa: E402
from rdd_lightning.models import build_model  # noqa: E402
from rdd_lightning.module import DistillationModule  # noqa: E402

NUM_CLASSES = 19
IGNORE = 255
CONFIGS = sorted(
    p.name[: -len(".yaml")]
    for p in files("rdd_lightning.conf").joinpath("distillation").iterdir()
    if p.name.endswith(".yaml")
)


def objective_of(name: str) -> DistillationObjective:
    """The objective of ``conf/distillation/<name>.yaml`` composed with ``dataset=cityscapes``."""
    with initialize_config_module(config_module="rdd_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"distillation={name}", "dataset=cityscapes"])
    options = OmegaConf.to_container(cfg.distillation, resolve=True)
    objective = DistillationObjective(**options, num_classes=NUM_CLASSES, ignore_index=IGNORE)
    if objective.task == "rdd":
        objective.stage = TSE
    return objective


def make_batch(batch: int, size: tuple[int, int], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, w = size
    coarse = torch.randint(0, NUM_CLASSES, (batch, -(-h // 32), -(-w // 32)), generator=g)
    target = coarse.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, :h, :w].contiguous()
    target[torch.rand(batch, h, w, generator=g) < 0.05] = IGNORE
    images = torch.randn(batch, 3, h, w, generator=g)
    return images.to(device), target.to(device)


class Case:
    """One config: its module (own student copy, modules, optimizers) and how to run one training step."""

    def __init__(self, name: str, student, teacher, device: str, amp: bool):
        self.name = name
        objective = objective_of(name)
        self.module = DistillationModule(
            student=copy.deepcopy(student),
            teacher=teacher if objective.needs_teacher else None,  # `none` runs without one
            objective=objective,
            optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=1e-4),
            scheduler=None,
            num_classes=NUM_CLASSES,
            class_names=[str(c) for c in range(NUM_CLASSES)],
        ).to(device)
        self.module.train()
        configured = self.module.configure_optimizers()
        self.optimizers = configured[0] if isinstance(configured, tuple) else [configured["optimizer"]]
        self.device = device
        cuda = device.startswith("cuda")
        self.autocast = (
            functools.partial(torch.autocast, "cuda", dtype=torch.float16)
            if amp and cuda
            else functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
            if amp
            else contextlib.nullcontext
        )
        self.scaler = torch.amp.GradScaler("cuda") if amp and cuda else None

    def step(self, images: torch.Tensor, target: torch.Tensor) -> None:
        m, objective = self.module, self.module.objective
        with self.autocast():
            out = m.student(images)
            teacher_out = m.teacher_forward(images)
            loss = objective(out, teacher_out, target, m.distill_modules)["loss"]
            if objective.has_discriminator:
                loss_d = objective.discriminator_loss(out, teacher_out, m.distill_modules)
                loss = loss + objective.discriminator_weight * loss_d
        if self.scaler is None:
            loss.backward()
            for optimizer in reversed(self.optimizers):  # the discriminator's first, as DistillationModule
                optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            for optimizer in reversed(self.optimizers):
                self.scaler.step(optimizer)
            self.scaler.update()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def resident_bytes(self) -> int:
        """Bytes of the tensors this config keeps between steps (teacher included, it is part of every run)."""
        tensors = {}
        for t in [*self.module.parameters(), *self.module.buffers()]:
            tensors[t.data_ptr()] = t.numel() * t.element_size()
        for optimizer in self.optimizers:
            for state in optimizer.state.values():
                for v in state.values():
                    if torch.is_tensor(v):
                        tensors[v.data_ptr()] = v.numel() * v.element_size()
        return sum(tensors.values())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def transient_peak_bytes(case: Case, images: torch.Tensor, target: torch.Tensor) -> int:
    """Peak memory one step adds to what is resident before it."""
    if case.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        case.step(images, target)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current VmRSS
    base = _status_kib("VmRSS")
    case.step(images, target)
    return (_status_kib("VmHWM") - base) * 1024


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    model = platform.processor() or "CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        model = found.group(1).strip() if found else model
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="input crop (default 128 128 on CPU, 512 1024 on CUDA)",
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="images per step (default 2 on CPU, 4 on CUDA)"
    )
    parser.add_argument("--amp", action="store_true", help="mixed precision (fp16 + loss scaler on CUDA)")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=CONFIGS,
        choices=CONFIGS,
        metavar="NAME",
        help=f"configs to run (default: all; kd is always added): {' '.join(CONFIGS)}",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    size = tuple(args.size or ((512, 1024) if cuda else (128, 128)))
    batch = args.batch or (4 if cuda else 2)
    if not cuda:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD, before the big allocations
    torch.backends.cudnn.benchmark = True
    names = ["kd", *[c for c in args.configs if c != "kd"]]

    torch.manual_seed(0)
    student = build_model(
        "DeepLabV3", "resnet18", NUM_CLASSES, encoder_output_stride=8, decoder_channels=128, upsampling=1
    )
    teacher = build_model(
        "DeepLabV3", "resnet101", NUM_CLASSES, encoder_output_stride=8, decoder_channels=256, upsampling=1
    ).to(args.device)
    cases = [Case(name, student, teacher, args.device, args.amp) for name in names]
    images, target = make_batch(batch, size, args.device)
    print(f"# {machine(args.device)}; input {batch}x3x{size[0]}x{size[1]}, amp={args.amp}", flush=True)

    times: dict[str, list[float]] = {c.name: [] for c in cases}
    for round_ in range(args.warmup + args.steps):
        shift = round_ % len(cases)
        for case in cases[shift:] + cases[:shift]:
            _sync(args.device)
            start = time.perf_counter()
            case.step(images, target)
            _sync(args.device)
            if round_ >= args.warmup:
                times[case.name].append((time.perf_counter() - start) * 1e3)
        print(f"round {round_ + 1}/{args.warmup + args.steps}", file=sys.stderr, flush=True)

    results = {}
    for case in cases:
        peak = case.resident_bytes() + transient_peak_bytes(case, images, target)
        results[case.name] = {"ms": statistics.median(times[case.name]), "peak_mib": peak / 2**20}
    ref = results["kd"]
    print("| config | ms / step | × kd | peak MiB | × kd |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        r = results[name]
        print(
            f"| `{name}` | {r['ms']:.0f} | {r['ms'] / ref['ms']:.2f} | {r['peak_mib']:.0f} | "
            f"{r['peak_mib'] / ref['peak_mib']:.2f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(args.device),
                    "size": size,
                    "batch": batch,
                    "amp": args.amp,
                    "results": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
