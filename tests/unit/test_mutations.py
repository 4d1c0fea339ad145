"""The deliberate breakages in tests/mutations/ still fit the tree: each patch applies cleanly to the current files
and names tests that exist, so a refactor that moves the code or renames a test is noticed here, in a second,
rather than when someone next runs `python tests/mutations/run.py` (which checks that the tests catch them)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "tests" / "mutations" / "run.py"


def _runner():
    spec = importlib.util.spec_from_file_location("mutation_runner", RUNNER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


runner = _runner()
MUTATIONS = runner.all_mutations()


def test_there_are_mutations():
    assert len(MUTATIONS) >= 6


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_patch_applies_and_names_existing_tests(mutation):
    assert mutation.tests, f"{mutation.patch.name} names no test: add a '# expect-fail: PATH::TEST' line"
    for test in mutation.tests:
        path, *names = test.split("::")
        file = ROOT / path
        assert file.is_file(), f"{mutation.patch.name}: no test file {path}"
        text = file.read_text()
        for name in names:
            bare = name.split("[")[0]
            assert re.search(rf"^\s*(def|class) {re.escape(bare)}\b", text, re.M), f"{mutation.patch.name}: {test}"
    if shutil.which("git") is None and shutil.which("patch") is None:
        pytest.skip("neither git nor patch is installed")
    # checked in place: `git apply --check` / `patch --dry-run` read the working tree and write nothing
    error = runner.apply_patch(mutation.patch, ROOT, check=True)
    assert error is None, f"{mutation.patch.name} no longer applies (update it to the new code): {error}"
