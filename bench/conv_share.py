"""How much of a train step is convolutions: records every convolution (forward, transposed and
their backward passes) that one step of a benchmark case runs, then replays those calls alone,
with the same shapes, strides and output masks, on fresh random tensors.

    python bench/conv_share.py --arch resnet50 --batch 2 --classes 3 --size 224 --threads 2

prints the step's time and the replayed convolutions' time (medians of ``--repeat`` runs,
alternating, in one process). The convolutions' FLOPs are fixed by the LRP rules (one transposed
convolution per convolution on every map, and the backward of both), so their replayed time
bounds from below what any step built on these convolution kernels can take.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import NamedTuple, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from isnet_fast.benchmark import CaseSpec, prepare_case

CONVOLUTION_OPS = (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default)


class TensorLayout(NamedTuple):
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    dtype: torch.dtype


class RecordConvolutions(TorchDispatchMode):
    """Keeps each convolution call's op and arguments, tensors as their ``TensorLayout``."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in CONVOLUTION_OPS:
            described = [TensorLayout(tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a
                         for a in args]
            self.calls.append((func, described))
        return func(*args, **(kwargs or {}))


def materialise(calls):
    """The recorded calls with random tensors of the recorded shapes and strides."""
    replay = []
    for func, described in calls:
        args = [torch.empty_strided(a.shape, a.stride, dtype=a.dtype).normal_() if isinstance(a, TensorLayout) else a
                for a in described]
        replay.append((func, args))
    return replay


def record_step_convolutions(case):
    """The convolution calls of one step of a prepared case, as ``materialise`` takes them."""
    recorder = RecordConvolutions()
    with recorder:
        case.step()
    return recorder.calls


def replay(calls) -> None:
    with torch.no_grad():
        for func, call_args in calls:
            func(*call_args)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = CaseSpec(case="train", implementation="isnet_fast", arch=args.arch, batch=args.batch,
                    classes=args.classes, size=args.size, threads=args.threads)
    case = prepare_case(spec)
    case.step()
    calls = materialise(record_step_convolutions(case))
    replay(calls)
    step_ms, conv_ms = [], []
    for _ in range(args.repeat):  # alternating, so that both see the machine in the same state
        start = time.perf_counter()
        case.step()
        step_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        replay(calls)
        conv_ms.append((time.perf_counter() - start) * 1000)
    step, conv = statistics.median(step_ms), statistics.median(conv_ms)
    print(f"{args.arch}, batch {args.batch}, {args.classes} classes, {args.size}x{args.size}, "
          f"{args.threads} threads, torch {torch.__version__}: {len(calls)} convolution calls per step")
    print(f"train step   {step:8.0f} ms  (runs {', '.join(f'{t:.0f}' for t in step_ms)})")
    print(f"convolutions {conv:8.0f} ms  (runs {', '.join(f'{t:.0f}' for t in conv_ms)}), "
          f"{100 * conv / step:.0f}% of the step")


if __name__ == "__main__":
    main()
