"""Shared test setup: Triton's CPU interpreter where there is no GPU, and fixture loading."""

import os

import torch

# Must precede the first import of a module holding @triton.jit kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import FIXTURE_DIR, load_fixture as _load_fixture  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def fixture_dir():
    """Path of ``tests/fixtures``."""
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def load_fixture():
    """``load_fixture(name)``: a fresh ``torch.load(tests/fixtures/name, weights_only=True)``."""
    return _load_fixture
