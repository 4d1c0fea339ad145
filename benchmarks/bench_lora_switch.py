"""Benchmark: switching LoRAs at run time on an onnx artifact vs compiling the LoRA in, full SD1.5 architecture.

    python benchmarks/bench_lora_switch.py [--workdir DIR] [--repeats 3] [--rank 8]

On the full-size SD1.5 checkpoint (real architecture, random weights; `bench_compile_sd15.ensure_checkpoint`,
cached in `--workdir`, default benchmarks/.cache) and its `--recipe none --target onnx` artifact (compiled
once, reused):

1. a random LoRA for the U-Net and text encoder in diffusers' layout (`tests/lora_files.make_full_lora`: every
   attention, projection, feed-forward and ResNet conv kohya's trainers address), rank `--rank`;
2. `load_compiled(artifact)` then `pipe.set_loras([lora])` / `pipe.set_loras([])`, `--repeats` times each:
   seconds per switch (the fused changes, the initializer reads, the rebuilt ONNX Runtime sessions);
3. the alternative: `sdcompiler compile CKPT --recipe merge_lora:path=LORA,scale=0.8 --target onnx`, a full re-export with the
   LoRA merged (one run, wall time of the subprocess).

Writes lora_switch.{json,md} to benchmarks/results.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_common import finish_results, log, new_results, peak_rss_gib, write_results  # noqa: E402
from bench_compile_sd15 import ensure_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    from sdcompiler import load_compiled

    results = new_results("lora_switch", ("torch", "onnxruntime", "diffusers", "peft"), repeats=args.repeats)
    checkpoint, _ = ensure_checkpoint(args.workdir)
    artifact = args.workdir / "sd15-full-onnx-loramap"
    cli = [sys.executable, "-m", "sdcompiler"]
    if not (artifact / "unet" / "lora_map.json").is_file():
        log(f"compiling {artifact} (recipe none, onnx)")
        start = time.perf_counter()
        command = [*cli, "compile", str(checkpoint), "--recipe", "none", "--target", "onnx", "--out", str(artifact)]
        subprocess.run([*command, "--quiet"], check=True)
        results["compile_none_seconds"] = round(time.perf_counter() - start, 1)

    with tempfile.TemporaryDirectory(prefix="lora-switch-") as tmp:
        import lora_files

        log("making the LoRA")
        lora_files.RANK = args.rank
        lora = lora_files.make_full_lora(checkpoint, Path(tmp) / "lora", seed=0)
        lora_mb = lora.stat().st_size / 2**20

        start = time.perf_counter()
        pipe = load_compiled(artifact, device="cpu", verify=False)
        load_s = time.perf_counter() - start
        on, off = [], []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            pipe.set_loras([(lora, 0.8)])
            on.append(time.perf_counter() - start)
            overridden = {n: len(m.overridden) for n, m in pipe.components.backends.items() if m.overridden}
            start = time.perf_counter()
            pipe.set_loras([])
            off.append(time.perf_counter() - start)
            log(f"repeat {repeat + 1}: set {on[-1]:.1f} s, restore {off[-1]:.1f} s")
        del pipe

        log("re-export with the LoRA merged")
        recipe = f"merge_lora:path={lora},scale=0.8"  # the CLI's inline recipe form
        start = time.perf_counter()
        command = [*cli, "compile", str(checkpoint), "--recipe", recipe, "--target", "onnx"]
        subprocess.run([*command, "--out", str(Path(tmp) / "merged"), "--quiet"], check=True)
        merged_s = time.perf_counter() - start

    results.update(
        lora_rank=args.rank,
        lora_file_mib=round(lora_mb, 1),
        load_seconds=round(load_s, 2),
        set_loras_seconds=[round(x, 2) for x in on],
        restore_seconds=[round(x, 2) for x in off],
        set_loras_median=round(statistics.median(on), 2),
        restore_median=round(statistics.median(off), 2),
        overridden_initializers=overridden,
        reexport_merged_seconds=round(merged_s, 1),
        peak_rss_gib=peak_rss_gib(),
    )
    finish_results(results)
    machine = results["machine"]
    table = "\n".join(
        [
            f"## lora_switch ({results['date']})",
            "",
            f"Full SD1.5 architecture (random weights), onnx fp32 artifact, CPU: {machine['cpu_model']}, "
            f"{machine['cpu_count']} cores; load average {results['load_average']}.",
            "",
            "| what | seconds |",
            "|---|---|",
            f"| `set_loras([lora])`, median of {args.repeats} | {results['set_loras_median']} |",
            f"| `set_loras([])` (restore), median of {args.repeats} | {results['restore_median']} |",
            f"| re-export with the LoRA merged (`compile --recipe merge_lora --target onnx`) | {merged_s:.1f} |",
            f"| `load_compiled` (verify=False) | {load_s:.2f} |",
            "",
            f"LoRA: rank {args.rank}, {lora_mb:.1f} MiB, U-Net + text encoder; initializers overridden per graph: "
            f"{overridden}; peak RSS {results['peak_rss_gib']} GiB.",
            "",
        ]
    )
    write_results(results, table, args.out, "lora_switch")


if __name__ == "__main__":
    main()
