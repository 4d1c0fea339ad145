"""Benchmark: `int8` / `fp8` with target torch on the full-size SD1.5 U-Net (CPU): compile, size, speed, fidelity.

    python benchmarks/bench_torch_lowp_sd15.py [--workdir DIR] [--repeats N] [--warmup N] [--threads 1]
                                               [--quiet-threshold 0.25] [--max-wait 300] [--results-dir DIR]

On the full-size SD1.5 checkpoint (real architecture, random weights, seed 0; built and cached under `--workdir`,
default benchmarks/.cache, by bench_cache.py), three torch artifacts, each compiled once by the CLI in a
subprocess with an empty cache (`none`: fp32; `int8` and `fp8`: the ptq pass's modelopt backend, calibrated on
the teacher's own trajectories, deployed as `torch._int_mm` / `torch._scaled_mm` layers):

1. compile: wall time, CPU time and peak RSS of the compile process, the pass's eps SQNR (of modelopt's
   fake-quantized U-Net, the simulation), and the `quantize_layers` stage's record (layers, the kernel each runs
   on CPU and on CUDA, the share of the U-Net's MACs at 512x512 that runs in low precision);
2. size: the U-Net's safetensors file vs the fp32 artifact's;
3. speed: the loaded U-Nets (`load_compiled(...).components.modules["unet"]`) on one input (32x32 latent, batch 2:
   one CFG step, 77 tokens), in this process: `--warmup` calls each, then rounds of one call per model until
   `--repeats` quiet rounds (other processes used at most `--quiet-threshold` cores) or twice as many ran;
   medians and the ratio to fp32 in the same rounds. On CPU this measures torch's own int8 / fp8 GEMMs
   (`_int_mm` runs oneDNN's int8 kernels; `_scaled_mm` on CPU upcasts), not a GPU's;
4. fidelity: the deployed U-Nets' eps SQNR vs the fp32 one on that input.

Results: benchmarks/results/torch_lowp_sd15.{json,md}. Needs ~5 GB of disk under `--workdir` and ~12 GB RAM.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_cache import ensure_artifact, ensure_checkpoint  # noqa: E402
from bench_common import finish_results, log, new_results, peak_rss_gib, write_results  # noqa: E402
from bench_int8_sd15 import _rounds  # noqa: E402
from bench_prune import QuietWaiter  # noqa: E402

NAME = "torch_lowp_sd15"
PACKAGES = ("torch", "diffusers", "nvidia-modelopt", "sd-compiler")
LATENT, BATCH, TEXT_LENGTH, TIMESTEP = 32, 2, 77, 500
VARIANTS = ("fp32", "int8", "fp8")
RECIPES = {"fp32": "none", "int8": "int8", "fp8": "fp8"}
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def artifact_record(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    stage = next((s for s in manifest["lowering"]["stages"] if s["name"] == "quantize_layers"), None)
    ptq = next((p for p in manifest["passes"] if p["name"] == "ptq"), None)
    return {
        "unet_file_bytes": (folder / UNET_FILE).stat().st_size,
        "quantize_layers": stage and {"seconds": stage["seconds"], **stage["results"]},
        "ptq": ptq and {"seconds": ptq["seconds"], "metrics": ptq["metrics"]},
    }


def time_unets(artifacts: dict[str, Path], args) -> dict:
    import torch

    from sdcompiler import load_compiled
    from sdcompiler.passes.training import sqnr_db

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(BATCH, 4, LATENT, LATENT, generator=generator)
    hidden = torch.randn(BATCH, TEXT_LENGTH, 768, generator=generator)
    timestep = torch.full((BATCH,), TIMESTEP)
    unets = {}
    for name, folder in artifacts.items():
        log(f"loading the {name} artifact")
        unets[name] = load_compiled(folder).components.modules["unet"]

    def call(unet):
        with torch.inference_mode():
            return unet(sample, timestep, hidden, return_dict=False)[0]

    outputs = {name: call(unet) for name, unet in unets.items()}
    models = {name: (lambda u=unet: call(u)) for name, unet in unets.items()}
    timing = _rounds(models, args, f"{args.threads} thread(s)", QuietWaiter(args.quiet_threshold, args.max_wait))
    medians = timing["median_s"]
    timing["speedup_over_fp32"] = {n: round(medians["fp32"] / medians[n], 3) for n in VARIANTS}
    timing["sqnr_vs_fp32_db"] = {n: round(sqnr_db(outputs["fp32"], outputs[n]), 2) for n in VARIANTS if n != "fp32"}
    timing.update(latent=[LATENT, LATENT], batch=BATCH, text_length=TEXT_LENGTH, threads=args.threads)
    return timing


def markdown(results: dict) -> str:
    m, unet = results["machine"], results["unet"]
    fp32_bytes = results["artifacts"]["fp32"]["unet_file_bytes"]
    lines = [
        "# int8 / fp8 with target torch, full SD1.5 U-Net (random weights), CPU",
        "",
        f"{results['date']}; {m.get('cpu_model', '?')}, {m.get('cpu_count', '?')} cores; torch {results['versions'].get('torch')}; "
        f"U-Net call at a {LATENT}x{LATENT} latent, batch {BATCH} (one CFG step), {unet['threads']} thread(s), "
        f"median of {unet['rounds_used']} rounds{' (contended: not enough quiet rounds)' if unet['contended'] else ''}.",
        "",
        "| variant | U-Net call (s) | vs fp32 | eps SQNR vs fp32 (dB) | pass SQNR, simulation (dB) | U-Net file | "
        "layers (conv / linear) | MACs in low precision | compile (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in VARIANTS:
        art, build = results["artifacts"][name], results["builds"][name]
        stage, ptq = art["quantize_layers"], art["ptq"]
        layers = f"{stage['layers'].get('conv', 0)} / {stage['layers'].get('linear', 0)}" if stage else "-"
        share = f"{100 * stage['low_precision_macs_share']:.1f}%" if stage else "-"
        simulated = f"{ptq['metrics']['sqnr_db']:.2f}" if ptq else "-"
        size = f"{art['unet_file_bytes'] / 2**20:.0f} MiB ({art['unet_file_bytes'] / fp32_bytes:.3f}x)"
        compile_s = f"{build.get('seconds', '?')}{' (cached build)' if build.get('cached') else ''}"
        lines.append(
            f"| {name} | {unet['median_s'][name]:.3f} | {unet['speedup_over_fp32'][name]:.3f}x | "
            f"{unet['sqnr_vs_fp32_db'].get(name, '-')} | {simulated} | {size} | {layers} | {share} | {compile_s} |"
        )
    kernels = results["artifacts"]["int8"]["quantize_layers"]["kernels"]
    lines += [
        "",
        f"Kernels per layer (int8): CPU {kernels['cpu']}; CUDA {kernels['cuda']}. The MAC share counts one U-Net "
        "forward at 512x512 (attention's own matmuls, norms and the float layers make the rest).",
        "Two SQNRs, two inputs: 'eps SQNR vs fp32' is the deployed U-Net's on the timing input (random latents and "
        "text embeddings, far from the calibrated ranges); 'pass SQNR' is the pass's, of modelopt's simulation on "
        "held-out teacher trajectories (what the calibration saw the like of).",
        f"Other processes used {min(r['others_cores'] for r in unet['rounds']):.2f}-"
        f"{max(r['others_cores'] for r in unet['rounds']):.2f} of the cores during the timed rounds "
        "(the ratios come from the same rounds; busy neighbours inflate the seconds).",
        "Compile: the CLI in a subprocess with an empty cache (teacher trajectories, calibration, SQNR measure, "
        "save). CPU timings show torch's CPU int8 / fp8 paths, not GPU speed: the GPU rows are issue 13's "
        "bench_gpu_e2e.",
    ]
    return "\n".join(lines) + "\n"


def rewrite_markdown(results_dir: Path) -> None:
    """Regenerate the Markdown from the stored JSON (after a change to `markdown`)."""
    results = json.loads((results_dir / f"{NAME}.json").read_text())
    (results_dir / f"{NAME}.md").write_text(markdown(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache")
    parser.add_argument("--repeats", type=int, default=5, help="quiet rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up calls per model (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--quiet-threshold", type=float, default=0.25)
    parser.add_argument("--max-wait", type=float, default=300, help="total seconds to wait for quiet moments")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    results = new_results(NAME, PACKAGES)
    results["settings"] = {k: v for k, v in vars(args).items() if k not in ("workdir", "results_dir")}
    checkpoint, built = ensure_checkpoint(workdir, "full")
    results["checkpoint"] = {"path": str(checkpoint), "build": built}
    artifacts, results["builds"] = {}, {}
    for name in VARIANTS:
        artifacts[name], results["builds"][name] = ensure_artifact(checkpoint, RECIPES[name], "torch", workdir)
    results["artifacts"] = {name: artifact_record(folder) for name, folder in artifacts.items()}
    results["unet"] = time_unets(artifacts, args)
    results["benchmark_process_peak_rss_gib"] = peak_rss_gib()
    finish_results(results)
    write_results(results, markdown(results), args.results_dir, NAME)
    log(f"free disk: {shutil.disk_usage(workdir).free / 2**30:.0f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
