"""Benchmark: how fast the refusals the issue singles out come (a tampered artifact, a NaN checkpoint, a YAML alias
bomb, an oversized request, an absurd U-Net config), through the real command line.

    python benchmarks/bench_refusals.py [--repeats 3] [--out DIR]

Each case is the refusal catalogue's own (`tests/catalogue/`, the inputs built the same way over a tiny SD1.5
checkpoint and artifacts compiled from it); each is run `--repeats` times as `python -m sdcompiler ...` in a fresh
process (wall time, interpreter and imports included) and once more in-process after a warm-up (the time the check
itself takes, as a long-running Python caller sees it). Before the issue-14 checks the same inputs took ~90 s and
ended in MemoryError (alias bomb), were OOM-killed (absurd U-Net), or produced images (tampered artifact, NaN
checkpoint). Writes refusals.{json,md} to `--out` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_common import finish_results, log, new_results, write_results  # noqa: E402

CASES = (
    "artifact weight byte flipped",
    "checkpoint folder with NaN weight",
    "recipe alias bomb",
    "generate height 100000",
    "config unet absurdly wide",
)


class Inputs:
    """The catalogue's shared inputs, built here instead of by pytest fixtures."""

    def __init__(self, root: Path):
        self.root = root
        self._artifacts: dict[tuple[str, str], Path] = {}

    @property
    def checkpoint(self) -> Path:
        from sdcompiler.testing import make_checkpoint

        path = self.root / "sd15"
        return path if path.exists() else make_checkpoint(path, "sd15", "tiny", seed=0)

    def artifact(self, target: str, recipe: str = "none") -> Path:
        from sdcompiler.compile import compile_artifact

        key = (target, recipe)
        if key not in self._artifacts:
            out = self.root / f"artifact-{target}-{recipe}"
            self._artifacts[key] = compile_artifact(self.checkpoint, recipe, target, out, show_progress=False)
        return self._artifacts[key]

    @property
    def torch_artifact(self) -> Path:
        return self.artifact("torch")

    def copy_checkpoint(self, tmp: Path) -> Path:
        return Path(shutil.copytree(self.checkpoint, tmp / "checkpoint"))

    def copy_artifact(self, tmp: Path, target: str = "torch") -> Path:
        return Path(shutil.copytree(self.artifact(target), tmp / f"artifact-{target}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    os.environ.setdefault("SDCOMPILER_QUIET", "1")
    from catalogue import all_cases

    from sdcompiler import cli

    cases = {case.name: case for case in all_cases()}
    work = Path(tempfile.mkdtemp(prefix="sdcompiler-bench-refusals-"))
    os.environ["SDCOMPILER_CACHE_DIR"] = str(work / "cache")
    inputs = Inputs(work / "inputs")
    rows = []
    try:
        for name in CASES:
            case = cases[name]
            wall, line = [], ""
            for i in range(args.repeats + 1):
                tmp = work / f"case-{len(rows)}-{i}"
                tmp.mkdir()
                argv = case.build(tmp, inputs)
                env = {**os.environ, **case.env}
                if i < args.repeats:
                    start = time.perf_counter()
                    done = subprocess.run(
                        [sys.executable, "-m", "sdcompiler", *argv], capture_output=True, text=True, env=env
                    )
                    wall.append(time.perf_counter() - start)
                    assert done.returncode == 1, done.stderr
                    line = done.stderr.strip()
                else:  # in-process, imports warm
                    err = io.StringIO()
                    os.environ.update(case.env)
                    with contextlib.redirect_stderr(err):
                        start = time.perf_counter()
                        code = cli.main(argv)
                        check = time.perf_counter() - start
                    assert code == 1, err.getvalue()
            rows.append(
                {
                    "case": name,
                    "cli_seconds": wall,
                    "cli_median_s": statistics.median(wall),
                    "in_process_s": check,
                    "line": line,
                }
            )
            log(f"{name}: cli {statistics.median(wall):.2f} s, in-process {check:.3f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = new_results("refusals", ("torch", "diffusers"), repeats=args.repeats, rows=rows)
    finish_results(results)
    table = [
        f"Refusal times through `python -m sdcompiler` (fresh process, median of {args.repeats}) and in-process "
        f"(imports warm); tiny SD1.5 inputs, {results['machine']['cpu_model']}",
        "",
        "| case | CLI wall s | in-process s | the line |",
        "|---|---|---|---|",
        *(
            f"| {r['case']} | {r['cli_median_s']:.2f} | {r['in_process_s']:.3f} | {r['line'].replace('|', '/')[:160]} |"
            for r in rows
        ),
    ]
    write_results(results, "\n".join(table) + "\n", args.out, "refusals")


if __name__ == "__main__":
    main()
