"""GPU tests: skipped without CUDA; runnable on a machine that has only torch + Triton.

Run them on their own, so the CPU suite's conftest (which needs diffusers)
is not loaded:

    python -m pytest tests/gpu --confcutdir=tests/gpu -q

When sd-compiler is not installed (the lent GPU machine has no diffusers and
no registry access), `sdcompiler.kernels` is imported straight from the
checkout: its kernel modules need only torch and Triton.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_common import import_checkout  # noqa: E402  (stdlib only; the GPU benchmarks share it)

import_checkout()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    here = Path(__file__).resolve().parent
    for item in items:  # this hook sees the whole session's items: mark only this folder's
        if here in Path(item.fspath).resolve().parents:
            item.add_marker(skip)
