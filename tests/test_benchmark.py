"""isnet_fast.benchmark: cases, timing, peak memory, comparisons, loading the original."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from isnet_fast import benchmark as bm

# The original calls the deprecated torch.cuda.amp.autocast.
pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.cuda\.amp\.autocast:FutureWarning")

TINY = dict(arch="tiny", batch=2, size=32, threads=1, warmup=0, repeat=1)


def _reference_folder():
    folder = os.environ.get(bm.REFERENCE_ENV)
    if not folder:
        pytest.skip(bm.REFERENCE_HINT)
    return folder


def test_case_specs_come_in_table_order():
    specs = bm.case_specs(bm.CASES, (2, 10), with_original=True, reference="/somewhere", **TINY)
    labels = [(s.classes, s.label) for s in specs]
    per_classes = ["explain", "explain (original)", "explain-floor", "train", "train (original)", "train-floor"]
    assert labels == [(2, label) for label in per_classes] + [(10, label) for label in per_classes]
    assert [s.label for s in bm.case_specs(["train"], (2,), with_original=False, **TINY)] == ["train"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(case="explain", implementation="autograd"), "runs for"),
    (dict(case="explain-floor", implementation="isnet_fast"), "runs for"),
    (dict(case="explain", implementation="original"), "ISNET_REFERENCE"),
    (dict(case="infer", implementation="isnet_fast"), "case must be one of"),
    (dict(case="explain", implementation="isnet_fast", arch="resnet50"), "arch"),
    (dict(case="explain", implementation="isnet_fast", batch=0), "batch"),
    (dict(case="explain", implementation="isnet_fast", warmup=-1), "warmup"),
])
def test_case_spec_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bm.CaseSpec(**kwargs)


def test_case_spec_round_trips_through_json():
    spec = bm.CaseSpec("train", "isnet_fast", classes=3, **TINY)
    assert bm.CaseSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("case, implementation", [
    ("explain", "isnet_fast"), ("train", "isnet_fast"), ("explain-floor", "autograd"), ("train-floor", "autograd")])
def test_every_case_runs_and_trains_what_it_should(case, implementation):
    torch.set_num_threads(1)
    prepared = bm.prepare_case(bm.CaseSpec(case, implementation, classes=3, **TINY))
    before = [p.detach().clone() for p in prepared.model.parameters()]
    prepared.step()
    changed = any(not torch.equal(a, p) for a, p in zip(before, prepared.model.parameters()))
    assert changed == case.startswith("train")  # the SGD step, and only in the train cases
    assert prepared.model.training == case.startswith("train")


def test_floor_heatmaps_are_per_class_input_gradients():
    torch.manual_seed(0)
    net = bm._build_our_densenet("tiny", classes=3).eval()
    images = torch.rand(2, 3, 32, 32)
    logits, heatmaps = bm._input_gradients(net, images, 3, create_graph=False)
    assert heatmaps.shape == (2, 3, 3, 32, 32)
    x = images[1:2].clone().requires_grad_(True)
    expected = torch.autograd.grad(net(x)[0, 2], x)[0]
    torch.testing.assert_close(heatmaps[1, 2], expected[0])


def test_same_seed_same_weights_and_batch():
    a = bm.prepare_case(bm.CaseSpec("explain", "isnet_fast", **TINY))
    b = bm.prepare_case(bm.CaseSpec("explain-floor", "autograd", **TINY))
    for (name, p), q in zip(a.model.DenseNet.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name
    spec = bm.CaseSpec("explain", "isnet_fast", **TINY)
    first, second = bm.synthetic_batch(spec, torch.device("cpu")), bm.synthetic_batch(spec, torch.device("cpu"))
    assert torch.equal(first.images, second.images) and torch.equal(first.masks, second.masks)
    assert set(first.masks.unique().tolist()) <= {0.0, 1.0} and first.masks.shape == (2, 3, 32, 32)


def test_time_step_warms_up_then_times_each_repeat():
    calls = []
    times = bm.time_step(lambda: calls.append(1), warmup=2, repeat=3)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)


def test_half_dtypes_need_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        bm.prepare_case(bm.CaseSpec("explain", "isnet_fast", dtype="bfloat16", **TINY))


def test_subprocess_reports_its_own_peak_rss_and_times():
    # A big footprint here must not leak into the case's figure (ru_maxrss survives fork + exec).
    ballast = torch.ones(200_000_000)  # 800 MB
    result = bm.run_case_in_subprocess(bm.CaseSpec("explain", "isnet_fast", **dict(TINY, repeat=2)))
    assert result.error is None, result.error_detail
    assert len(result.times_s) == 2 and all(t > 0 for t in result.times_s)
    assert result.memory_kind == "peak RSS"
    assert 50 * 2**20 < result.peak_memory_bytes < ballast.numel() * 4
    del ballast


def test_subprocess_failure_comes_back_as_an_error():
    result = bm.run_case_in_subprocess(bm.CaseSpec("explain", "isnet_fast", **dict(TINY, arch="tiny", size=32,
                                                                                    device="cuda:99")))
    assert result.error and not result.times_s
    assert "cuda:99" in result.error


def test_launcher_passes_on_exit_codes_and_signals():
    def run(code):
        return subprocess.run([sys.executable, "-c", bm._LAUNCHER, sys.executable, "-c", code]).returncode
    assert run("raise SystemExit(3)") == 3
    assert run("import os, signal; os.kill(os.getpid(), signal.SIGKILL)") == -9


def _result(case, implementation, seconds, classes=2):
    return bm.CaseResult(bm.CaseSpec(case, implementation, classes=classes, reference="/r", **TINY), [seconds])


def test_compare_takes_ratios_within_a_configuration():
    results = [_result("explain", "isnet_fast", 2.0), _result("explain", "original", 8.0),
               _result("explain-floor", "autograd", 1.0), _result("train", "isnet_fast", 3.0),
               _result("explain", "isnet_fast", 5.0, classes=10)]
    ours, original, floor, train, other = bm.compare(results)
    assert ours.floor_ratio == 2.0 and ours.speedup_vs_original == 4.0
    assert original.floor_ratio == 8.0 and original.speedup_vs_original is None
    assert floor.floor_ratio == 1.0
    assert train.floor_ratio is None and train.speedup_vs_original is None  # no train floor or original measured
    assert other.floor_ratio is None  # 10 classes: no floor of its own


def test_failed_results_get_no_ratios():
    failed = bm.CaseResult(bm.CaseSpec("explain-floor", "autograd", **TINY), error="boom")
    ours, floor = bm.compare([_result("explain", "isnet_fast", 2.0), failed])
    assert ours.floor_ratio is None and floor.floor_ratio is None
    record = bm.comparison_record(floor)
    assert record["error"] == "boom" and record["median_ms"] is None


def test_minimum_image_size():
    assert bm.minimum_image_size("tiny") == 29
    assert bm.minimum_image_size("densenet121") == 29


def test_default_settings_fit_a_small_cpu():
    cpu = bm.default_settings("cpu")
    assert cpu["size"] == 224 and cpu["batch"] <= 2 and cpu["repeat"] >= 3


def test_environment_info_names_versions_and_device():
    info = bm.environment_info("cpu")
    assert info["torch"] == torch.__version__ and info["cpu_count"] >= 1
    assert {"python", "triton", "numpy", "device_name", "cpu_model"} <= set(info)


def test_reference_folder_without_the_files(tmp_path):
    (tmp_path / "ISNetLayers.py").write_text("")
    with pytest.raises(bm.ReferenceFolderError, match="lacks ISNetFunctions.py, LRPDenseNet.py, globals.py"):
        bm.load_reference(tmp_path)
    with pytest.raises(bm.ReferenceFolderError, match="does not exist"):
        bm.check_reference_folder(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- with the original


def test_original_starts_from_our_weights():
    folder = _reference_folder()
    spec = bm.CaseSpec("explain", "original", reference=folder, classes=3, **TINY)
    original = bm.prepare_case(spec)
    ours = bm.prepare_case(dataclasses.replace(spec, implementation="isnet_fast"))
    images = bm.synthetic_batch(spec, torch.device("cpu")).images
    with torch.no_grad():
        y_original, heatmaps_original = original.model(images)
        y_ours, heatmaps_ours = ours.model(images)
    torch.testing.assert_close(y_ours, y_original)
    assert heatmaps_ours.shape == heatmaps_original.shape == (2, 3, 3, 32, 32)


def test_cudnn_deterministic_only_around_the_originals_construction():
    folder = _reference_folder()
    previous = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = False
    try:
        prepared = bm.prepare_case(bm.CaseSpec("train", "original", reference=folder, **TINY))
        assert torch.backends.cudnn.deterministic is False
        prepared.step()
    finally:
        torch.backends.cudnn.deterministic = previous


def test_original_in_a_subprocess():
    folder = _reference_folder()
    result = bm.run_case_in_subprocess(bm.CaseSpec("train", "original", reference=folder, **TINY))
    assert result.error is None, result.error_detail
    assert result.times_s[0] > 0 and result.peak_memory_bytes > 0
