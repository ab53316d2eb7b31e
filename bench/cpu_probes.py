"""Small CPU measurements behind the README's ResNet-50 profile, each printed with what it ran.

    python bench/cpu_probes.py stabiliser          # the stabiliser against torch.where's version
    python bench/cpu_probes.py weight-layout       # train steps, parameters NCHW vs channels_last
    python bench/cpu_probes.py small-step-copies   # the copies of one profiled step at 32 x 32
    python bench/cpu_probes.py operator-times      # one profiled step at 224: convolutions vs the rest

``--threads`` (2) and ``--repeat`` set the threads and the number of timed runs (or step pairs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from isnet_fast.benchmark import CaseSpec, prepare_case
from isnet_fast.engine.functions import stabilized

# a ResNet-50 step's per-image shapes at 224 x 224, batch 2 (what its stabilisers see)
STABILISER_SHAPES = [(2, 64, 112, 112), (2, 256, 56, 56), (2, 64, 56, 56), (2, 512, 28, 28), (2, 128, 28, 28),
                     (2, 1024, 14, 14), (2, 256, 14, 14), (2, 2048, 7, 7)]


def stabilized_by_select(z: torch.Tensor, e: float) -> torch.Tensor:
    """The stabiliser as it was: a select between e and -e, then z added."""
    return torch.where(z.detach() >= 0, z.new_full((), e), z.new_full((), -e)).add_(z)


def median_ms(run, repeat: int) -> float:
    run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def stabiliser(repeat: int, shapes=STABILISER_SHAPES) -> dict:
    """Medians (ms) of both versions per shape, on channels-last views holding zeros of both signs;
    raises if the two differ in any bit."""
    totals = {"select": 0.0, "sign": 0.0}
    for shape in shapes:
        z = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        z[0, :, 0, 0], z[0, :, 0, -1] = 0.0, -0.0
        view = z.movedim(1, -1)
        if not torch.equal(stabilized(view, 1e-2).view(torch.int32), stabilized_by_select(view, 1e-2).view(torch.int32)):
            raise AssertionError(f"the two stabilisers differ on {shape}")
        select = median_ms(lambda: stabilized_by_select(view, 1e-2), repeat)
        sign = median_ms(lambda: stabilized(view, 1e-2), repeat)
        totals["select"] += select
        totals["sign"] += sign
        print(f"{'x'.join(map(str, shape)):>16} channels_last: select {select:6.2f} ms, sign {sign:6.2f} ms")
    print(f"{'all':>16}: select {totals['select']:6.2f} ms, sign {totals['sign']:6.2f} ms (medians of {repeat} runs)")
    return totals


def resnet50_train_case(size: int, threads: int):
    return prepare_case(CaseSpec(case="train", implementation="isnet_fast", arch="resnet50", batch=2, classes=3,
                                 size=size, threads=threads))


def weight_layout(pairs: int, threads: int) -> None:
    """Step pairs in one process: the parameters NCHW, then channels_last (each after an untimed step)."""
    case = resnet50_train_case(224, threads)
    nchw, channels_last = [], []
    for _ in range(pairs):
        for layout, times in ((torch.contiguous_format, nchw), (torch.channels_last, channels_last)):
            case.model.to(memory_format=layout)
            case.step()
            start = time.perf_counter()
            case.step()
            times.append((time.perf_counter() - start) * 1000)
    ratios = [b / a for a, b in zip(nchw, channels_last)]
    print(f"resnet50 train, batch 2, 3 classes, 224 x 224, {threads} threads, {pairs} step pairs")
    print(f"parameters NCHW          {statistics.median(nchw):7.0f} ms  ({', '.join(f'{t:.0f}' for t in nchw)})")
    print(f"parameters channels_last {statistics.median(channels_last):7.0f} ms  "
          f"({', '.join(f'{t:.0f}' for t in channels_last)})")
    print(f"channels_last / NCHW, median of the pairs: {statistics.median(ratios):.3f}")


def profiled_step(size: int, threads: int):
    """The profiler's per-operator rows of one train step, after two untimed ones."""
    from torch.profiler import profile

    case = resnet50_train_case(size, threads)
    case.step()
    case.step()
    with profile() as prof:
        case.step()
    return prof.key_averages()


def small_step_copies(threads: int) -> None:
    """One profiled train step at 32 x 32 pixels: what its copies cost when activations are tiny."""
    copies = [row for row in profiled_step(32, threads) if row.key == "aten::copy_"]
    count = sum(row.count for row in copies)
    milliseconds = sum(row.self_cpu_time_total for row in copies) / 1000
    print(f"resnet50 train, batch 2, 3 classes, 32 x 32, {threads} threads, one profiled step: "
          f"{count} copies, {milliseconds:.0f} ms")


CONVOLUTION_OPERATORS = ("aten::convolution_backward", "aten::_convolution", "aten::mkldnn_convolution")


def operator_times(threads: int) -> None:
    """One profiled train step at 224 x 224: the operators' own (self) times, convolutions and the rest."""
    rows = [row for row in profiled_step(224, threads) if row.key.startswith("aten::")]
    convolutions = sum(row.self_cpu_time_total for row in rows if row.key in CONVOLUTION_OPERATORS) / 1000
    rest = sum(row.self_cpu_time_total for row in rows if row.key not in CONVOLUTION_OPERATORS) / 1000
    print(f"resnet50 train, batch 2, 3 classes, 224 x 224, {threads} threads, one profiled step: "
          f"convolution operators {convolutions:.0f} ms, the other aten operators {rest:.0f} ms")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("probe", choices=["stabiliser", "weight-layout", "small-step-copies", "operator-times"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=None, help="timed runs (stabiliser: 31) or step pairs (6)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    if args.probe == "stabiliser":
        stabiliser(args.repeat or 31)
    elif args.probe == "weight-layout":
        weight_layout(args.repeat or 6, args.threads)
    elif args.probe == "small-step-copies":
        small_step_copies(args.threads)
    else:
        operator_times(args.threads)


if __name__ == "__main__":
    main()
