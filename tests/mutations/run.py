"""Mutation check: each deliberate breakage in this folder must make the tests it names fail.

A mutation is one `NAME.patch` here: a unified diff against the repository (as `git diff` writes it) whose
header, before the diff, names the tests that must catch it, one or more per line:

    # expect-fail: tests/integration/test_ptq.py::test_name

For each mutation (all of them, or the names given on the command line) this script copies the repository's
files (`git ls-files`: tracked plus untracked, not ignored, as they are in the working tree) into a scratch
folder, applies the patch there, builds the import shim (`<scratch>/shim/sdcompiler/`: a link per entry of
`compiler/`, plus `passes` and `kernels`) so that `import sdcompiler` reads the patched copy, and runs the named
tests with pytest. The mutation is "killed" when every named test fails (a failure or an error in at least one
of its cases, read from pytest's JUnit XML: a node id without parameters covers all of them), "SURVIVED" when
one of them passes; a patch that does not apply, or a named test that did not run, is an "ERROR". Exit status
1 unless every mutation was killed.

    python tests/mutations/run.py                      # every mutation
    python tests/mutations/run.py ptq_one_calibration_input --baseline -v

`--baseline` runs the named tests on an unpatched copy first (they must pass, or a kill means nothing);
`-v` prints pytest's output; `--keep` keeps the scratch folders.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
EXPECT_FAIL = re.compile(r"#\s*expect-fail:\s*(.+)")
SUBPACKAGES = ("passes", "kernels")  # sdcompiler.passes = passes/, sdcompiler.kernels = kernels/ (pyproject)


@dataclass(frozen=True)
class Mutation:
    name: str
    patch: Path
    tests: tuple[str, ...]  # pytest node ids: path[::function[[params]]]


def read_mutation(patch: Path) -> Mutation:
    """The mutation in `patch`, with the tests its header names (the lines before the diff)."""
    tests = []
    for line in patch.read_text().splitlines():
        if line.startswith(("diff ", "--- ")):
            break
        if match := EXPECT_FAIL.match(line):
            tests.append(match.group(1).strip())  # one node id per line (parametrized ids may hold spaces)
    return Mutation(patch.stem, patch, tuple(tests))


def all_mutations(names: list[str] | None = None) -> list[Mutation]:
    found = {p.stem: read_mutation(p) for p in sorted(HERE.glob("*.patch"))}
    if not names:
        return list(found.values())
    unknown = [n for n in names if Path(n).stem not in found]
    if unknown:
        raise SystemExit(f"no mutation named {', '.join(unknown)} in {HERE}; have {', '.join(found)}")
    return [found[Path(n).stem] for n in names]


def repo_files(repo: Path = REPO) -> list[str]:
    """Tracked and untracked-but-not-ignored files, as the working tree has them (deleted ones left out)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted({f for f in listed.split("\0") if f and (repo / f).is_file()})


def copy_repo(dest: Path, repo: Path = REPO) -> Path:
    for name in repo_files(repo):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, dest / name)
    # a repository of its own, so that `git apply` takes the patch's paths relative to `dest` even when the
    # temp folder lies inside another repository
    subprocess.run(["git", "init", "-q", str(dest)], check=True)
    return dest


def apply_patch(patch: Path, tree: Path, check: bool = False) -> str | None:
    """Apply `patch` to `tree` (or only check that it applies); returns None, or why it does not apply."""
    if shutil.which("git"):
        command = ["git", "apply", "--whitespace=nowarn", *(["--check"] if check else []), str(patch)]
    else:
        command = ["patch", "-p1", "--batch", "--forward", *(["--dry-run"] if check else []), "-i", str(patch)]
    proc = subprocess.run(command, cwd=tree, capture_output=True, text=True)
    return None if proc.returncode == 0 else (proc.stdout + proc.stderr).strip() or f"exit {proc.returncode}"


def make_shim(tree: Path, shim: Path) -> Path:
    """`shim/sdcompiler/` maps the package onto `tree` as the editable install maps it onto the repository."""
    package = shim / "sdcompiler"
    package.mkdir(parents=True)
    for entry in (tree / "compiler").iterdir():
        (package / entry.name).symlink_to(entry)
    for name in SUBPACKAGES:
        (package / name).symlink_to(tree / name)
    return shim


def _matches(test_id: str, classname: str, name: str) -> bool:
    """Does the JUnit test case (classname `tests.unit.test_x[.Class]`, name `test_f[params]`) fall under the
    node id `test_id` (`tests/unit/test_x.py[::Class][::test_f[params]]`)?"""
    path, _, rest = test_id.partition("::")
    module = path.removesuffix(".py").replace("/", ".")
    full = ".".join([classname, name])
    wanted = ".".join([module, *rest.split("::")]) if rest else module
    return full == wanted or full.startswith(wanted + ".") or full.startswith(wanted + "[")


def run_tests(tree: Path, shim: Path, tests: tuple[str, ...], verbose: bool) -> tuple[dict[str, list[bool]], str]:
    """Run `tests` on `tree` through `shim`: per named test, the outcome of each case it covers (True:
    failed or errored; skipped cases left out), and pytest's output."""
    report = tree.parent / "junit.xml"
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))}
    where = subprocess.run(
        [sys.executable, "-c", "import sdcompiler; print(sdcompiler.__file__)"], env=env, capture_output=True, text=True
    ).stdout.strip()
    if not where.startswith(str(shim)):
        raise RuntimeError(f"the shim does not win: sdcompiler imports from {where or 'nowhere'}")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *tests]
    proc = subprocess.run(command, cwd=tree, env=env, capture_output=not verbose, text=True)
    outcomes: dict[str, list[bool]] = {test: [] for test in tests}
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            kinds = {child.tag for child in case}
            if "skipped" in kinds:
                continue
            for test in tests:
                if _matches(test, case.get("classname", ""), case.get("name", "")):
                    outcomes[test].append(bool(kinds & {"failure", "error"}))
        report.unlink()
    return outcomes, (proc.stdout or "") + (proc.stderr or "")


def verdict(outcomes: dict[str, list[bool]]) -> str:
    """'killed' when every named test failed (in at least one of its cases), else what survived or did not run."""
    not_run = [test for test, cases in outcomes.items() if not cases]
    if not_run:
        return "ERROR: did not run: " + ", ".join(not_run)
    passed = [test for test, cases in outcomes.items() if not any(cases)]
    if not passed:
        cases = [failed for test_cases in outcomes.values() for failed in test_cases]
        return f"killed ({sum(cases)} of {len(cases)} cases failed)"
    return "SURVIVED: " + ", ".join(passed) + " passed"


def run_mutation(mutation: Mutation, baseline: bool, verbose: bool, keep: bool) -> str:
    """'killed', 'SURVIVED: ...' or 'ERROR: ...'."""
    if not mutation.tests:
        return "ERROR: the patch names no test (# expect-fail: ...)"
    scratch = Path(tempfile.mkdtemp(prefix=f"sdcompiler-mutation-{mutation.name}-"))
    try:
        tree = copy_repo(scratch / "repo")
        shim = make_shim(tree, scratch / "shim")
        if baseline:
            outcomes, output = run_tests(tree, shim, mutation.tests, verbose)
            failing = [test for test, cases in outcomes.items() if any(cases) or not cases]
            if failing:
                tail = "" if verbose else "\n" + output[-3000:]
                return f"ERROR: unpatched, these fail or do not run: {', '.join(failing)}{tail}"
        if (error := apply_patch(mutation.patch, tree)) is not None:
            return f"ERROR: the patch does not apply: {error}"
        outcomes, output = run_tests(tree, shim, mutation.tests, verbose)
        result = verdict(outcomes)
        if result.startswith("ERROR") and not verbose:
            result += "\n" + output[-3000:]
        return result
    finally:
        if keep:
            print(f"  (scratch kept: {scratch})")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (NAME or NAME.patch); default: all")
    parser.add_argument("--baseline", action="store_true", help="first check the named tests pass unpatched")
    parser.add_argument("-v", "--verbose", action="store_true", help="show pytest's output")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folders")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    args = parser.parse_args(argv)
    mutations = all_mutations(args.names)
    if args.list:
        for mutation in mutations:
            print(f"{mutation.name}: {' '.join(mutation.tests)}")
        return 0
    results = {}
    for mutation in mutations:
        print(f"{mutation.name}: {' '.join(mutation.tests)}", flush=True)
        start = time.perf_counter()
        results[mutation.name] = run_mutation(mutation, args.baseline, args.verbose, args.keep)
        print(f"  {results[mutation.name]} ({time.perf_counter() - start:.0f} s)", flush=True)
    killed = sum(r.startswith("killed") for r in results.values())
    print(f"{killed} of {len(results)} mutations killed")
    for name, result in results.items():
        if not result.startswith("killed"):
            print(f"  {name}: {result.splitlines()[0]}")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
