"""``isnet-fast bench``: figures, JSON, sweeps and clean errors.

Kept fast for 2-core CI: one densenet121 run at 64x64, the rest on the smoke-test 'tiny'
architecture, one thread, no warmup and one timed run.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from isnet_fast import benchmark as bm
from isnet_fast.cli import main

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
    assert "[4/4]" in err  # progress goes to stderr

    record = json.loads((tmp_path / "out.json").read_text())
    assert record["command_line"] == "isnet-fast " + " ".join(argv)
    environment = record["environment"]
    assert {"python", "torch", "triton", "numpy", "device_name", "cpu_count", "torch_threads"} <= set(environment)
    assert record["settings"]["arch"] == "densenet121" and record["settings"]["classes"] == [2]
    assert record["wall_time_s"] > 0
    results = {r["label"]: r for r in record["results"]}
    assert set(results) == {"explain", "train", "explain-floor", "train-floor"}
    for label, result in results.items():
        assert result["error"] is None, result["error_detail"]
        assert (result["batch"], result["classes"], result["size"], result["dtype"]) == (1, 2, 64, "float32")
        assert len(result["times_ms"]) == 1 and all(t > 0 for t in result["times_ms"])
        assert result["median_ms"] > 0 and result["images_per_s"] > 0
        assert result["peak_memory_bytes"] > 0 and result["memory_kind"] == "peak RSS"
        assert result["floor_ratio"] > 0 and result["speedup_vs_original"] is None
    assert results["train-floor"]["floor_ratio"] == 1.0


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu", "--dtype", "bfloat16"], "--dtype bfloat16 needs a CUDA device"),
    (["--device", "cpu", "--dtype", "float16"], "--dtype float16 needs a CUDA device"),
    (["--dtype", "float8"], "invalid choice: 'float8'"),
    (["--arch", "resnet50"], "invalid choice: 'resnet50'"),
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


def test_no_reference_flag_overrides_the_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(bm.REFERENCE_ENV, str(tmp_path / "nowhere"))  # would be an error if read
    assert main(["bench", *TINY, "--classes", "2", "--cases", "explain", "--no-reference"]) == 0
    assert "original: not measured" in capsys.readouterr().out
