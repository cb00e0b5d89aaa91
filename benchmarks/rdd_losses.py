"""Cost of the RDD task losses against the plain task loss, at Cityscapes per-GPU scale.

Usage::

    python benchmarks/rdd_losses.py [--repeats 5] [--device cpu|cuda] [--no-memory]

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
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rdd_lightning.rdd import tfe_task_loss, tse_task_loss  # noqa: E402

B, C, h, w, H, W = 4, 19, 64, 128, 512, 1024
IGNORE = 255
CASES = ("plain+aux", "tfe+aux", "tse+aux", "plain noaux", "tfe noaux", "tse noaux")


def make_inputs(device: str, seed: int = 0) -> dict:
    """Labels ``[B,H,W]`` int64 and leaf logits ``[B,C,h,w]`` float32 (student ones require grad)."""
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


def time_cases(device: str, repeats: int) -> dict[str, float]:
    """Median wall time (ms) of forward + backward per case, interleaved rounds after one warm-up round."""
    x = make_inputs(device)
    times: dict[str, list[float]] = {c: [] for c in CASES}
    for round_ in range(repeats + 1):
        for case in CASES:
            _sync(device)
            start = time.perf_counter()
            run_case(case, x)
            _sync(device)
            if round_ > 0:
                times[case].append((time.perf_counter() - start) * 1e3)
    return {c: statistics.median(t) for c, t in times.items()}


def _status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _peak_mib_this_process(case: str, device: str) -> float:
    """Peak extra memory (MiB) of one forward + backward of ``case``; see the module docstring."""
    if device.startswith("cuda"):
        x = make_inputs(device)
        run_case(case, x)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_case(case, x)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: big buffers are mmap'ed and unmapped on free
    x = make_inputs(device)
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


def peak_memory(device: str) -> dict[str, float]:
    """Peak MiB per case: in-process on CUDA, one fresh subprocess per case on CPU."""
    out = {}
    for case in CASES:
        if device.startswith("cuda"):
            out[case] = _peak_mib_this_process(case, device)
            continue
        proc = subprocess.run(
            [sys.executable, __file__, "--device", device, "--_memory-case", case],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        out[case] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]
    return out


def describe_masks(device: str) -> str:
    """One line on the inputs: hard fractions of each head and which threshold path they take."""
    x = make_inputs(device)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median is reported)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--_memory-case", dest="memory_case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.memory_case:
        print(json.dumps({"peak_mib": _peak_mib_this_process(args.memory_case, args.device)}))
        return

    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"batch {B}, classes {C}, logits {h}x{w}, labels {H}x{W}, repeats {args.repeats}")  # fmt: skip
    print(describe_masks(args.device))
    times = time_cases(args.device, args.repeats)
    mem = None if args.no_memory else peak_memory(args.device)
    print()
    print("| case | median ms | × plain time | peak MiB | × plain memory |")
    print("|---|---:|---:|---:|---:|")
    for case in CASES:
        plain = "plain+aux" if case.endswith("+aux") else "plain noaux"
        row = f"| {case} | {times[case]:.0f} | {times[case] / times[plain]:.2f} |"
        if mem is None:
            row += " – | – |"
        else:
            row += f" {mem[case]:.0f} | {mem[case] / mem[plain]:.2f} |"
        print(row)


if __name__ == "__main__":
    main()
