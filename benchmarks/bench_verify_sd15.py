"""Benchmark: what the integrity checks cost on the full SD1.5 architecture (random weights, seed 0).

    python benchmarks/bench_verify_sd15.py [--target torch|onnx] [--repeats 3] [--out DIR] [--work DIR]

Builds the full-size SD1.5 checkpoint (`make_checkpoint(..., "full")`, fp32: ~4.3 GB of weights) and compiles
it with no passes for `--target`; then times, `--repeats` rounds each, medians:
- `verify_files(hashes=True)`: sha256 of every artifact file (what `load_compiled` / `sdcompiler verify` run by
  default) against `hashes=False` (presence, confinement and ONNX graph checks only: `verify=False`);
- `load_compiled(verify=True)` against `load_compiled(verify=False)`, alternating, so the ratio is the start-up
  cost the default adds;
- `load_checkpoint` of the full checkpoint folder with its NaN / Inf scan of the safetensors files (the default,
  `allow_nonfinite=False`) against without it (`allow_nonfinite=True`), alternating: what the scan adds to
  every compile.
The page cache is warm after the first round (the files were just written), as on a serving host that loads an
artifact it has on local disk; cold-cache reads are bounded by the disk instead. Writes verify_<target>_sd15.{json,md}
to `--out` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_common import finish_results, log, new_results, write_results  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="torch", choices=["torch", "onnx"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temp folder, removed at the end)")
    args = parser.parse_args()

    from sdcompiler import load_compiled
    from sdcompiler.artifact import read_manifest, verify_files
    from sdcompiler.compile import compile_artifact
    from sdcompiler.loading import load_checkpoint
    from sdcompiler.testing import make_checkpoint

    work = args.work or Path(tempfile.mkdtemp(prefix="sdcompiler-bench-verify-"))
    try:
        log("building the full-size SD1.5 checkpoint")
        checkpoint = make_checkpoint(work / "sd15", "sd15", "full", seed=0)
        log(f"compiling (no passes, target {args.target})")
        root = compile_artifact(checkpoint, "none", args.target, work / "artifact", show_progress=False)
        manifest = read_manifest(root)
        weights = sorted(checkpoint.rglob("*.safetensors"))

        rounds: dict[str, list[float]] = {}
        probes = {
            "verify_files_hashes": lambda: verify_files(root, manifest, hashes=True),
            "verify_files_no_hashes": lambda: verify_files(root, manifest, hashes=False),
            "load_compiled_verify": lambda: load_compiled(root, device="cpu", verify=True),
            "load_compiled_no_verify": lambda: load_compiled(root, device="cpu", verify=False),
            "load_checkpoint_scan": lambda: load_checkpoint(checkpoint),
            "load_checkpoint_no_scan": lambda: load_checkpoint(checkpoint, allow_nonfinite=True),
        }
        for probe in probes.values():  # untimed: warms the page cache and imports
            probe()
        for i in range(args.repeats):
            for name, probe in probes.items():
                rounds.setdefault(name, []).append(timed(probe))
                log(f"round {i + 1} {name}: {rounds[name][-1]:.2f} s")
        median = {name: statistics.median(times) for name, times in rounds.items()}
        artifact_bytes = sum((root / name).stat().st_size for name in manifest["files"])
        checkpoint_bytes = sum(file.stat().st_size for file in weights)
        results = new_results(
            f"verify_{args.target}_sd15",
            ("torch", "diffusers", "safetensors"),
            target=args.target,
            repeats=args.repeats,
            artifact_files=len(manifest["files"]),
            artifact_bytes=artifact_bytes,
            checkpoint_safetensors_bytes=checkpoint_bytes,
            seconds=rounds,
            median_seconds=median,
            hash_gb_per_s=artifact_bytes / 1e9 / median["verify_files_hashes"],
            load_verify_overhead_s=median["load_compiled_verify"] - median["load_compiled_no_verify"],
            scan_overhead_s=median["load_checkpoint_scan"] - median["load_checkpoint_no_scan"],
        )
        finish_results(results)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    m = results["machine"]
    table = [
        f"Integrity checks on the full SD1.5 architecture (random weights), target {args.target}: "
        f"{artifact_bytes / 1e9:.2f} GB in {len(manifest['files'])} artifact files; {m['cpu_model']}, "
        f"medians of {args.repeats} rounds, page cache warm",
        "",
        "| what | seconds |",
        "|---|---|",
        *(f"| {name} | {value:.2f} |" for name, value in median.items()),
        "",
        f"sha256 of the artifact: {results['hash_gb_per_s']:.2f} GB/s; `load_compiled` with the default "
        f"verify=True takes {results['load_verify_overhead_s']:+.2f} s more than verify=False; the checkpoint's "
        f"NaN/Inf scan ({checkpoint_bytes / 1e9:.2f} GB of safetensors) adds {results['scan_overhead_s']:+.2f} s to "
        "`load_checkpoint`.",
    ]
    write_results(results, "\n".join(table) + "\n", args.out, f"verify_{args.target}_sd15")


if __name__ == "__main__":
    main()
