"""Measurements behind ``isnet-fast bench`` and the pytest-benchmark suite in ``bench/``.

A *case* is one thing timed per batch of images, for one model:

* ``explain``: forward and heatmaps under ``torch.no_grad()``, model in eval mode;
* ``train``: forward, heatmaps, ``(1-P) * cross-entropy + P * heatmap_loss`` (P = 0.7, random
  labels and binary masks), backward and an SGD step, model in train mode;
* ``explain-floor``: forward and one ``torch.autograd.grad`` w.r.t. the input per class, the
  least any per-class explanation costs;
* ``train-floor``: the same with ``create_graph=True``, the gradients as heatmaps in the same
  loss and a backward through them: how gradient-based ISNet variants train.

``explain`` and ``train`` run for ``isnet_fast`` (``IsDenseFast``) and for the ``original``
(ISNet's ``IsDense``, loaded from a checkout of its LRP-Block code); the floors run a plain
``isnet_fast.DenseNet`` under autograd (implementation ``autograd``). All models of one
configuration start from the same random weights, and all read the same synthetic images.

Where each case runs (``measure``):

* CUDA: in this process. Peak memory is ``torch.cuda.max_memory_allocated`` after a reset just
  before the case is built, so it counts weights, inputs, activations and workspace.
* CPU: in a fresh subprocess per case (``python -m isnet_fast.benchmark --case JSON --result
  FILE``), because a process's peak RSS cannot be reset: ``ru_maxrss`` read at the end of a
  process that ran only that case is that case's peak. The subprocess also does the timing, so
  each case is built, warmed up and timed once; timing in-process as well would run every case
  twice and push the default ``isnet-fast bench`` on a 2-core CPU past its few-minute budget.
  What the subprocess measures is the same step function an in-process run times.

Ratios (to the floor, against the original) are only ever taken between results of one run
(``compare``), never against numbers saved by another.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .densenet import DenseNet, densenet121, densenet161, densenet169, densenet201
from .devices import resolve_device
from .forward import minimum_input_size
from .loss import heatmap_loss
from .model import BACKENDS, IsDenseFast
from .structure import build_plan

__all__ = [
    "ARCHS",
    "CASES",
    "CaseResult",
    "CaseSpec",
    "Comparison",
    "PreparedCase",
    "ReferenceFolderError",
    "ReferenceModules",
    "check_reference_folder",
    "compare",
    "default_settings",
    "environment_info",
    "extra_info",
    "load_reference",
    "measure",
    "minimum_image_size",
    "prepare_case",
    "resolve_device",
    "run_case",
    "run_case_in_subprocess",
    "silence_original_deprecation_warnings",
    "time_step",
]

# The smoke-test architecture (--arch tiny): the layout of a DenseNet-BC at a fraction of the
# cost, for tests and quick checks of the tooling, never for performance figures.
TINY_DENSENET = dict(growth_rate=4, block_config=(2, 2, 2, 2), num_init_features=8, bn_size=2)
ARCHS = ("densenet121", "densenet161", "densenet169", "densenet201", "tiny")
_OUR_BUILDERS = {"densenet121": densenet121, "densenet161": densenet161, "densenet169": densenet169,
                 "densenet201": densenet201}

CASES = ("explain", "train", "explain-floor", "train-floor")
FLOOR_OF = {"explain": "explain-floor", "train": "train-floor"}

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
CUDA_ONLY_DTYPES = ("bfloat16", "float16")

HEATMAP_LOSS_WEIGHT = 0.7  # P in (1-P) * cross-entropy + P * heatmap loss
LRP_EPSILON = 1e-2  # the original IsDense's default e
LEARNING_RATE = 1e-3  # small, so that repeated steps from random weights stay finite

REFERENCE_FILES = ("ISNetLayers.py", "ISNetFunctions.py", "LRPDenseNet.py", "globals.py")
REFERENCE_ENV = "ISNET_REFERENCE"
REFERENCE_HINT = (f"set {REFERENCE_ENV} to a folder with the original ISNet LRP-Block code "
                  f"({', '.join(REFERENCE_FILES)}) to measure the original too")


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class CaseSpec:
    """Everything that defines one measured case; JSON-serialisable, so it can cross to a subprocess."""

    case: str  # one of CASES
    implementation: str  # "isnet_fast" or "original" for explain/train, "autograd" for the floors
    arch: str = "densenet121"
    batch: int = 2
    classes: int = 2
    size: int = 224
    dtype: str = "float32"
    device: str = "cpu"
    backend: str = "auto"  # IsDenseFast(backend=...)
    threads: Optional[int] = None  # torch.set_num_threads on the CPU; None keeps torch's default
    warmup: int = 1
    repeat: int = 3
    reference: Optional[str] = None  # folder of the original's code, for implementation "original"
    seed: int = 0

    def __post_init__(self):
        if self.case not in CASES:
            raise ValueError(f"case must be one of {CASES}, got {self.case!r}")
        expected = ("autograd",) if self.case.endswith("-floor") else ("isnet_fast", "original")
        if self.implementation not in expected:
            raise ValueError(f"case {self.case!r} runs for {expected}, not {self.implementation!r}")
        if self.implementation == "original" and not self.reference:
            raise ValueError(f"the original's cases need its code: {REFERENCE_HINT}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("batch", "classes", "size", "repeat"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be 0 or more, got {self.warmup}")

    @property
    def label(self) -> str:
        """How tables name the case: ``explain``, ``train (original)``, ``train-floor``."""
        return self.case if self.implementation != "original" else f"{self.case} (original)"

    @property
    def configuration(self) -> tuple:
        """What must match for two cases to be compared (everything but the case and implementation)."""
        return (self.arch, self.batch, self.classes, self.size, self.dtype, self.device, self.backend,
                self.threads, self.seed)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "CaseSpec":
        return cls(**json.loads(text))


def default_settings(device: str) -> Dict[str, object]:
    """The embedded default of ``isnet-fast bench``: batch, size, classes, warmup and repeat for a device.

    On a CPU it is sized for a 2-core machine to finish in a few minutes, the original included
    (its train step takes seconds per image); on CUDA it is a realistic training batch.
    """
    if torch.device(device).type == "cuda":
        # The original keeps its whole relevance graph for B x C maps in train mode: 8 x 10 fits an 80 GB GPU.
        return dict(batch=8, size=224, classes=(2, 10), warmup=3, repeat=10)
    return dict(batch=2, size=224, classes=(2,), warmup=1, repeat=3)


def case_specs(cases: Sequence[str], classes: Sequence[int], with_original: bool, **settings) -> List[CaseSpec]:
    """The specs to run, in table order: per number of classes, each case for ours, the original, the floor."""
    specs = []
    for n_classes in classes:
        for case in ("explain", "train"):
            if case in cases:
                specs.append(CaseSpec(case, "isnet_fast", classes=n_classes, **settings))
                if with_original:
                    specs.append(CaseSpec(case, "original", classes=n_classes, **settings))
            if FLOOR_OF[case] in cases:
                specs.append(CaseSpec(FLOOR_OF[case], "autograd", classes=n_classes, **settings))
    return specs


def minimum_image_size(arch: str) -> int:
    """The smallest image side the architecture accepts (every pooling layer keeps a pixel)."""
    with torch.device("meta"):  # no memory, no initialisation cost: only the layout matters
        net = _build_our_densenet(arch, classes=1)
    return minimum_input_size(build_plan(net))


# ----------------------------------------------------------------------------- the original


class ReferenceFolderError(ValueError):
    """The folder given for the original ISNet code is missing or unusable."""


class ReferenceModules(NamedTuple):
    layers: object  # ISNetLayers
    densenet: object  # LRPDenseNet
    folder: Path


def check_reference_folder(path) -> Path:
    """The folder as an absolute path; ReferenceFolderError naming what is missing if it lacks the original's files."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ReferenceFolderError(f"reference folder {str(path)!r} does not exist; it must hold the original ISNet "
                             f"LRP-Block code ({', '.join(REFERENCE_FILES)})")
    missing = [name for name in REFERENCE_FILES if not (folder / name).is_file()]
    if missing:
        raise ReferenceFolderError(f"reference folder {str(path)!r} lacks {', '.join(missing)}; it must hold the original "
                             f"ISNet LRP-Block code ({', '.join(REFERENCE_FILES)})")
    return folder.resolve()


def load_reference(path) -> ReferenceModules:
    """Imports the original's ISNetLayers and LRPDenseNet from ``path``.

    They import their siblings by plain name (``import globals``), so the folder goes on
    ``sys.path`` for the import only. Python keeps one module per name: a second folder in the
    same process cannot be loaded, which raises ReferenceFolderError instead of silently mixing the two.
    """
    folder = check_reference_folder(path)
    entry = str(folder)
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        layers = importlib.import_module("ISNetLayers")
        densenet = importlib.import_module("LRPDenseNet")
    except Exception as error:
        raise ReferenceFolderError(f"importing the original ISNet code from {entry} failed: "
                             f"{type(error).__name__}: {error}") from error
    finally:
        if added:
            sys.path.remove(entry)
    for module in (layers, densenet):
        origin = Path(module.__file__).resolve().parent
        if origin != folder:
            raise ReferenceFolderError(f"{module.__name__} is already imported from {origin}; one process can load the "
                                 f"original from one folder only, not also from {folder}")
    return ReferenceModules(layers, densenet, folder)


@contextlib.contextmanager
def cudnn_deterministic() -> Iterator[None]:
    """``torch.backends.cudnn.deterministic = True`` inside, restored on the way out.

    The original refuses to build its LRP block without the flag, but it slows down every
    other model's convolutions, so it is only set around the original's construction.
    """
    previous = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic = previous


def build_original(reference: ReferenceModules, arch: str, classes: int, state_dict) -> nn.Module:
    """A fresh original ``IsDense(LRPDenseNet.<arch>, e=1e-2, heat=True, Zb=True)`` holding ``state_dict``.

    Build one per case: the original keeps its activations in module-level lists that each
    construction resets, so two live instances would read each other's.
    """
    if arch == "tiny":
        net = reference.densenet.DenseNet(num_classes=classes, **TINY_DENSENET)
    else:
        net = getattr(reference.densenet, arch)(num_classes=classes)
    net.load_state_dict(state_dict)
    with cudnn_deterministic():
        return reference.layers.IsDense(net, e=LRP_EPSILON, heat=True, Zb=True)


# ----------------------------------------------------------------------------- building cases


def _build_our_densenet(arch: str, classes: int) -> DenseNet:
    if arch == "tiny":
        return DenseNet(num_classes=classes, **TINY_DENSENET)
    return _OUR_BUILDERS[arch](num_classes=classes)


@dataclass
class Batch:
    images: torch.Tensor  # B x 3 x H x W in [0, 1)
    labels: torch.Tensor  # B
    masks: torch.Tensor  # B x 3 x H x W, 1 = foreground


def synthetic_batch(spec: CaseSpec, device: torch.device) -> Batch:
    generator = torch.Generator().manual_seed(spec.seed)
    shape = (spec.batch, 3, spec.size, spec.size)
    images = torch.rand(shape, generator=generator)
    labels = torch.randint(0, spec.classes, (spec.batch,), generator=generator)
    masks = (torch.rand(shape, generator=generator) < 0.5).float()
    return Batch(images.to(device, DTYPES[spec.dtype]), labels.to(device), masks.to(device))


def isnet_loss(logits: torch.Tensor, heatmaps: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``(1-P) * cross-entropy + P * heatmap_loss`` with P = HEATMAP_LOSS_WEIGHT."""
    return ((1 - HEATMAP_LOSS_WEIGHT) * F.cross_entropy(logits, batch.labels)
            + HEATMAP_LOSS_WEIGHT * heatmap_loss(heatmaps, batch.masks))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class PreparedCase:
    """A built case: ``step()`` processes one batch and returns once the device is done with it."""

    spec: CaseSpec
    step: Callable[[], None]
    model: nn.Module = field(repr=False)


def prepare_case(spec: CaseSpec, reference: Optional[ReferenceModules] = None) -> PreparedCase:
    """Builds the model, the synthetic batch and the step function of a case.

    ``reference`` is the loaded original for implementation "original" (loaded from
    ``spec.reference`` when not given).
    """
    device = resolve_device(spec.device)
    if spec.dtype in CUDA_ONLY_DTYPES and device.type != "cuda":
        raise ValueError(f"dtype {spec.dtype} needs a CUDA device; on the CPU use float32 or float64")
    dtype = DTYPES[spec.dtype]
    # The same seed gives every implementation of a configuration the same weights, without
    # disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        net = _build_our_densenet(spec.arch, spec.classes)
    if spec.implementation == "original":
        model = build_original(reference or load_reference(spec.reference), spec.arch, spec.classes, net.state_dict())
        del net
    elif spec.implementation == "isnet_fast":
        model = IsDenseFast(net, e=LRP_EPSILON, heat=True, Zb=True, backend=spec.backend)
    else:
        model = net
    model = model.to(device, dtype)
    batch = synthetic_batch(spec, device)
    step_builders = {"explain": _explain_step, "train": _train_step, "explain-floor": _explain_floor_step,
                     "train-floor": _train_floor_step}
    step = step_builders[spec.case](model, batch, spec.classes)

    def synchronized_step():
        step()
        synchronize(device)

    return PreparedCase(spec, synchronized_step, model)


def _explain_step(model, batch, classes):
    model.eval()

    def step():
        with torch.no_grad():
            model(batch.images)
    return step


def _sgd_step(model, batch, logits_and_heatmaps):
    """One ISNet training step (train mode, loss on logits and heatmaps, backward, SGD); the
    implementation and its floor differ only in ``logits_and_heatmaps``."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits, heatmaps = logits_and_heatmaps()
        isnet_loss(logits, heatmaps, batch).backward()
        optimizer.step()
    return step


def _train_step(model, batch, classes):
    return _sgd_step(model, batch, lambda: model(batch.images))


def _input_gradients(net, images, classes, create_graph):
    """Logits and the gradient of each class's logit w.r.t. the input, stacked as B x C x 3 x H x W."""
    images = images.detach().requires_grad_(True)
    logits = net(images)
    grads = []
    for c in range(classes):
        # Images are independent in eval mode, so the gradient of the batch sum is each image's own.
        retain = create_graph or c < classes - 1
        grads.append(torch.autograd.grad(logits[:, c].sum(), images, retain_graph=retain,
                                         create_graph=create_graph)[0])
    return logits, torch.stack(grads, 1)


def _explain_floor_step(net, batch, classes):
    net.eval()

    def step():
        _input_gradients(net, batch.images, classes, create_graph=False)
    return step


def _train_floor_step(net, batch, classes):
    return _sgd_step(net, batch, lambda: _input_gradients(net, batch.images, classes, create_graph=True))


# ----------------------------------------------------------------------------- measuring


def time_step(step: Callable[[], None], warmup: int, repeat: int) -> List[float]:
    """Runs ``step`` ``warmup`` times untimed, then ``repeat`` times; the seconds of each timed run.

    ``step`` must return only when the device is done (PreparedCase.step synchronises CUDA).
    Summarise with the median: one slow run (another process, a page fault) does not move it.
    """
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def peak_rss_bytes() -> Optional[int]:
    """This process's peak resident set size so far (None where ``resource`` does not exist)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


@dataclass
class CaseResult:
    spec: CaseSpec
    times_s: List[float] = field(default_factory=list)
    peak_memory_bytes: Optional[int] = None
    memory_kind: str = ""  # "peak RSS" (CPU) or "max_memory_allocated" (CUDA)
    error: Optional[str] = None  # one line; the case did not finish
    error_detail: Optional[str] = None  # its traceback

    @property
    def median_s(self) -> Optional[float]:
        return statistics.median(self.times_s) if self.times_s else None

    @property
    def images_per_s(self) -> Optional[float]:
        median = self.median_s
        return self.spec.batch / median if median else None

    def to_dict(self) -> dict:
        return {"spec": dataclasses.asdict(self.spec), "times_s": list(self.times_s),
                "peak_memory_bytes": self.peak_memory_bytes, "memory_kind": self.memory_kind,
                "error": self.error, "error_detail": self.error_detail}

    @classmethod
    def from_dict(cls, data: dict) -> "CaseResult":
        data = dict(data)
        return cls(spec=CaseSpec(**data.pop("spec")), **data)


Timer = Callable[[Callable[[], None], int, int], List[float]]


def run_case(spec: CaseSpec, timer: Timer = time_step, reference: Optional[ReferenceModules] = None) -> CaseResult:
    """Builds and times one case in this process; exceptions propagate.

    Peak memory on CUDA is ``max_memory_allocated`` since just before the build. On the CPU it
    is this process's peak RSS, which is the case's own only in a fresh process: use
    ``run_case_in_subprocess`` (or ``measure``) for that.
    """
    device = resolve_device(spec.device)
    if device.type == "cpu" and spec.threads:
        torch.set_num_threads(spec.threads)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    prepared = prepare_case(spec, reference)
    times = timer(prepared.step, spec.warmup, spec.repeat)
    if device.type == "cuda":
        return CaseResult(spec, times, torch.cuda.max_memory_allocated(device), "max_memory_allocated")
    return CaseResult(spec, times, peak_rss_bytes(), "peak RSS")


# Starts the case's process from a bare Python interpreter. On Linux a process's ru_maxrss
# carries over, through exec, the RSS of the process it was forked from: started straight from
# this one (torch loaded, maybe gigabytes of earlier work), a case would report this process's
# footprint whenever it exceeds its own. Forked from a ~10 MB launcher, it reports its own peak.
# The launcher passes on SIGINT and SIGTERM, and its exit status or the signal that killed the
# case; on Linux it gets SIGTERM when its parent dies, so no case outlives the command.
_LAUNCHER = """\
import os, signal, subprocess, sys
if sys.platform.startswith("linux"):
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the line above
        sys.exit(1)
case = subprocess.Popen(sys.argv[1:])
for forwarded in (signal.SIGINT, signal.SIGTERM):
    signal.signal(forwarded, lambda signum, frame: case.send_signal(signum))
code = case.wait()
if code < 0:  # killed by a signal: die by the same one, so the parent sees how
    if -code not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be handled, nor need resetting
        signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def run_case_in_subprocess(spec: CaseSpec) -> CaseResult:
    """Runs one case in a fresh Python process (timing and peak RSS); a failure comes back as ``error``."""
    with tempfile.TemporaryDirectory(prefix="isnet-fast-bench-") as folder:
        result_path = Path(folder) / "result.json"
        command = [sys.executable, "-c", _LAUNCHER, sys.executable, "-m", "isnet_fast.benchmark",
                   "--case", spec.to_json(), "--result", str(result_path)]
        with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as launcher:
            try:
                _, stderr = launcher.communicate()
            except BaseException:  # Ctrl-C, or a timeout upstream: stop the case too, not just its launcher
                launcher.terminate()
                try:
                    launcher.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    launcher.kill()
                raise
        if result_path.is_file():
            return CaseResult.from_dict(json.loads(result_path.read_text()))
    code = launcher.returncode
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    hint = " (out of memory?)" if code == -9 else ""
    last_line = (stderr.strip().splitlines() or [""])[-1]
    return CaseResult(spec, error=f"the case's subprocess {how}{hint}" + (f": {last_line}" if last_line else ""),
                      error_detail=stderr)


def measure(spec: CaseSpec, reference: Optional[ReferenceModules] = None) -> CaseResult:
    """One case as the command line measures it: CUDA in this process, CPU in a subprocess.

    Never raises for a failing case: the result carries the error, so one case (an original
    that does not support a dtype, an out-of-memory) does not lose the others.
    """
    if resolve_device(spec.device).type == "cpu":
        return run_case_in_subprocess(spec)
    try:
        return run_case(spec, reference=reference)
    except Exception as error:  # reported per case, with its traceback kept for the JSON
        return CaseResult(spec, error=f"{type(error).__name__}: {error}", error_detail=traceback.format_exc())
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass
class Comparison:
    """A result with the ratios taken within its run."""

    result: CaseResult
    floor_ratio: Optional[float] = None  # time / time of the matching floor
    speedup_vs_original: Optional[float] = None  # original's time / this time (isnet_fast rows)


def compare(results: Sequence[CaseResult]) -> List[Comparison]:
    """Ratios to the floor and speedups against the original, between results of the same configuration."""
    by_key = {(r.spec.configuration, r.spec.case, r.spec.implementation): r for r in results if r.median_s}
    comparisons = []
    for result in results:
        comparison = Comparison(result)
        spec = result.spec
        if result.median_s and spec.case in FLOOR_OF:
            floor = by_key.get((spec.configuration, FLOOR_OF[spec.case], "autograd"))
            if floor is not None:
                comparison.floor_ratio = result.median_s / floor.median_s
            original = by_key.get((spec.configuration, spec.case, "original"))
            if spec.implementation == "isnet_fast" and original is not None:
                comparison.speedup_vs_original = original.median_s / result.median_s
        elif result.median_s and spec.case.endswith("-floor"):
            comparison.floor_ratio = 1.0
        comparisons.append(comparison)
    return comparisons


def comparison_record(comparison: Comparison) -> dict:
    """Every figure of a compared result, flat, for JSON."""
    result = comparison.result
    record = dict(dataclasses.asdict(result.spec), label=result.spec.label)
    record.update(
        median_ms=None if result.median_s is None else result.median_s * 1e3,
        times_ms=[t * 1e3 for t in result.times_s],
        images_per_s=result.images_per_s,
        peak_memory_bytes=result.peak_memory_bytes,
        memory_kind=result.memory_kind,
        floor_ratio=comparison.floor_ratio,
        speedup_vs_original=comparison.speedup_vs_original,
        error=result.error,
        error_detail=result.error_detail,
    )
    return record


# ----------------------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def _version(module_name: str) -> Optional[str]:
    try:
        return importlib.import_module(module_name).__version__
    except Exception:  # not installed, or broken on this platform: report it as absent
        return None


def environment_info(device) -> dict:
    """Versions, device and host, for JSON records and pytest-benchmark's extra_info."""
    from . import __version__

    device = torch.device(device)
    return {
        "isnet_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def extra_info(spec: CaseSpec, peak_memory_bytes: Optional[int], memory_kind: str) -> dict:
    """What pytest-benchmark records next to a case's timings (its ``extra_info``)."""
    device = torch.device(spec.device)
    return {
        "case": spec.case,
        "implementation": spec.implementation,
        "arch": spec.arch,
        "batch": spec.batch,
        "classes": spec.classes,
        "size": spec.size,
        "dtype": spec.dtype,
        "backend": spec.backend,
        "threads": spec.threads,
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peak_memory_bytes": peak_memory_bytes,
        "memory_kind": memory_kind,
    }


# ----------------------------------------------------------------------------- subprocess entry


def _exit_with_parent() -> None:
    """Linux: have the kernel stop this case if its launcher dies (killed with SIGKILL, say)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    except (OSError, AttributeError):  # no prctl: a dead launcher leaves the case to finish on its own
        pass


def silence_original_deprecation_warnings() -> None:
    # The original calls torch.cuda.amp.autocast, deprecated in recent torch: one warning per
    # call site, which would interleave with the progress lines.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.cuda\.amp\.autocast")


def _subprocess_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m isnet_fast.benchmark",
                                     description="Runs one benchmark case in this process (used by isnet-fast bench).")
    parser.add_argument("--case", required=True, help="the CaseSpec as JSON")
    parser.add_argument("--result", required=True, help="file to write the CaseResult to, as JSON")
    args = parser.parse_args(argv)
    _exit_with_parent()
    silence_original_deprecation_warnings()
    spec = CaseSpec.from_json(args.case)
    try:
        result = run_case(spec)
    except Exception as error:  # written to the result file, so the parent reports it per case
        traceback.print_exc()
        result = CaseResult(spec, error=f"{type(error).__name__}: {error}", error_detail=traceback.format_exc())
    Path(args.result).write_text(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(_subprocess_main())
