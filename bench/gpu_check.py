"""One prepared device check: environment, test suite, fixture parity and the bench table.

Run it through ``bench/gpu_check.sh OUTDIR [--smoke]`` (or ``python bench/gpu_check.py OUTDIR
[--smoke]``). Every step runs in its own process with a time limit, so a crash, a hang or a
poisoned CUDA context in one step never loses the others; each step's status, wall time and log
tail go into ``OUTDIR/steps.json`` and ``OUTDIR/summary.md``, its figures into its own JSON:

* ``environment``: ``environment.json``, ``nvidia-smi.txt`` (versions, device, driver, CUDA);
* ``parity``: ``parity.json``, every model fixture of ``tests/fixtures`` (``tests/test_parity.py``
  and the ``fi_*`` ones of ``tests/test_variants.py``) on the device with ``backend="triton"``
  and ``backend="torch"``, float32 with TF32 off (and float64 on CUDA), each quantity's relative
  error against the fixture next to its tolerance;
* ``tests``: the test suite under coreutils ``timeout`` (SIGINT first, so pytest still writes
  ``junit.xml``), summarised in ``tests.json``; the files that run the compiled kernels first, the
  slow CPU-only ones (sm_90 compile table, DDP, demo) last, this check's own smoke test left out;
* ``bench-*``: one step per group of the bench table (eager fp32 NCHW first, the authors' code
  next when ``ISNET_REFERENCE`` names a checkout of ISNet, then channels_last, bf16 autocast and
  ``torch.compile``), every case's timings and peak memory in ``bench-<group>.jsonl`` as they
  are measured, all of them with their ratios in ``bench.json``. Models come from
  ``benchmark.prepare_case`` (the weights and builders of ``isnet-fast bench``); the step
  functions mirror benchmark.py's, with the forward and the loss under ``torch.autocast`` in the
  bf16 groups. Where the original's train step runs out of memory at batch 16, it and ours are
  measured at batch 8 as well.

The whole run keeps to ``--total-budget`` seconds (450 on the device, enough for the 8 minutes
the GPU session allows): each step gets at most its own cap and never the time the later steps
reserve; a bench group skips its remaining cases when its time runs short. The exit status is 0
when every step passed (or was skipped), 1 when any failed.

``--smoke`` runs the same flow on the CPU with the tiny DenseNet (about a minute on 2 cores).
``--fail-step NAME`` (or ``GPU_CHECK_FAIL=NAME[,NAME]``) makes a step raise, to check that a
failure is recorded and the other steps still run; ``bench`` names every bench group.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
FAIL_ENV = "GPU_CHECK_FAIL"
REFERENCE_ENV = "ISNET_REFERENCE"
LOG_TAIL_LINES = 40

# Test files run first on the device: the ones that exercise the compiled kernels.
PRIORITY_TESTS = ("test_kernels.py", "test_triton_backend.py", "test_parity.py", "test_variants.py",
                  "test_fused_vs_reference.py", "test_autocast.py", "test_layouts.py", "test_memory.py",
                  "test_torch_compile.py", "test_model.py", "test_benchmark.py")
# ... and last: slow and the same on any machine (sm_90 compiles with ptxas, DDP on gloo, the demo's training).
LAST_TESTS = ("test_compile.py", "test_lightning.py", "test_demo.py")
# Left out on the device: this check's own smoke test (the CPU flow, a minute of the suite's budget).
SKIPPED_TESTS = ("test_gpu_check.py",)
SMOKE_TESTS = ["tests/test_variants.py", "-k", "shapes"]


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class BenchGroup:
    name: str  # the step is "bench-" + name
    layout: str = "nchw"  # or "channels_last"
    precision: str = "fp32"  # or "bf16-autocast"
    compiled: bool = False
    reference: bool = False  # the authors' code next to ours


BENCH_GROUPS = {
    "fp32-nchw": BenchGroup("fp32-nchw"),
    "reference": BenchGroup("reference", reference=True),
    "fp32-channels_last": BenchGroup("fp32-channels_last", layout="channels_last"),
    "bf16-nchw": BenchGroup("bf16-nchw", precision="bf16-autocast"),
    "bf16-channels_last": BenchGroup("bf16-channels_last", layout="channels_last", precision="bf16-autocast"),
    "compiled-fp32-nchw": BenchGroup("compiled-fp32-nchw", compiled=True),
}


@dataclass(frozen=True)
class Step:
    name: str
    cap_s: float  # the most this step may take
    reserve_s: float  # what earlier steps leave for it
    group: Optional[str] = None  # bench group


def plan_steps(smoke: bool, test_budget: Optional[float], with_reference: bool) -> List[Step]:
    """The steps in order, with their caps and reserves (seconds)."""
    if smoke:
        caps = dict(environment=(30, 5), parity=(45, 10), tests=(test_budget or 60, 10), **{
            "fp32-nchw": (40, 5), "reference": (60, 5), "fp32-channels_last": (30, 5), "bf16-nchw": (30, 5),
            "bf16-channels_last": (30, 5), "compiled-fp32-nchw": (60, 5)})
    else:
        # with the authors' code to time (the speedup targets), the suite leaves it a minute more
        tests_cap = test_budget or (180 if with_reference else 240)
        caps = dict(environment=(40, 10), parity=(75, 30), tests=(tests_cap, 90), **{
            "fp32-nchw": (80, 60), "reference": (100, 30), "fp32-channels_last": (50, 15), "bf16-nchw": (50, 15),
            "bf16-channels_last": (50, 15), "compiled-fp32-nchw": (150, 20)})
    steps = [Step("environment", *caps["environment"]), Step("parity", *caps["parity"]),
             Step("tests", *caps["tests"])]
    for name in BENCH_GROUPS:
        if name == "reference" and not with_reference:
            continue
        steps.append(Step(f"bench-{name}", *caps[name], group=name))
    return steps


@dataclass
class Settings:
    """The bench settings of a run: the device's or the smoke test's."""

    device: str
    arch: str
    batch: int
    size: int
    classes: tuple
    warmup: int
    repeat: int
    reference_warmup: int
    reference_repeat: int
    reference_batch: int
    reference_fallback_batch: int
    compile_backend: str
    threads: Optional[int] = None  # torch threads on the CPU

    @classmethod
    def for_run(cls, smoke: bool, device: Optional[str], compile_backend: Optional[str]) -> "Settings":
        if smoke:
            # the inductor's C++ compile of even the tiny model takes minutes on 2 cores: aot_eager
            # traces the same graphs (dynamo and AOTAutograd) without it
            # 64x64: at 32x32 the tiny net's Selective train step diverges after one SGD step (NaN heatmaps)
            # one thread: tiny steps gain nothing from two, and on a busy 2-core machine two spin-waiting
            # OpenMP threads make each step up to 100x slower
            return cls(device or "cpu", "tiny", 2, 64, (2, 3), 1, 1, 1, 1, 2, 1, compile_backend or "aot_eager", 1)
        return cls(device or "cuda", "densenet121", 16, 224, (2, 10), 2, 5, 1, 3, 16, 8, compile_backend or "inductor")


@dataclass
class Run:
    out: Path
    smoke: bool
    settings: Settings
    fail_steps: tuple = ()
    reference: Optional[str] = None
    budget_s: float = 0.0  # this step's time (children)
    started: float = field(default_factory=time.time)

    def fails(self, step: str) -> bool:
        return any(step == name or step.startswith(name + "-") for name in self.fail_steps)


def fail_steps_from(args_fail: Sequence[str]) -> tuple:
    names = list(args_fail or [])
    names += [n.strip() for n in os.environ.get(FAIL_ENV, "").split(",") if n.strip()]
    return tuple(dict.fromkeys(names))


class DeliberateFailure(RuntimeError):
    pass


class Interrupted(BaseException):
    """The driver got SIGTERM or SIGINT."""


def maybe_fail(run: Run, step: str) -> None:
    if run.fails(step):
        raise DeliberateFailure(f"deliberate failure of step {step!r} (--fail-step / {FAIL_ENV})")


# ----------------------------------------------------------------------------- small helpers


def write_json(path: Path, data) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def say(*parts) -> None:
    print(*parts, flush=True)


def fmt(value, spec=".3g", missing="–"):
    if value is None:
        return missing
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def mib(value) -> str:
    return "–" if value is None else f"{value / 2 ** 20:.0f}"


# ----------------------------------------------------------------------------- step: environment


def run_command(command: Sequence[str], timeout: float = 30) -> dict:
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout)
        return {"command": " ".join(command), "rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"command": " ".join(command), "rc": None, "stdout": "", "stderr": f"{type(error).__name__}: {error}"}


def step_environment(run: Run) -> int:
    info: Dict[str, object] = {"python": sys.version, "executable": sys.executable, "platform": platform.platform(),
                               "cwd": os.getcwd(), "mode": "smoke" if run.smoke else "device",
                               "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
                               REFERENCE_ENV: os.environ.get(REFERENCE_ENV)}
    problems = []
    if shutil.which("nvidia-smi"):
        smi = run_command(["nvidia-smi"])
        query = run_command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm,"
                             "power.limit,mig.mode.current,persistence_mode", "--format=csv"])
        (run.out / "nvidia-smi.txt").write_text("\n".join((smi["stdout"], smi["stderr"], query["stdout"],
                                                          query["stderr"])))
        info["nvidia_smi_query"] = query["stdout"].strip()
        lines = query["stdout"].strip().splitlines()
        if len(lines) >= 2:
            info["gpus"] = [dict(zip([h.strip() for h in lines[0].split(",")], [v.strip() for v in line.split(",")]))
                            for line in lines[1:]]
            info["driver"] = info["gpus"][0].get("driver_version")
    else:
        info["nvidia_smi"] = "absent"
        (run.out / "nvidia-smi.txt").write_text("nvidia-smi: not found on this machine\n")
    git = run_command(["git", "-C", str(ROOT), "rev-parse", "HEAD"], timeout=10)
    info["git_commit"] = git["stdout"].strip() or None
    if info["git_commit"]:
        status = run_command(["git", "-C", str(ROOT), "status", "--short"], timeout=10)
        info["git_dirty"] = [line for line in status["stdout"].splitlines()][:50]
    maybe_fail(run, "environment")
    import torch

    versions = {"torch": torch.__version__}
    for name in ("triton", "numpy", "pytest", "pytest-benchmark", "lightning", "isnet-fast"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info["versions"] = versions
    info["torch_cuda"] = torch.version.cuda
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info["cuda_available"] = torch.cuda.is_available()
    info["torch_threads"] = torch.get_num_threads()
    info["cpu_count"] = os.cpu_count()
    try:
        import triton.backends

        info["triton_backends"] = sorted(triton.backends.backends)
    except Exception as error:
        info["triton_backends"] = f"unavailable ({type(error).__name__})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device_count"] = torch.cuda.device_count()
        info["device_name"] = props.name
        info["capability"] = f"{props.major}.{props.minor}"
        info["total_memory_bytes"] = props.total_memory
        info["multiprocessors"] = props.multi_processor_count
        x = torch.ones(1024, device="cuda")
        info["cuda_sanity"] = float((x * 2).sum().item())
    elif not run.smoke and run.settings.device.startswith("cuda"):
        problems.append("CUDA is not available to torch: the device checks cannot run")
    try:
        from isnet_fast import benchmark as bm

        info["benchmark_environment"] = bm.environment_info(run.settings.device if (
            torch.cuda.is_available() or not run.settings.device.startswith("cuda")) else "cpu")
    except Exception as error:
        problems.append(f"isnet_fast.benchmark.environment_info: {type(error).__name__}: {error}")
    info["problems"] = problems
    write_json(run.out / "environment.json", info)
    for key in ("device_name", "driver", "torch_cuda", "cudnn", "capability"):
        say(f"{key}: {info.get(key)}")
    say("versions:", versions)
    for problem in problems:
        say("problem:", problem)
    return 1 if problems else 0


# ----------------------------------------------------------------------------- step: parity


QUANTITIES = ("y", "R", "grad_x", "grad_param", "running")
SMOKE_PARITY = ("tiny_eval_zb", "tiny_train_dropout", "fi_selective_train", "fi_highest_eval")


def step_parity(run: Run) -> int:
    device_name = run.settings.device
    if not device_name.startswith("cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # backend="triton" on the CPU: the interpreter, as the tests
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    sys.path.insert(0, str(TESTS))
    import test_parity as tp  # the fixtures' lists, builder and tolerances, as the tests use them
    import test_variants as tv
    from helpers import load_fixture, rel_err

    device = torch.device(device_name)
    model_fixtures = list(tp.MODEL_FIXTURES)
    variant_fixtures = list(tv.VARIANTS)
    dtypes = [torch.float32] + ([torch.float64] if device.type == "cuda" else [])
    jobs = []
    for dtype in dtypes:
        for name in model_fixtures + variant_fixtures:
            for backend in ("triton", "torch"):
                if run.smoke and (name not in SMOKE_PARITY or (backend == "triton" and name != SMOKE_PARITY[0])):
                    continue  # a sample, to keep the smoke run short (Triton's interpreter takes seconds per pass)
                jobs.append((dtype, name, backend))
    deadline = time.monotonic() + max(5.0, run.budget_s - 10)
    records = []
    report = {"device": str(device), "tf32": {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                                               "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32},
              "triton_interpret": os.environ.get("TRITON_INTERPRET"), "records": records}
    write_json(run.out / "parity.json", report)
    maybe_fail(run, "parity")
    for dtype, name, backend in jobs:
        dtype_name = str(dtype).replace("torch.", "")
        record = {"fixture": name, "backend": backend, "dtype": dtype_name, "quantities": {}, "passed": False,
                  "error": None}
        records.append(record)
        if time.monotonic() > deadline:
            record["error"] = "skipped: the step's time ran out"
            record["skipped"] = True
            continue
        started = time.perf_counter()
        try:
            data = load_fixture(name)
            if name in tv.VARIANTS:
                settings, pick = tv.VARIANTS[name]
                tolerance = tv.FASTER_TOLERANCE[dtype]
            else:
                settings, pick = {}, None
                tolerance = tp.TOLERANCE[dtype]
            model = tp.build_from_fixture(data, dtype, backend)
            for key, value in settings.items():
                setattr(model, key, value)
            model = model.to(device)
            classes = pick(data).to(device) if pick else None
            x = data["x"].to(device, dtype).clone().requires_grad_()
            y, R = model(x, classes=classes)
            ((R * data["G_R"].to(device, dtype)).sum() + (y * data["G_y"].to(device, dtype)).sum()).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            quantities = record["quantities"]
            if tuple(R.shape) != tuple(data["R"].shape):
                raise AssertionError(f"R has shape {tuple(R.shape)}, the fixture {tuple(data['R'].shape)}")
            quantities["y"] = {"rel_err": rel_err(y, data["y"])}
            quantities["R"] = {"rel_err": rel_err(R, data["R"])}
            quantities["grad_x"] = {"rel_err": rel_err(x.grad, data["grad_x"])}
            worst, worst_name = 0.0, None
            params = dict(model.DenseNet.named_parameters())
            missing = set(data["grad_params"]) ^ set(params)
            if missing:
                raise AssertionError(f"parameters differ from the fixture's: {sorted(missing)[:5]}")
            for param_name, param in params.items():
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
                error = rel_err(grad, data["grad_params"][param_name])
                if worst_name is None or error > worst:
                    worst, worst_name = error, param_name
            quantities["grad_param"] = {"rel_err": worst, "worst": worst_name}
            state = model.DenseNet.state_dict()
            worst, worst_name = 0.0, None
            for key in (k for k in data["state_dict_after"] if "running" in k):
                error = rel_err(state[key], data["state_dict_after"][key])
                if worst_name is None or error > worst:
                    worst, worst_name = error, key
            quantities["running"] = {"rel_err": worst, "worst": worst_name}
            for quantity in QUANTITIES:
                entry = quantities[quantity]
                entry["tolerance"] = tolerance[quantity]
                entry["passed"] = bool(entry["rel_err"] <= tolerance[quantity])
            record["passed"] = all(quantities[q]["passed"] for q in QUANTITIES)
        except Exception as error:  # per fixture: the others still run
            record["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:500]
            record["traceback"] = traceback.format_exc()[-4000:]
        finally:
            record["seconds"] = time.perf_counter() - started
        verdict = "ok" if record["passed"] else f"FAILED {record['error'] or ''}"
        errors = " ".join(f"{q}={fmt(v['rel_err'], '.1e')}" for q, v in record["quantities"].items())
        say(f"{dtype_name:8s} {backend:6s} {name:26s} {verdict}  {errors}")
        write_json(run.out / "parity.json", report)
    report["passed"] = sum(r["passed"] for r in records)
    report["failed"] = sum(not r["passed"] and not r.get("skipped") for r in records)
    report["skipped"] = sum(bool(r.get("skipped")) for r in records)
    # float64 runs last and is a bonus: only a float32 record left out for time makes the step incomplete
    report["float32_skipped"] = sum(bool(r.get("skipped")) for r in records if r["dtype"] == "float32")
    write_json(run.out / "parity.json", report)
    return 0 if report["failed"] == 0 and report["float32_skipped"] == 0 else 1


# ----------------------------------------------------------------------------- step: bench


@dataclass
class BenchCase:
    spec: object  # benchmark.CaseSpec
    group: BenchGroup
    note: Optional[str] = None


def group_cases(run: Run, group: BenchGroup, bm) -> List[BenchCase]:
    s = run.settings
    common = dict(arch=s.arch, batch=s.batch, size=s.size, dtype="float32", device=s.device, backend="auto",
                  warmup=s.warmup, repeat=s.repeat, threads=s.threads if s.device.startswith("cpu") else None)
    if group.reference:
        return reference_cases(run, group, bm, common)
    if group.compiled:
        specs = []
        for classes in s.classes:
            for case, implementation, explain, selective in (
                    ("train", "isnet_fast", "all", False), ("train-plain", "autograd", "all", False),
                    ("explain", "isnet_fast", "all", False), ("explain-floor", "autograd", "all", False),
                    ("train", "isnet_fast", "lowest", True), ("explain", "isnet_fast", "lowest", True),
                    ("explain-floor", "autograd", "top", False)):
                specs.append(bm.CaseSpec(case, implementation, classes=classes, explain=explain, selective=selective,
                                         **common))
        # train-floor is left out: its create_graph double backward is not supported under torch.compile's
        # AOTAutograd; the compiled train cases are compared with the eager floor of their layout and precision.
        if run.smoke:  # one compile of the tiny model: about 10 s with aot_eager on 2 cores
            specs = [spec for spec in specs if spec.case == "explain"][:1]
        return [BenchCase(spec, group) for spec in specs]
    specs = bm.case_specs(bm.CASES, s.classes, bm.STANDARD_VARIANTS, **common)
    return [BenchCase(spec, group) for spec in specs]


def reference_cases(run: Run, group: BenchGroup, bm, common) -> List[BenchCase]:
    folders = bm.find_references(run.reference)
    s = run.settings
    classes = max(s.classes)
    common = dict(common, batch=s.reference_batch, warmup=s.reference_warmup, repeat=s.reference_repeat)
    cases = []
    for case in ("train", "explain"):
        cases.append(bm.CaseSpec(case, "isnet_fast", classes=classes, **common))
        if folders.original:
            cases.append(bm.CaseSpec(case, "original", classes=classes, reference=folders.original, **common))
        cases.append(bm.CaseSpec(case, "isnet_fast", classes=classes, explain="lowest", selective=True, **common))
        if folders.selective_reference:
            cases.append(bm.CaseSpec(case, "selective_reference", classes=classes, explain="lowest", selective=True,
                                     reference=folders.selective_reference, **common))
    return [BenchCase(spec, group, note=folders.note) for spec in cases]


def make_step(case: str, explain: str, model, forward, batch, amp_dtype, device, bm):
    """The step of a case, as benchmark.py's, with the forward and the loss under autocast when asked.

    ``model`` is the module (train/eval, parameters), ``forward`` what runs it (the module or its
    ``torch.compile``).
    """
    import torch
    import torch.nn.functional as F

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    def input_gradients(explain, create_graph):
        images = batch.images.detach().requires_grad_(True)
        logits = forward(images)
        if explain == "top":
            top = logits.gather(1, logits.detach().argmax(dim=1, keepdim=True)).sum()
            return logits, torch.autograd.grad(top, images, create_graph=create_graph)[0].unsqueeze(1)
        grads = []
        classes = logits.shape[1]
        for c in range(classes):
            retain = create_graph or c < classes - 1
            grads.append(torch.autograd.grad(logits[:, c].sum(), images, retain_graph=retain,
                                             create_graph=create_graph)[0])
        return logits, torch.stack(grads, 1)

    def synchronized(step):
        def run_step():
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return run_step

    if case in ("explain", "explain-floor"):
        model.eval()

        def explain_step():
            if case == "explain":
                with torch.no_grad(), autocast():
                    forward(batch.images)
            else:
                with autocast():
                    input_gradients(explain, create_graph=False)
        return synchronized(explain_step)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=bm.LEARNING_RATE)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            if case == "train-plain":
                loss = F.cross_entropy(forward(batch.images), batch.labels)
            else:
                if case == "train":
                    logits, heatmaps = forward(batch.images)
                else:  # train-floor
                    logits, heatmaps = input_gradients(explain, create_graph=True)
                loss = bm.isnet_loss(logits, heatmaps, batch)
        loss.backward()
        optimizer.step()
    return synchronized(train_step)


def is_cuda_fatal(message: str) -> bool:
    """Errors after which this process's CUDA context is unusable (the next cases would fail too)."""
    words = ("illegal memory access", "unspecified launch failure", "device-side assert", "CUDA error: an illegal",
             "misaligned address", "illegal instruction")
    return any(word in message for word in words)


def measure_case(run: Run, bench_case: BenchCase, bm, reference_modules: dict) -> dict:
    import torch

    spec, group = bench_case.spec, bench_case.group
    device = bm.resolve_device(spec.device)
    record = {"group": group.name, "layout": group.layout, "precision": group.precision, "compiled": group.compiled,
              "compile_backend": run.settings.compile_backend if group.compiled else None, "note": bench_case.note,
              "warmup_ms": [], "build_s": None, "wall_s": None, "status": "ok"}
    started = time.perf_counter()
    result = bm.CaseResult(spec)
    prepared = model = forward = step = batch = None
    try:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        if group.compiled:
            torch._dynamo.reset()
        reference = None
        if spec.implementation in bm.LOADERS:
            if spec.implementation not in reference_modules:
                reference_modules[spec.implementation] = bm.LOADERS[spec.implementation](spec.reference)
            reference = reference_modules[spec.implementation]
        prepared = bm.prepare_case(spec, reference)  # the model as isnet-fast bench builds it, same weights
        model = prepared.model
        prepared = None
        batch = bm.synthetic_batch(spec, device)
        images = batch.images
        if group.layout == "channels_last" or (device.type == "cpu" and spec.implementation == "autograd"):
            images = images.contiguous(memory_format=torch.channels_last)
        if group.layout == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        batch.images = images
        forward = model
        if group.compiled:
            forward = torch.compile(model, backend=run.settings.compile_backend)
        amp_dtype = torch.bfloat16 if group.precision == "bf16-autocast" else None
        step = make_step(spec.case, spec.explain, model, forward, batch, amp_dtype, device, bm)
        record["build_s"] = time.perf_counter() - started
        for _ in range(spec.warmup):
            t0 = time.perf_counter()
            step()
            record["warmup_ms"].append((time.perf_counter() - t0) * 1e3)
        for _ in range(spec.repeat):
            t0 = time.perf_counter()
            step()
            result.times_s.append(time.perf_counter() - t0)
        if device.type == "cuda":
            result.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
            result.memory_kind = "max_memory_allocated"
        else:
            result.memory_kind = "none (CPU, in-process)"
    except Exception as error:  # per case: the others still run
        result.error = f"{type(error).__name__}: {error}".splitlines()[0][:500]
        result.error_detail = traceback.format_exc()[-6000:]
        record["status"] = "error"
        if device.type == "cuda":
            result.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
            result.memory_kind = "max_memory_allocated"
    finally:
        del prepared, model, forward, step, batch
        gc.collect()
        if device.type == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
    record["wall_s"] = time.perf_counter() - started
    record["result"] = result.to_dict()
    return record


def is_oom(record: dict) -> bool:
    error = record["result"].get("error") or ""
    return "OutOfMemoryError" in error or "out of memory" in error


def step_bench(run: Run, group_name: str) -> int:
    group = BENCH_GROUPS[group_name]
    path = run.out / f"bench-{group_name}.jsonl"
    path.write_text("")
    maybe_fail(run, f"bench-{group_name}")
    import torch
    from isnet_fast import benchmark as bm

    bm.silence_original_deprecation_warnings()
    if run.settings.device.startswith("cpu") and run.settings.threads:
        torch.set_num_threads(run.settings.threads)
    started = time.monotonic()
    grace = min(25.0, 0.2 * run.budget_s)
    soft_deadline = started + run.budget_s - grace
    cases = group_cases(run, group, bm)
    reference_modules: dict = {}
    failures = 0
    last_wall = 0.0
    queue = list(cases)
    fallback_done = False
    while queue:
        bench_case = queue.pop(0)
        spec = bench_case.spec
        now = time.monotonic()
        if now + 1.2 * last_wall > soft_deadline:
            record = {"group": group.name, "layout": group.layout, "precision": group.precision,
                      "compiled": group.compiled, "status": "skipped", "note": bench_case.note,
                      "skip_reason": f"the group's time ran out ({run.budget_s:.0f} s)", "warmup_ms": [],
                      "result": bm.CaseResult(spec).to_dict()}
        else:
            say(f"[{time.monotonic() - started:6.1f} s] {group.name}: {spec.label}, K={spec.classes}, "
                f"B={spec.batch} ...")
            record = measure_case(run, bench_case, bm, reference_modules)
            last_wall = record["wall_s"]
            result = record["result"]
            if result["error"]:
                failures += 1
                say(f"    error: {result['error']}")
            else:
                times = [t * 1e3 for t in result["times_s"]]
                warmup = ", ".join(f"{t:.1f}" for t in record["warmup_ms"])
                say(f"    {sorted(times)[len(times) // 2]:.1f} ms (runs {', '.join(f'{t:.1f}' for t in times)}; "
                    f"warmup {warmup}), peak {mib(result['peak_memory_bytes'])} MiB")
            # The original keeps B x K relevance graphs: where batch 16 does not fit, measure it and ours at a
            # smaller batch too, side by side.
            if (group.reference and spec.implementation == "original" and spec.case == "train" and is_oom(record)
                    and not fallback_done and run.settings.reference_fallback_batch < spec.batch):
                fallback_done = True
                small = run.settings.reference_fallback_batch
                failures -= 1  # the original's known limit, measured at the smaller batch instead
                record["note"] = (f"the original's train step ran out of memory at batch {spec.batch}: both are "
                                  f"measured at batch {small} too")
                # ours first, then the original: the pair of one configuration
                queue[0:0] = [BenchCase(dataclasses.replace(spec, implementation="isnet_fast", reference=None,
                                                            batch=small), group, note="batch fallback after OOM"),
                              BenchCase(dataclasses.replace(spec, batch=small), group, note="batch fallback after OOM")]
            if is_cuda_fatal(result["error"] or ""):
                with path.open("a") as handle:
                    handle.write(json.dumps(record, default=str) + "\n")
                say("    the CUDA context is unusable after this error: the group stops here")
                return 2
        with path.open("a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
    return 1 if failures else 0


# ----------------------------------------------------------------------------- bench report


def load_bench_records(out: Path, groups: Sequence[str]) -> Dict[str, List[dict]]:
    records = {}
    for name in groups:
        path = out / f"bench-{name}.jsonl"
        if not path.is_file():
            continue
        rows = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
        records[name] = rows
    return records


def bench_report(run: Run, steps: List[dict]) -> dict:
    """bench.json: every case with its ratios (benchmark.compare, within each group)."""
    from isnet_fast import benchmark as bm

    names = [s["group"] for s in steps if s.get("group")]
    raw = load_bench_records(run.out, names)
    groups = []
    floors_by_group = {}
    for name in names:
        rows = raw.get(name, [])
        results = [bm.CaseResult.from_dict(row["result"]) for row in rows]
        comparisons = bm.compare(results)
        cases = []
        for row, comparison in zip(rows, comparisons):
            record = bm.comparison_record(comparison)
            for key in ("group", "layout", "precision", "compiled", "compile_backend", "status", "skip_reason",
                        "warmup_ms", "build_s", "wall_s", "note"):
                record[key] = row.get(key)
            record["spread"] = comparison.result.spread
            record["error_detail"] = (record.get("error_detail") or None) and record["error_detail"][-3000:]
            cases.append(record)
        group = BENCH_GROUPS[name]
        floors_by_group[(group.layout, group.precision, group.compiled)] = cases
        groups.append({"name": name, "layout": group.layout, "precision": group.precision,
                       "compiled": group.compiled, "reference": group.reference,
                       "step_status": next((s["status"] for s in steps if s.get("group") == name), None),
                       "cases": cases})
    # Compiled cases without a compiled floor: the eager floor of the same layout and precision.
    for group in groups:
        if not group["compiled"]:
            continue
        eager = floors_by_group.get((group["layout"], group["precision"], False), [])
        for record in group["cases"]:
            if record["floor_ratio"] is not None or record["case"] not in bm.FLOOR_OF or not record["median_ms"]:
                continue
            maps = record["maps"]
            floor = next((r for r in eager if r["case"] == bm.FLOOR_OF[record["case"]] and r["maps"] == maps
                          and r["classes"] == record["classes"] and r["batch"] == record["batch"] and r["median_ms"]),
                         None)
            if floor is not None:
                record["floor_ratio"] = record["median_ms"] / floor["median_ms"]
                record["floor"] = f"{floor['label']} (eager)"
    # Memory against the authors' code, in the groups that ran it.
    for group in groups:
        by_config = {}
        for record in group["cases"]:
            key = (record["case"], record["classes"], record["batch"], record["explain"], record["selective"])
            by_config.setdefault(key, {})[record["implementation"]] = record
        for record in group["cases"]:
            if record["implementation"] != "isnet_fast":
                continue
            key = (record["case"], record["classes"], record["batch"], record["explain"], record["selective"])
            for other, field_name in (("original", "memory_vs_original"),
                                      ("selective_reference", "memory_vs_selective_reference")):
                theirs = by_config[key].get(other)
                if theirs and theirs["peak_memory_bytes"] and record["peak_memory_bytes"]:
                    record[field_name] = record["peak_memory_bytes"] / theirs["peak_memory_bytes"]
    s = run.settings
    import torch

    report = {
        "settings": {"device": s.device, "arch": s.arch, "batch": s.batch, "size": s.size, "classes": list(s.classes),
                     "warmup": s.warmup, "repeat": s.repeat, "reference_batch": s.reference_batch,
                     "reference_warmup": s.reference_warmup, "reference_repeat": s.reference_repeat,
                     "compile_backend": s.compile_backend, "threads": s.threads, "smoke": run.smoke,
                     "reference": run.reference,
                     "cudnn.allow_tf32 (bench)": torch.backends.cudnn.allow_tf32,
                     "cuda.matmul.allow_tf32 (bench)": torch.backends.cuda.matmul.allow_tf32,
                     "cudnn.benchmark": torch.backends.cudnn.benchmark,
                     "steps": "benchmark.prepare_case builds each model; the steps mirror benchmark.py's, with the "
                              "forward and the loss under torch.autocast in the bf16 groups"},
        "groups": groups,
    }
    report["targets"] = targets(groups)
    return report


def targets(groups: List[dict]) -> List[dict]:
    """The speed and memory targets, from the figures measured side by side."""
    cases = [r for g in groups for r in g["cases"] if r.get("median_ms")]
    out = []

    def add(name, goal, values, ok):
        out.append({"target": name, "goal": goal, "values": values,
                    "status": "not measured" if not values else ("met" if all(ok(v["value"]) for v in values)
                                                                 else "missed")})

    train_vs_original = [{"where": f"{r['group']}, K={r['classes']}, B={r['batch']}", "value": r["speedup_vs_original"]}
                         for r in cases if r["case"] == "train" and r.get("speedup_vs_original")]
    add("train step vs the original (10 maps)", ">= 10x faster", train_vs_original, lambda v: v >= 10)
    selective = [{"where": f"{r['group']}, {r['case']}, K={r['classes']}, B={r['batch']}",
                  "value": r["speedup_vs_selective_reference"]}
                 for r in cases if r["case"] == "train" and r.get("speedup_vs_selective_reference")]
    add("ours Selective vs the authors' Selective ISNet (train step)", ">= 4x faster", selective, lambda v: v >= 4)
    explain = [{"where": f"{r['group']}, {r['label']}, K={r['classes']}", "value": r["floor_ratio"]}
               for r in cases if r["case"] == "explain" and r["implementation"] == "isnet_fast"
               and r.get("floor_ratio") and not r["compiled"]]
    add("explain within 1.2x of its floor (eager groups)", "<= 1.2x floor", explain, lambda v: v <= 1.2)
    memory = [{"where": f"{r['group']}, {r['case']}, K={r['classes']}, B={r['batch']}",
               "value": r["memory_vs_original"]}
              for r in cases if r["case"] == "train" and r.get("memory_vs_original")]
    add("train peak memory vs the original's", "<= 0.25 of the original's", memory, lambda v: v <= 0.25)
    return out


# ----------------------------------------------------------------------------- tests step


def pytest_command(run: Run, timeout_s: float) -> List[str]:
    if run.smoke:
        selection = list(SMOKE_TESTS)
    else:
        files = sorted(p.name for p in TESTS.glob("test_*.py") if p.name not in SKIPPED_TESTS)
        middle = [f for f in files if f not in PRIORITY_TESTS and f not in LAST_TESTS]
        ordered = [f for f in PRIORITY_TESTS if f in files] + middle + [f for f in LAST_TESTS if f in files]
        selection = [f"tests/{f}" for f in ordered]
    if run.fails("tests"):
        selection.append("tests/deliberately_missing_test_file.py")  # pytest exits 4: the step fails
    junit = run.out / "junit.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--durations=25",
               "--maxfail=25", f"--junitxml={junit}"]
    if shutil.which("timeout"):  # else the driver's own limit stops it (SIGTERM: no junit XML then)
        command = ["timeout", "-s", "INT", "-k", "20", str(int(max(1, timeout_s)))] + command
    return command + selection


def summarise_junit(path: Path) -> dict:
    if not path.is_file():
        return {"junit": None}
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        return {"junit": str(path), "parse_error": str(error)}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0) or 0) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["time_s"] = sum(float(s.get("time", 0) or 0) for s in suites)
    failed, slowest = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        slowest.append((float(case.get("time", 0) or 0), name))
        for kind in ("failure", "error"):
            element = case.find(kind)
            if element is not None:
                message = (element.get("message") or element.text or "").strip().splitlines()
                failed.append({"test": name, "kind": kind, "message": (message[0] if message else "")[:300]})
    slowest.sort(reverse=True)
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return dict(counts, junit=str(path), failed=failed, slowest=[{"test": n, "s": t} for t, n in slowest[:15]])


# ----------------------------------------------------------------------------- driver


def child_env(run: Run) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if run.settings.device.startswith("cuda"):
        env.pop("TRITON_INTERPRET", None)  # compiled kernels on the device, never the interpreter
    if run.fail_steps:
        env[FAIL_ENV] = ",".join(run.fail_steps)
    if run.settings.device.startswith("cpu") and run.settings.threads:
        env["OMP_NUM_THREADS"] = str(run.settings.threads)
    return env


def run_process(command: List[str], log: Path, timeout_s: float, env: dict) -> tuple:
    """Runs ``command`` in its own process group; (rc, timed out). On timeout the group gets SIGTERM, then SIGKILL."""
    with log.open("w") as handle:
        handle.write("$ " + " ".join(shlex.quote(c) for c in command) + "\n")
        handle.flush()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                   start_new_session=True)
        try:
            return process.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, sig)
                try:
                    process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            return process.returncode, True
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            raise


def base_args(run: Run, args) -> List[str]:
    extra = ["--device", run.settings.device, "--compile-backend", run.settings.compile_backend]
    if run.smoke:
        extra.append("--smoke")
    if run.reference:
        extra += ["--reference", run.reference]
    return extra


def drive(run: Run, args) -> int:
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "logs").mkdir(exist_ok=True)
    # a rerun into the same folder: nothing of the last run may pass for this one's
    stale = [run.out / n for n in ("steps.json", "summary.md", "environment.json", "nvidia-smi.txt", "parity.json",
                                   "tests.json", "junit.xml", "bench.json")]
    for path in stale + list(run.out.glob("bench-*.jsonl")) + list((run.out / "logs").glob("*.log")):
        with contextlib.suppress(OSError):
            path.unlink()
    steps = plan_steps(run.smoke, args.test_budget, bool(run.reference))
    if args.only:
        steps = [s for s in steps if any(s.name == o or s.name.startswith(o + "-") for o in args.only)]
    deadline = time.monotonic() + args.total_budget
    env = child_env(run)
    records: List[dict] = []
    state = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
             "mode": "smoke" if run.smoke else "device",
             "total_budget_s": args.total_budget, "fail_steps": list(run.fail_steps), "steps": records}
    say(f"gpu_check: {len(steps)} steps into {run.out} ({state['mode']}, budget {args.total_budget:.0f} s)")
    wall_start = time.monotonic()

    def stop(signum, frame):  # a backstop's SIGTERM (or Ctrl-C): stop the step's processes, still write the report
        for sig in (signal.SIGTERM, signal.SIGINT):  # once: coreutils timeout signals its child, then its group
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signal.Signals(signum).name)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    interrupted = None
    for index, step in enumerate(steps):
        later = sum(s.reserve_s for s in steps[index + 1:])
        available = deadline - time.monotonic() - later
        budget = min(step.cap_s, available)
        log = run.out / "logs" / f"{step.name}.log"
        record = {"name": step.name, "group": step.group, "status": None, "reason": None, "seconds": 0.0,
                  "budget_s": round(max(budget, 0), 1), "rc": None, "timed_out": False,
                  "log": str(log.relative_to(run.out))}
        records.append(record)
        if interrupted or budget < min(step.reserve_s, 10) or budget < 3:
            reason = f"not run: the check was stopped ({interrupted})" if interrupted else (
                f"no time left ({max(available, 0):.0f} s after the later steps' reserve)")
            record.update(status="skipped", reason=reason)
            say(f"-- {step.name}: skipped ({record['reason']})")
            write_json(run.out / "steps.json", state)
            continue
        say(f"-- {step.name} (up to {budget:.0f} s)")
        started = time.monotonic()
        try:
            if step.name == "tests":
                command = pytest_command(run, budget - 25)  # SIGINT at budget - 25 s, SIGKILL 20 s later
                rc, timed_out = run_process(command, log, budget, env)
                if rc == 124:  # coreutils timeout: pytest was stopped (and wrote its junit XML on the SIGINT)
                    timed_out = True
            else:
                command = [sys.executable, str(Path(__file__).resolve()), str(run.out), "--step", step.name,
                           "--step-budget", str(round(budget, 1))] + base_args(run, args)
                rc, timed_out = run_process(command, log, budget, env)
        except Interrupted as error:  # run_process has killed the step's process group
            interrupted = str(error)
            rc, timed_out = None, False
        if step.name == "tests":
            junit = summarise_junit(run.out / "junit.xml")
            write_json(run.out / "tests.json", dict(junit, command=command, rc=rc))
            record["detail"] = {k: junit.get(k) for k in ("tests", "passed", "failures", "errors", "skipped")}
        record["seconds"] = round(time.monotonic() - started, 1)
        record["rc"] = rc
        record["timed_out"] = timed_out
        if interrupted:
            record["status"] = "failed"
            record["reason"] = f"stopped by {interrupted} (the backstop?); partial results kept"
        elif rc == 0 and not timed_out:
            record["status"] = "passed"
        else:
            record["status"] = "failed"
            if timed_out:
                record["reason"] = f"timed out after {budget:.0f} s (partial results kept)"
            elif step.name == "tests":
                record["reason"] = f"pytest exited with {rc}"
            elif rc == 1:
                record["reason"] = "checks failed (see the log and the step's JSON)"
            elif rc == 2 and step.group:
                record["reason"] = "stopped: a CUDA error left the context unusable (see the log)"
            else:
                lines = [line for line in tail(log, 200).splitlines() if line.strip()]
                record["reason"] = f"crashed (exit {rc}): " + (lines[-1][:300] if lines else "")
        record["log_tail"] = tail(log)
        say(f"   {record['status']} in {record['seconds']} s" + (f": {record['reason']}" if record["reason"] else ""))
        write_json(run.out / "steps.json", state)
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    # The report: bench.json and summary.md; its own failure is recorded, never fatal.
    report_record = {"name": "report", "status": "passed", "reason": None, "seconds": 0.0}
    started = time.monotonic()
    bench = None
    if any(s.group for s in steps):
        try:
            bench = bench_report(run, records)
            write_json(run.out / "bench.json", bench)
        except Exception as error:
            report_record.update(status="failed", reason=f"bench report: {type(error).__name__}: {error}",
                                 log_tail=traceback.format_exc()[-3000:])
    state["elapsed_s"] = round(time.monotonic() - wall_start, 1)
    try:
        (run.out / "summary.md").write_text(summary_markdown(run, state, bench))
    except Exception as error:
        report_record.update(status="failed", reason=f"summary: {type(error).__name__}: {error}",
                             log_tail=traceback.format_exc()[-3000:])
        (run.out / "summary.md").write_text(f"# gpu_check\n\nThe summary could not be written: {error}\n\n"
                                            f"```\n{traceback.format_exc()}\n```\nSee steps.json.\n")
    report_record["seconds"] = round(time.monotonic() - started, 1)
    records.append(report_record)
    state["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    state["elapsed_s"] = round(time.monotonic() - wall_start, 1)
    state["failed"] = [r["name"] for r in records if r["status"] == "failed"]
    state["exit_code"] = 1 if state["failed"] else 0
    write_json(run.out / "steps.json", state)
    if report_record["status"] != "passed":  # the summary predates this record: append it
        with (run.out / "summary.md").open("a") as handle:
            handle.write(f"\n**report step failed**: {report_record['reason']}\n")
    failed = f" (failed: {', '.join(state['failed'])})" if state["failed"] else ""
    say(f"gpu_check: exit {state['exit_code']}{failed}")
    return state["exit_code"]


# ----------------------------------------------------------------------------- summary


def summary_markdown(run: Run, state: dict, bench: Optional[dict]) -> str:
    lines = [f"# isnet-fast device check ({state['mode']})", ""]
    env = read_json(run.out / "environment.json", {}) or {}
    versions = env.get("versions", {})
    lines.append(f"Started {state['started']}, {state.get('elapsed_s', '?')} s of the {state['total_budget_s']:.0f} s "
                 f"budget; device `{run.settings.device}`"
                 f" ({env.get('device_name') or (env.get('benchmark_environment') or {}).get('device_name') or '?'}); "
                 f"driver {env.get('driver') or '?'}; torch {versions.get('torch', '?')} "
                 f"(CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}); triton {versions.get('triton', '?')}; "
                 f"numpy {versions.get('numpy', '?')}; "
                 f"python {platform.python_version()}.")
    for gpu in env.get("gpus") or []:
        lines.append("")
        lines.append("GPU: " + ", ".join(f"{k} {v}" for k, v in gpu.items()))
    if env.get("problems"):
        lines.append("")
        lines += [f"- **problem**: {p}" for p in env["problems"]]
    lines += ["", "## Steps", "", "| step | status | seconds | budget s | note |", "| --- | --- | ---: | ---: | --- |"]
    for record in state["steps"]:
        note = (record.get("reason") or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {record['name']} | {'**failed**' if record['status'] == 'failed' else record['status']} | "
                     f"{record.get('seconds', '')} | {record.get('budget_s', '')} | {note} |")
    failed = [r for r in state["steps"] if r["status"] == "failed" and r.get("log_tail")]
    for record in failed:
        lines += ["", f"<details><summary>log tail: {record['name']}</summary>", "", "```",
                  "\n".join(record["log_tail"].splitlines()[-25:]), "```", "</details>"]
    tests = read_json(run.out / "tests.json")
    if tests:
        lines += ["", "## Tests", ""]
        if tests.get("tests") is None:
            lines.append(f"No junit XML (pytest exit {tests.get('rc')}); see logs/tests.log.")
        else:
            cut = "; 124: stopped at its time limit, later tests did not run" if tests.get("rc") == 124 else ""
            lines.append(f"{tests['tests']} tests: {tests['passed']} passed, {tests['failures']} failed, "
                         f"{tests['errors']} errors, {tests['skipped']} skipped in {tests['time_s']:.1f} s "
                         f"(pytest exit {tests.get('rc')}{cut}).")
            if tests.get("slowest"):
                lines += ["", "Slowest: " + "; ".join(f"`{t['test']}` {t['s']:.1f} s" for t in tests["slowest"][:8])]
            if tests.get("failed"):
                lines += ["", "| test | kind | message |", "| --- | --- | --- |"]
                for item in tests["failed"][:40]:
                    message = item["message"].replace("|", "\\|")
                    lines.append(f"| `{item['test']}` | {item['kind']} | {message} |")
    parity = read_json(run.out / "parity.json")
    if parity and parity.get("error"):
        lines += ["", "## Parity", "", f"**The parity step failed**: {parity['error']}"]
    if parity:
        lines += ["", f"## Parity against the fixtures ({parity.get('device')}, TF32 off)", "",
                  "Relative error max|ours - ref| / max|ref| against the float64 fixtures, / the tolerance.", "",
                  "| fixture | backend | dtype | y | R | grad_x | grad_param | running | result |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for record in parity["records"]:
            cells = []
            for quantity in QUANTITIES:
                entry = record["quantities"].get(quantity)
                if not entry or "tolerance" not in entry:
                    cells.append("–")
                    continue
                mark = "" if entry["passed"] else " **✗**"
                cells.append(f"{entry['rel_err']:.1e} / {entry['tolerance']:.0e}{mark}")
            if record["passed"]:
                result = "pass"
            elif record.get("skipped"):
                result = "skipped (time)"
            else:
                result = "**FAIL**" + (f": {record['error']}".replace("|", "\\|")[:200] if record.get("error") else "")
            lines.append(f"| {record['fixture']} | {record['backend']} | {record['dtype']} | " + " | ".join(cells)
                         + f" | {result} |")
    if bench:
        lines += bench_markdown(bench)
    lines.append("")
    return "\n".join(lines)


def bench_markdown(bench: dict) -> List[str]:
    s = bench["settings"]
    lines = ["", "## Bench", "",
             f"{s['arch']}, {s['size']}x{s['size']}, batch {s['batch']}, classes {s['classes']}, warmup {s['warmup']}, "
             f"repeat {s['repeat']} (the authors' code: batch {s['reference_batch']}, warmup {s['reference_warmup']}, "
             f"repeat {s['reference_repeat']}); conv TF32 {s['cudnn.allow_tf32 (bench)']} (torch's default); "
             f"compile backend {s['compile_backend']}. Median of the timed runs; spread = (max - min) / median; "
             "peak = max_memory_allocated since the case's build. x floor: against the floor with the same number "
             "of maps; x plain: against train-plain; vs original / vs authors': their time over ours, with "
             "(mem: our peak / theirs)."]
    if s.get("smoke"):
        lines += ["", "Smoke run: tiny sizes on the CPU, a check of the tooling; the figures say nothing about speed."]
    for group in bench["groups"]:
        mode = "torch.compile" if group["compiled"] else "eager"
        title = f"{group['name']}: {group['layout']}, {group['precision']}, {mode}"
        lines += ["", f"### {title} (step {group['step_status']})", ""]
        if not group["cases"]:
            lines.append("No cases ran.")
            continue
        lines += ["| case | K | B | ms | spread | first step ms | peak MiB | x floor | x plain | vs original "
                  "| vs authors' |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in group["cases"]:
            if r.get("status") == "skipped":
                lines.append(f"| {r['label']} | {r['classes']} | {r['batch']} | skipped: {r.get('skip_reason')} "
                             f"| | | | | | | |")
                continue
            if r.get("error"):
                error = r["error"].replace("|", "\\|")[:160]
                lines.append(f"| {r['label']} | {r['classes']} | {r['batch']} | **error**: {error} | | | "
                             f"{mib(r.get('peak_memory_bytes'))} | | | | |")
                continue
            first = r["warmup_ms"][0] if r.get("warmup_ms") else None
            vs_original = fmt(r.get("speedup_vs_original"), ".2f", "")
            if r.get("memory_vs_original"):
                vs_original += f"x (mem {r['memory_vs_original']:.2f})"
            elif vs_original:
                vs_original += "x"
            vs_authors = fmt(r.get("speedup_vs_selective_reference"), ".2f", "")
            if r.get("memory_vs_selective_reference"):
                vs_authors += f"x (mem {r['memory_vs_selective_reference']:.2f})"
            elif vs_authors:
                vs_authors += "x"
            floor = fmt(r.get("floor_ratio"), ".2f", "")
            if floor and r.get("floor") and "(eager)" in r["floor"]:
                floor += " (eager floor)"
            spread = "" if r.get("spread") is None else f"{r['spread']:.0%}"
            lines.append(f"| {r['label']} | {r['classes']} | {r['batch']} | {r['median_ms']:.1f} | {spread} | "
                         f"{fmt(first, '.0f', '')} | {mib(r.get('peak_memory_bytes'))} | {floor} | "
                         f"{fmt(r.get('plain_ratio'), '.2f', '')} | {vs_original} | {vs_authors} |")
        notes = sorted({r["note"] for r in group["cases"] if r.get("note")})
        lines += [f"", *[f"Note: {n}" for n in notes]] if notes else []
    lines += ["", "## Targets", "", "| target | goal | status | measured |", "| --- | --- | --- | --- |"]
    for target in bench.get("targets", []):
        values = "; ".join(f"{v['where']}: {v['value']:.2f}" for v in target["values"]) or "–"
        status = target["status"] if target["status"] != "missed" else "**missed**"
        lines.append(f"| {target['target']} | {target['goal']} | {status} | {values} |")
    if not any(t["values"] for t in bench.get("targets", [])[:2]):
        lines.append("")
        lines.append(f"The authors' code was not measured: set {REFERENCE_ENV} to a checkout of the ISNet repository "
                     "(backup/ and code/) for the speedup and memory targets.")
    return lines


# ----------------------------------------------------------------------------- entry


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for the JSON, logs and summary.md")
    parser.add_argument("--smoke", action="store_true", help="the same flow on the CPU with tiny sizes (~1 minute)")
    parser.add_argument("--device", help="cuda (default) or cpu (--smoke's default)")
    parser.add_argument("--total-budget", type=float, help="seconds for the whole run (default 450; smoke 150)")
    parser.add_argument("--test-budget", type=float, help="seconds for the test suite (default 240, 180 with the authors' code; smoke 60)")
    parser.add_argument("--fail-step", action="append", default=[], metavar="STEP",
                        help=f"make STEP raise (environment, parity, tests, bench or bench-<group>); also {FAIL_ENV}")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run these steps only (bench = every bench group)")
    parser.add_argument("--reference", help=f"a checkout of the ISNet repository (default: ${REFERENCE_ENV})")
    parser.add_argument("--compile-backend", help="torch.compile backend (default inductor; smoke aot_eager)")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this process
    parser.add_argument("--step-budget", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.total_budget is None:
        args.total_budget = 150.0 if args.smoke else 450.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    reference = args.reference or os.environ.get(REFERENCE_ENV) or None
    run = Run(out=args.out.resolve(), smoke=args.smoke,
              settings=Settings.for_run(args.smoke, args.device, args.compile_backend),
              fail_steps=fail_steps_from(args.fail_step), reference=reference)
    if args.step is None:
        return drive(run, args)
    run.budget_s = args.step_budget
    try:
        if args.step == "environment":
            return step_environment(run)
        if args.step == "parity":
            return step_parity(run)
        if args.step.startswith("bench-"):
            return step_bench(run, args.step[len("bench-"):])
        raise SystemExit(f"unknown step {args.step!r}")
    except Exception as error:
        traceback.print_exc()
        # the step's JSON says so too, so that every JSON of the run is there and well-formed
        name = {"environment": "environment.json", "parity": "parity.json"}.get(args.step)
        if name:
            data = read_json(run.out / name, {}) or {}
            if name == "parity.json":
                data.setdefault("records", [])
            data["error"] = f"{type(error).__name__}: {error}"
            data["traceback"] = traceback.format_exc()[-4000:]
            write_json(run.out / name, data)
        return 3


if __name__ == "__main__":
    sys.exit(main())
