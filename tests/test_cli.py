"""``isnet-fast bench``: figures, JSON, sweeps and clean errors.

Kept fast for 2-core CI: one densenet121 run at 64x64, the rest on the smoke-test 'tiny'
architecture, one thread, no warmup and one timed run.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from isnet_fast import benchmark as bm
from isnet_fast import cli
from isnet_fast.cli import build_parser, main

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.cuda\.amp\.autocast:FutureWarning")

QUICK = ["--device", "cpu", "--threads", "1", "--warmup", "0", "--repeat", "1"]
TINY = QUICK + ["--arch", "tiny", "--size", "32", "--batch", "2"]


@pytest.fixture
def no_reference(monkeypatch):
    monkeypatch.delenv(bm.REFERENCE_ENV, raising=False)


def _usage_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_bench_writes_every_figure(tmp_path, monkeypatch, capsys, no_reference):
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--device", "cpu", "--batch", "1", "--classes", "2", "--size", "64", "--json", "out.json",
            "--threads", "1", "--warmup", "0", "--repeat", "1"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "ms/batch" in out and "images/s" in out and "peak RSS" in out and "x floor" in out
    assert "original: not measured" in out
    assert "Selective ISNet" not in out  # not asked for: no note about it
    assert "[5/5]" in err  # progress goes to stderr

    record = json.loads((tmp_path / "out.json").read_text())
    assert record["command_line"] == "isnet-fast " + " ".join(argv)
    environment = record["environment"]
    assert {"python", "torch", "triton", "numpy", "device_name", "cpu_count", "torch_threads"} <= set(environment)
    assert record["settings"]["arch"] == "densenet121" and record["settings"]["classes"] == [2]
    assert record["wall_time_s"] > 0
    results = {r["label"]: r for r in record["results"]}
    assert set(results) == {"explain", "train", "explain-floor", "train-floor", "train-plain"}
    for label, result in results.items():
        assert result["error"] is None, result["error_detail"]
        assert (result["batch"], result["classes"], result["size"], result["dtype"]) == (1, 2, 64, "float32")
        assert (result["explain"], result["selective"]) == ("all", False)
        assert len(result["times_ms"]) == 1 and all(t > 0 for t in result["times_ms"])
        assert result["median_ms"] > 0 and result["images_per_s"] > 0
        assert result["peak_memory_bytes"] > 0 and result["memory_kind"] == "peak RSS"
        assert result["speedup_vs_original"] is None and result["speedup_vs_selective_reference"] is None
        if label != "train-plain":
            assert result["floor_ratio"] > 0
    assert results["train-floor"]["floor_ratio"] == 1.0
    assert results["train-plain"]["floor_ratio"] is None and results["train-plain"]["plain_ratio"] == 1.0
    assert results["train"]["plain_ratio"] == pytest.approx(
        results["train"]["median_ms"] / results["train-plain"]["median_ms"])
    assert results["explain"]["plain_ratio"] is None
    assert record["settings"]["variants"] == [{"explain": "all", "selective": False, "name": "all maps"}]


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu", "--dtype", "bfloat16"], "--dtype bfloat16 needs a CUDA device"),
    (["--device", "cpu", "--dtype", "float16"], "--dtype float16 needs a CUDA device"),
    (["--dtype", "float8"], "invalid choice: 'float8'"),
    (["--arch", "vgg16"], "invalid choice: 'vgg16'"),
    (["--batch", "-1"], "expected a positive integer, got -1"),
    (["--batch", "two"], "expected a positive integer, got 'two'"),
    (["--classes", "2", "0"], "expected a positive integer, got 0"),
    (["--device", "cpu", "--size", "16"], "image size 16 is too small for densenet121: every side must be at least 29"),
    (["--device", "cpu", "--sweep", "size", "--sweep-values", "16", "64"], "image size 16 is too small"),
    (["--warmup", "-1"], "expected an integer >= 0"),
    (["--cases", "explain", "predict"], "invalid choice: 'predict'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "cpu", "--sweep-values", "1", "2"], "--sweep-values needs --sweep"),
    (["--device", "cpu", "--json", "/nonexistent-folder/out.json"], "does not exist"),
    (["--device", "cpu", "--json", "/"], "that is a folder"),
    (["--explain", "best"], "invalid choice: 'best'"),
    (["--selective", "maybe"], "invalid choice: 'maybe'"),
    (["--cases", "train-fancy"], "invalid choice: 'train-fancy'"),
    (["--device", "cpu", "--explain", "sum", "--selective"], "cannot explain 'sum'"),
    (["--device", "cpu", "--variants", "--explain", "top"], "--variants picks its own variants"),
    (["--device", "cpu", "--variants", "--selective", "on"], "--variants picks its own variants"),
    (["--device", "cpu", "--classes", "1", "--explain", "random"], "needs at least two classes"),
    (["--device", "cpu", "--classes", "1", "--explain", "lowest", "--selective"], "needs at least two classes"),
])
def test_bad_options_exit_2_with_a_message(capsys, no_reference, argv, message):
    assert message in _usage_error(capsys, ["bench", *argv])


def test_missing_cuda_is_a_usage_error(capsys):
    if bm.torch.cuda.is_available():
        pytest.skip("CUDA is available")
    assert "CUDA is not available" in _usage_error(capsys, ["bench", "--device", "cuda"])


def test_reference_folder_without_the_files(tmp_path, capsys, no_reference):
    err = _usage_error(capsys, ["bench", "--device", "cpu", "--reference", str(tmp_path)])
    assert "--reference" in err and "lacks ISNetLayers.py" in err


def test_bad_reference_in_the_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(bm.REFERENCE_ENV, str(tmp_path / "nowhere"))
    err = _usage_error(capsys, ["bench", "--device", "cpu"])
    assert "$ISNET_REFERENCE" in err and "does not exist" in err


def test_a_command_is_required(capsys):
    assert "required" in _usage_error(capsys, [])


def test_console_entry_point_exits_2_without_a_traceback():
    completed = subprocess.run([sys.executable, "-m", "isnet_fast.cli", "bench", "--device", "cpu",
                                "--dtype", "float16"], capture_output=True, text=True)
    assert completed.returncode == 2
    assert "needs a CUDA device" in completed.stderr and "Traceback" not in completed.stderr
    assert len([line for line in completed.stderr.splitlines() if "error:" in line]) == 1


def test_sweep_classes_writes_its_table_and_plot(tmp_path, capsys, no_reference):
    plot = tmp_path / "sweep.png"
    argv = ["bench", *TINY, "--sweep", "classes", "--sweep-values", "1", "3", "--cases", "explain",
            "--plot", str(plot), "--json", str(tmp_path / "sweep.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["3"])]
    assert [(row[0], row[1]) for row in rows] == [("1", "explain"), ("3", "explain")]
    record = json.loads((tmp_path / "sweep.json").read_text())
    assert record["settings"]["sweep"] == "classes" and record["settings"]["sweep_values"] == [1, 3]
    assert [r["classes"] for r in record["results"]] == [1, 3]
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert record["plot"] == str(plot)
    else:
        assert not plot.exists()
        assert "matplotlib is not installed" in out and record["plot"] is None


def test_reference_cases_run_with_isnet_reference(tmp_path, capsys):
    folder = os.environ.get(bm.REFERENCE_ENV)
    if not folder:
        pytest.skip(bm.REFERENCE_HINT)
    argv = ["bench", *TINY, "--classes", "2", "--cases", "explain", "train", "--json", str(tmp_path / "ref.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "explain (original)" in out and "train (original)" in out
    results = {r["label"]: r for r in json.loads((tmp_path / "ref.json").read_text())["results"]}
    assert set(results) == {"explain", "explain (original)", "train", "train (original)"}
    for label in ("explain", "train"):
        assert results[label]["speedup_vs_original"] == pytest.approx(
            results[f"{label} (original)"]["median_ms"] / results[label]["median_ms"])
        assert results[f"{label} (original)"]["peak_memory_bytes"] > 0


TINY_RESNET = QUICK + ["--arch", "tiny-resnet", "--size", "32", "--batch", "2"]


def test_bench_takes_a_resnet(tmp_path, capsys, no_reference):
    argv = ["bench", *TINY_RESNET, "--classes", "2", "--cases", "explain", "train", "explain-floor",
            "--json", str(tmp_path / "resnet.json")]
    assert main(argv) == 0
    record = json.loads((tmp_path / "resnet.json").read_text())
    results = {r["label"]: r for r in record["results"]}
    assert set(results) == {"explain", "train", "explain-floor"}
    assert all(r["arch"] == "tiny-resnet" and r["error"] is None for r in results.values())
    assert results["explain"]["floor_ratio"] > 0


def test_resnet_bench_runs_the_authors_lrpresnet_as_the_original(tmp_path, capsys):
    folder = os.environ.get(bm.REFERENCE_ENV)
    if not folder or bm.find_references(folder).selective_reference is None:
        pytest.skip(bm.SELECTIVE_REFERENCE_HINT)
    argv = ["bench", *TINY_RESNET, "--classes", "3", "--variants", "--cases", "train",
            "--json", str(tmp_path / "resnet.json")]
    assert main(argv) == 0
    results = {r["label"]: r for r in json.loads((tmp_path / "resnet.json").read_text())["results"]}
    for theirs in ("train (original)", "train (authors' selective)"):
        assert results[theirs]["error"] is None, results[theirs]["error_detail"]
        assert results[theirs]["reference"].endswith("code")
    assert results["train"]["speedup_vs_original"] == pytest.approx(
        results["train (original)"]["median_ms"] / results["train"]["median_ms"])
    assert results["train, selective lowest"]["speedup_vs_selective_reference"] > 0


def test_no_reference_flag_overrides_the_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(bm.REFERENCE_ENV, str(tmp_path / "nowhere"))  # would be an error if read
    assert main(["bench", *TINY, "--classes", "2", "--cases", "explain", "--no-reference"]) == 0
    assert "original: not measured" in capsys.readouterr().out


# ----------------------------------------------------------------------------- variants


def _variants(argv, classes=(3,)):
    args = build_parser().parse_args(["bench", *argv])
    return cli._variants(args, args.subparser, classes)


@pytest.mark.parametrize("argv, variants", [
    ([], [("all", False)]),
    (["--explain", "lowest", "--selective"], [("lowest", True)]),
    (["--explain", "lowest", "--selective", "on"], [("lowest", True)]),
    (["--explain", "top", "lowest", "top"], [("top", False), ("lowest", False)]),
    (["--explain", "all", "lowest", "--selective", "both"],
     [("all", False), ("all", True), ("lowest", False), ("lowest", True)]),
    (["--explain", "sum", "top", "--selective", "both"], [("sum", False), ("top", False), ("top", True)]),
    (["--selective", "off", "--explain", "random"], [("random", False)]),
    (["--variants"], [("all", False), ("lowest", True)]),
])
def test_variant_options(argv, variants):
    assert _variants(argv) == (variants, [])


def test_variants_left_out_for_one_class_get_a_note():
    variants, notes = _variants(["--variants"], classes=(1, 2, 4))
    assert variants == [("all", False), ("lowest", True)]
    assert notes == ["selective lowest: not run for 1 class(es) (it needs at least two)."]


def test_help_documents_the_variant_options(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--explain MODE [MODE ...]", "--selective [off|on|both]", "--variants",
                 "The Selective ISNet is --explain lowest --selective", "train-plain"):
        assert text in out


def _comparisons(*rows):
    results = [bm.CaseResult(bm.CaseSpec(case, implementation, classes=3, reference="/r", explain=explain,
                                         selective=selective, arch="tiny", size=32), [seconds], 2**20, "peak RSS")
               for case, implementation, explain, selective, seconds in rows]
    return bm.compare(results)


def test_table_shows_each_variant_and_its_ratios():
    table = cli.format_table(_comparisons(
        ("train", "isnet_fast", "all", False, 3.0),
        ("train", "original", "all", False, 12.0),
        ("train", "isnet_fast", "lowest", True, 1.0),
        ("train", "selective_reference", "lowest", True, 8.0),
        ("train-floor", "autograd", "all", False, 6.0),
        ("train-floor", "autograd", "top", False, 2.0),
        ("train-plain", "autograd", "all", False, 0.5)), ["classes"])
    header, *lines = [re.split(r"\s{2,}", line.strip()) for line in table.splitlines()]
    assert header == ["classes", "case", "ms/batch", "spread", "images/s", "peak RSS", "x floor", "x plain",
                      "vs original", "vs authors' sel."]
    assert all(cells[3] == "-" for cells in lines)  # one timed run each: no spread
    rows = {cells[1]: cells[6:] for cells in lines}
    assert rows["train"] == ["0.50", "6.00", "4.00x", "-"]
    assert rows["train (original)"] == ["2.00", "24.00", "-", "-"]
    assert rows["train, selective lowest"] == ["0.50", "2.00", "12.00x", "8.00x"]  # the original (K maps) over ours Selective
    assert rows["train (authors' selective)"] == ["4.00", "16.00", "-", "-"]
    assert rows["train-floor, 1 map"] == ["1.00", "4.00", "-", "-"]
    assert rows["train-plain"] == ["-", "1.00", "-", "-"]


def test_table_shows_the_spread_of_the_runs():
    result = bm.CaseResult(bm.CaseSpec("explain", "isnet_fast", arch="tiny", size=32), [1.0, 1.3, 1.1], 2**20,
                           "peak RSS")
    header, row = [re.split(r"\s{2,}", line.strip()) for line in cli.format_table(bm.compare([result]), []).splitlines()]
    assert row[header.index("spread")] == "27%"


def test_table_leaves_out_the_new_columns_when_nothing_fills_them():
    header = cli.format_table(_comparisons(("explain", "isnet_fast", "all", False, 1.0)), ["classes"]).splitlines()[0]
    assert "x floor" in header and "vs original" in header
    assert "x plain" not in header and "authors' sel." not in header


def test_bench_runs_the_selective_variant_without_the_reference(tmp_path, capsys, no_reference):
    argv = ["bench", *TINY, "--classes", "3", "--variants", "--cases", "explain", "train", "train-floor",
            "train-plain", "--json", str(tmp_path / "variants.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for label in ("explain, selective lowest", "train, selective lowest", "train-floor, 1 map", "train-plain"):
        assert f"  {label}  " in out
    assert "original: not measured" in out and "authors' Selective ISNet: not measured" in out
    record = json.loads((tmp_path / "variants.json").read_text())
    results = {r["label"]: r for r in record["results"]}
    assert list(results) == ["explain", "explain, selective lowest", "train", "train, selective lowest",
                             "train-floor", "train-floor, 1 map", "train-plain"]
    for label, result in results.items():
        assert result["error"] is None, result["error_detail"]
    selective = results["train, selective lowest"]
    assert (selective["explain"], selective["selective"], selective["maps"]) == ("lowest", True, 1)
    assert selective["floor"] == "train-floor, 1 map"
    one_map_floor = results["train-floor, 1 map"]
    assert selective["floor_ratio"] == pytest.approx(selective["median_ms"] / one_map_floor["median_ms"])
    assert results["train"]["floor_ratio"] == pytest.approx(
        results["train"]["median_ms"] / results["train-floor"]["median_ms"])
    assert selective["plain_ratio"] == pytest.approx(selective["median_ms"] / results["train-plain"]["median_ms"])
    assert results["explain, selective lowest"]["floor_ratio"] is None  # no explain floor was asked for
    assert record["settings"]["variants"][1] == {"explain": "lowest", "selective": True, "name": "selective lowest"}
    assert record["settings"]["reference"] is None and record["settings"]["selective_reference"] is None


def test_sweep_classes_with_the_variants_plots_a_line_per_variant(tmp_path, capsys, no_reference, monkeypatch):
    plotted = {}
    real_series = cli._sweep_series
    monkeypatch.setattr(cli, "_sweep_series", lambda *a: plotted.setdefault("series", real_series(*a)))
    plot = tmp_path / "sweep.png"
    argv = ["bench", *TINY, "--variants", "--sweep", "classes", "--sweep-values", "2", "3", "--cases", "explain",
            "--plot", str(plot), "--json", str(tmp_path / "sweep.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split(None, 1) for line in out.splitlines() if line.split()[:1] in (["2"], ["3"])]
    assert [(k, rest.split("  ")[0]) for k, rest in rows] == [
        ("2", "explain"), ("2", "explain, selective lowest"), ("3", "explain"), ("3", "explain, selective lowest")]
    record = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["classes"], r["selective"]) for r in record["results"]] == [(2, False), (2, True), (3, False), (3, True)]
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert {name: [x for x, _, _ in points] for name, points in plotted["series"].items()} == {
            "explain": [2, 3], "explain, selective lowest": [2, 3]}


def test_a_backup_folder_alone_measures_the_original_and_notes_the_rest(tmp_path, capsys, monkeypatch):
    backup = tmp_path / "backup"
    backup.mkdir()
    for name in bm.REFERENCE_FILES:
        (backup / name).write_text("")
    monkeypatch.setenv(bm.REFERENCE_ENV, str(backup))
    args = build_parser().parse_args(["bench", *TINY, "--variants"])
    settings, classes, sweep_values, references = cli._validated_settings(args, args.subparser)
    assert references.original == str(backup.resolve()) and references.selective_reference is None
    variants, _ = cli._variants(args, args.subparser, classes)
    notes = cli._reference_notes(args, references, variants)
    assert len(notes) == 1 and "backup/ folder alone" in notes[0]
    specs = cli._bench_specs(args, settings, classes, sweep_values, variants, references.original, None)
    assert "train (original)" in [s.label for s in specs]
    assert "train (authors' selective)" not in [s.label for s in specs]


def test_variants_with_the_reference(tmp_path, capsys):
    folder = os.environ.get(bm.REFERENCE_ENV)
    if not folder:
        pytest.skip(bm.REFERENCE_HINT)
    references = bm.find_references(folder)
    argv = ["bench", *TINY, "--classes", "3", "--variants", "--cases", "explain", "train",
            "--json", str(tmp_path / "ref.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    results = {r["label"]: r for r in json.loads((tmp_path / "ref.json").read_text())["results"]}
    for label in ("explain", "train"):
        assert results[label]["error"] is None, results[label]["error_detail"]
        if references.original:
            assert results[label]["speedup_vs_original"] == pytest.approx(
                results[f"{label} (original)"]["median_ms"] / results[label]["median_ms"])
        ours = results[f"{label}, selective lowest"]
        if references.selective_reference:
            theirs = results[f"{label} (authors' selective)"]
            assert theirs["error"] is None, theirs["error_detail"]
            assert (theirs["implementation"], theirs["explain"], theirs["selective"]) == (
                "selective_reference", "lowest", True)
            assert ours["speedup_vs_selective_reference"] == pytest.approx(theirs["median_ms"] / ours["median_ms"])
            assert "vs authors' sel." in out
        else:
            assert f"{label} (authors' selective)" not in results
            assert "backup/ folder alone" in out


def test_bench_rounds_measure_every_case_in_turn_and_pool_the_runs(tmp_path, capsys, no_reference):
    out_json = tmp_path / "rounds.json"
    argv = ["bench", "--arch", "tiny", "--device", "cpu", "--batch", "1", "--classes", "2", "--size", "32",
            "--cases", "explain", "explain-floor", "--threads", "1", "--warmup", "0", "--repeat", "2",
            "--rounds", "2", "--json", str(out_json)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    progress = [line.split(":")[0] for line in err.splitlines() if line.startswith("[round")]
    assert progress == ["[round 1/2, 1/2] classes 2", "[round 1/2, 2/2] classes 2",
                        "[round 2/2, 1/2] classes 2", "[round 2/2, 2/2] classes 2"]
    assert "median of 4 runs in 2 rounds" in out
    record = json.loads(out_json.read_text())
    assert record["settings"]["rounds"] == 2
    for result in record["results"]:
        assert result["error"] is None, result["error_detail"]
        assert len(result["times_ms"]) == 4


def test_pooled_rounds_keep_every_run_the_largest_peak_and_a_failure():
    spec = bm.CaseSpec(case="explain", implementation="isnet_fast", arch="tiny")
    first = bm.CaseResult(spec, [1.0, 2.0], 100, "peak RSS")
    second = bm.CaseResult(spec, [3.0], 300, "peak RSS")
    pooled = bm.pool_rounds([first, second])
    assert pooled.times_s == [1.0, 2.0, 3.0] and pooled.peak_memory_bytes == 300 and pooled.median_s == 2.0
    failed = bm.pool_rounds([first, bm.CaseResult(spec, error="out of memory", error_detail="trace")])
    assert failed.error == "out of memory" and failed.times_s == [] and failed.median_s is None
