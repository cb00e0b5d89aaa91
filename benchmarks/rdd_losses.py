"""Cost of the RDD task losses against the plain task loss, at Cityscapes per-GPU scale.

Usage::

    python benchmarks/rdd_losses.py [--repeats 5] [--device cpu|cuda] [--no-memory] [--scaling] [--json F]

``--scaling`` (``make bench-scaling``) measures instead how the cost grows with batch size (2, 4, 8), label
resolution (256x256, 512x512, 512x1024) and number of classes (19, 60, 150; 150 at 512x512 is ADE20K), one
axis at a time around batch 4 x 19 classes x 512x512, as ratios to the plain loss of the same size.

Setting (DeepLabV3 at output stride 8 on 512x1024 crops, batch 4 per GPU): 19 classes, logits ``[4, 19, 64,
128]`` (student main/aux and teacher main/aux), labels ``[4, 512, 1024]`` with ~5 % ignored (255). Labels
are blocky 128x128-pixel regions drawn at logit resolution; the teacher's logits are confident on the true
class (about 3 % of the pixels under the 0.7 threshold, fewer than ``min_kept = 100000``, so the OHEM
k-th-value path runs), the student's less so (the fixed-threshold path suffices). The script prints which
path each head takes.

Cases, each timed as forward + backward of the loss w.r.t. the student logits (the teacher logits are
constants):

- ``plain``: ``CE(up(zs), y) + 0.4 * CE(up(as), y)`` with PyTorch's mean over valid pixels (the floor);
- ``tfe``: :func:`rdd_lightning.rdd.tfe_task_loss` (default options);
- ``tse``: :func:`rdd_lightning.rdd.tse_task_loss` (default ``mode="xor"``);

each with the auxiliary heads (``+aux``) and without (``noaux``: student aux ``None``; for TSE the teacher
aux is ``None`` too; TFE always needs the teacher's aux head).

Timing: all cases run in this one process, interleaved round-robin (one run of each case per round) after a
warm-up round, so drift of the machine hits all cases alike; the table reports the median over ``--repeats``
rounds.

Peak memory:

- CUDA: ``torch.cuda.max_memory_allocated`` during one forward + backward, minus the memory allocated before
  it (the inputs), in the same process.
- CPU: PyTorch's CPU allocator has no peak counter, so each case runs in a **fresh subprocess** that (1) sets
  glibc's ``M_MMAP_THRESHOLD`` to 64 KiB with ``mallopt`` so every tensor buffer is its own ``mmap`` and is
  returned to the OS at ``free`` (resident memory then follows live tensor allocations instead of the heap's
  high-water mark), (2) builds the inputs and runs one warm-up forward + backward (one-time allocations such as
  thread pools), (3) resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0)
  and (4) runs one forward + backward and reports ``VmHWM - VmRSS`` (peak resident minus resident before the
  run). This counts every byte the loss actually touched (tensors and kernel temporaries), at page
  granularity. Without ``clear_refs`` it falls back to ``ru_maxrss`` minus the RSS before the warm-up.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rdd_lightning.rdd import tfe_task_loss, tse_task_loss  # noqa: E402

IGNORE = 255
CASES = ("plain+aux", "tfe+aux", "tse+aux", "plain noaux", "tfe noaux", "tse noaux")
STRIDE = 8  # logits at 1/8 of the labels (DeepLabV3 / PSPNet at output stride 8)


@dataclass(frozen=True)
class Setting:
    """A loss-input size: batch ``B`` (per GPU), classes ``C``, labels ``H x W`` (logits ``H/8 x W/8``)."""

    B: int = 4
    C: int = 19
    H: int = 512
    W: int = 1024

    @property
    def logit_size(self) -> tuple[int, int]:
        return self.H // STRIDE, self.W // STRIDE

    def __str__(self) -> str:
        return f"batch {self.B}, {self.C} classes, {self.H}x{self.W}"


CITYSCAPES = Setting()  # the paper's per-GPU Cityscapes batch


def make_inputs(device: str, setting: Setting = CITYSCAPES, seed: int = 0) -> dict:
    """Labels ``[B,H,W]`` int64 and leaf logits ``[B,C,h,w]`` float32 (student ones require grad)."""
    B, C, H, W = setting.B, setting.C, setting.H, setting.W
    h, w = setting.logit_size
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, C, (B, h // 16, w // 16), generator=g)  # regions of 128x128 label px
    y_low = coarse.repeat_interleave(16, 1).repeat_interleave(16, 2)  # [B,h,w]
    target = y_low.repeat_interleave(H // h, 1).repeat_interleave(W // w, 2).contiguous()
    target[torch.rand(B, H, W, generator=g) < 0.05] = IGNORE
    onehot = F.one_hot(y_low, C).permute(0, 3, 1, 2).float()

    def logits(scale_noise: float, scale_true: float, grad: bool) -> torch.Tensor:
        x = scale_noise * torch.randn(B, C, h, w, generator=g) + scale_true * onehot
        return x.to(device).requires_grad_(grad)

    return {
        "target": target.to(device),
        "zs": logits(2.0, 4.0, True),
        "as": logits(2.0, 3.0, True),
        "zt": logits(1.0, 8.0, False),
        "at": logits(1.0, 7.0, False),
    }


def plain_task_loss(zs, as_, target):
    """The floor: PyTorch CE (mean over valid pixels) of the upsampled main (+ 0.4 aux) logits."""
    size = target.shape[-2:]
    up = lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=True)  # noqa: E731
    loss = F.cross_entropy(up(zs), target, ignore_index=IGNORE)
    if as_ is not None:
        loss = loss + 0.4 * F.cross_entropy(up(as_), target, ignore_index=IGNORE)
    return loss


def run_case(case: str, x: dict) -> None:
    """One forward + backward of ``case`` on inputs ``x``."""
    aux = case.endswith("+aux")
    zs, as_ = x["zs"], (x["as"] if aux else None)
    zs.grad = None
    x["as"].grad = None
    if case.startswith("plain"):
        loss = plain_task_loss(zs, as_, x["target"])
    elif case.startswith("tfe"):
        loss = tfe_task_loss(zs, as_, x["zt"], x["at"], x["target"])
    else:
        loss = tse_task_loss(zs, as_, x["zt"], x["at"] if aux else None, x["target"])
    loss.backward()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_cases(
    device: str, repeats: int, setting: Setting = CITYSCAPES, cases: tuple[str, ...] = CASES
) -> dict[str, float]:
    """Median wall time (ms) of forward + backward per case, interleaved rounds after one warm-up round."""
    x = make_inputs(device, setting)
    times: dict[str, list[float]] = {c: [] for c in cases}
    for round_ in range(repeats + 1):
        for case in cases:
            _sync(device)
            start = time.perf_counter()
            run_case(case, x)
            _sync(device)
            if round_ > 0:
                times[case].append((time.perf_counter() - start) * 1e3)
    return {c: statistics.median(t) for c, t in times.items()}


def _status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _peak_mib_this_process(case: str, device: str, setting: Setting = CITYSCAPES) -> float:
    """Peak extra memory (MiB) of one forward + backward of ``case``; see the module docstring."""
    if device.startswith("cuda"):
        x = make_inputs(device, setting)
        run_case(case, x)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_case(case, x)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: big buffers are mmap'ed and unmapped on free
    x = make_inputs(device, setting)
    rss_before_warmup = _status_kib("VmRSS")
    run_case(case, x)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        run_case(case, x)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_warmup) / 1024
    base = _status_kib("VmRSS")
    run_case(case, x)
    return (_status_kib("VmHWM") - base) / 1024


def peak_memory(
    device: str, setting: Setting = CITYSCAPES, cases: tuple[str, ...] = CASES
) -> dict[str, float]:
    """Peak MiB per case: in-process on CUDA, one fresh subprocess per case on CPU."""
    out = {}
    for case in cases:
        if device.startswith("cuda"):
            out[case] = _peak_mib_this_process(case, device, setting)
            continue
        size = f"{setting.B},{setting.C},{setting.H},{setting.W}"
        proc = subprocess.run(
            [sys.executable, __file__, "--device", device, "--_memory-case", case, "--_setting", size],
            capture_output=True,
            text=True,
            check=True,
        )
        out[case] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]
    return out


def describe_masks(device: str, setting: Setting = CITYSCAPES) -> str:
    """One line on the inputs: hard fractions of each head and which threshold path they take."""
    x = make_inputs(device, setting)
    from rdd_lightning.rdd import pixel_confidence

    valid = x["target"] != IGNORE
    n_valid = int(valid.sum())
    parts = []
    for name in ("zs", "as", "zt", "at"):
        q = pixel_confidence(x[name], x["target"])
        n_le = int((valid & (q <= 0.7)).sum())
        path = "fixed threshold" if n_le >= min(100000, n_valid) else "k-th value"
        parts.append(f"{name}: {n_le / n_valid:.1%} of valid pixels have q<=0.7 ({path})")
    return "; ".join(parts)


# The scaling study: one axis at a time around 4 x 19 classes x 512x512; 150 classes at 512x512 is ADE20K.
SCALING = {
    "batch": [Setting(2, 19, 512, 512), Setting(4, 19, 512, 512), Setting(8, 19, 512, 512)],
    "resolution": [Setting(4, 19, 256, 256), Setting(4, 19, 512, 512), Setting(4, 19, 512, 1024)],
    "classes": [Setting(4, 19, 512, 512), Setting(4, 60, 512, 512), Setting(4, 150, 512, 512)],
}
SCALING_CASES = ("plain+aux", "tfe+aux", "tse+aux")


def cost_table(
    device: str, repeats: int, setting: Setting, memory: bool, cases: tuple[str, ...] = CASES
) -> list[dict]:
    """One row per case: median ms, peak MiB and both as ratios to the plain loss of the same heads."""
    times = time_cases(device, repeats, setting, cases)
    mem = peak_memory(device, setting, cases) if memory else None
    rows = []
    for case in cases:
        plain = "plain+aux" if case.endswith("+aux") else "plain noaux"
        rows.append(
            {
                "setting": str(setting),
                "case": case,
                "ms": times[case],
                "time_ratio": times[case] / times[plain],
                "peak_mib": None if mem is None else mem[case],
                "memory_ratio": None if mem is None else mem[case] / mem[plain],
            }
        )
    return rows


def markdown(rows: list[dict], first: str = "case") -> str:
    lines = [
        f"| {first} | median ms | × plain time | peak MiB | × plain memory |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        label = r["case"] if first == "case" else f"{r['setting']}: {r['case']}"
        mem = " – | – |" if r["peak_mib"] is None else f" {r['peak_mib']:.0f} | {r['memory_ratio']:.2f} |"
        lines.append(f"| {label} | {r['ms']:.0f} | {r['time_ratio']:.2f} |{mem}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median is reported)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="batch, resolution and class-count sweeps (3 sizes each) instead of one setting",
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--_memory-case", dest="memory_case", help=argparse.SUPPRESS)
    parser.add_argument("--_setting", dest="setting", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.memory_case:
        setting = Setting(*map(int, args.setting.split(","))) if args.setting else CITYSCAPES
        print(json.dumps({"peak_mib": _peak_mib_this_process(args.memory_case, args.device, setting)}))
        return

    print(
        f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
        f"repeats {args.repeats}, logits at 1/{STRIDE} of the labels"
    )
    if not args.scaling:
        print(f"{CITYSCAPES}; {describe_masks(args.device)}\n")
        rows = cost_table(args.device, args.repeats, CITYSCAPES, not args.no_memory)
        print(markdown(rows))
    else:
        rows = []
        for axis, settings in SCALING.items():
            axis_rows = []
            for setting in settings:
                axis_rows += cost_table(args.device, args.repeats, setting, not args.no_memory, SCALING_CASES)
            print(f"\n{axis}:\n{markdown(axis_rows, first='setting')}", flush=True)
            rows += [{"axis": axis, **r} for r in axis_rows]
    if args.json:
        args.json.write_text(
            json.dumps({"device": args.device, "torch": torch.__version__, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
