"""Options and fixtures of the pytest-benchmark suite (``python -m pytest bench --benchmark-only``).

The suite's settings default to those of ``isnet-fast bench`` on the device found; override
them with ``--bench-device``, ``--bench-batch``, ``--bench-size`` and the like. The original's
cases run when ``ISNET_REFERENCE`` names a checkout of the ISNet repository or its ``backup/``
folder; the authors' Selective ISNet's when it names the whole repository (its ``code/`` folder).
"""

import os

import pytest
import torch

from isnet_fast import benchmark as bm


def pytest_addoption(parser):
    group = parser.getgroup("isnet-fast bench", "settings of the isnet-fast benchmark suite")
    group.addoption("--bench-device", help="cpu, cuda or cuda:N (default: cuda if available)")
    group.addoption("--bench-arch", choices=bm.ARCHS, default="densenet121", help="default densenet121")
    group.addoption("--bench-batch", type=int, help="images per batch (default: as isnet-fast bench)")
    group.addoption("--bench-size", type=int, default=224, help="image side (default 224)")
    group.addoption("--bench-dtype", choices=tuple(bm.DTYPES), default="float32", help="default float32")
    group.addoption("--bench-backend", choices=bm.BACKENDS, default="auto", help="IsDenseFast backend")
    group.addoption("--bench-threads", type=int, help="torch.set_num_threads on the CPU (default: torch's)")
    group.addoption("--bench-warmup", type=int, help="untimed rounds (default: as isnet-fast bench)")
    group.addoption("--bench-repeat", type=int, help="timed rounds (default: as isnet-fast bench)")


@pytest.fixture(scope="session")
def bench_settings(request):
    """CaseSpec settings shared by every case (all but case, implementation and classes)."""
    option = request.config.getoption
    try:
        device = bm.resolve_device(option("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None
    defaults = bm.default_settings(str(device))
    threads = option("--bench-threads")
    if device.type == "cpu":
        threads = threads or torch.get_num_threads()
    return dict(
        arch=option("--bench-arch"),
        batch=option("--bench-batch") or defaults["batch"],
        size=option("--bench-size"),
        dtype=option("--bench-dtype"),
        device=str(device),
        backend=option("--bench-backend"),
        threads=threads,
        warmup=defaults["warmup"] if option("--bench-warmup") is None else option("--bench-warmup"),
        repeat=option("--bench-repeat") or defaults["repeat"],
    )


@pytest.fixture(scope="session")
def reference_folders():
    """Where ISNET_REFERENCE has the authors' code (bm.ReferenceFolders: the original's backup/,
    the Selective ISNet's code/, a note on what is missing); both None when it is not set."""
    folder = os.environ.get(bm.REFERENCE_ENV)
    if not folder:
        return bm.ReferenceFolders(None, None)
    try:
        return bm.find_references(folder)
    except bm.ReferenceFolderError as error:
        raise pytest.UsageError(f"${bm.REFERENCE_ENV}: {error}") from None
