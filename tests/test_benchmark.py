"""isnet_fast.benchmark: cases, timing, peak memory, comparisons, loading the original."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from isnet_fast import benchmark as bm
from isnet_fast.models.resnet import ResNet
from isnet_fast.resnet_model import IsResNetFast

# The original calls the deprecated torch.cuda.amp.autocast.
pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.cuda\.amp\.autocast:FutureWarning")

TINY = dict(arch="tiny", batch=2, size=32, threads=1, warmup=0, repeat=1)


def _references():
    """Where ISNET_REFERENCE has the authors' code: a checkout of the whole ISNet repository
    (backup/ and code/) or its backup/ folder alone; skips when it is not set."""
    folder = os.environ.get(bm.REFERENCE_ENV)
    if not folder:
        pytest.skip(bm.REFERENCE_HINT)
    return bm.find_references(folder)


def _reference_folder():
    """The original's folder (backup/) under ISNET_REFERENCE; skips without it."""
    original = _references().original
    if original is None:
        pytest.skip(f"{bm.REFERENCE_ENV} has no backup/ folder: {bm.REFERENCE_HINT}")
    return original


def _selective_reference_folder():
    """The authors' Selective ISNet's folder (code/) under ISNET_REFERENCE; skips without it."""
    references = _references()
    if references.selective_reference is None:
        pytest.skip(references.note or bm.SELECTIVE_REFERENCE_HINT)
    return references.selective_reference


def test_case_specs_come_in_table_order():
    specs = bm.case_specs(bm.CASES, (2, 10), original="/somewhere", **TINY)
    labels = [(s.classes, s.label) for s in specs]
    per_classes = ["explain", "explain (original)", "explain-floor", "train", "train (original)", "train-floor",
                   "train-plain"]
    assert labels == [(2, label) for label in per_classes] + [(10, label) for label in per_classes]
    assert [s.label for s in bm.case_specs(["train"], (2,), **TINY)] == ["train"]
    assert all(s.reference == "/somewhere" for s in specs if s.implementation == "original")


def test_case_specs_with_the_standard_variants():
    specs = bm.case_specs(bm.CASES, (1, 3), bm.STANDARD_VARIANTS, original="/backup", selective_reference="/code",
                          **TINY)
    rows = [(s.classes, s.label, s.maps) for s in specs]
    # One class: no selective variant (it needs two), one floor (K = 1 = one map).
    assert rows[:7] == [(1, "explain", 1), (1, "explain (original)", 1), (1, "explain-floor", 1),
                        (1, "train", 1), (1, "train (original)", 1), (1, "train-floor", 1), (1, "train-plain", 0)]
    assert rows[7:] == [
        (3, "explain", 3), (3, "explain (original)", 3), (3, "explain, selective lowest", 1),
        (3, "explain (authors' selective)", 1), (3, "explain-floor", 3), (3, "explain-floor, 1 map", 1),
        (3, "train", 3), (3, "train (original)", 3), (3, "train, selective lowest", 1),
        (3, "train (authors' selective)", 1), (3, "train-floor", 3), (3, "train-floor, 1 map", 1),
        (3, "train-plain", 0)]
    selective = [s for s in specs if s.implementation == "selective_reference"]
    assert {(s.reference, s.explain, s.selective) for s in selective} == {("/code", "lowest", True)}
    # Without the authors' code, only ours and the floors.
    labels = [s.label for s in bm.case_specs(["explain", "explain-floor"], (3,), bm.STANDARD_VARIANTS, **TINY)]
    assert labels == ["explain", "explain, selective lowest", "explain-floor", "explain-floor, 1 map"]
    # One-map variants only: only the one-map floor.
    labels = [s.label for s in bm.case_specs(["train-floor"], (3,), [("top", False), ("sum", False)], **TINY)]
    assert labels == ["train-floor, 1 map"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(case="explain", implementation="autograd"), "runs for"),
    (dict(case="explain-floor", implementation="isnet_fast"), "runs for"),
    (dict(case="explain", implementation="original"), "ISNET_REFERENCE"),
    (dict(case="infer", implementation="isnet_fast"), "case must be one of"),
    (dict(case="explain", implementation="isnet_fast", arch="vgg16"), "arch"),
    (dict(case="explain", implementation="isnet_fast", batch=0), "batch"),
    (dict(case="explain", implementation="isnet_fast", warmup=-1), "warmup"),
    (dict(case="explain", implementation="isnet_fast", explain="best"), "explain must be one of"),
    (dict(case="explain", implementation="isnet_fast", selective="yes"), "selective must be True or False"),
    (dict(case="explain", implementation="isnet_fast", explain="sum", selective=True), "cannot explain the sum"),
    (dict(case="train", implementation="isnet_fast", explain="lowest", selective=True, classes=1), "two classes"),
    (dict(case="train", implementation="isnet_fast", explain="random", classes=1), "two classes"),
    (dict(case="explain", implementation="original", reference="/r", explain="top"), "one map per class"),
    (dict(case="explain", implementation="original", reference="/r", selective=True), "one map per class"),
    (dict(case="explain", implementation="selective_reference", explain="lowest", selective=True),
     "ISNET_REFERENCE"),
    (dict(case="explain", implementation="selective_reference", reference="/r"), "explain='lowest', selective=True"),
    (dict(case="train", implementation="selective_reference", reference="/r", explain="top", selective=True),
     "explain='lowest', selective=True"),
    (dict(case="explain-floor", implementation="autograd", explain="lowest"), "a floor takes"),
    (dict(case="train-floor", implementation="autograd", selective=True), "a floor takes"),
    (dict(case="train-plain", implementation="autograd", explain="top"), "train-plain makes no heatmaps"),
    (dict(case="train-plain", implementation="isnet_fast"), "runs for"),
    (dict(case="train-floor", implementation="selective_reference", reference="/r"), "runs for"),
])
def test_case_spec_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bm.CaseSpec(**kwargs)


def test_case_spec_round_trips_through_json():
    spec = bm.CaseSpec("train", "isnet_fast", classes=3, **TINY)
    assert bm.CaseSpec.from_json(spec.to_json()) == spec
    selective = bm.CaseSpec("train", "isnet_fast", classes=3, explain="lowest", selective=True, **TINY)
    assert bm.CaseSpec.from_json(selective.to_json()) == selective != spec
    assert '"explain": "lowest"' in selective.to_json() and '"selective": true' in selective.to_json()


@pytest.mark.parametrize("case, implementation, explain, selective, classes, label, maps", [
    ("train", "isnet_fast", "all", False, 10, "train", 10),
    ("train", "isnet_fast", "lowest", True, 10, "train, selective lowest", 1),
    ("train", "isnet_fast", "all", True, 10, "train, selective, all maps", 10),
    ("explain", "isnet_fast", "top", False, 10, "explain, top", 1),
    ("explain", "isnet_fast", "sum", False, 10, "explain, sum", 1),
    ("train", "original", "all", False, 10, "train (original)", 10),
    ("train", "selective_reference", "lowest", True, 10, "train (authors' selective)", 1),
    ("train-floor", "autograd", "all", False, 10, "train-floor", 10),
    ("train-floor", "autograd", "top", False, 10, "train-floor, 1 map", 1),
    ("train-plain", "autograd", "all", False, 10, "train-plain", 0),
])
def test_labels_and_maps_per_image(case, implementation, explain, selective, classes, label, maps):
    spec = bm.CaseSpec(case, implementation, classes=classes, explain=explain, selective=selective, reference="/r",
                       **TINY)
    assert (spec.label, spec.maps) == (label, maps)


def test_the_variant_is_part_of_the_configuration_but_not_of_the_base():
    ours = bm.CaseSpec("train", "isnet_fast", classes=3, **TINY)
    selective = dataclasses.replace(ours, explain="lowest", selective=True)
    assert ours.configuration != selective.configuration
    assert ours.base_configuration == selective.base_configuration
    assert dataclasses.replace(ours, batch=4).base_configuration != ours.base_configuration


@pytest.mark.parametrize("case, implementation, explain, selective", [
    ("explain", "isnet_fast", "all", False), ("train", "isnet_fast", "all", False),
    ("explain", "isnet_fast", "lowest", True), ("train", "isnet_fast", "lowest", True),
    ("train", "isnet_fast", "random", False),
    ("explain-floor", "autograd", "all", False), ("train-floor", "autograd", "all", False),
    ("explain-floor", "autograd", "top", False), ("train-floor", "autograd", "top", False),
    ("train-plain", "autograd", "all", False)])
def test_every_case_runs_and_trains_what_it_should(case, implementation, explain, selective):
    torch.set_num_threads(1)
    prepared = bm.prepare_case(bm.CaseSpec(case, implementation, classes=3, explain=explain, selective=selective,
                                           **TINY))
    prepared.step()
    assert _took_a_gradient_step(prepared.model) == case.startswith("train")  # and only the train cases
    assert prepared.model.training == case.startswith("train")


def _took_a_gradient_step(model) -> bool:
    """Whether the step left gradients on the parameters (the SGD update itself runs with a zero
    learning rate, see bm.LEARNING_RATE, so the weights stay put)."""
    return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())


def test_ours_is_built_with_the_cases_variant():
    spec = bm.CaseSpec("explain", "isnet_fast", classes=3, explain="lowest", selective=True, **TINY)
    model = bm.prepare_case(spec).model
    assert (model.explain, model.selective, model.maps_per_image) == ("lowest", True, 1)
    with torch.no_grad():
        _, heatmaps = model(bm.synthetic_batch(spec, torch.device("cpu")).images)
    assert heatmaps.shape == (2, 1, 3, 32, 32)
    assert bm.prepare_case(dataclasses.replace(spec, explain="all", selective=False)).model.maps_per_image == 3


def test_plain_cases_read_channels_last_images_on_the_cpu():
    # The layout IsDenseFast runs on the CPU, so that the floors and train-plain are not slowed by another.
    for case in ("train-plain", "explain-floor"):
        prepared = bm.prepare_case(bm.CaseSpec(case, "autograd", **TINY))
        seen = []
        handle = prepared.model.features.conv0.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        prepared.step()
        handle.remove()
        assert seen and seen[0].is_contiguous(memory_format=torch.channels_last), case
        assert not seen[0].is_contiguous(), case  # 2 x 3 x 32 x 32: the two layouts differ


def test_floor_heatmaps_are_per_class_input_gradients():
    torch.manual_seed(0)
    net = bm._build_our_net("tiny", classes=3).eval()
    images = torch.rand(2, 3, 32, 32)
    logits, heatmaps = bm._input_gradients(net, images, 3, create_graph=False)
    assert heatmaps.shape == (2, 3, 3, 32, 32)
    x = images[1:2].clone().requires_grad_(True)
    expected = torch.autograd.grad(net(x)[0, 2], x)[0]
    torch.testing.assert_close(heatmaps[1, 2], expected[0])


def test_one_map_floor_is_the_top_logits_input_gradient():
    torch.manual_seed(0)
    net = bm._build_our_net("tiny", classes=3).eval()
    images = torch.rand(2, 3, 32, 32)
    logits, heatmaps = bm._input_gradients(net, images, 3, create_graph=False, explain="top")
    assert heatmaps.shape == (2, 1, 3, 32, 32)
    for i in range(2):
        x = images[i:i + 1].clone().requires_grad_(True)
        y = net(x)[0]
        expected = torch.autograd.grad(y[y.argmax()], x)[0]
        torch.testing.assert_close(heatmaps[i, 0], expected[0])


def test_timed_steps_repeat_the_same_numbers():
    # A zero learning rate: every timed step computes what the first did (no divergence).
    prepared = bm.prepare_case(bm.CaseSpec("train", "isnet_fast", classes=3, **TINY))
    grads = []
    for _ in range(2):
        prepared.step()
        grads.append([p.grad.clone() for p in prepared.model.parameters() if p.grad is not None])
    assert grads[0] and all(torch.equal(a, b) for a, b in zip(*grads))


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


def _result(case, implementation, seconds, classes=2, explain="all", selective=False, **settings):
    spec = bm.CaseSpec(case, implementation, classes=classes, reference="/r", explain=explain, selective=selective,
                       **dict(TINY, **settings))
    return bm.CaseResult(spec, [seconds])


def test_compare_takes_ratios_within_a_configuration():
    results = [_result("explain", "isnet_fast", 2.0), _result("explain", "original", 8.0),
               _result("explain-floor", "autograd", 1.0), _result("train", "isnet_fast", 3.0),
               _result("explain", "isnet_fast", 5.0, classes=10)]
    ours, original, floor, train, other = bm.compare(results)
    assert ours.floor_ratio == 2.0 and ours.speedup_vs_original == 4.0
    assert original.floor_ratio == 8.0 and original.speedup_vs_original is None
    assert floor.floor_ratio == 1.0
    assert train.floor_ratio is None and train.speedup_vs_original is None  # no train floor or original measured
    assert train.plain_ratio is None  # no train-plain measured
    assert other.floor_ratio is None  # 10 classes: no floor of its own


def test_compare_pairs_each_case_with_the_floor_of_its_number_of_maps():
    results = [
        _result("train", "isnet_fast", 6.0, classes=10),
        _result("train", "original", 24.0, classes=10),
        _result("train", "isnet_fast", 2.0, classes=10, explain="lowest", selective=True),
        _result("train", "selective_reference", 10.0, classes=10, explain="lowest", selective=True),
        _result("train", "isnet_fast", 2.5, classes=10, explain="top"),
        _result("train-floor", "autograd", 12.0, classes=10),  # 10 gradients
        _result("train-floor", "autograd", 4.0, classes=10, explain="top"),  # one gradient
        _result("train-plain", "autograd", 1.0, classes=10),
        _result("train", "isnet_fast", 50.0, classes=10, batch=4),  # another batch: never paired with the above
        _result("train-floor", "autograd", 100.0, classes=10, batch=4),
    ]
    ours, original, selective, theirs, top, floor_k, floor_1, plain, other_batch, other_floor = bm.compare(results)
    assert (ours.floor_ratio, ours.floor_label) == (0.5, "train-floor")
    assert (original.floor_ratio, original.floor_label) == (2.0, "train-floor")
    assert (selective.floor_ratio, selective.floor_label) == (0.5, "train-floor, 1 map")
    assert (theirs.floor_ratio, theirs.floor_label) == (2.5, "train-floor, 1 map")
    assert (top.floor_ratio, top.floor_label) == (0.625, "train-floor, 1 map")
    assert floor_k.floor_ratio == floor_1.floor_ratio == 1.0
    # Every variant of ours against the original (K maps); the authors' Selective only for ours Selective.
    assert ours.speedup_vs_original == 4.0 and ours.speedup_vs_selective_reference is None
    assert selective.speedup_vs_selective_reference == 5.0 and selective.speedup_vs_original == 12.0
    assert top.speedup_vs_original == 24.0 / 2.5 and top.speedup_vs_selective_reference is None
    assert other_batch.speedup_vs_original is None  # no original at batch 4
    assert original.speedup_vs_original is None and original.speedup_vs_selective_reference is None
    assert theirs.speedup_vs_original is None and theirs.speedup_vs_selective_reference is None
    # Every train case against the plain step.
    assert [c.plain_ratio for c in (ours, original, selective, theirs, top, floor_k, floor_1, plain)] == [
        6.0, 24.0, 2.0, 10.0, 2.5, 12.0, 4.0, 1.0]
    assert other_batch.floor_ratio == 0.5 and other_floor.floor_ratio == 1.0  # paired within batch 4 only
    assert other_batch.plain_ratio is None and plain.floor_ratio is None


def test_compare_with_one_class_uses_the_one_floor_for_every_variant():
    results = [_result("explain", "isnet_fast", 2.0, classes=1), _result("explain", "isnet_fast", 3.0, classes=1,
                                                                        explain="top"),
               _result("explain-floor", "autograd", 4.0, classes=1)]
    every, top, floor = bm.compare(results)
    assert every.floor_ratio == 0.5 and top.floor_ratio == 0.75


def test_comparison_record_carries_the_variant_and_the_new_ratios():
    results = [_result("train", "isnet_fast", 2.0, classes=10, explain="lowest", selective=True),
               _result("train", "selective_reference", 10.0, classes=10, explain="lowest", selective=True),
               _result("train-floor", "autograd", 4.0, classes=10, explain="top"),
               _result("train-plain", "autograd", 1.0, classes=10)]
    record = bm.comparison_record(bm.compare(results)[0])
    assert (record["explain"], record["selective"], record["variant"], record["maps"]) == (
        "lowest", True, "selective lowest", 1)
    assert record["label"] == "train, selective lowest" and record["floor"] == "train-floor, 1 map"
    assert (record["floor_ratio"], record["plain_ratio"], record["speedup_vs_selective_reference"]) == (0.5, 2.0, 5.0)
    assert record["speedup_vs_original"] is None
    info = bm.extra_info(results[0].spec, 123, "peak RSS")
    assert (info["explain"], info["selective"], info["maps"], info["label"]) == (
        "lowest", True, 1, "train, selective lowest")


def test_failed_results_get_no_ratios():
    failed = bm.CaseResult(bm.CaseSpec("explain-floor", "autograd", **TINY), error="boom")
    ours, floor = bm.compare([_result("explain", "isnet_fast", 2.0), failed])
    assert ours.floor_ratio is None and floor.floor_ratio is None
    record = bm.comparison_record(floor)
    assert record["error"] == "boom" and record["median_ms"] is None


def test_minimum_image_size():
    assert bm.minimum_image_size("tiny") == 29
    assert bm.minimum_image_size("densenet121") == 29
    assert bm.minimum_image_size("resnet50") == 1


TINY_RESNET = dict(TINY, arch="tiny-resnet")


@pytest.mark.parametrize("case, implementation, explain, selective", [
    ("explain", "isnet_fast", "all", False), ("train", "isnet_fast", "all", False),
    ("train", "isnet_fast", "lowest", True), ("explain-floor", "autograd", "all", False),
    ("train-plain", "autograd", "all", False)])
def test_resnet_cases_run_ours_and_the_floors(case, implementation, explain, selective):
    torch.set_num_threads(1)
    prepared = bm.prepare_case(bm.CaseSpec(case, implementation, classes=3, explain=explain, selective=selective,
                                           **TINY_RESNET))
    expected = IsResNetFast if implementation == "isnet_fast" else ResNet
    assert isinstance(prepared.model, expected)
    prepared.step()
    assert _took_a_gradient_step(prepared.model) == case.startswith("train")


@pytest.mark.parametrize("implementation, explain, selective, maps", [
    ("original", "all", False, 3), ("selective_reference", "lowest", True, 1)], ids=["original", "selective"])
def test_the_authors_resnet_isnet_matches_ours(implementation, explain, selective, maps):
    folder = _selective_reference_folder()  # their LRPResNet is in code/
    spec = bm.CaseSpec("explain", implementation, reference=folder, classes=3, explain=explain, selective=selective,
                       **TINY_RESNET)
    theirs = bm.prepare_case(spec)
    ours = bm.prepare_case(dataclasses.replace(spec, implementation="isnet_fast", reference=None))
    images = bm.synthetic_batch(spec, torch.device("cpu")).images
    with torch.no_grad():
        y_theirs, heatmaps_theirs = theirs.model(images)
        y_ours, heatmaps_ours = ours.model(images)
    torch.testing.assert_close(y_ours, y_theirs)
    assert heatmaps_ours.shape == heatmaps_theirs.shape == (2, maps, 3, 32, 32)
    scale = heatmaps_theirs.abs().max()
    assert scale > 0 and (heatmaps_ours - heatmaps_theirs).abs().max() <= 1e-3 * scale


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
    with pytest.raises(bm.ReferenceFolderError, match="lacks ISNetLayersZe.py"):
        bm.load_selective_reference(tmp_path)


def _fake_folder(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        (folder / name).write_text("")
    return folder


def test_find_references_in_the_repository_or_its_backup_folder(tmp_path):
    repository = tmp_path / "ISNet"
    backup = _fake_folder(repository / "backup", bm.REFERENCE_FILES)
    code = _fake_folder(repository / "code", bm.SELECTIVE_REFERENCE_FILES)
    found = bm.find_references(repository)
    assert (found.original, found.selective_reference, found.note) == (str(backup), str(code), None)
    alone = bm.find_references(backup)  # as before: the original only, and a one-line note
    assert (alone.original, alone.selective_reference) == (str(backup), None)
    assert "backup/ folder alone" in alone.note and "\n" not in alone.note
    code_only = bm.find_references(code)
    assert (code_only.original, code_only.selective_reference) == (None, str(code))


def test_find_references_reports_what_is_missing(tmp_path):
    with pytest.raises(bm.ReferenceFolderError, match="lacks ISNetLayers.py.*whole ISNet repository"):
        bm.find_references(tmp_path)
    with pytest.raises(bm.ReferenceFolderError, match="does not exist"):
        bm.find_references(tmp_path / "nowhere")
    _fake_folder(tmp_path / "backup", bm.REFERENCE_FILES)
    _fake_folder(tmp_path / "code", bm.SELECTIVE_REFERENCE_FILES[:1])
    with pytest.raises(bm.ReferenceFolderError, match="lacks ISNetFunctionsZe.py, LRPDenseNetZe.py, globalsZe.py"):
        bm.find_references(tmp_path)
    (tmp_path / "code" / "ISNetLayersZe.py").unlink()
    (tmp_path / "code").rmdir()
    found = bm.find_references(tmp_path)  # a repository without code/: the original only
    assert found.original and found.selective_reference is None and "code/" in found.note


def test_the_bench_suite_cases_are_valid_specs():
    from helpers import load_bench_script

    suite = load_bench_script("test_bench.py", "isnet_fast_bench_suite")
    ids = [suite._case_id(case) for case in suite.CASES]
    assert len(set(ids)) == len(ids)
    labels = set()
    for case, implementation, explain, selective in suite.CASES:
        for classes in suite.CLASSES:
            labels.add(bm.CaseSpec(case, implementation, classes=classes, reference="/r", explain=explain,
                                   selective=selective, **TINY).label)
    assert {"train, selective lowest", "train (authors' selective)", "train-floor, 1 map", "train-plain",
            "explain (original)"} <= labels


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


def test_authors_selective_isnet_matches_ours_selective_lowest():
    folder = _selective_reference_folder()
    spec = bm.CaseSpec("explain", "selective_reference", reference=folder, classes=4, explain="lowest",
                       selective=True, **TINY)
    theirs = bm.prepare_case(spec)
    ours = bm.prepare_case(dataclasses.replace(spec, implementation="isnet_fast", reference=None))
    images = bm.synthetic_batch(spec, torch.device("cpu")).images
    with torch.no_grad():
        y_theirs, heatmaps_theirs = theirs.model(images)
        y_ours, heatmaps_ours = ours.model(images)
    torch.testing.assert_close(y_ours, y_theirs)
    assert heatmaps_ours.shape == heatmaps_theirs.shape == (2, 1, 3, 32, 32)
    scale = heatmaps_theirs.abs().max()
    assert scale > 0 and (heatmaps_ours - heatmaps_theirs).abs().max() <= 1e-3 * scale


def test_both_references_load_in_one_process():
    original, selective = _reference_folder(), _selective_reference_folder()
    previous = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = False
    try:
        first = bm.prepare_case(bm.CaseSpec("train", "original", reference=original, **TINY))
        second = bm.prepare_case(bm.CaseSpec("train", "selective_reference", reference=selective, explain="lowest",
                                             selective=True, **TINY))
        assert torch.backends.cudnn.deterministic is False  # set only around the constructions
        first.step()
        second.step()
    finally:
        torch.backends.cudnn.deterministic = previous
    assert type(first.model).__module__ == "ISNetLayers" and type(second.model).__module__ == "ISNetLayersZe"


def test_authors_selective_isnet_in_a_subprocess():
    folder = _selective_reference_folder()
    result = bm.run_case_in_subprocess(bm.CaseSpec("train", "selective_reference", reference=folder,
                                                   explain="lowest", selective=True, **TINY))
    assert result.error is None, result.error_detail
    assert result.times_s[0] > 0 and result.peak_memory_bytes > 0


# ---------------------------------------------------------------------------------------------
# Spread of the timed runs
# ---------------------------------------------------------------------------------------------

def test_spread_and_its_warning():
    spec = bm.CaseSpec("explain", "isnet_fast", arch="tiny", size=32)
    steady = bm.CaseResult(spec, times_s=[1.0, 1.1, 1.05])
    noisy = bm.CaseResult(bm.CaseSpec("train", "isnet_fast", arch="tiny", size=32), times_s=[1.0, 1.5, 1.2])
    single = bm.CaseResult(spec, times_s=[1.0])
    assert steady.spread == pytest.approx(0.1 / 1.05)
    assert single.spread is None
    assert bm.spread_warning([steady, single]) is None
    warning = bm.spread_warning([steady, noisy])
    assert warning is not None and "1 case(s)" in warning and "train (42%)" in warning
