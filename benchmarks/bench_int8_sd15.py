"""Benchmark: the `int8` preset on the full-size SD1.5 U-Net: compile time, ORT INT8 vs FP32 latency, eps SQNR.

    python benchmarks/bench_int8_sd15.py [--workdir DIR] [--repeats N] [--warmup N] [--skip-compile]
                                         [--threads 1,default] [--torch] [--quiet-threshold 0.25]
                                         [--max-wait 300] [--results-dir DIR]

On the full-size SD1.5 checkpoint of bench_compile_sd15.py (real architecture, random weights, cached under
`--workdir`, default benchmarks/.cache; built there when missing):

1. **Compile**: `sdcompiler compile CKPT --recipe int8 --target onnx --out DIR` in a subprocess with a fresh,
   empty `SDCOMPILER_CACHE_DIR`, so the calibration trajectories, the export, the calibration and the
   quantization all run (no cache hit): wall time, CPU time and peak RSS of that process, the pass's and the
   stages' seconds from the manifest, and the verdict against the issue's budget (15 minutes on this machine).
   `--skip-compile` reuses the int8 artifact in `--workdir`.
2. **U-Net latency**: the float artifact's `unet/model.onnx` (bench_compile_sd15's `sd15-full-onnx`, compiled
   with `--recipe none` when missing) vs the int8 artifact's, both on ONNX Runtime's CPU execution provider,
   32x32 latent, batch 1, 77 tokens, in this one process: `--warmup` runs each, then rounds that run each
   model once (fp32, int8[, torch]) until `--repeats` rounds are *quiet* (other processes used at most
   `--quiet-threshold` cores during every run of the round) or 2 x `--repeats` rounds ran; before each round
   it waits, within `--max-wait` seconds in all, for a quiet moment. Medians, speedup = fp32 / int8. Once per
   `--threads` setting (`1`: the contention-robust one on a shared 2-core machine; `default`: all cores).
   `--torch` adds the torch eager U-Net (fp32, diffusers, SDPA) to each round.
3. **Fidelity**: the pass record's `sqnr_db` (eps SQNR of the int8 graph vs the float torch U-Net on held-out
   teacher trajectories at the calibration resolution), and the SQNR of the int8 vs the fp32 ORT output on
   the timing input (random; a check that both graphs compute the same function).

Results: benchmarks/results/int8_sd15.{json,md}; the Markdown table is printed. Needs ~6 GB more disk (the
int8 artifact ~1.3 GB, the compile's scratch export ~3.4 GB, removed) and ~14 GB RAM during the compile.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_common import CpuMeter, finish_results, log, new_results, peak_rss_gib, write_results  # noqa: E402
from bench_compile_sd15 import (  # noqa: E402
    LATENT,
    TEXT_LENGTH,
    TIMESTEP,
    artifact_facts,
    compile_artifact,
    ensure_checkpoint,
    parse_threads,
    run_measured,
)
from bench_prune import QuietWaiter  # noqa: E402

NAME = "int8_sd15"
PACKAGES = ("sd-compiler", "torch", "onnxruntime", "onnx", "diffusers")
BUDGET_S = 15 * 60  # issue 5: a full SD1.5 int8 compile within 15 minutes on this machine


def compile_int8(checkpoint: Path, artifact: Path, workdir: Path) -> dict:
    """`sdcompiler compile --recipe int8` with an empty cache, measured (wall, CPU, peak RSS)."""
    with tempfile.TemporaryDirectory(prefix="int8-cache-", dir=workdir) as cache:
        env = dict(os.environ, SDCOMPILER_QUIET="1", SDCOMPILER_CACHE_DIR=cache)
        command = [
            sys.executable,
            "-m",
            "sdcompiler",
            "compile",
            str(checkpoint),
            "--recipe",
            "int8",
            "--target",
            "onnx",
            "--out",
            str(artifact),
            "--quiet",
        ]
        log(f"compiling (empty cache: calibration included): {' '.join(command[1:])}")
        meter = CpuMeter()
        result = run_measured(command, env)
        result["cpu_load"] = meter.stop()
    if result["exit_code"] != 0:
        raise SystemExit(f"int8 compile failed (exit {result['exit_code']}):\n{result['output_tail']}")
    result.pop("output_tail")
    result["budget_s"] = BUDGET_S
    result["within_budget"] = result["seconds"] <= BUDGET_S
    return result


def ptq_record(artifact: Path) -> dict:
    manifest = json.loads((artifact / "manifest.json").read_text())
    record = next(r for r in manifest["passes"] if r["name"] == "ptq")
    stage = next(s for s in manifest["lowering"]["stages"] if s["name"] == "quantize_onnx")
    return {
        "config": record["config"],
        "metrics": record["metrics"],
        "seconds": record["seconds"],
        "quantize_onnx": stage,
    }


def time_unets(checkpoint: Path, fp32: Path, int8: Path, args, waiter: QuietWaiter) -> dict:
    """Interleaved rounds of the fp32 and int8 ORT U-Nets (and torch eager with --torch), per thread setting."""
    import numpy as np
    import onnxruntime as ort
    import torch

    generator = torch.Generator().manual_seed(0)
    feed = {
        "sample": torch.randn(1, 4, LATENT, LATENT, generator=generator).numpy(),
        "timestep": np.asarray(TIMESTEP, dtype=np.float32),
        "encoder_hidden_states": torch.randn(1, TEXT_LENGTH, 768, generator=generator).numpy(),
    }
    unet = None
    if args.torch:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet").eval()
    default_threads = torch.get_num_threads()
    out = {"latent": [LATENT, LATENT], "batch": 1, "text_length": TEXT_LENGTH, "timestep": TIMESTEP, "runs": []}
    for threads in args.threads:
        label = "default" if threads is None else f"{threads} thread{'s' if threads > 1 else ''}"
        torch.set_num_threads(threads or default_threads)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        sessions, session_seconds = {}, {}
        for name, artifact in (("fp32", fp32), ("int8", int8)):
            log(f"[{label}] creating the {name} ONNX Runtime session")
            start = time.perf_counter()
            sessions[name] = ort.InferenceSession(
                str(artifact / "unet" / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
            )
            session_seconds[name] = round(time.perf_counter() - start, 1)
        models = {name: (lambda s=s: s.run(["out_sample"], feed)[0]) for name, s in sessions.items()}
        if unet is not None:
            sample, hidden = torch.from_numpy(feed["sample"]), torch.from_numpy(feed["encoder_hidden_states"])

            def run_torch():
                with torch.inference_mode():
                    return unet(sample, torch.tensor(TIMESTEP), hidden, return_dict=False)[0].numpy()

            models["torch"] = run_torch
        reference, quantized = models["fp32"](), models["int8"]()
        sqnr = float(10 * np.log10((reference**2).sum() / max(float(((reference - quantized) ** 2).sum()), 1e-20)))
        timing = _rounds(models, args, label, waiter)
        timing.update(threads=label, ort_session_seconds=session_seconds, sqnr_int8_vs_fp32_db=round(sqnr, 2))
        out["runs"].append(timing)
        del sessions, models
    torch.set_num_threads(default_threads)
    return out


def _rounds(models: dict, args, label: str, waiter: QuietWaiter) -> dict:
    """Warm-up, then rounds of one run per model; medians over the quiet rounds (all rounds if too few)."""

    def timed(run) -> tuple[float, float]:
        meter = CpuMeter()
        start = time.perf_counter()
        run()
        return time.perf_counter() - start, meter.stop().get("others_cores", 0.0)

    waiter.wait(label)
    warm = {name: [round(timed(run)[0], 3) for _ in range(args.warmup)] for name, run in models.items()}
    log(f"[{label}] warm-up: {warm}")
    rounds: list[dict] = []
    while sum(r["quiet"] for r in rounds) < args.repeats and len(rounds) < 2 * args.repeats:
        waiter.wait(label)
        runs = {name: timed(run) for name, run in models.items()}
        others = max(load for _, load in runs.values())
        rounds.append(
            {
                "seconds": {n: round(t, 4) for n, (t, _) in runs.items()},
                "others_cores": others,
                "quiet": others <= args.quiet_threshold,
            }
        )
        log(
            f"[{label}] round {len(rounds)} ({'quiet' if rounds[-1]['quiet'] else f'others {others:.2f} cores'}): "
            + ", ".join(f"{n} {t:.3f} s" for n, (t, _) in runs.items())
        )
    quiet = [r for r in rounds if r["quiet"]]
    used = quiet if len(quiet) >= args.repeats else rounds
    medians = {name: statistics.median(r["seconds"][name] for r in used) for name in models}
    return {
        "warmup_seconds": warm,
        "rounds": rounds,
        "rounds_used": len(used),
        "contended": used is rounds and len(quiet) < len(rounds),
        "median_s": {n: round(m, 4) for n, m in medians.items()},
        "speedup_int8_over_fp32": round(medians["fp32"] / medians["int8"], 3),
        **({"speedup_fp32_ort_over_torch": round(medians["torch"] / medians["fp32"], 3)} if "torch" in medians else {}),
    }


def markdown(results: dict) -> str:
    m, c, p, a = results["machine"], results.get("compile"), results["ptq"], results["artifact"]
    config, metrics = p["config"], p["metrics"]
    rows = [("machine", f"{m['cpu_model']}, {m['cpu_count']} cores, {m['mem_total_gib']} GiB RAM")]
    if c:
        verdict = "within" if c["within_budget"] else "OVER"
        rows.append(
            (
                "`sdcompiler compile --recipe int8 --target onnx` (empty cache)",
                f"{c['seconds']:.0f} s wall ({verdict} the {c['budget_s'] // 60}-minute budget), peak RSS "
                f"{c['peak_rss_gib']:.1f} GiB, {c['cpu_seconds']:.0f} CPU-s, others used "
                f"{c['cpu_load'].get('others_cores', 0):.2f} cores",
            )
        )
    else:
        rows.append(("compile", "skipped (--skip-compile: reused the artifact)"))
    rows += [
        (
            "ptq pass / lowering stages (manifest)",
            f"ptq {p['seconds']:.0f} s; " + ", ".join(f"{k} {v:.0f} s" for k, v in a["stage_seconds"].items()),
        ),
        (
            "calibration",
            f"{config['calib_prompts']} prompts x {config['calib_steps']} steps x CFG = "
            f"{metrics['calibration_inputs']:.0f} inputs at {config['resolution']} px, "
            f"{config['calibration']}; ops {', '.join(config['op_types'])}; "
            f"{metrics['excluded_nodes']:.0f} nodes kept float",
        ),
        ("**eps SQNR, int8 vs float torch U-Net** (held-out trajectories)", f"**{metrics['sqnr_db']:.1f} dB**"),
        ("int8 artifact size", f"{a['gib']:.2f} GiB (unet {a['component_gib'].get('unet', 0):.2f})"),
    ]
    for run in results["unet"]["runs"]:
        t, med = run["threads"], run["median_s"]
        rows += [
            (f"U-Net ORT fp32, {LATENT}x{LATENT} latent, batch 1, median [{t}]", f"{med['fp32']:.3f} s"),
            (f"U-Net ORT int8, median [{t}]", f"{med['int8']:.3f} s"),
            (
                f"**speedup int8 / fp32** [{t}]",
                f"**{run['speedup_int8_over_fp32']:.2f}x**" + (" (contended rounds)" if run["contended"] else ""),
            ),
            (f"int8 vs fp32 ORT output SQNR, timing input [{t}]", f"{run['sqnr_int8_vs_fp32_db']:.1f} dB"),
        ]
        if "torch" in med:
            rows.append(
                (
                    f"U-Net torch eager fp32, median [{t}]",
                    f"{med['torch']:.3f} s (ORT fp32 {run['speedup_fp32_ort_over_torch']:.2f}x faster)",
                )
            )
    rows += [
        (
            "load average (1/5/15 min) at start / end",
            f"{results['load_average']['start']} / {results['load_average']['end']}",
        ),
        ("versions", ", ".join(f"{k} {v}" for k, v in results["versions"].items())),
    ]
    lines = [f"## int8_sd15 ({results['date']})", "", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    notes = [
        "U-Net: the real SD1.5 architecture with random weights: SQNR and speed carry over to real weights "
        "only roughly (trained weights have other ranges and outliers).",
        "Rounds interleave the models; compare the speedup, not absolute times.",
    ]
    if results["other_busy_processes"]:
        notes.append("Other busy processes: " + "; ".join(results["other_busy_processes"]))
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache")
    parser.add_argument("--repeats", type=int, default=5, help="quiet rounds per thread setting (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up runs per model (default 2)")
    parser.add_argument("--skip-compile", action="store_true", help="reuse the int8 artifact in --workdir")
    parser.add_argument(
        "--threads",
        type=parse_threads,
        default=parse_threads("1,default"),
        help="intra-op thread settings, each timed in turn (default '1,default')",
    )
    parser.add_argument("--torch", action="store_true", help="also time the torch eager U-Net")
    parser.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.25,
        help="a round counts when others used at most this many cores (default 0.25)",
    )
    parser.add_argument("--max-wait", type=float, default=300, help="total seconds to wait for quiet moments")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    fp32, int8 = workdir / "sd15-full-onnx", workdir / "sd15-full-int8"
    results = new_results(NAME, PACKAGES)
    results["settings"] = {k: v for k, v in vars(args).items() if k not in ("workdir", "results_dir")}
    checkpoint, built = ensure_checkpoint(workdir)
    results["checkpoint"] = {"path": str(checkpoint), "build": built}
    if not (fp32 / "manifest.json").exists():
        log(f"no float artifact in {fp32}: compiling it (recipe none)")
        compile_artifact(checkpoint, fp32)
    if args.skip_compile and (int8 / "manifest.json").exists():
        results["compile"] = None
    else:
        results["compile"] = compile_int8(checkpoint, int8, workdir)
    results["ptq"] = ptq_record(int8)
    results["artifact"] = {"path": str(int8), **artifact_facts(int8)}
    results["unet"] = time_unets(checkpoint, fp32, int8, args, QuietWaiter(args.quiet_threshold, args.max_wait))
    results["benchmark_process_peak_rss_gib"] = peak_rss_gib()
    finish_results(results)
    write_results(results, markdown(results), args.results_dir, NAME)
    log(
        f"wrote {args.results_dir / (NAME + '.json')} and .md; "
        f"free disk: {shutil.disk_usage(workdir).free / 2**30:.0f} GiB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
