"""Peak memory and time of CIRKD's mini-batch pixel-relation term at the paper's crop, whole and in row blocks.

Usage::

    python benchmarks/cirkd_memory.py [--batch 2] [--chunks none,512,128] [--repeats 3] [--json F]

Setting: Cityscapes crops of 512x1024, features at 1/8 (``N = 64 x 128 = 8192`` pixels per image), the
student's decoder feature (128 channels, CIRKD's DeepLabV3-R18) against the teacher's (256, R101), ``B`` images
per process, all of them partners (``gather=False``, one process: ``B_global = B``). Each case is one forward +
backward of :func:`rdd_lightning.losses.minibatch_pixel_relation_loss` w.r.t. the student feature with
``chunk_rows`` ``None`` (CIRKD's profile: each anchor image's ``[B, N, N]`` relations kept for backward) or a
row-block size (relations recomputed block by block in backward).

Peak memory is measured as ``benchmarks/rdd_losses.py`` does on the CPU (a fresh subprocess per case, glibc's
``M_MMAP_THRESHOLD`` lowered so freed tensors leave the resident set, the kernel's peak-RSS counter reset after
a warm-up run): the extra resident memory of one forward + backward, in MiB; on CUDA
``torch.cuda.max_memory_allocated`` above what was allocated before. The model line
``2 * B * B_global * N^2 * 4`` bytes (unchunked) / ``3 * B_global * chunk_rows * N * 4`` (chunked) is printed beside
it, and the paper's batches (one GPU x 16 images, ``gather`` over 4 GPUs x 4) from the same formulas.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rdd_lightning.losses import minibatch_pixel_relation_loss  # noqa: E402

H, W, STUDENT_CHANNELS, TEACHER_CHANNELS = 64, 128, 128, 256
N = H * W
GIB = 2**30


def inputs(batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    fs = torch.randn(batch, STUDENT_CHANNELS, H, W, generator=generator).to(device).requires_grad_(True)
    ft = torch.randn(batch, TEACHER_CHANNELS, H, W, generator=generator).to(device)
    return fs, ft


def step(fs: torch.Tensor, ft: torch.Tensor, chunk: int | None) -> None:
    fs.grad = None
    minibatch_pixel_relation_loss(fs, ft, gather=False, chunk_rows=chunk).backward()


def _status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def peak_mib_here(batch: int, chunk: int | None, device: str) -> float:
    """Extra memory (MiB) of one forward + backward in this process, after a warm-up one."""
    if device.startswith("cuda"):
        fs, ft = inputs(batch, device)
        step(fs, ft, chunk)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(fs, ft, chunk)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: freed buffers are unmapped
    fs, ft = inputs(batch, device)
    step(fs, ft, chunk)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status_kib("VmRSS")
    step(fs, ft, chunk)
    return (_status_kib("VmHWM") - base) / 1024


def peak_mib(batch: int, chunk: int | None, device: str) -> float:
    if device.startswith("cuda"):
        return peak_mib_here(batch, chunk, device)
    cmd = [sys.executable, __file__, "--_peak", f"{batch},{chunk}", "--device", device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def median_ms(batch: int, chunk: int | None, device: str, repeats: int) -> float:
    fs, ft = inputs(batch, device)
    times = []
    for i in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(fs, ft, chunk)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def model_gib(batch: int, partners: int, chunk: int | None) -> float:
    """The formula: floats the term keeps at once, in GiB."""
    floats = 2 * batch * partners * N * N if chunk is None else 3 * partners * min(chunk, N) * N
    return floats * 4 / GIB


def parse_chunk(text: str) -> int | None:
    return None if text in ("none", "None") else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="images per process (all partners)")
    parser.add_argument("--chunks", default="none,512,128", help="chunk_rows values; none = unchunked")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--_peak", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._peak:
        batch, chunk = args._peak.split(",")
        print(peak_mib_here(int(batch), parse_chunk(chunk), args.device))
        return
    torch.manual_seed(0)
    rows = []
    for chunk in [parse_chunk(c) for c in args.chunks.split(",")]:
        peak = peak_mib(args.batch, chunk, args.device)
        ms = median_ms(args.batch, chunk, args.device, args.repeats)
        rows.append(
            {
                "batch": args.batch,
                "chunk_rows": chunk,
                "peak_mib": peak,
                "model_mib": model_gib(args.batch, args.batch, chunk) * 1024,
                "ms": ms,
            }
        )
    base = next((r for r in rows if r["chunk_rows"] is None), None)
    print(
        f"CIRKD mini-batch term, {N} pixels per image (512x1024 crops at 1/8), B = B_global = {args.batch}, "
        f"{args.device}, torch {torch.__version__}"
    )
    print("| chunk_rows | peak MiB (measured) | model MiB | time ms (median) | time vs unchunked |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['ms'] / base['ms']:.2f}x" if base else "-"
        print(
            f"| {r['chunk_rows'] or 'none'} | {r['peak_mib']:.0f} | {r['model_mib']:.0f} | {r['ms']:.0f} | {ratio} |"
        )
    print("\nThe paper's batches from the model (GiB kept by the term):")
    for label, batch, partners in (
        ("1 GPU x 16 images", 16, 16),
        ("4 GPUs x 4, gather", 4, 16),
        ("per GPU, no gather", 4, 4),
    ):
        cells = ", ".join(
            f"chunk_rows={c or 'none'}: {model_gib(batch, partners, c):.2f}"
            for c in [parse_chunk(x) for x in args.chunks.split(",")]
        )
        print(f"- {label}: {cells}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
