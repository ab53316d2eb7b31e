"""pytest-benchmark suite: IsDenseFast, the original IsDense and the autograd floor.

Run with ``python -m pytest bench --benchmark-only`` (the plain test command collects only
tests/). Each group (``explain, 2 classes``, ``train, 10 classes``, ...) holds isnet_fast, the
original when ``ISNET_REFERENCE`` is set, and the floor, measured side by side in one session.
Cases and step functions are those of ``isnet-fast bench`` (``isnet_fast.benchmark``), so the
two agree within run-to-run noise. Peak memory goes to ``extra_info``: CUDA's
max_memory_allocated, or on the CPU the peak RSS of a subprocess that runs the case alone.
"""

import dataclasses

import pytest
import torch

from isnet_fast import benchmark as bm

CLASSES = (2, 10)
CASES = [
    ("explain", "isnet_fast"),
    ("explain", "original"),
    ("explain-floor", "autograd"),
    ("train", "isnet_fast"),
    ("train", "original"),
    ("train-floor", "autograd"),
]

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.cuda\.amp\.autocast:FutureWarning")


def _case_id(case_implementation):
    case, implementation = case_implementation
    return case if implementation == "autograd" else f"{case}-{implementation}"


@pytest.mark.parametrize("classes", CLASSES, ids=lambda c: f"{c}classes")
@pytest.mark.parametrize("case_implementation", CASES, ids=_case_id)
def test_case(benchmark, bench_settings, reference_folder, case_implementation, classes):
    case, implementation = case_implementation
    if implementation == "original" and reference_folder is None:
        pytest.skip(bm.REFERENCE_HINT)
    spec = bm.CaseSpec(case, implementation, classes=classes, reference=reference_folder, **bench_settings)
    benchmark.group = f"{case.replace('-floor', '')}, {classes} classes"

    def pytest_benchmark_timer(step, warmup, repeat):
        benchmark.pedantic(step, rounds=repeat, warmup_rounds=warmup, iterations=1)
        return list(benchmark.stats.stats.data) if benchmark.stats else []

    result = bm.run_case(spec, timer=pytest_benchmark_timer)
    if torch.device(spec.device).type == "cpu":
        # This process's peak RSS mixes every case so far: measure the case alone.
        alone = bm.run_case_in_subprocess(dataclasses.replace(spec, warmup=1, repeat=1))
        if alone.error:
            pytest.fail(f"peak-RSS subprocess failed: {alone.error}\n{alone.error_detail}")
        result = dataclasses.replace(result, peak_memory_bytes=alone.peak_memory_bytes, memory_kind=alone.memory_kind)
    benchmark.extra_info.update(bm.extra_info(spec, result.peak_memory_bytes, result.memory_kind))
