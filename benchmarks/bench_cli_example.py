"""Benchmark: README's `sdcompiler bench` example, run as a user runs it, with its report stored.

    python benchmarks/bench_cli_example.py [--recipe bk-small] [--target onnx] [--steps 4] [--repeats 5]
                                           [--threads 1] [--out DIR]

Builds the tiny SD1.5 checkpoint (`make_checkpoint(arch="sd15", size="tiny", seed=0)`), compiles it with
`sdcompiler compile` (`--recipe`, `--target`), then runs `sdcompiler bench ARTIFACT --baseline CHECKPOINT
--steps N --repeats R --json --markdown` in a fresh process with `SDCOMPILER_NUM_THREADS=--threads` (one
intra-op thread count for torch and ONNX Runtime on both sides). Writes `bench_example.{json,md}` to `--out`
(default benchmarks/results): the machine, the commands, the compile time, and the bench report as the
command wrote it (every timed call's median/min/max, the speed-ups, PSNR/SSIM, its noisy-timing warnings).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_common import finish_results, log, new_results, write_results  # noqa: E402


def _run(command: list[str], env: dict[str, str]) -> float:
    log(" ".join(command))
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="bk-small")
    parser.add_argument("--target", default="onnx")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="SDCOMPILER_NUM_THREADS for compile and bench")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    from sdcompiler.testing import make_checkpoint

    env = dict(os.environ, SDCOMPILER_NUM_THREADS=str(args.threads), SDCOMPILER_QUIET="1")
    results = new_results("bench_example", ("torch", "onnxruntime", "diffusers"), threads=args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-example-") as tmp:
        root = Path(tmp)
        checkpoint = make_checkpoint(root / "ckpt", "sd15", "tiny", seed=0)
        artifact = root / "artifact"
        cli = [sys.executable, "-m", "sdcompiler"]
        compile_cmd = [*cli, "compile", str(checkpoint), "--recipe", args.recipe, "--target", args.target]
        compile_s = _run([*compile_cmd, "--out", str(artifact), "--quiet"], env)
        bench_cmd = [*cli, "bench", str(artifact), "--baseline", str(checkpoint), "--steps", str(args.steps)]
        bench_cmd += ["--repeats", str(args.repeats)]
        bench_s = _run([*bench_cmd, "--json", str(root / "report.json"), "--markdown", str(root / "report.md")], env)
        report = json.loads((root / "report.json").read_text())
        markdown = (root / "report.md").read_text()
    results["commands"] = {
        "checkpoint": 'make_checkpoint(DIR, arch="sd15", size="tiny", seed=0)',
        "compile": " ".join(["sdcompiler", *compile_cmd[3:4], "CKPT", *compile_cmd[5:], "--out", "ART"]),
        "bench": " ".join(["sdcompiler", "bench", "ART", "--baseline", "CKPT", *bench_cmd[7:]]),
        "environment": f"SDCOMPILER_NUM_THREADS={args.threads}",
    }
    results["compile_seconds"] = round(compile_s, 1)
    results["bench_seconds"] = round(bench_s, 1)
    results["report"] = report
    finish_results(results)
    machine = results["machine"]
    table = (
        f"# README's `sdcompiler bench` example ({results['date']})\n\n"
        f"Machine: {machine['cpu_model']}, {machine['cpu_count']} cores; "
        f"`{results['commands']['environment']}`; load average {results['load_average']}.\n\n"
        f"    {results['commands']['compile']}   # {compile_s:.0f} s\n"
        f"    {results['commands']['bench']}   # {bench_s:.0f} s\n\n"
        f"{markdown}"
    )
    write_results(results, table, args.out, "bench_example")


if __name__ == "__main__":
    main()
