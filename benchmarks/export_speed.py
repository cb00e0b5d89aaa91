"""CPU images/s of an exported student: onnxruntime and TorchScript against PyTorch eager, same images.

Usage::

    python benchmarks/export_speed.py                          # DeepLabV3-ResNet18 (student=resnet18), 512x1024
    python benchmarks/export_speed.py --size 360 480 --runs 7  # CamVid's image size
    python benchmarks/export_speed.py --ckpt logs/train/runs/<time>/checkpoints/best.ckpt --classes 11

Setting: the network of ``--ckpt`` (default: the package's ``student=resnet18`` config, the paper's
DeepLabV3-ResNet18 at output stride 8 with 128 decoder channels, random weights, ``--classes`` classes; speed
does not depend on the weights), without its auxiliary head, in the form ``rdd_lightning.export`` writes:
:class:`~rdd_lightning.deploy.StandaloneSegmenter` with ``returns=class_map`` and the ImageNet normalisation
baked in (uint8 RGB in, class map out). The same module runs in PyTorch eager (``torch.no_grad``), is exported
to ONNX (opset 18, run by onnxruntime's CPU provider) and to TorchScript, exactly as the export command does;
all three get the same random uint8 batch of ``--batch`` images of ``--size``.

Timing: in this one process, round-robin (the order rotates every round, so drift of the machine hits every
runtime alike), ``--warmup`` rounds first; the table reports the median of ``--runs`` timed rounds as seconds
per batch and images/s, and each runtime's speed as a ratio to eager. Threads: ``--threads`` (default: the
CPUs this process may use) for torch's intra-op pool and onnxruntime's.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hydra import compose, initialize_config_module  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from rdd_lightning.data.transforms import NORMALIZATIONS  # noqa: E402
from rdd_lightning.deploy import ModelCard, open_checkpoint, standalone  # noqa: E402
from rdd_lightning.export import write_onnx, write_torchscript  # noqa: E402


def student_network(ckpt: str | None, classes: int) -> torch.nn.Module:
    """The checkpoint's network, or the package's ``student=resnet18`` with random weights."""
    if ckpt:
        return open_checkpoint(Path(ckpt)).net
    with initialize_config_module(config_module="rdd_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="export", overrides=["student=resnet18"])
    return instantiate(
        cfg.student, num_classes=classes, encoder_weights=None, zero_init_residual=False
    ).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="a checkpoint to export (default: student=resnet18, random weights)")
    parser.add_argument("--classes", type=int, default=19, help="classes of the random network")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    net = student_network(args.ckpt, args.classes)
    net.aux_head = None
    norm = NORMALIZATIONS["imagenet"]
    classes = int(getattr(net, "num_classes", args.classes))
    card = ModelCard(
        [str(i) for i in range(classes)],
        [[0, 0, 0]] * classes,
        norm,
        int(net.output_stride),
        format="onnx",
        returns="class_map",
        uint8_input=True,
    )
    eager = standalone(net, "class_map", norm, with_aux=False)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, ts_path = Path(tmp) / "student.onnx", Path(tmp) / "student.torchscript.pt"
        start = time.perf_counter()
        write_onnx(eager, card, onnx_path, opset=18)
        onnx_export_s = time.perf_counter() - start
        write_torchscript(net, card, ts_path)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(str(ts_path))

        images = torch.randint(0, 256, (args.batch, 3, *args.size), dtype=torch.uint8)
        feed = {"images": images.numpy()}
        runtimes = {
            "PyTorch eager": lambda: eager(images),
            "onnxruntime": lambda: session.run(None, feed),
            "TorchScript": lambda: scripted(images),
        }
        times: dict[str, list[float]] = {name: [] for name in runtimes}
        order = list(runtimes)
        with torch.no_grad():
            for round_ in range(args.warmup + args.runs):
                for name in order[round_ % len(order) :] + order[: round_ % len(order)]:
                    start = time.perf_counter()
                    runtimes[name]()
                    if round_ >= args.warmup:
                        times[name].append(time.perf_counter() - start)
        # the three agree (class maps equal but for near ties)
        with torch.no_grad():
            ref = eager(images)
            agree = float((torch.from_numpy(session.run(None, feed)[0]) == ref).float().mean())

    eager_s = statistics.median(times["PyTorch eager"])
    print(
        f"\n{type(net).__name__} {getattr(net, 'arch', '')}-{getattr(net, 'encoder_name', '')}, {classes} classes, "
        f"batch {args.batch} x {args.size[0]}x{args.size[1]} uint8 -> class map, {args.threads} threads, "
        f"median of {args.runs} rounds ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}; ONNX export took {onnx_export_s:.1f} s; ONNX = eager on "
        f"{agree * 100:.3f} % of pixels)\n"
    )
    print("| runtime | s / batch | images/s | × eager speed |")
    print("|---|---|---|---|")
    for name in runtimes:
        median = statistics.median(times[name])
        print(f"| {name} | {median:.3f} | {args.batch / median:.2f} | {eager_s / median:.2f} |")


if __name__ == "__main__":
    main()
