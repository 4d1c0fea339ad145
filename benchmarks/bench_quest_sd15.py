"""Benchmark: QuEST W4A4 (`quest-w4a4` preset, target "torch") on the full-size SD1.5 U-Net, on this CPU.

    python benchmarks/bench_quest_sd15.py [--workdir DIR] [--calib-prompts 2] [--held-out-prompts 1]
                                          [--calib-steps 4] [--resolution 256] [--search-grid 8]
                                          [--finetune-steps 1,1] [--finetune-batch 2] [--image-steps 10]
                                          [--image-resolution 256] [--skip-compile] [--skip-images]
                                          [--save-images DIR] [--results-dir DIR]

On the full-size SD1.5 checkpoint of bench_compile_sd15.py (real architecture, random weights, cached under
`--workdir`, default benchmarks/.cache; built there when missing):

1. **Compile** `[{"preset": "quest-w4a4", <CPU-sized overrides>}]` with target "torch" into
   `<workdir>/quest-w4a4-sd15`, in a subprocess with a fresh, empty `SDCOMPILER_CACHE_DIR` (the teacher
   trajectories, calibration, range searches, SQNR evaluations and finetuning all run): wall time, CPU time and
   peak RSS of that process (os.wait4), and the time of each phase of the pass (the worker wraps the pass's
   module-level helpers with timers: trajectories, activation statistics, weight-range search, eps SQNR,
   finetuning stages, packing). The fp32 reference is `--recipe none --target torch` in
   `<workdir>/sd15-full-torch` (compiled once, reused). `--skip-compile` reuses the W4A4 artifact.
   The overrides are CPU-sized: the preset's defaults (4 calibration prompts, 2 held-out, 8 steps, grid 16,
   finetuning 20 + 40 steps at batch 4) take hours on 2 cores; the weight-range MSE search alone costs
   ~40 s per grid point on the 860M weights there.
2. **Weight bytes**: the U-Net safetensors file of the packed W4A4 artifact vs the fp32 `none` artifact (and the
   fp16 size implied = fp32 / 2), from the files' sizes; the W4A4 file split by kind of tensor (packed int4 / int8
   codes, per-channel scales and zero points, activation scales, float tensors left as they were); the packed
   layers' share of the U-Net's parameters, from the two files' headers.
3. **Fidelity**: the pass record's `sqnr_rtn_db` / `sqnr_calibrated_db` / `sqnr_finetuned_db` (eps SQNR vs the
   float U-Net on the held-out prompts' trajectory inputs, at `--resolution`).
4. **End to end**: both artifacts, each loaded by `load_compiled(..., device="cpu")` in its own subprocess
   (its own peak RSS), sample the same 2 prompts from the same initial latents (fixed seeds) with the
   checkpoint's scheduler (PNDM) at `--image-steps` steps, guidance 7.5, `--image-resolution` px; PSNR (dB) of
   the W4A4 images vs the fp32 ones, and the SQNR of the final latents. Random weights make the images
   noise-like, so the PSNR is a relative measure of how far the quantized model drifts from the float one over
   a whole sampling run, not an image-quality score. The packed layers run `sdcompiler::w4a4_linear` /
   `w4a4_conv2d`, which on CPU is the integer reference (codes unpacked per call, exact integer sums in
   float64): the per-call U-Net times are recorded but are not a speed measure of W4A4.

Results: benchmarks/results/quest_sd15.{json,md}; the Markdown table is printed. Disk: the fp32 torch artifact
~4.1 GB, the W4A4 artifact ~1.3 GB (U-Net ~0.5 GB; the text encoder and VAE stay fp32).
"""

from __future__ import annotations

import argparse
import json
import math
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
from bench_compile_sd15 import ensure_checkpoint, run_measured  # noqa: E402

NAME = "quest_sd15"
PACKAGES = ("sd-compiler", "torch", "diffusers", "transformers", "accelerate", "safetensors")
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
W4A4_DIR = "quest-w4a4-sd15"
FP32_DIR = "sd15-full-torch"
PROMPTS = (
    "a photograph of an astronaut riding a horse on the moon",
    "a watercolor painting of a lighthouse on a cliff at dawn",
)
SEEDS = (1234, 5678)


# --- workers (run in subprocesses, so each has its own peak RSS) -----------------------------------------------


def _rss_gib() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 2)


def worker_compile(spec: dict) -> None:
    """compile_artifact(checkpoint, recipe, target, out) with the QuEST pass's phases timed."""
    import sdcompiler.passes.quest.pass_ as quest  # the pass looks its phases up in this module
    import sdcompiler.targets.torch_target as torch_target
    from sdcompiler.compile import compile_artifact

    phases: list[dict] = []

    def timed(module, name: str, labels: list[str]) -> None:
        fn = getattr(module, name)
        count = {"n": 0}

        def wrapper(*args, **kwargs):
            i = count["n"]
            count["n"] += 1
            label = labels[i] if i < len(labels) else f"{name} #{i + 1}"
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - start
                phases.append({"phase": label, "seconds": round(seconds, 1), "peak_rss_gib_so_far": _rss_gib()})
                print(
                    f"[worker {time.strftime('%H:%M:%S')}] {label}: {seconds:.1f} s, peak RSS {_rss_gib()} GiB",
                    file=sys.stderr,
                    flush=True,
                )

        setattr(module, name, wrapper)

    timed(
        quest,
        "teacher_trajectories",
        ["teacher trajectories (calibration prompts)", "teacher trajectories (held-out prompts)"],
    )
    timed(quest, "collect_act_stats", ["activation statistics (float model, calibration inputs)"])
    timed(quest, "set_weight_ranges", ["weight ranges: min-max (RTN)", "weight ranges: MSE search"])
    timed(
        quest,
        "set_act_scales",
        ["activation scales: min-max, one for all timesteps (RTN)", "activation scales: MSE search, time-wise"],
    )
    timed(
        quest,
        "eps_sqnr",
        [
            "eps SQNR on held-out inputs: RTN",
            "eps SQNR on held-out inputs: calibrated",
            "eps SQNR on held-out inputs: finetuned",
        ],
    )
    timed(quest, "finetune_stage", ["finetune stage 1 (time_emb_proj)", "finetune stage 2 (FFN + act scales)"])
    timed(torch_target, "pack_quantized", ["pack_quantized (torch target)"])
    start = time.perf_counter()
    compile_artifact(spec["checkpoint"], spec["recipe"], spec["target"], spec["out"], seed=0)
    Path(spec["report"]).write_text(
        json.dumps(
            {
                "phases": phases,
                "compile_artifact_seconds": round(time.perf_counter() - start, 1),
                "peak_rss_gib": _rss_gib(),
            }
        )
    )


def worker_images(spec: dict) -> None:
    """Load an artifact, sample `prompts` from fixed initial latents, save final latents + decoded images."""
    import numpy as np
    import torch

    from sdcompiler.runtime import load_compiled

    start = time.perf_counter()
    pipe = load_compiled(spec["artifact"], device="cpu")
    load_seconds = time.perf_counter() - start
    rss_loaded = _rss_gib()
    components = pipe.components
    unet, calls = components.unet, []

    def timed_unet(*args, **kwargs):
        begin = time.perf_counter()
        out = unet(*args, **kwargs)
        calls.append(time.perf_counter() - begin)
        print(
            f"[worker {time.strftime('%H:%M:%S')}] U-Net call {len(calls)}: {calls[-1]:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        return out

    components.unet = timed_unet
    size = spec["resolution"] // components.vae_scale_factor
    latents = torch.cat(
        [
            torch.randn(1, components.latent_channels, size, size, generator=torch.Generator().manual_seed(seed))
            for seed in spec["seeds"]
        ]
    )
    start = time.perf_counter()
    final = pipe(
        list(spec["prompts"]),
        num_inference_steps=spec["steps"],
        height=spec["resolution"],
        width=spec["resolution"],
        latents=latents,
        output_type="latent",
    ).images
    sampling_seconds = time.perf_counter() - start
    start = time.perf_counter()
    image = components.decode(final / components.scaling_factor)  # as sampling.generate does for "np"
    image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
    decode_seconds = time.perf_counter() - start
    np.savez(spec["out"], latents=final.float().numpy(), images=image)
    Path(spec["report"]).write_text(
        json.dumps(
            {
                "load_seconds": round(load_seconds, 1),
                "sampling_seconds": round(sampling_seconds, 1),
                "unet_calls": len(calls),
                "unet_call_seconds": [round(c, 2) for c in calls],
                "unet_call_median_s": round(statistics.median(calls), 2) if calls else None,
                "decode_seconds": round(decode_seconds, 1),
                "peak_rss_after_load_gib": rss_loaded,
                "peak_rss_gib": _rss_gib(),
                "guidance_scale": pipe.manifest.get("defaults", {}).get("guidance_scale"),
                "scheduler": type(components.scheduler_factory()).__name__,
            }
        )
    )


def run_worker(kind: str, spec: dict, env: dict | None = None) -> dict:
    """Run a worker of this script in a subprocess (measured: wall, CPU, peak RSS); return its report + those."""
    with tempfile.TemporaryDirectory(prefix="quest-report-") as scratch:
        spec = dict(spec, report=str(Path(scratch) / "report.json"))
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)]
        meter = CpuMeter()
        result = run_measured(command, env)
        result["cpu_load"] = meter.stop()
        if result["exit_code"] != 0:
            raise SystemExit(f"{kind} worker failed (exit {result['exit_code']}):\n{result['output_tail']}")
        result["report"] = json.loads(Path(spec["report"]).read_text())
    result.pop("output_tail")
    result["command"] = result["command"][1:3] + [kind, "<spec>"]
    return result


# --- steps --------------------------------------------------------------------------------------------------------


def quest_recipe(args) -> list[dict]:
    stage1, stage2 = args.finetune_steps
    item = {
        "preset": "quest-w4a4",
        "calib_prompts": args.calib_prompts,
        "held_out_prompts": args.held_out_prompts,
        "calib_steps": args.calib_steps,
        "resolution": args.resolution,
        "search_grid": args.search_grid,
        "finetune": stage1 + stage2 > 0,
    }
    if stage1 + stage2 > 0:
        item |= {"stage1_steps": stage1, "stage2_steps": stage2, "batch_size": args.finetune_batch}
    return [item]


def compile_into(checkpoint: Path, out: Path, recipe, label: str, fresh_cache_in: Path) -> dict:
    """Compile in a worker with an empty SDCOMPILER_CACHE_DIR (no calibration data reused)."""
    with tempfile.TemporaryDirectory(prefix="quest-cache-", dir=fresh_cache_in) as cache:
        env = dict(os.environ, SDCOMPILER_QUIET="1", SDCOMPILER_CACHE_DIR=cache)
        log(f"compiling {label} into {out} (empty cache)")
        result = run_worker(
            "compile", {"checkpoint": str(checkpoint), "recipe": recipe, "target": "torch", "out": str(out)}, env
        )
    log(f"compiled {label}: {result['seconds']:.0f} s wall, peak RSS {result['peak_rss_gib']} GiB")
    return result


def is_artifact(path: Path, recipe_name: str | None = None) -> bool:
    manifest = path / "manifest.json"
    if not manifest.exists():
        return False
    data = json.loads(manifest.read_text())
    if data.get("target") != "torch":
        return False
    names = [p["name"] for p in data.get("passes", [])]
    return names == [] if recipe_name is None else names == [recipe_name]


def safetensors_facts(path: Path) -> dict:
    """Per-tensor dtype, shape, element count and bytes from a safetensors header (no tensor data read)."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return {
        name: {
            "dtype": t["dtype"],
            "shape": t["shape"],
            "numel": math.prod(t["shape"]),
            "bytes": t["data_offsets"][1] - t["data_offsets"][0],
        }
        for name, t in header.items()
    }


def weight_facts(fp32_file: Path, w4a4_file: Path) -> dict:
    fp32, packed = safetensors_facts(fp32_file), safetensors_facts(w4a4_file)
    fp32_bytes, w4a4_bytes = fp32_file.stat().st_size, w4a4_file.stat().st_size
    total_params = sum(t["numel"] for t in fp32.values())
    layers = sorted({n.rsplit(".", 1)[0] for n in packed if n.endswith(".weight_packed")})
    by_bits: dict[int, dict] = {}
    for layer in layers:
        weight = fp32[f"{layer}.weight"]
        k = weight["numel"] // weight["shape"][0]
        codes = packed[f"{layer}.weight_packed"]
        if f"{layer}.weight_packed_skip" in packed:  # split decoder input: two halves, each ceil(K_half / 2) bytes
            skip = packed[f"{layer}.weight_packed_skip"]
            codes = {"shape": [codes["shape"][0], codes["shape"][1] + skip["shape"][1]]}
        bits = 4 if codes["shape"][1] < k else 8
        entry = by_bits.setdefault(bits, {"layers": 0, "params": 0})
        entry["layers"] += 1
        entry["params"] += weight["numel"]
    quantized_params = sum(e["params"] for e in by_bits.values())

    kinds = {
        "packed weight codes (uint8)": 0,
        "weight scales + zero points (per output channel)": 0,
        "activation scales (per calibrated timestep)": 0,
        "float tensors kept (bias, norms, embeddings...)": 0,
    }
    for name, t in packed.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("weight_packed"):
            kinds["packed weight codes (uint8)"] += t["bytes"]
        elif leaf in ("w_scale", "w_zero"):
            kinds["weight scales + zero points (per output channel)"] += t["bytes"]
        elif leaf == "scale" or name == "quant_timesteps":
            kinds["activation scales (per calibrated timestep)"] += t["bytes"]
        else:
            kinds["float tensors kept (bias, norms, embeddings...)"] += t["bytes"]
    return {
        "fp32_unet_file_bytes": fp32_bytes,
        "fp16_unet_implied_bytes": fp32_bytes // 2,
        "w4a4_unet_file_bytes": w4a4_bytes,
        "ratio_fp32_over_w4a4": round(fp32_bytes / w4a4_bytes, 2),
        "ratio_fp16_over_w4a4": round(fp32_bytes / 2 / w4a4_bytes, 2),
        "w4a4_bytes_by_kind": kinds,
        "unet_params": total_params,
        "quantized_layers": len(layers),
        "quantized_params": quantized_params,
        "quantized_params_share": round(quantized_params / total_params, 4),
        "quantized_by_weight_bits": {
            str(b): e | {"share": round(e["params"] / total_params, 6)} for b, e in sorted(by_bits.items())
        },
        "fp32_tensors": len(fp32),
        "w4a4_tensors": len(packed),
    }


def images(fp32_dir: Path, w4a4_dir: Path, steps: int, resolution: int, save_dir: Path | None) -> dict:
    import numpy as np

    out: dict = {"prompts": list(PROMPTS), "seeds": list(SEEDS), "steps": steps, "resolution": resolution}
    arrays = {}
    with tempfile.TemporaryDirectory(prefix="quest-images-") as scratch:
        for label, artifact in (("fp32", fp32_dir), ("w4a4", w4a4_dir)):
            log(f"sampling {len(PROMPTS)} prompts with the {label} artifact ({steps} steps, {resolution} px)")
            file = Path(scratch) / f"{label}.npz"
            out[label] = run_worker(
                "images",
                {
                    "artifact": str(artifact),
                    "prompts": list(PROMPTS),
                    "seeds": list(SEEDS),
                    "steps": steps,
                    "resolution": resolution,
                    "out": str(file),
                },
                dict(os.environ, SDCOMPILER_QUIET="1"),
            )
            with np.load(file) as data:
                arrays[label] = {k: data[k].astype(np.float64) for k in data.files}
            log(
                f"{label}: sampling {out[label]['report']['sampling_seconds']} s, "
                f"peak RSS {out[label]['peak_rss_gib']} GiB"
            )
    ref, est = arrays["fp32"], arrays["w4a4"]
    psnr = []
    for i in range(len(PROMPTS)):
        mse = float(((ref["images"][i] - est["images"][i]) ** 2).mean())
        psnr.append(round(10 * math.log10(1.0 / mse), 2) if mse > 0 else float("inf"))
    mse_all = float(((ref["images"] - est["images"]) ** 2).mean())
    noise = float(((ref["latents"] - est["latents"]) ** 2).sum())
    out |= {
        "psnr_db": psnr,
        "psnr_db_all": round(10 * math.log10(1.0 / mse_all), 2) if mse_all > 0 else float("inf"),
        "mean_abs_diff_0_255": round(float(np.abs(ref["images"] - est["images"]).mean()) * 255, 2),
        "latent_sqnr_db": round(10 * math.log10(float((ref["latents"] ** 2).sum()) / noise), 2)
        if noise
        else float("inf"),
        "fp32_image_std": round(float(ref["images"].std()), 4),
    }
    if save_dir is not None:
        from PIL import Image

        save_dir.mkdir(parents=True, exist_ok=True)
        for label, data in arrays.items():
            for i, img in enumerate(data["images"]):
                Image.fromarray((img * 255).round().clip(0, 255).astype(np.uint8)).save(save_dir / f"{label}_{i}.png")
        out["saved_to"] = str(save_dir)
    return out


# --- report -------------------------------------------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB ({n:,} B)"


def markdown(results: dict) -> str:
    m, s, w = results["machine"], results["settings"], results["weights"]
    c, ref = results["compile"]["w4a4"], results["compile"]["fp32"]
    metrics = results["fidelity"]
    stage1, stage2 = s["finetune_steps"]
    rows = [
        ("machine", f"{m['cpu_model']}, {m['cpu_count']} cores, {m['mem_total_gib']} GiB RAM"),
        ("recipe (CPU-sized)", f"`{json.dumps(s['recipe'][0])}`, target torch (fp32 floats)"),
        (
            "calibration",
            f"{s['calib_prompts']} prompts + {s['held_out_prompts']} held-out, {s['calib_steps']} steps "
            f"(= calibrated timesteps), CFG 7.5, {s['resolution']} px, MSE-search grid {s['search_grid']}",
        ),
        (
            "finetuning",
            f"stage 1 {stage1} + stage 2 {stage2} steps, batch {s['finetune_batch']}" if stage1 + stage2 else "off",
        ),
    ]
    if c:
        rows.append(
            (
                "**compile W4A4** (subprocess, empty cache)",
                f"**{c['seconds']:.0f} s** wall ({c['seconds'] / 60:.1f} min), peak RSS **{c['peak_rss_gib']:.2f} "
                f"GiB**, {c['cpu_seconds']:.0f} CPU-s; others used {c['cpu_load'].get('others_cores', '?')} "
                f"cores on average",
            )
        )
        for p in c["report"]["phases"]:
            rows.append(
                (f"&nbsp;&nbsp;{p['phase']}", f"{p['seconds']:.1f} s (peak RSS so far {p['peak_rss_gib_so_far']} GiB)")
            )
        rows.append(("&nbsp;&nbsp;pass total (manifest)", f"{metrics['pass_seconds']:.1f} s"))
    else:
        rows.append(("compile W4A4", "skipped (--skip-compile: reused the artifact)"))
    rows.append(
        (
            "compile fp32 reference (`none`, torch)",
            f"{ref['seconds']:.0f} s, peak RSS {ref['peak_rss_gib']:.2f} GiB" if ref else "cached (reused)",
        )
    )
    rows += [
        ("U-Net file, fp32 (`none`)", _gib(w["fp32_unet_file_bytes"])),
        ("U-Net, fp16 (implied: fp32 / 2)", _gib(w["fp16_unet_implied_bytes"])),
        ("**U-Net file, packed W4A4**", f"**{_gib(w['w4a4_unet_file_bytes'])}**"),
        (
            "**ratio fp32 / W4A4, fp16 / W4A4**",
            f"**{w['ratio_fp32_over_w4a4']:.2f}x, {w['ratio_fp16_over_w4a4']:.2f}x**",
        ),
    ]
    rows += [(f"&nbsp;&nbsp;W4A4 file: {k}", _gib(v)) for k, v in w["w4a4_bytes_by_kind"].items()]
    bits = ", ".join(
        f"{e['layers']} at {b}-bit weights ({e['params']:,} params, {100 * e['params'] / w['unet_params']:.3g}%)"
        for b, e in w["quantized_by_weight_bits"].items()
    )
    rows += [
        ("packed (quantized) layers", f"{w['quantized_layers']}: {bits}"),
        (
            "packed layers' share of U-Net params",
            f"{100 * w['quantized_params_share']:.2f}% ({w['quantized_params']:,} of {w['unet_params']:,})",
        ),
        ("eps SQNR, RTN (min-max, one scale for all t)", f"{metrics.get('sqnr_rtn_db', float('nan')):.2f} dB"),
        ("eps SQNR, calibrated (MSE search, time-wise)", f"{metrics.get('sqnr_calibrated_db', float('nan')):.2f} dB"),
        (
            "eps SQNR, finetuned",
            f"{metrics['sqnr_finetuned_db']:.2f} dB" if "sqnr_finetuned_db" in metrics else "n/a (finetuning off)",
        ),
    ]
    img = results.get("images")
    if img:
        f32, w4 = img["fp32"], img["w4a4"]
        rows += [
            (
                f"**image PSNR W4A4 vs fp32** ({len(img['prompts'])} prompts, seeds {img['seeds']}, "
                f"{img['steps']} steps {f32['report']['scheduler']}, CFG {f32['report']['guidance_scale']}, "
                f"{img['resolution']} px)",
                f"**{', '.join(f'{p:.2f}' for p in img['psnr_db'])} dB** (both: {img['psnr_db_all']:.2f} dB); "
                f"mean abs diff {img['mean_abs_diff_0_255']:.2f} / 255",
            ),
            ("final latents SQNR W4A4 vs fp32", f"{img['latent_sqnr_db']:.2f} dB"),
            (
                "sampling, fp32 artifact (torch eager)",
                f"{f32['report']['sampling_seconds']:.0f} s, U-Net call median "
                f"{f32['report']['unet_call_median_s']:.1f} s (batch {2 * len(img['prompts'])}), peak RSS "
                f"{f32['peak_rss_gib']:.2f} GiB",
            ),
            (
                "sampling, W4A4 artifact (CPU integer reference)",
                f"{w4['report']['sampling_seconds']:.0f} s, U-Net call "
                f"median {w4['report']['unet_call_median_s']:.1f} s, peak RSS {w4['peak_rss_gib']:.2f} GiB "
                f"(after load {w4['report']['peak_rss_after_load_gib']:.2f})",
            ),
        ]
    rows += [
        ("benchmark process peak RSS", f"{results['benchmark_process_peak_rss_gib']:.2f} GiB"),
        (
            "load average (1/5/15 min) at start / end",
            f"{results['load_average']['start']} / {results['load_average']['end']}",
        ),
        (
            "total wall time of this benchmark",
            f"{results['total_seconds']:.0f} s ({results['total_seconds'] / 60:.1f} min)",
        ),
        ("versions", ", ".join(f"{k} {v}" for k, v in results["versions"].items())),
    ]
    lines = [f"## quest_sd15 ({results['date']})", "", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    notes = [
        f"U-Net: {w['unet_params']:,} params (real SD1.5 architecture, random weights). eps SQNR is over the "
        "held-out prompts' trajectory inputs at the calibration resolution (the pass's own metric).",
        "Random weights make the images noise-like: the PSNR measures how far a whole W4A4 sampling run drifts from "
        "the fp32 one from the same latents, not image quality. Sampling visits timesteps that were not calibrated; "
        "the packed layers use the nearest calibrated timestep's activation scales.",
        "The W4A4 U-Net runs the packed integer path on CPU through the reference implementation (codes unpacked per "
        "call, exact float64 sums): its times are not a W4A4 speed measure (see bench_w4a4_kernel.py on GPU). "
        "Attention q/k/v and softmax probabilities are fake-quantized (8 bit) in float in both the pass and the "
        "artifact.",
    ]
    others = max(
        [x.get("cpu_load", {}).get("others_cores", 0.0) for x in (c, ref) if x]
        + (
            [img["fp32"]["cpu_load"].get("others_cores", 0.0), img["w4a4"]["cpu_load"].get("others_cores", 0.0)]
            if img
            else []
        )
    )
    if others >= 0.25:
        notes.append(
            f"Other processes kept up to {others:.2f} of the {m['cpu_count']} cores busy during a phase, so "
            "the absolute times are inflated."
            + (" Likely: " + "; ".join(results["other_busy_processes"]) if results["other_busy_processes"] else "")
        )
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


# --- main ---------------------------------------------------------------------------------------------------------


def parse_finetune(text: str) -> tuple[int, int]:
    """`1,2` -> stage 1 and stage 2 steps; `0` or `off` -> no finetuning; `N` -> N steps in each stage."""
    text = text.strip().lower()
    if text in ("off", "0", "none", ""):
        return (0, 0)
    parts = [int(x) for x in text.split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 0:
        raise argparse.ArgumentTypeError("--finetune-steps takes 'S1,S2', 'N' or 'off'")
    return parts[0], parts[1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        {"compile": worker_compile, "images": worker_images}[argv[1]](json.loads(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=HERE / ".cache",
        help="checkpoint and artifacts cache (default benchmarks/.cache)",
    )
    parser.add_argument("--calib-prompts", type=int, default=2)
    parser.add_argument("--held-out-prompts", type=int, default=1)
    parser.add_argument("--calib-steps", type=int, default=4, help="sampling steps = calibrated timesteps")
    parser.add_argument("--resolution", type=int, default=256, help="calibration resolution, px")
    parser.add_argument(
        "--search-grid",
        type=int,
        default=8,
        help="shrink factors tried by the range searches (preset: 16; ~40 s per point on 2 cores)",
    )
    parser.add_argument(
        "--finetune-steps",
        type=parse_finetune,
        default=(1, 1),
        help="finetuning steps 'S1,S2' (stage 1, stage 2), 'N' (both) or 'off' (default 1,1)",
    )
    parser.add_argument("--finetune-batch", type=int, default=2)
    parser.add_argument("--image-steps", type=int, default=10)
    parser.add_argument("--image-resolution", type=int, default=256)
    parser.add_argument("--skip-compile", action="store_true", help="reuse the W4A4 artifact in --workdir")
    parser.add_argument("--skip-images", action="store_true", help="no end-to-end sampling")
    parser.add_argument("--save-images", type=Path, default=None, help="also write the images as PNGs here")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)

    begin = time.perf_counter()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    recipe = quest_recipe(args)
    results = new_results(NAME, PACKAGES)
    results["settings"] = {
        "recipe": recipe,
        "calib_prompts": args.calib_prompts,
        "held_out_prompts": args.held_out_prompts,
        "calib_steps": args.calib_steps,
        "resolution": args.resolution,
        "search_grid": args.search_grid,
        "finetune_steps": list(args.finetune_steps),
        "finetune_batch": args.finetune_batch,
        "image_steps": args.image_steps,
        "image_resolution": args.image_resolution,
        "skip_compile": args.skip_compile,
    }
    checkpoint, built = ensure_checkpoint(workdir)
    results["checkpoint"] = {"path": str(checkpoint), "build": built}

    fp32_dir, w4a4_dir = workdir / FP32_DIR, workdir / W4A4_DIR
    results["compile"] = {"fp32": None, "w4a4": None}
    if not is_artifact(fp32_dir):
        results["compile"]["fp32"] = compile_into(checkpoint, fp32_dir, "none", "the fp32 reference (none)", workdir)
    if args.skip_compile and is_artifact(w4a4_dir, "quest_w4a4"):
        log(f"--skip-compile: reusing {w4a4_dir}")
    else:
        results["compile"]["w4a4"] = compile_into(checkpoint, w4a4_dir, recipe, "quest-w4a4", workdir)

    manifest = json.loads((w4a4_dir / "manifest.json").read_text())
    record = manifest["passes"][0]
    results["artifact"] = {
        "w4a4": str(w4a4_dir),
        "fp32": str(fp32_dir),
        "w4a4_recipe": manifest["recipe"],
        "w4a4_lowering_stages": manifest["lowering"]["stages"],
    }
    results["fidelity"] = dict(record["metrics"]) | {"pass_seconds": record["seconds"], "config": record["config"]}
    results["weights"] = weight_facts(fp32_dir / UNET_FILE, w4a4_dir / UNET_FILE)
    if not args.skip_images:
        results["images"] = images(fp32_dir, w4a4_dir, args.image_steps, args.image_resolution, args.save_images)
    results["benchmark_process_peak_rss_gib"] = peak_rss_gib()
    results["total_seconds"] = round(time.perf_counter() - begin, 1)
    finish_results(results)
    write_results(results, markdown(results), args.results_dir, NAME)
    log(
        f"wrote {args.results_dir / (NAME + '.json')} and .md in {results['total_seconds']:.0f} s; free disk: "
        f"{shutil.disk_usage(workdir).free / 2**30:.0f} GiB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
