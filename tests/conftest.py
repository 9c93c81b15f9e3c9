"""Shared test setup: the Triton interpreter on machines without a GPU, per-test seeding, the ``gpu`` marker."""

import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so this must run before mirai_kernels' Triton modules
# are imported (they are imported lazily, on first use, but set it here once for the whole session).
HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_GPU else "cpu")
