"""pytest-benchmark suite: IsDenseFast (all maps and Selective), the authors' code, the floors
and a plain training step.

Run with ``python -m pytest bench --benchmark-only`` (the plain test command collects only
tests/). Each group (``explain, 2 classes``, ``train, 10 classes``, ...) holds, measured side by
side in one session:

* isnet_fast with all maps and the original (when ``ISNET_REFERENCE`` is set), and their floor
  (one input gradient per class);
* isnet_fast Selective (``selective=True, explain="lowest"``) and the authors' Selective ISNet
  (when ``ISNET_REFERENCE`` names the whole ISNet repository, whose ``code/`` holds it), and
  their floor (one input gradient, the top logit's);
* in the train groups, train-plain: a plain DenseNet training step without heatmaps.

Cases and step functions are those of ``isnet-fast bench`` (``isnet_fast.benchmark``), so the
two agree within run-to-run noise. Peak memory goes to ``extra_info``: CUDA's
max_memory_allocated, or on the CPU the peak RSS of a subprocess that runs the case alone.
"""

import dataclasses

import pytest
import torch

from isnet_fast import benchmark as bm

CLASSES = (2, 10)
# (case, implementation, explain, selective)
CASES = [
    ("explain", "isnet_fast", "all", False),
    ("explain", "original", "all", False),
    ("explain", "isnet_fast", "lowest", True),
    ("explain", "selective_reference", "lowest", True),
    ("explain-floor", "autograd", "all", False),
    ("explain-floor", "autograd", "top", False),
    ("train", "isnet_fast", "all", False),
    ("train", "original", "all", False),
    ("train", "isnet_fast", "lowest", True),
    ("train", "selective_reference", "lowest", True),
    ("train-floor", "autograd", "all", False),
    ("train-floor", "autograd", "top", False),
    ("train-plain", "autograd", "all", False),
]

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.cuda\.amp\.autocast:FutureWarning")


def _case_id(case):
    case, implementation, explain, selective = case
    name = case if implementation == "autograd" else f"{case}-{implementation}"
    if implementation == "isnet_fast" and (explain, selective) != bm.ORIGINAL_VARIANT:
        name += "-" + bm.variant_name(explain, selective).replace(" ", "-").replace(",", "")
    if case.endswith("-floor") and explain != "all":
        name += "-1map"
    return name


@pytest.mark.parametrize("classes", CLASSES, ids=lambda c: f"{c}classes")
@pytest.mark.parametrize("case_variant", CASES, ids=_case_id)
def test_case(benchmark, bench_settings, reference_folders, case_variant, classes):
    case, implementation, explain, selective = case_variant
    reference = None
    if implementation == "original":
        reference = reference_folders.original
        if reference is None:
            pytest.skip(reference_folders.note or bm.REFERENCE_HINT)
    elif implementation == "selective_reference":
        reference = reference_folders.selective_reference
        if reference is None:
            pytest.skip(reference_folders.note or bm.SELECTIVE_REFERENCE_HINT)
    spec = bm.CaseSpec(case, implementation, classes=classes, reference=reference, explain=explain,
                       selective=selective, **bench_settings)
    benchmark.group = f"{case.replace('-floor', '').replace('-plain', '')}, {classes} classes"

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
