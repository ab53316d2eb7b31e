"""Helpers the tests import (``from helpers import rel_err, load_fixture``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures"
BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


def load_bench_script(filename: str, module_name: str) -> ModuleType:
    """Imports ``bench/<filename>`` (the scripts are no package) as ``module_name``, registered in
    ``sys.modules`` (dataclasses look their module up there) unless a module of that name is."""
    spec = importlib.util.spec_from_file_location(module_name, BENCH_DIR / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(module_name, module)
    spec.loader.exec_module(module)
    return module


def load_fixture(name: str):
    """Loads ``tests/fixtures/<name>`` (``.pt`` may be left off), tensors only."""
    path = FIXTURE_DIR / name
    if not path.suffix:
        path = path.with_suffix(".pt")
    return torch.load(path, weights_only=True, map_location="cpu")


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|ours - ref| / max|ref|``; the absolute error where ``ref`` is all zero."""
    ours = torch.as_tensor(ours).detach().to("cpu", torch.float64)
    ref = torch.as_tensor(ref).detach().to("cpu", torch.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(ours.shape)} vs {tuple(ref.shape)}")
    if ref.numel() == 0:
        return 0.0
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    return err / scale if scale > 0 else err


def original_reference_folder():
    """The original ISNet's ``backup/`` folder from ``ISNET_REFERENCE`` (the repository's root or
    ``backup/`` itself), or None where it is not set or holds no original."""
    import os

    folder = os.environ.get("ISNET_REFERENCE")
    if not folder:
        return None
    folder = Path(folder).expanduser()
    for candidate in (folder, folder / "backup"):
        if (candidate / "ISNetFunctions.py").is_file() and (candidate / "LRPDenseNet.py").is_file():
            return candidate
    return None
