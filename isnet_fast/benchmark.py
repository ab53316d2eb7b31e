"""Measurements behind ``isnet-fast bench`` and the pytest-benchmark suite in ``bench/``.

A *case* is one thing timed per batch of images, for one model:

* ``explain``: forward and heatmaps under ``torch.no_grad()``, model in eval mode;
* ``train``: forward, heatmaps, ``(1-P) * cross-entropy + P * heatmap_loss`` (P = 0.7, random
  labels and binary masks), backward and an SGD step, model in train mode;
* ``explain-floor``: forward and one ``torch.autograd.grad`` w.r.t. the input per map, the
  least any explanation with that many maps costs;
* ``train-floor``: the same with ``create_graph=True``, the gradients as heatmaps in the same
  loss and a backward through them: how gradient-based ISNet variants train;
* ``train-plain``: a plain DenseNet training step (forward, cross-entropy, backward, SGD), no
  heatmaps: what the classifier costs without ISNet.

``explain`` and ``train`` run for ``isnet_fast`` (``IsDenseFast``, with any ``explain`` /
``selective`` variant), for the ``original`` (ISNet's ``IsDense``, one map per class, loaded
from the ``backup/`` folder of the ISNet repository) and for ``selective_reference`` (the
authors' Selective ISNet, ``IsDense(..., multiple=False, selective=True, highest=True)`` from the
repository's ``code/`` folder, which explains the class-selective quantity of the lowest logit:
ours with ``selective=True, explain="lowest"``). The floors and ``train-plain`` run a plain
``isnet_fast.DenseNet`` under autograd (implementation ``autograd``); on the CPU they read their
images channels_last, the layout ``IsDenseFast`` runs there, so that no ratio gains from a slower
layout of the plain network. All models of one configuration start from the same random weights,
and all read the same synthetic images.

A case's number of maps per image, M (``CaseSpec.maps``), is K (the classes) for ``explain="all"``
and 1 for the one-map variants. A floor is given by its M: ``explain="all"`` (one input gradient
per class) or ``explain="top"`` (one, of the top logit), and every case is compared with the floor
of its own M.

Where each case runs (``measure``):

* CUDA: in this process. Peak memory is ``torch.cuda.max_memory_allocated`` after a reset just
  before the case is built, so it counts weights, inputs, activations and workspace.
* CPU: in a fresh subprocess per case (``python -m isnet_fast.benchmark --case JSON --result
  FILE``), because a process's peak RSS cannot be reset: ``ru_maxrss`` read at the end of a
  process that ran only that case is that case's peak. The subprocess also does the timing, so
  each case is built, warmed up and timed once; timing in-process as well would run every case
  twice and push the default ``isnet-fast bench`` on a 2-core CPU past its few-minute budget.
  What the subprocess measures is the same step function an in-process run times.

Ratios (to the floor, to ``train-plain``, against the original and the authors' Selective
ISNet) are only ever taken between results of one run (``compare``), never against numbers
saved by another.
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

from .models.densenet import DenseNet, densenet121, densenet161, densenet169, densenet201
from .devices import resolve_device
from .engine.densenet.forward import minimum_input_size
from .loss import heatmap_loss
from .model import BACKENDS, IsDenseFast
from .models.resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from .resnet_model import IsResNetFast
from .engine.output import EXPLAIN_MODES, check_variant
from .engine.densenet.plan import build_plan

__all__ = [
    "ARCHS",
    "CASES",
    "IMPLEMENTATIONS",
    "ORIGINAL_VARIANT",
    "SELECTIVE_ISNET",
    "STANDARD_VARIANTS",
    "CaseResult",
    "CaseSpec",
    "Comparison",
    "PreparedCase",
    "ReferenceFolderError",
    "ReferenceFolders",
    "ReferenceModules",
    "build_original",
    "build_selective_reference",
    "case_specs",
    "check_reference_folder",
    "check_selective_reference_folder",
    "compare",
    "default_settings",
    "environment_info",
    "extra_info",
    "find_references",
    "load_reference",
    "load_selective_reference",
    "measure",
    "minimum_image_size",
    "prepare_case",
    "resolve_device",
    "run_case",
    "run_case_in_subprocess",
    "silence_original_deprecation_warnings",
    "time_step",
    "variant_is_valid",
    "variant_name",
]

# The smoke-test architecture (--arch tiny): the layout of a DenseNet-BC at a fraction of the
# cost, for tests and quick checks of the tooling, never for performance figures.
TINY_DENSENET = dict(growth_rate=4, block_config=(2, 2, 2, 2), num_init_features=8, bn_size=2)
TINY_RESNET = dict(block="basic", layers=(1, 1, 1, 1), stem_width=8, widths=(8, 12, 16, 24))  # --arch tiny-resnet
DENSENET_ARCHS = ("densenet121", "densenet161", "densenet169", "densenet201", "tiny")
RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "tiny-resnet")
ARCHS = DENSENET_ARCHS + RESNET_ARCHS
_OUR_BUILDERS = {"densenet121": densenet121, "densenet161": densenet161, "densenet169": densenet169,
                 "densenet201": densenet201, "resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50,
                 "resnet101": resnet101, "resnet152": resnet152}


def is_resnet(arch: str) -> bool:
    """Whether ``arch`` names a ResNet (ours: IsResNetFast; the authors': their LRPResNet of code/)."""
    return arch in RESNET_ARCHS

CASES = ("explain", "train", "explain-floor", "train-floor", "train-plain")
FLOOR_OF = {"explain": "explain-floor", "train": "train-floor"}
# Which implementations run each case: ours and the authors' two for the heatmap cases, a plain
# DenseNet under autograd for the floors and the plain training step.
IMPLEMENTATIONS = ("isnet_fast", "original", "selective_reference", "autograd")
IMPLEMENTATION_NAMES = {"original": "original", "selective_reference": "authors' selective"}

# A variant of ours is (explain, selective). The original computes one map per class; the
# authors' Selective ISNet one map, the class-selective quantity of the lowest logit.
ORIGINAL_VARIANT = ("all", False)
SELECTIVE_ISNET = ("lowest", True)
DEFAULT_VARIANTS = (ORIGINAL_VARIANT,)
# isnet-fast bench --variants: ours with all maps, ours Selective, each next to the authors' code.
STANDARD_VARIANTS = (ORIGINAL_VARIANT, SELECTIVE_ISNET)
FLOOR_EXPLAIN = ("all", "top")  # a floor's maps: one input gradient per class, or the top logit's only

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
CUDA_ONLY_DTYPES = ("bfloat16", "float16")

HEATMAP_LOSS_WEIGHT = 0.7  # P in (1-P) * cross-entropy + P * heatmap loss
LRP_EPSILON = 1e-2  # the original IsDense's default e
# SGD with a zero learning rate: the same work as any other rate (the update still runs), and
# the weights stay the seed's, so every timed step computes the same numbers. With a positive
# rate, random weights and gradient heatmaps of ten classes diverged to NaN within a few steps.
LEARNING_RATE = 0.0

REFERENCE_FILES = ("ISNetLayers.py", "ISNetFunctions.py", "LRPDenseNet.py", "globals.py")
# The authors' newer code (the ISNet repository's code/ folder), with the Selective ISNet. Its
# modules are named apart from backup/'s, so both load in one process.
SELECTIVE_REFERENCE_FILES = ("ISNetLayersZe.py", "ISNetFunctionsZe.py", "LRPDenseNetZe.py", "globalsZe.py")
REFERENCE_ENV = "ISNET_REFERENCE"
REFERENCE_HINT = (f"set {REFERENCE_ENV} to a checkout of the ISNet repository (github.com/PedroRASB/ISNet) or to "
                  f"its backup/ folder ({', '.join(REFERENCE_FILES)}) to measure the original too")
SELECTIVE_REFERENCE_HINT = (f"set {REFERENCE_ENV} to a checkout of the whole ISNet repository (its code/ folder: "
                            f"{', '.join(SELECTIVE_REFERENCE_FILES)}) to measure the authors' Selective ISNet too")


def variant_name(explain: str, selective: bool) -> str:
    """A variant of ours in words: "all maps", "top", "selective lowest", "selective, all maps"."""
    if explain == "all":
        return "selective, all maps" if selective else "all maps"
    return f"selective {explain}" if selective else explain


def variant_is_valid(explain: str, selective: bool, classes: int) -> bool:
    """Whether IsDenseFast can explain (explain, selective) for ``classes`` classes."""
    try:
        check_variant(explain, selective, classes)
    except (ValueError, TypeError):
        return False
    return True


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class CaseSpec:
    """Everything that defines one measured case; JSON-serialisable, so it can cross to a subprocess."""

    case: str  # one of CASES
    # "isnet_fast", "original" or "selective_reference" for explain/train; "autograd" for the
    # floors and train-plain
    implementation: str
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
    # The folder of the authors' code: backup/ for "original", code/ for "selective_reference"
    reference: Optional[str] = None
    seed: int = 0
    # IsDenseFast(explain=..., selective=...). The original is ("all", False), the authors'
    # Selective ISNet ("lowest", True); a floor is "all" (K gradients) or "top" (one).
    explain: str = "all"
    selective: bool = False

    def __post_init__(self):
        if self.case not in CASES:
            raise ValueError(f"case must be one of {CASES}, got {self.case!r}")
        plain = self.case.endswith("-floor") or self.case == "train-plain"
        expected = ("autograd",) if plain else ("isnet_fast", "original", "selective_reference")
        if self.implementation not in expected:
            raise ValueError(f"case {self.case!r} runs for {expected}, not {self.implementation!r}")
        if self.implementation == "original" and not self.reference:
            raise ValueError(f"the original's cases need its code: {REFERENCE_HINT}")
        if self.implementation == "selective_reference" and not self.reference:
            raise ValueError(f"the authors' Selective ISNet's cases need its code: {SELECTIVE_REFERENCE_HINT}")
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
        self._check_variant()

    def _check_variant(self):
        if self.explain not in EXPLAIN_MODES:
            raise ValueError(f"explain must be one of {EXPLAIN_MODES}, got {self.explain!r}")
        if not isinstance(self.selective, bool):
            raise ValueError(f"selective must be True or False, got {self.selective!r}")
        variant = (self.explain, self.selective)
        if self.case == "train-plain":
            if variant != ("all", False):
                raise ValueError("train-plain makes no heatmaps: leave explain='all' and selective=False")
        elif self.case.endswith("-floor"):
            if self.selective or self.explain not in FLOOR_EXPLAIN:
                raise ValueError(f"a floor takes explain='all' (one input gradient per class) or 'top' (one, the "
                                 f"top logit's) and selective=False, got explain={self.explain!r}, "
                                 f"selective={self.selective!r}")
        elif self.implementation == "original" and variant != ORIGINAL_VARIANT:
            raise ValueError(f"the original computes one map per class: explain='all', selective=False, got "
                             f"explain={self.explain!r}, selective={self.selective!r}")
        elif self.implementation == "selective_reference" and variant != SELECTIVE_ISNET:
            raise ValueError(f"the authors' Selective ISNet explains the lowest logit's class-selective quantity: "
                             f"explain='lowest', selective=True, got explain={self.explain!r}, "
                             f"selective={self.selective!r}")
        if not self.case.endswith("-floor"):
            try:
                check_variant(self.explain, self.selective, self.classes)
            except (ValueError, TypeError) as error:
                raise ValueError(str(error)) from None

    @property
    def maps(self) -> int:
        """M, the heatmaps (or floor gradients) per image: K for explain "all", else 1; 0 for train-plain."""
        if self.case == "train-plain":
            return 0
        return self.classes if self.explain == "all" else 1

    @property
    def variant(self) -> str:
        """What the maps explain, in words: "all maps", "selective lowest", "1 map (top logit)", "no maps"."""
        if self.case == "train-plain":
            return "no maps"
        if self.case.endswith("-floor"):
            return "all maps" if self.explain == "all" else "1 map (top logit)"
        return variant_name(self.explain, self.selective)

    @property
    def label(self) -> str:
        """How tables name the case: ``explain``, ``train, selective lowest``, ``train (original)``,
        ``train (authors' selective)``, ``train-floor``, ``train-floor, 1 map``, ``train-plain``."""
        if self.implementation in IMPLEMENTATION_NAMES:
            return f"{self.case} ({IMPLEMENTATION_NAMES[self.implementation]})"
        if self.case.endswith("-floor"):
            return self.case if self.explain == "all" else f"{self.case}, 1 map"
        if self.implementation == "isnet_fast" and (self.explain, self.selective) != ORIGINAL_VARIANT:
            return f"{self.case}, {self.variant}"
        return self.case

    @property
    def base_configuration(self) -> tuple:
        """The settings every case of one run shares: what must match for a case to be compared
        with a floor or with train-plain (everything but case, implementation and variant)."""
        return (self.arch, self.batch, self.classes, self.size, self.dtype, self.device, self.backend,
                self.threads, self.seed)

    @property
    def configuration(self) -> tuple:
        """What must match for two implementations to be compared: the settings and the variant
        (ours with all maps against the original, ours Selective against the authors')."""
        return self.base_configuration + (self.explain, self.selective)

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


def case_specs(cases: Sequence[str], classes: Sequence[int], variants: Sequence[tuple] = DEFAULT_VARIANTS,
               original: Optional[str] = None, selective_reference: Optional[str] = None,
               **settings) -> List[CaseSpec]:
    """The specs to run, in table order.

    Per number of classes K, for explain then train: ours in each variant (explain, selective),
    the original right after ours with all maps (given ``original``, the backup/ folder), the
    authors' Selective ISNet right after ours Selective (given ``selective_reference``, the
    code/ folder), then the floors for the variants' numbers of maps (K and/or 1); last
    train-plain. Variants IsDenseFast cannot explain with K classes (selective or random with
    one class) are left out for that K.
    """
    specs = []
    for n_classes in classes:
        valid = [tuple(v) for v in variants if variant_is_valid(v[0], v[1], n_classes)]
        for case in ("explain", "train"):
            if case in cases:
                for explain, selective in valid:
                    specs.append(CaseSpec(case, "isnet_fast", classes=n_classes, explain=explain, selective=selective,
                                          **settings))
                    if (explain, selective) == ORIGINAL_VARIANT and original:
                        specs.append(CaseSpec(case, "original", classes=n_classes, reference=original, **settings))
                    if (explain, selective) == SELECTIVE_ISNET and selective_reference:
                        specs.append(CaseSpec(case, "selective_reference", classes=n_classes,
                                              reference=selective_reference, explain="lowest", selective=True,
                                              **settings))
            if FLOOR_OF[case] in cases:
                maps = sorted({n_classes if explain == "all" else 1 for explain, _ in valid}, reverse=True)
                for n_maps in maps:
                    specs.append(CaseSpec(FLOOR_OF[case], "autograd", classes=n_classes,
                                          explain="all" if n_maps == n_classes else "top", **settings))
        if "train-plain" in cases:
            specs.append(CaseSpec("train-plain", "autograd", classes=n_classes, **settings))
    return specs


def minimum_image_size(arch: str) -> int:
    """The smallest image side the architecture accepts (every pooling layer keeps a pixel)."""
    if is_resnet(arch):
        return 1  # padded, strided convolutions and pools keep a pixel of any input
    with torch.device("meta"):  # no memory, no initialisation cost: only the layout matters
        net = _build_our_net(arch, classes=1)
    return minimum_input_size(build_plan(net))


# ----------------------------------------------------------------------------- the authors' code


class ReferenceFolderError(ValueError):
    """The folder given for the authors' ISNet code is missing or unusable."""


class ReferenceModules(NamedTuple):
    layers: object  # ISNetLayers (ISNetLayersZe for the Selective ISNet)
    densenet: object  # LRPDenseNet (LRPDenseNetZe)
    folder: Path
    implementation: str = "original"  # or "selective_reference"


class ReferenceFolders(NamedTuple):
    """Where the authors' code was found under a ``--reference`` path."""

    original: Optional[str]  # the backup/ folder, or None
    selective_reference: Optional[str]  # the code/ folder, or None
    note: Optional[str] = None  # one line on what could not be found, or None


def _check_folder(path, files, what) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ReferenceFolderError(f"reference folder {str(path)!r} does not exist; it must hold {what} "
                                   f"({', '.join(files)})")
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise ReferenceFolderError(f"reference folder {str(path)!r} lacks {', '.join(missing)}; it must hold {what} "
                                   f"({', '.join(files)})")
    return folder.resolve()


def check_reference_folder(path) -> Path:
    """The folder as an absolute path; ReferenceFolderError naming what is missing if it lacks the original's files."""
    return _check_folder(path, REFERENCE_FILES, "the original ISNet LRP-Block code")


def check_selective_reference_folder(path) -> Path:
    """The same for the authors' newer code (the repository's code/ folder), with the Selective ISNet."""
    return _check_folder(path, SELECTIVE_REFERENCE_FILES,
                         "the authors' newer ISNet code (the repository's code/ folder)")


def find_references(path) -> ReferenceFolders:
    """The folders of the original and of the authors' Selective ISNet under ``path``.

    ``path`` is a checkout of the whole ISNet repository (its ``backup/`` holds the original,
    its ``code/`` the Selective ISNet), or the ``backup/`` folder alone (only the original; the
    note says why the Selective ISNet is missing), or the ``code/`` folder alone. A folder that
    is found must hold its files; ReferenceFolderError otherwise.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ReferenceFolderError(f"reference folder {str(path)!r} does not exist; it must be a checkout of the ISNet "
                                   f"repository (with backup/ and code/) or its backup/ folder")
    backup, code = folder / "backup", folder / "code"
    if backup.is_dir() or code.is_dir():  # the whole repository
        original = str(check_reference_folder(backup)) if backup.is_dir() else None
        selective = str(check_selective_reference_folder(code)) if code.is_dir() else None
        missing = "backup/ (the original)" if original is None else (
            "code/ (the authors' Selective ISNet)" if selective is None else None)
        return ReferenceFolders(original, selective,
                                None if missing is None else f"{folder} has no {missing}: not measured")
    if all((folder / name).is_file() for name in REFERENCE_FILES):
        return ReferenceFolders(str(folder.resolve()), None,
                                f"{folder} is ISNet's backup/ folder alone: the authors' Selective ISNet (the "
                                f"repository's code/ folder) is not measured; give the repository's root to "
                                f"measure it too.")
    if all((folder / name).is_file() for name in SELECTIVE_REFERENCE_FILES):
        return ReferenceFolders(None, str(folder.resolve()),
                                f"{folder} is ISNet's code/ folder alone: the original (the repository's backup/ "
                                f"folder) is not measured; give the repository's root to measure it too.")
    try:
        check_reference_folder(folder)
    except ReferenceFolderError as error:
        raise ReferenceFolderError(f"{error}; or give a checkout of the whole ISNet repository (backup/ and code/)") \
            from None
    raise AssertionError("unreachable: the folder holds the original's files")


def _load_modules(folder: Path, names: Sequence[str], what: str) -> list:
    """Imports ``names`` from ``folder``.

    They import their siblings by plain name (``import globals``), so the folder goes on
    ``sys.path`` for the import only. Python keeps one module per name: a second folder in the
    same process cannot be loaded, which raises ReferenceFolderError instead of silently mixing
    the two. The original's and the newer code's modules have different names, so one process
    loads both.
    """
    entry = str(folder)
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        modules = [importlib.import_module(name) for name in names]
    except Exception as error:
        raise ReferenceFolderError(f"importing {what} from {entry} failed: {type(error).__name__}: {error}") from error
    finally:
        if added:
            sys.path.remove(entry)
    for module in modules:
        origin = Path(module.__file__).resolve().parent
        if origin != folder:
            raise ReferenceFolderError(f"{module.__name__} is already imported from {origin}; one process can load "
                                       f"{what} from one folder only, not also from {folder}")
    return modules


def load_reference(path) -> ReferenceModules:
    """Imports the original's ISNetLayers and LRPDenseNet from ``path`` (the repository's backup/)."""
    folder = check_reference_folder(path)
    layers, densenet = _load_modules(folder, ("ISNetLayers", "LRPDenseNet"), "the original ISNet code")
    return ReferenceModules(layers, densenet, folder, "original")


def load_selective_reference(path) -> ReferenceModules:
    """Imports the authors' ISNetLayersZe and LRPDenseNetZe from ``path`` (the repository's code/)."""
    folder = check_selective_reference_folder(path)
    layers, densenet = _load_modules(folder, ("ISNetLayersZe", "LRPDenseNetZe"), "the authors' newer ISNet code")
    return ReferenceModules(layers, densenet, folder, "selective_reference")


LOADERS = {"original": load_reference, "selective_reference": load_selective_reference}


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


def _reference_densenet(reference: ReferenceModules, arch: str, classes: int, state_dict) -> nn.Module:
    if arch == "tiny":  # the authors' constructors take the DenseNet's layout as keywords
        net = reference.densenet.DenseNet(num_classes=classes, **TINY_DENSENET)
    else:
        net = getattr(reference.densenet, arch)(num_classes=classes)
    net.load_state_dict(state_dict)
    return net


def build_original(reference: ReferenceModules, arch: str, classes: int, state_dict) -> nn.Module:
    """A fresh original ``IsDense(LRPDenseNet.<arch>, e=1e-2, heat=True, Zb=True)`` holding ``state_dict``.

    Build one per case: the original keeps its activations in module-level lists that each
    construction resets, so two live instances would read each other's.
    """
    net = _reference_densenet(reference, arch, classes, state_dict)
    with cudnn_deterministic():
        return reference.layers.IsDense(net, e=LRP_EPSILON, heat=True, Zb=True)


def build_selective_reference(reference: ReferenceModules, arch: str, classes: int, state_dict) -> nn.Module:
    """The authors' Selective ISNet: ``ISNetLayersZe.IsDense(LRPDenseNetZe.<arch>, e=1e-2, heat=True,
    Zb=True, multiple=False, selective=True, highest=True)`` holding ``state_dict``.

    ``highest=True`` asks for one map per image; its default ``mode='lowest'`` picks the lowest
    logit's class (ours: ``selective=True, explain="lowest"``). Like the original it refuses to
    build without ``cudnn.deterministic`` and keeps its activations in module-level lists
    (``globalsZe``): build one per case.
    """
    net = _reference_densenet(reference, arch, classes, state_dict)
    with cudnn_deterministic():
        return reference.layers.IsDense(net, e=LRP_EPSILON, heat=True, Zb=True, multiple=False, selective=True,
                                        highest=True)


def build_resnet_reference(reference: ReferenceModules, arch: str, classes: int, state_dict,
                           selective: bool = False) -> nn.Module:
    """The authors' ResNet ISNet, ``ISNetLayersZe.LRPResNet`` of their code/ folder, over our ResNet
    (torchvision's layout, which their ``resnet.py`` copies; theirs imports torchvision) holding
    ``state_dict``: one map per class (``multiple=True``), or with ``selective`` their Selective
    ISNet (``selective=True, highest=True``: the lowest logit's class-selective quantity).
    """
    net = _build_our_net(arch, classes)
    net.load_state_dict(state_dict)
    with cudnn_deterministic():
        return reference.layers.LRPResNet(net, heat=True, e=LRP_EPSILON, Zb=True, rule="e", selective=selective,
                                          highest=selective, multiple=not selective, positive=False)


def _build_original(reference: ReferenceModules, arch: str, classes: int, state_dict) -> nn.Module:
    if is_resnet(arch):
        return build_resnet_reference(reference, arch, classes, state_dict)
    return build_original(reference, arch, classes, state_dict)


def _build_selective_reference(reference: ReferenceModules, arch: str, classes: int, state_dict) -> nn.Module:
    if is_resnet(arch):
        return build_resnet_reference(reference, arch, classes, state_dict, selective=True)
    return build_selective_reference(reference, arch, classes, state_dict)


BUILDERS = {"original": _build_original, "selective_reference": _build_selective_reference}


def load_reference_for(implementation: str, arch: str, path) -> ReferenceModules:
    """The authors' code an implementation of ``arch`` runs: for a DenseNet the original from
    backup/ or the Selective ISNet from code/; for a ResNet both from code/ (backup/ has no ResNet)."""
    if is_resnet(arch):
        return load_selective_reference(path)._replace(implementation=implementation)
    return LOADERS[implementation](path)


# ----------------------------------------------------------------------------- building cases


def _build_our_net(arch: str, classes: int) -> nn.Module:
    if arch == "tiny":
        return DenseNet(num_classes=classes, **TINY_DENSENET)
    if arch == "tiny-resnet":
        return ResNet(num_classes=classes, **TINY_RESNET)
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

    ``reference`` is the loaded code of the authors for implementations "original" and
    "selective_reference" (loaded from ``spec.reference`` when not given, or when it is the
    other implementation's).
    """
    device = resolve_device(spec.device)
    if spec.dtype in CUDA_ONLY_DTYPES and device.type != "cuda":
        raise ValueError(f"dtype {spec.dtype} needs a CUDA device; on the CPU use float32 or float64")
    dtype = DTYPES[spec.dtype]
    # The same seed gives every implementation of a configuration the same weights, without
    # disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        net = _build_our_net(spec.arch, spec.classes)
    if spec.implementation in BUILDERS:
        if reference is None or reference.implementation != spec.implementation:
            reference = load_reference_for(spec.implementation, spec.arch, spec.reference)
        model = BUILDERS[spec.implementation](reference, spec.arch, spec.classes, net.state_dict())
        del net
    elif spec.implementation == "isnet_fast":
        wrapper = IsResNetFast if is_resnet(spec.arch) else IsDenseFast
        model = wrapper(net, e=LRP_EPSILON, heat=True, Zb=True, explain=spec.explain, selective=spec.selective,
                        backend=spec.backend)
    else:
        model = net
    model = model.to(device, dtype)
    batch = synthetic_batch(spec, device)
    if spec.implementation == "autograd" and device.type == "cpu":
        # IsDenseFast runs the network channels_last on the CPU, where oneDNN's convolutions
        # are fastest; the plain network gets the same layout, so no ratio gains from a slower one.
        batch = dataclasses.replace(batch, images=batch.images.contiguous(memory_format=torch.channels_last))
    step_builders = {"explain": _explain_step, "train": _train_step, "explain-floor": _explain_floor_step,
                     "train-floor": _train_floor_step, "train-plain": _train_plain_step}
    step = step_builders[spec.case](model, batch, spec)

    def synchronized_step():
        step()
        synchronize(device)

    return PreparedCase(spec, synchronized_step, model)


def _explain_step(model, batch, spec):
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


def _train_step(model, batch, spec):
    return _sgd_step(model, batch, lambda: model(batch.images))


def _input_gradients(net, images, classes, create_graph, explain="all"):
    """Logits and input gradients as heatmaps, ``B x M x 3 x H x W``.

    ``explain="all"``: the gradient of each class's logit (M = K); ``"top"``: of each image's
    top logit only (M = 1), the floor of the one-map variants.
    """
    images = images.detach().requires_grad_(True)
    logits = net(images)
    if explain == "top":
        top = logits.gather(1, logits.detach().argmax(dim=1, keepdim=True)).sum()
        return logits, torch.autograd.grad(top, images, create_graph=create_graph)[0].unsqueeze(1)
    grads = []
    for c in range(classes):
        # Images are independent in eval mode, so the gradient of the batch sum is each image's own.
        retain = create_graph or c < classes - 1
        grads.append(torch.autograd.grad(logits[:, c].sum(), images, retain_graph=retain,
                                         create_graph=create_graph)[0])
    return logits, torch.stack(grads, 1)


def _explain_floor_step(net, batch, spec):
    net.eval()

    def step():
        _input_gradients(net, batch.images, spec.classes, create_graph=False, explain=spec.explain)
    return step


def _train_floor_step(net, batch, spec):
    return _sgd_step(net, batch, lambda: _input_gradients(net, batch.images, spec.classes, create_graph=True,
                                                          explain=spec.explain))


def _train_plain_step(net, batch, spec):
    """A plain training step, no heatmaps: forward, cross-entropy, backward, SGD."""
    net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=LEARNING_RATE)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(batch.images), batch.labels).backward()
        optimizer.step()
    return step


# ----------------------------------------------------------------------------- measuring


SPREAD_WARNING = 0.25  # runs of one case that spread by more than this are flagged


def spread_warning(results: Sequence["CaseResult"], limit: float = SPREAD_WARNING) -> Optional[str]:
    """A warning naming the cases whose timed runs spread by more than ``limit`` of their median."""
    noisy = [f"{r.spec.label} ({r.spread:.0%})" for r in results if r.spread is not None and r.spread > limit]
    if not noisy:
        return None
    return (f"warning: the runs of {len(noisy)} case(s) spread by more than {limit:.0%} of their median: "
            f"{', '.join(noisy)}. The machine was busy or its speed moved; compare these figures with care, "
            "or rerun with more --repeat on an idle machine.")


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
    def spread(self) -> Optional[float]:
        """(slowest - fastest) / median of the timed runs; None with fewer than two."""
        if len(self.times_s) < 2:
            return None
        return (max(self.times_s) - min(self.times_s)) / self.median_s

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


def pool_rounds(results: Sequence[CaseResult]) -> CaseResult:
    """One case measured in several rounds (``isnet-fast bench --rounds``) as one result: every
    round's timed runs, the largest peak memory, and the first error (its runs are then dropped)."""
    first = results[0]
    failed = next((r for r in results if r.error), None)
    if failed is not None:
        return CaseResult(first.spec, error=failed.error, error_detail=failed.error_detail)
    peaks = [r.peak_memory_bytes for r in results if r.peak_memory_bytes is not None]
    return CaseResult(first.spec, [t for r in results for t in r.times_s], max(peaks) if peaks else None,
                      first.memory_kind)


@dataclass
class Comparison:
    """A result with the ratios taken within its run."""

    result: CaseResult
    floor_ratio: Optional[float] = None  # time / time of the floor with the same number of maps
    speedup_vs_original: Optional[float] = None  # original's time (K maps) / this time (ours, any variant)
    # the authors' Selective ISNet's time / this time (ours with selective=True, explain="lowest")
    speedup_vs_selective_reference: Optional[float] = None
    plain_ratio: Optional[float] = None  # time / time of train-plain (train cases)
    floor_label: Optional[str] = None  # the floor floor_ratio was taken against


def compare(results: Sequence[CaseResult]) -> List[Comparison]:
    """Ratios between results of the same run and settings.

    * ``floor_ratio``: to the floor of the same case kind and the same number of maps M (K for
      explain "all" and the original, 1 for the one-map variants and the authors' Selective ISNet);
    * ``plain_ratio``: a train case's time over train-plain's;
    * ``speedup_vs_original``: for ours, the original ISNet (K maps: what every variant replaces)
      over ours, whatever our variant;
    * ``speedup_vs_selective_reference``: for ours Selective, the authors' Selective ISNet over ours.
    """
    done = [r for r in results if r.median_s]
    by_key = {(r.spec.configuration, r.spec.case, r.spec.implementation): r for r in done}
    originals = {(r.spec.base_configuration, r.spec.case): r for r in done if r.spec.implementation == "original"}
    floors = {(r.spec.base_configuration, r.spec.case, r.spec.maps): r for r in done if r.spec.case.endswith("-floor")}
    plain = {r.spec.base_configuration: r for r in done if r.spec.case == "train-plain"}
    comparisons = []
    for result in results:
        comparison = Comparison(result)
        comparisons.append(comparison)
        spec = result.spec
        if not result.median_s:
            continue
        if spec.case in FLOOR_OF:
            floor = floors.get((spec.base_configuration, FLOOR_OF[spec.case], spec.maps))
            if floor is not None:
                comparison.floor_ratio = result.median_s / floor.median_s
                comparison.floor_label = floor.spec.label
            if spec.implementation == "isnet_fast":
                original = originals.get((spec.base_configuration, spec.case))
                if original is not None:
                    comparison.speedup_vs_original = original.median_s / result.median_s
                theirs = by_key.get((spec.configuration, spec.case, "selective_reference"))
                if theirs is not None:
                    comparison.speedup_vs_selective_reference = theirs.median_s / result.median_s
        elif spec.case.endswith("-floor"):
            comparison.floor_ratio = 1.0
            comparison.floor_label = spec.label
        if spec.case.startswith("train") and spec.base_configuration in plain:
            comparison.plain_ratio = result.median_s / plain[spec.base_configuration].median_s
    return comparisons


def comparison_record(comparison: Comparison) -> dict:
    """Every figure of a compared result, flat, for JSON."""
    result = comparison.result
    record = dict(dataclasses.asdict(result.spec), label=result.spec.label, variant=result.spec.variant,
                  maps=result.spec.maps)
    record.update(
        median_ms=None if result.median_s is None else result.median_s * 1e3,
        times_ms=[t * 1e3 for t in result.times_s],
        images_per_s=result.images_per_s,
        peak_memory_bytes=result.peak_memory_bytes,
        memory_kind=result.memory_kind,
        floor_ratio=comparison.floor_ratio,
        floor=comparison.floor_label,
        plain_ratio=comparison.plain_ratio,
        speedup_vs_original=comparison.speedup_vs_original,
        speedup_vs_selective_reference=comparison.speedup_vs_selective_reference,
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
        "label": spec.label,
        "explain": spec.explain,
        "selective": spec.selective,
        "variant": spec.variant,
        "maps": spec.maps,
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
    # The authors' code (backup/ and code/) calls torch.cuda.amp.autocast, deprecated in recent torch: one warning per
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
