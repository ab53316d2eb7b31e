"""bench/gpu_check.sh, the prepared device check: its whole flow in --smoke mode on the CPU, with two
steps made to fail (the others must still run and pass), and its plan for the device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from helpers import load_bench_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
DRIVER = ROOT / "bench" / "gpu_check.py"
FAILED = ("parity", "bench-bf16-nchw")
STATUSES = {"passed", "failed", "skipped"}


def load_driver():
    return load_bench_script("gpu_check.py", "gpu_check")


def clean_env():
    # the check sets up its children itself: no interpreter flag, no authors' code, no injected failure
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ISNET_REFERENCE", "GPU_CHECK_FAIL")}
    env["PYTHON"] = sys.executable
    return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    args = ["bash", str(SCRIPT), str(out), "--smoke"]
    for step in FAILED:
        args += ["--fail-step", step]
    done = subprocess.run(args, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    return out, done


def steps_by_name(out):
    state = json.loads((out / "steps.json").read_text())
    return state, {record["name"]: record for record in state["steps"]}


def test_failing_steps_are_recorded_and_the_others_still_run(smoke):
    out, done = smoke
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    state, steps = steps_by_name(out)
    assert state["exit_code"] == 1
    expected = ["environment", "parity", "tests", "bench-fp32-nchw", "bench-fp32-channels_last", "bench-bf16-nchw",
                "bench-bf16-channels_last", "bench-compiled-fp32-nchw", "report"]
    assert list(steps) == expected
    for name, record in steps.items():
        assert record["status"] in STATUSES, name
        assert isinstance(record["seconds"], (int, float)), name
    for name in FAILED:
        assert steps[name]["status"] == "failed"
        assert "deliberate failure" in steps[name]["log_tail"]
        assert steps[name]["reason"]
    assert sorted(state["failed"]) == sorted(FAILED)
    for name in set(expected) - set(FAILED):
        assert steps[name]["status"] == "passed", (name, steps[name].get("reason"), steps[name].get("log_tail"))


def test_json_files_are_well_formed(smoke):
    out, _ = smoke
    env = json.loads((out / "environment.json").read_text())
    assert env["versions"]["torch"] and "numpy" in env["versions"]
    assert (out / "nvidia-smi.txt").is_file()

    parity = json.loads((out / "parity.json").read_text())
    assert "deliberate failure" in parity["error"]  # the failed step's JSON says why

    tests = json.loads((out / "tests.json").read_text())
    assert tests["tests"] > 0 and tests["passed"] == tests["tests"]
    assert "timeout" in tests["command"][0] and "-p" in tests["command"]
    ElementTree.parse(out / "junit.xml")

    bench = json.loads((out / "bench.json").read_text())
    assert bench["settings"]["arch"] == "tiny" and bench["settings"]["smoke"]
    groups = {group["name"]: group for group in bench["groups"]}
    assert groups["bf16-nchw"]["step_status"] == "failed" and not groups["bf16-nchw"]["cases"]
    eager = groups["fp32-nchw"]["cases"]
    labels = {case["label"] for case in eager}
    assert {"explain", "train", "explain-floor", "train-floor", "train-plain", "train, selective lowest",
            "train-floor, 1 map"} <= labels
    assert {case["classes"] for case in eager} == set(bench["settings"]["classes"])
    for case in eager + groups["bf16-channels_last"]["cases"] + groups["fp32-channels_last"]["cases"]:
        assert case["error"] is None, case["error"]
        assert case["median_ms"] > 0 and len(case["times_ms"]) == bench["settings"]["repeat"]
        if case["case"] in ("explain", "train"):
            assert case["floor_ratio"] is not None
        if case["case"].startswith("train"):
            assert case["plain_ratio"] is not None
    assert {case["precision"] for case in groups["bf16-channels_last"]["cases"]} == {"bf16-autocast"}
    assert {case["layout"] for case in groups["fp32-channels_last"]["cases"]} == {"channels_last"}
    compiled = groups["compiled-fp32-nchw"]["cases"]
    assert compiled and all(case["compiled"] for case in compiled)
    assert all(case["error"] is None and case["floor_ratio"] for case in compiled)
    assert [t["target"] for t in bench["targets"]][0].startswith("train step vs the original")
    for line in (out / "bench-fp32-nchw.jsonl").read_text().splitlines():
        json.loads(line)


def test_summary_has_every_section(smoke):
    out, _ = smoke
    summary = (out / "summary.md").read_text()
    for heading in ("## Steps", "## Tests", "## Parity", "## Bench", "### fp32-nchw", "### compiled-fp32-nchw",
                    "## Targets"):
        assert heading in summary, heading
    rows = [line for line in summary.splitlines() if line.startswith("| parity |")]
    assert rows and "failed" in rows[0]
    assert "log tail: parity" in summary


def test_a_clean_step_exits_zero(tmp_path):
    done = subprocess.run([sys.executable, str(DRIVER), str(tmp_path), "--smoke", "--only", "environment"], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    state = json.loads((tmp_path / "steps.json").read_text())
    assert [r["status"] for r in state["steps"]] == ["passed", "passed"]  # environment, report
    assert (tmp_path / "summary.md").is_file()


def test_device_plan_fits_the_session():
    gpu_check = load_driver()
    for reference in (False, True):
        steps = gpu_check.plan_steps(smoke=False, test_budget=None, with_reference=reference)
        assert [s.name for s in steps[:3]] == ["environment", "parity", "tests"]
        assert steps[3].name == "bench-fp32-nchw"  # the most important figures first
        assert sum(s.reserve_s for s in steps) <= 450
        assert ("bench-reference" in [s.name for s in steps]) == reference
    args = gpu_check.parse_args(["out"])
    assert args.total_budget + 30 <= 8 * 60  # the driver's budget, with room for the install and the report
    settings = gpu_check.Settings.for_run(False, None, None)
    assert (settings.device, settings.arch, settings.batch, settings.size, settings.classes) == (
        "cuda", "densenet121", 16, 224, (2, 10))
    run = gpu_check.Run(out=Path("out"), smoke=False, settings=settings)
    command = gpu_check.pytest_command(run, 200)
    assert command[:6] == ["timeout", "-s", "INT", "-k", "20", "200"]
    files = [c for c in command if c.startswith("tests/")]
    assert files[0] == "tests/test_kernels.py" and "tests/test_gpu_check.py" not in files
    assert files[-1] == "tests/test_demo.py"
