"""The catalogue of refusals (issue 14): every bad input a user or an attacker can hand the `sdcompiler` command
line, each refused with exit status 1, one line on stderr naming the problem and the fix, and nothing written.

A case is a `Case` in the `CASES` list of a module of this package (one module per area: checkpoints, recipes,
artifacts, runtime calls, ...); `tests/integration/test_catalogue.py` collects every module's cases and runs each
through `sdcompiler.cli.main` in-process (no interpreter start per case). For each case it records the check that
refused it (the innermost frame of sd-compiler's own code where the original exception was raised, followed
through `raise ... from`) so the suite can assert how many distinct checks the catalogue reaches.

    Case(
        "nan guidance scale",
        lambda tmp, inputs: ["generate", str(inputs.torch_artifact), "a cat", "--guidance", "nan", "--out", ...],
        words=("guidance_scale", "finite"),
        unreached=("sdcompiler.targets.torch_target.TorchTarget.load",),
    )

`build(tmp, inputs)` writes the case's inputs under `tmp` (never into the shared inputs: copy them first) and
returns the argv; `words` are fragments the error line must contain (case-insensitive); `unreached` names
functions (dotted import paths) that must not be called, e.g. the model loader for a refusal that must come
before any model is built.
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import shutil
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

# the project's own source folders: a raise site counts as a check only inside them
_OWN = tuple(str(Path(__file__).resolve().parents[2] / name) + os.sep for name in ("compiler", "passes", "kernels"))


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path, "Inputs"], list[str]]
    words: tuple[str, ...]
    unreached: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


class Inputs:
    """Shared, read-only inputs, built on first use: a tiny SD1.5 checkpoint and artifacts compiled from it."""

    def __init__(self, request: pytest.FixtureRequest):
        self._request = request

    @property
    def checkpoint(self) -> Path:
        return self._request.getfixturevalue("tiny_checkpoint")("sd15")

    def artifact(self, target: str, recipe: str = "none") -> Path:
        return self._request.getfixturevalue("compiled")("sd15", target=target, recipe=recipe).root

    @property
    def torch_artifact(self) -> Path:
        return self.artifact("torch")

    @property
    def onnx_artifact(self) -> Path:
        return self.artifact("onnx")

    def copy_checkpoint(self, tmp: Path) -> Path:
        return Path(shutil.copytree(self.checkpoint, tmp / "checkpoint"))

    def copy_artifact(self, tmp: Path, target: str = "torch") -> Path:
        return Path(shutil.copytree(self.artifact(target), tmp / f"artifact-{target}"))


def link_loop(tmp: Path, name: str = "a", other: str = "b") -> Path:
    """`tmp / name`, a symbolic link that loops through `tmp / other` back to itself."""
    (tmp / name).symlink_to(tmp / other)
    (tmp / other).symlink_to(tmp / name)
    return tmp / name


def fifo(tmp: Path, name: str) -> Path:
    """`tmp / name`, a named pipe (reading it would block)."""
    os.mkfifo(tmp / name)
    return tmp / name


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    site: str | None  # "compiler/loading.py:123" where the refusal was raised


def all_cases() -> list[Case]:
    cases = []
    for module in pkgutil.iter_modules(__path__):
        cases += importlib.import_module(f"{__name__}.{module.name}").CASES
    names = [case.name for case in cases]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert not duplicates, f"catalogue case names must be unique: {duplicates}"
    return cases


def raise_site(exc: BaseException) -> str | None:
    """Where the check that refused was: the innermost own frame of the first exception in the chain."""
    while True:
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    own = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if str(Path(frame.filename).resolve()).startswith(_OWN)
    ]
    if not own:
        return None
    root = Path(__file__).resolve().parents[2]
    return f"{Path(own[-1].filename).resolve().relative_to(root).as_posix()}:{own[-1].lineno}"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path below `folder` with its size and modification time (links not followed)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        stat = path.lstat()
        found[path.relative_to(folder).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return found


def run(case: Case, tmp: Path, inputs: Inputs, monkeypatch: pytest.MonkeyPatch, output) -> tuple[Outcome, dict]:
    """Build the case's inputs, run `sdcompiler` in-process, and return the outcome and the unreached calls."""
    from sdcompiler import cli

    argv = case.build(tmp, inputs)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    calls: dict[str, int] = {}
    for dotted in case.unreached:
        module, _, attr = dotted.rpartition(".")
        owner = _resolve(module)
        original = getattr(owner, attr)

        def record(*args, _dotted=dotted, _original=original, **kwargs):
            calls[_dotted] = calls.get(_dotted, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, attr, record)
    failure: list[BaseException] = []
    report = cli._report_failure

    def capture(exc, debug):
        failure.append(exc)
        return report(exc, debug)

    monkeypatch.setattr(cli, "_report_failure", capture)
    _route_library_logging(monkeypatch)
    before = snapshot(tmp)
    output.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        code = cli.main(argv)
    out = output.readouterr()
    shown = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, QUIET_WARNINGS)]
    written = {"before": before, "after": snapshot(tmp)}
    stderr = out.err + "".join(f"{line}\n" for line in shown)
    outcome = Outcome(code, out.out, stderr, raise_site(failure[0]) if failure else None)
    return outcome, {"calls": calls, **written}


# warnings Python does not print by default outside __main__; every other warning the CLI raises reaches its stderr
QUIET_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def _route_library_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point every library log handler that writes to a stream at the current sys.stderr (the capture): a handler
    made at import time holds the stderr of that moment, which under pytest is an earlier capture, so lines the
    real CLI prints (e.g. diffusers' LoRA loading errors) would otherwise go unseen here."""
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler:  # not pytest's caplog handlers, not file handlers
                monkeypatch.setattr(handler, "stream", sys.stderr)


def _resolve(dotted: str):
    """The object at a dotted path: a module, or an attribute (e.g. a class) of one."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(dotted)


def check_refused(case: Case, outcome: Outcome, extra: dict) -> None:
    """Exit status 1, one line on stderr that names the problem (the case's words), no unexpected error,
    nothing written, no unreached function called."""
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert outcome.code == 1, f"exit status {outcome.code}, stderr: {outcome.stderr!r}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{outcome.stderr}"
    line = lines[0]
    assert line.startswith("error: ") and "unexpected" not in line, line
    missing = [word for word in case.words if word.lower() not in line.lower()]
    assert not missing, f"{missing} not in {line!r}"
    assert extra["before"] == extra["after"], f"files changed: {_diff(extra['before'], extra['after'])}"
    assert not extra["calls"], f"reached {sorted(extra['calls'])} before refusing: {line}"
    assert outcome.site is not None, f"no sd-compiler frame raised {line!r}"


def _diff(before: dict, after: dict) -> list[str]:
    return sorted(set(before.items()) ^ set(after.items()))[:5]
