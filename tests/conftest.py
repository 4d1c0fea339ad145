"""Shared test set-up: a private cache folder, quiet output, markers by folder, and session-wide tiny checkpoints /
artifacts.

Folders (each test gets its folder's marker, so `-m unit` / `-m "not integration"` select by cost):
- `unit/`: fast, no end-to-end compile (`make test-fast` runs these without the `slow` ones);
- `integration/`: compiles, training and calibration runs, served artifacts;
- `gpu/`: needs CUDA (skipped without it).

The environment is set at import time, before any test module imports
`sdcompiler`, so nothing the tests build lands in the user's cache.

Session fixtures (each thing is built once per test session):
- `tiny_checkpoint(arch)`: `make_checkpoint(<tmp>/arch, arch, "tiny", seed=0)`;
- `compiled(arch, target="onnx", recipe="none")`: the `CompiledPipeline` that
  `compile_pipeline` returned for that combination, compiled into its own
  session temp folder (`.root` is the artifact folder).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("SDCOMPILER_QUIET", "1")
# One intra-op thread for torch and ONNX Runtime (the library's own knob, also read by `load_compiled`):
# the tiny models gain nothing from more, and on a shared 2-core machine an OpenMP barrier waiting for a
# descheduled second thread makes a 0.1 ms convolution take 10 ms or more.
os.environ.setdefault("SDCOMPILER_NUM_THREADS", "1")
_SESSION_ROOT = Path(tempfile.mkdtemp(prefix="sdcompiler-tests-"))
os.environ["SDCOMPILER_CACHE_DIR"] = str(_SESSION_ROOT / "cache")
os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = str(_SESSION_ROOT / "hypothesis")  # not .hypothesis/ in the checkout
atexit.register(shutil.rmtree, _SESSION_ROOT, ignore_errors=True)

import torch  # noqa: E402  (after the environment above)

torch.set_num_threads(int(os.environ["SDCOMPILER_NUM_THREADS"]))
# Without a GPU, Triton kernels run (on CPU tensors) only in its interpreter; Triton reads this when a
# kernel is decorated, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


_FOLDER_MARKERS = {"unit": pytest.mark.unit, "integration": pytest.mark.integration, "gpu": pytest.mark.gpu}


def pytest_collection_modifyitems(config, items):
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder in _FOLDER_MARKERS:
            item.add_marker(_FOLDER_MARKERS[folder])


def _recipe_key(recipe) -> str:
    return recipe if isinstance(recipe, str) else json.dumps(recipe, sort_keys=True, default=str)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: arch -> path of a tiny diffusers checkpoint (seed 0), built once per arch."""
    from sdcompiler.testing import make_checkpoint

    root = tmp_path_factory.mktemp("tiny_checkpoints")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = make_checkpoint(root / arch, arch, "tiny", seed=0)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def compiled(tiny_checkpoint, tmp_path_factory):
    """Factory: (arch, target, recipe) -> CompiledPipeline, compiled once per combination."""
    from sdcompiler import compile_pipeline

    root = tmp_path_factory.mktemp("artifacts")
    built: dict[tuple[str, str, str], object] = {}

    def get(arch: str, target: str = "onnx", recipe="none"):
        key = (arch, target, _recipe_key(recipe))
        if key not in built:
            out = root / f"{arch}-{target}-{len(built)}"
            built[key] = compile_pipeline(
                tiny_checkpoint(arch), recipe=recipe, target=target, output_dir=out, device="cpu"
            )
        return built[key]

    return get
