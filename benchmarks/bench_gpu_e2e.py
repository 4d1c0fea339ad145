"""Benchmark: end-to-end text-to-image on a GPU, diffusers' pipelines against the torch target's artifacts.

    python benchmarks/bench_gpu_e2e.py [--rows a,b,...] [--archs sd15,sdxl] [--batches 1,4] [--steps 30]
                                       [--warmup 2] [--repeats 3] [--training untrained|preset]
                                       [--calibration preset|quick] [--peer-mode max-autotune]
                                       [--background-compile] [--time-budget S] [--work DIR] [--out DIR]
                                       [--tiny] [--device cuda|cpu]

Per architecture (SD1.5 at 512x512, SDXL at 1024x1024; `--tiny`: the test checkpoints at their native
128x128), a checkpoint with random weights is written (`sdcompiler.testing.make_checkpoint`, seed 0), and every
selected row generates `--batches` images per call with CFG 7.5 and `--steps` steps (30), fp16 (fp32 on CPU),
from the same initial latents and prompt, so each row's images can be compared with the baseline's (PSNR).

Rows (`--rows`; `all` for every one; rows not selected stay in the output as "not run (not selected)", rows
that cannot run as "skipped: why", rows that raised as "failed: error"):

- `diffusers-sdpa`: diffusers' own pipeline, eager, SDPA attention: the baseline every ratio is against;
- `diffusers-compile`: the same with its U-Net under `torch.compile(mode=--peer-mode)` (channels-last, as
  diffusers' guide does): the peer users pick;
- `torch-eager`, `torch-graphs-fused`, `torch-compile`: `compile_pipeline(ckpt, "none", "torch")` loaded with
  the target's run-time options: eager / CUDA graphs + fused Triton kernels / `compile` (mode --compile-mode);
- `bk-small`, `deepcache`, `gri`, `fp8`, `int8`: that preset compiled for the torch target, run with CUDA graphs
  + fused kernels (the best fp16 runtime; graphs apply on CUDA only); bk-small is structure only (no distill);
- `lcm` (4 steps, guidance 1), `cfg-distill` (guidance 1: one U-Net call per step), `quest-w4a4`,
  `quest-w4a8` (packed integer weights): training recipes. With `--training untrained` (the default: their
  training takes hours at full size) the preset runs with a budget of one step / no finetuning and the rows are
  marked "untrained: speed only" (their PSNR measures nothing). `--calibration quick` calibrates fp8 / int8 on
  one prompt x 2 steps (marked "quick calibration": the same kernels, other scales).

Rows run in the order `--rows` names them, the baseline first; `--time-budget` skips rows not started by then;
`--background-compile` compiles the artifacts (CPU work) in a second process while the diffusers rows run on the
GPU; artifacts and checkpoints are kept in `--work` and reused by a later run.

Per row and batch: median ms per image over `--repeats` calls after `--warmup` (the first warm-up call holds
torch.compile's compile and the CUDA-graph captures: `first_call_s`; the artifact's compile time is
`artifact_compile_s`); U-Net calls per second from the median interval between step callbacks of one warm-up
call (synchronized: a step is one U-Net call, CFG batched, plus the scheduler step); the U-Net's MACs
(`sdcompiler.passes.count_macs` on the row's U-Net, else the source U-Net's: same layers) -> achieved TFLOP/s
and its share of the bf16 `torch.mm` rate measured in the same run; peak GPU memory (max allocated from the
load); PSNR of the first timed call's images vs the baseline's. A reference section times the bf16 matmul
(8192^3) and `torch._int_mm` vs fp16 `F.linear` at the W4A4 FFN shapes of SD1.5 at batch 8 with CFG (the
realistic ceiling of the W4A4 GEMM). Results are written after every row (a run cut by a timeout keeps what it
measured) to `--out`/gpu_e2e.{json,md} (`gpu_e2e_cpu_check` with `--device cpu`).

Needs torch, diffusers, transformers and, for fp8 / int8, nvidia-modelopt: the lent GPU machine has no diffusers
and transformers 5: `benchmarks/gpu_wheels.sh` downloads the pinned wheels that `run_gpu_checks.sh` installs.
`--tiny --device cpu` runs the same code on the tiny checkpoints, as a check of the script.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_common import import_checkout, log, machine, median_ms, versions  # noqa: E402
from bench_w4a4_kernel import sd15_shapes  # noqa: E402

PROMPT = "a red cube on a wooden table, studio light"
PACKAGES = (
    "torch",
    "triton",
    "diffusers",
    "transformers",
    "tokenizers",
    "huggingface-hub",
    "nvidia-modelopt",
    "safetensors",
    "accelerate",
    "peft",
)
BEST = {"cuda_graphs": True, "fused_kernels": True, "compile": False}
EAGER = {"cuda_graphs": False, "fused_kernels": False, "compile": False}


@dataclass(frozen=True)
class Row:
    """One variant: a diffusers pipeline (`recipe` None) or a torch-target artifact of `recipe`."""

    what: str
    recipe: str | None = None
    runtime: dict[str, Any] = field(default_factory=dict)  # load_compiled options
    peer_compile: bool = False  # diffusers: torch.compile the U-Net
    untrained: dict[str, Any] | None = None  # preset overrides for --training untrained (one step, no finetuning)
    steps: int | None = None  # fixed step count (lcm)
    guidance: float | None = 7.5  # None: the artifact's default (distilled rows: 1.0)
    needs: str | None = None  # a module the row imports (its absence skips the row)
    quick: dict[str, Any] | None = None  # preset overrides for --calibration quick (a smaller calibration set)


_ONE_STEP_LCM = dict(steps=1, batch_size=1, num_prompts=1, held_out_prompts=1, teacher_steps=1, reference_steps=1)
_ONE_STEP_CFG = dict(steps=1, batch_size=1, num_prompts=1, held_out_prompts=1, teacher_steps=1, image_steps=1)
_QUICK_CALIBRATION = dict(calib_prompts=1, held_out_prompts=1, calib_steps=2)
_NO_FINETUNE = dict(finetune=False, calib_prompts=1, held_out_prompts=1, calib_steps=2, search_grid=4)

ROWS: dict[str, Row] = {
    "diffusers-sdpa": Row("diffusers pipeline, eager, SDPA (baseline)"),
    "diffusers-compile": Row("diffusers pipeline, U-Net under torch.compile", peer_compile=True),
    "torch-eager": Row("torch target fp16, eager", "none", EAGER),
    "torch-graphs-fused": Row("torch target fp16 + CUDA graphs + fused kernels", "none", BEST),
    "torch-compile": Row("torch target fp16 + torch.compile", "none", {"compile": True, "cuda_graphs": False}),
    "bk-small": Row("bk-small (blocks removed, structure only) + graphs + fused", "bk-small", BEST),
    "deepcache": Row("deepcache (interval 3) + graphs + fused", "deepcache", BEST),
    "gri": Row("GRI attention + graphs + fused", "gri", BEST),
    "lcm": Row(
        "LCM (4 steps, guidance 1) + graphs + fused", "lcm", BEST, untrained=_ONE_STEP_LCM, steps=4, guidance=None
    ),
    "cfg-distill": Row(
        "CFG distilled (one call per step) + graphs + fused",
        "cfg-distill",
        BEST,
        untrained=_ONE_STEP_CFG,
        guidance=None,
    ),
    "fp8": Row("ptq fp8 (E4M3, _scaled_mm) + graphs + fused", "fp8", BEST, needs="modelopt", quick=_QUICK_CALIBRATION),
    "int8": Row("ptq int8 (_int_mm) + graphs + fused", "int8", BEST, needs="modelopt", quick=_QUICK_CALIBRATION),
    "quest-w4a4": Row("QuEST W4A4, packed + graphs + fused", "quest-w4a4", BEST, untrained=_NO_FINETUNE),
    "quest-w4a8": Row("QuEST W4A8, packed + graphs + fused", "quest-w4a8", BEST, untrained=_NO_FINETUNE),
}
BASELINE = "diffusers-sdpa"
OUR_FP16 = ("torch-eager", "torch-graphs-fused", "torch-compile")
RESOLUTION = {"sd15": 512, "sdxl": 1024}


# --- timing helpers -----------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def sig(value: float, digits: int = 4) -> float:
    """`value` rounded to `digits` significant digits (a slow CPU check's rates stay non-zero)."""
    return float(f"{value:.{digits}g}")


def reference_rates(device: str, tiny: bool) -> dict[str, Any]:
    """The dense matmul rate of this device (bf16 on CUDA) and _int_mm vs fp16 F.linear at the W4A4 FFN shapes."""
    n = 8192 if device == "cuda" else 256
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lhs, rhs = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    ms = median_ms(lambda: torch.mm(lhs, rhs), 3, 10, device)
    out: dict[str, Any] = {
        "matmul": {"n": n, "dtype": str(dtype), "ms": round(ms, 4), "tflops": sig(2 * n**3 / ms / 1e9)}
    }
    gemms = []
    half = torch.float16 if device == "cuda" else torch.float32
    for layer, m, k, n_out in sd15_shapes(batch=8):  # batch 8 with CFG: serving batch 4
        if not layer.startswith("ffn"):
            continue
        if tiny:  # a check of the code on CPU, not a measurement
            m, k, n_out = m // 64, max(32, k // 8), max(32, n_out // 8)
        x, w = torch.randn(m, k, device=device).to(half), torch.randn(n_out, k, device=device).to(half)
        xq = torch.randint(-8, 8, (m, k), dtype=torch.int8, device=device)
        wq = torch.randint(-8, 8, (k, n_out), dtype=torch.int8, device=device)
        fp = median_ms(lambda: torch.nn.functional.linear(x, w), 3, 10, device)
        i8 = median_ms(lambda: torch._int_mm(xq, wq), 3, 10, device)
        flop = 2 * m * k * n_out
        gemms.append(
            {
                "layer": layer,
                "m": m,
                "k": k,
                "n": n_out,
                "linear_ms": round(fp, 4),
                "linear_tflops": sig(flop / fp / 1e9),
                "int_mm_ms": round(i8, 4),
                "int_mm_tops": sig(flop / i8 / 1e9),
                "int_mm_speedup": round(fp / i8, 3),
            }
        )
    out["int_mm_vs_linear"] = {"linear_dtype": str(half), "shapes": "SD1.5 512px FFN, batch 8 (M = 8 x tokens)"}
    out["int_mm_vs_linear"]["rows"] = gemms
    return out


# --- building the pipelines ----------------------------------------------------------------------------------------


def checkpoint(work: Path, arch: str, tiny: bool) -> Path:
    from sdcompiler.testing import make_checkpoint

    path = work / f"ckpt-{arch}-{'tiny' if tiny else 'full'}"
    begin = time.perf_counter()
    make_checkpoint(path, arch, "tiny" if tiny else "full")  # returns at once when already written
    log(f"{arch} checkpoint: {time.perf_counter() - begin:.1f} s")
    return path


def artifact_folder(row: Row, work: Path, arch: str, args) -> Path:
    variant = f"{args.training}-{args.calibration}" if row.untrained or row.quick else "preset"
    return work / f"art-{arch}-{'tiny' if args.tiny else 'full'}-{row.recipe}-{variant}-{args.device}"


def compile_row(row: Row, ckpt: Path, work: Path, arch: str, args) -> float:
    """Compile `row`'s artifact (its preset, or the untrained / quick variant) for the torch target; seconds."""
    from sdcompiler.compile import compile_artifact

    recipe: Any = row.recipe
    if row.untrained is not None and args.training == "untrained":
        recipe = [{"preset": row.recipe, **row.untrained}]
    if row.quick is not None and args.calibration == "quick":
        recipe = [{"preset": row.recipe, **row.quick}]
    folder = artifact_folder(row, work, arch, args)
    shutil.rmtree(folder, ignore_errors=True)
    begin = time.perf_counter()
    precision = "fp16" if args.device == "cuda" else "fp32"
    compile_artifact(ckpt, recipe, "torch", folder, target_options={"precision": precision}, show_progress=False)
    seconds = round(time.perf_counter() - begin, 1)
    log(f"{folder.name}: artifact compiled in {seconds} s")
    return seconds


def compile_only(rows: list[str], ckpt: Path, arch: str, args) -> None:
    """--compile-only (the background process): compile the artifacts of `rows` in order, recording the times."""
    record = args.work / "compile_times.json"
    for name in rows:
        row = ROWS[name]
        folder = artifact_folder(row, args.work, arch, args) if row.recipe else None
        if folder is None or (folder / "manifest.json").exists() or missing_module(row.needs):
            continue
        try:
            seconds = compile_row(row, ckpt, args.work, arch, args)
        except Exception:  # noqa: BLE001  (the main process compiles it again and reports the error)
            traceback.print_exc()
            continue
        times = json.loads(record.read_text()) if record.exists() else {}
        record.write_text(json.dumps(times | {folder.name: seconds}))


def start_background(rows: list[str], arch: str, args):
    """A process compiling the rows' artifacts (CPU work: passes, calibration, saving) while the diffusers rows
    run on the GPU; None when no row needs one."""
    import subprocess

    if not any(ROWS[r].recipe for r in rows):
        return None
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--compile-only",
        "--archs",
        arch,
        "--rows",
        ",".join(rows),
    ]
    command += ["--training", args.training, "--calibration", args.calibration, "--work", str(args.work)]
    command += ["--device", args.device] + (["--tiny"] if args.tiny else [])
    return subprocess.Popen(command)


def build(row: Row, ckpt: Path, work: Path, arch: str, args) -> tuple[Any, torch.nn.Module, dict[str, Any]]:
    """(pipeline, its U-Net module, setup record) for `row`."""
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    setup: dict[str, Any] = {}
    if row.recipe is None:
        import diffusers

        begin = time.perf_counter()
        pipe = diffusers.DiffusionPipeline.from_pretrained(ckpt, torch_dtype=dtype).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        unet = pipe.unet
        setup["attention_processor"] = type(next(iter(unet.attn_processors.values()))).__name__
        if row.peer_compile:
            pipe.unet = torch.compile(unet.to(memory_format=torch.channels_last), mode=args.peer_mode)
            setup["compile_mode"] = args.peer_mode
        setup["load_s"] = round(time.perf_counter() - begin, 1)
        return pipe, unet, setup
    from sdcompiler.runtime import load_compiled

    folder = artifact_folder(row, work, arch, args)
    if not (folder / "manifest.json").exists() and args.background is not None:
        log(f"waiting for the background compile ({folder.name})")
        while not (folder / "manifest.json").exists() and args.background.poll() is None:
            time.sleep(0.5)  # it compiles the rows in run order; if it failed on this one, it compiles here
    times = json.loads((work / "compile_times.json").read_text()) if (work / "compile_times.json").exists() else {}
    if (folder / "manifest.json").exists():  # compiled in the background, or by an earlier run
        setup["artifact_compile_s"] = times.get(folder.name, "cached")
        if folder.name in times:
            setup["artifact_compiled"] = "in a background process, beside the rows before this one"
    else:
        setup["artifact_compile_s"] = compile_row(row, ckpt, work, arch, args)
    options = dict(row.runtime)
    if options.get("compile"):
        options["compile_mode"] = args.compile_mode
    begin = time.perf_counter()
    pipe = load_compiled(folder, device=args.device, options=options, verify=False)
    pipe.set_progress_bar_config(disable=True)
    setup["load_s"] = round(time.perf_counter() - begin, 1)
    setup["runtime_options"] = options
    setup["artifact"] = folder.name
    return pipe, pipe.unet, setup


def unet_macs(unet: torch.nn.Module, source_macs: int, resolution: int, vae_scale: int) -> tuple[int, str]:
    from sdcompiler.passes import count_macs

    try:
        return count_macs(unet, (resolution, resolution), vae_scale), "this row's U-Net"
    except Exception as exc:  # noqa: BLE001  (a module that does not run on meta: same layers as the source)
        return source_macs, f"the source U-Net's ({type(exc).__name__} counting this one)"


# --- one measurement -----------------------------------------------------------------------------------------------


def measure(pipe, row: Row, batch: int, latents: torch.Tensor, args, resolution: int) -> dict[str, Any]:
    """Warm-up calls (the first one timed on its own, the last one with synchronized step callbacks), then
    `args.repeats` timed calls; the first timed call's images are kept for PSNR."""
    steps = row.steps or args.steps
    stamps: list[float] = []

    def stamp(pipe_, i, t, tensors):
        sync(args.device)
        stamps.append(time.perf_counter())
        return tensors

    def call(callback=None) -> Any:
        kwargs = dict(prompt=[PROMPT] * batch, num_inference_steps=steps, height=resolution, width=resolution)
        kwargs |= dict(latents=latents.clone(), output_type="np", callback_on_step_end=callback)
        if row.guidance is not None:
            kwargs["guidance_scale"] = row.guidance
        sync(args.device)
        begin = time.perf_counter()
        with torch.inference_mode():
            images = pipe(**kwargs).images
        sync(args.device)
        return time.perf_counter() - begin, images

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first_s, _ = call()
    for i in range(1, args.warmup):
        call(stamp if i == args.warmup - 1 else None)
    if args.warmup < 2:
        call(stamp)
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    totals, images = [], None
    for _ in range(args.repeats):
        seconds, out = call()
        totals.append(seconds)
        images = out if images is None else images
    record = {
        "steps": steps,
        "guidance_scale": row.guidance if row.guidance is not None else "artifact default",
        "first_call_s": round(first_s, 2),
        "ms_per_call": round(statistics.median(totals) * 1e3, 2),
        "ms_per_image": round(statistics.median(totals) * 1e3 / batch, 2),
        "calls_ms": [round(t * 1e3, 1) for t in totals],
        "unet_calls": len(stamps),  # per pipeline call: one per step callback (PNDM runs steps + 1)
        "unet_calls_per_s": round(1 / statistics.median(intervals), 2) if intervals else None,
    }
    if args.device == "cuda":
        record["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return record | {"_images": images}


def psnr_db(reference, estimate) -> float:
    import numpy as np

    mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(estimate, np.float64)) ** 2))
    return float("inf") if mse == 0 else round(10 * np.log10(1.0 / mse), 2)


# --- the run ---------------------------------------------------------------------------------------------------------


def selected_rows(text: str) -> list[str]:
    names = list(ROWS) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {', '.join(unknown)}; choose from {', '.join(ROWS)} (or all)")
    return sorted(dict.fromkeys(names), key=lambda n: n != BASELINE)  # run order as given, the baseline first


def missing_module(name: str | None) -> str | None:
    import importlib.util

    return name if name and importlib.util.find_spec(name) is None else None


def device_description(device: str) -> dict[str, Any]:
    if device != "cuda":
        return {"device": "cpu"}
    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(),
        "compute_capability": f"{props.major}.{props.minor}",
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="all", help=f"comma-separated, of: {', '.join(ROWS)}; or all")
    parser.add_argument("--archs", default="sd15,sdxl")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--training", choices=("untrained", "preset"), default="untrained")
    parser.add_argument(
        "--calibration", choices=("preset", "quick"), default="preset", help="fp8 / int8: quick = 1 prompt, 2 steps"
    )
    parser.add_argument("--peer-mode", default="max-autotune", help="torch.compile mode of diffusers-compile")
    parser.add_argument("--compile-mode", default="max-autotune", help="compile_mode of torch-compile")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds; rows not started by then are skipped (not the baseline)",
    )
    parser.add_argument(
        "--background-compile",
        action="store_true",
        help="compile the artifacts in a second process while the diffusers rows run (run them first)",
    )
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cpu-compile", action="store_true", help="run the torch.compile rows on CPU too")
    parser.add_argument("--reference", choices=("on", "off"), default="on", help="the matmul / _int_mm timings")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdc-gpu-e2e"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark measures the GPU path (--tiny --device cpu checks the script)")
    started = time.perf_counter()
    import_checkout(with_passes=True)
    rows = selected_rows(args.rows)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    args.work.mkdir(parents=True, exist_ok=True)
    name = "gpu_e2e" if args.device == "cuda" else "gpu_e2e_cpu_check"
    results: dict[str, Any] = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine() | device_description(args.device),
        "versions": versions(PACKAGES),
        "settings": {
            "archs": archs,
            "batches": batches,
            "steps": args.steps,
            "guidance_scale": 7.5,
            "dtype": "fp16" if args.device == "cuda" else "fp32",
            "unets": "tiny test checkpoints" if args.tiny else "full architectures, random weights (seed 0)",
            "resolution": {a: 128 if args.tiny else RESOLUTION[a] for a in archs},
            "warmup": args.warmup,
            "repeats": args.repeats,
            "training": args.training,
            "calibration": args.calibration,
            "peer_mode": args.peer_mode,
            "compile_mode": args.compile_mode,
            "selected_rows": rows,
        },
        "reference": None,
        "rows": [],
    }
    args.background = None
    if args.reference == "on" and not args.compile_only:
        results["reference"] = reference_rates(args.device, args.tiny)
        log(f"matmul: {results['reference']['matmul']['tflops']} TFLOP/s")
    matmul_tflops = (results["reference"] or {}).get("matmul", {}).get("tflops")
    for arch in archs:
        resolution = 128 if args.tiny else RESOLUTION[arch]
        entries = {
            (r, b): {
                "row": r,
                "arch": arch,
                "batch": b,
                "what": ROWS[r].what,
                "status": "not finished (the run ended first: a timeout?)",
            }
            for r in ROWS
            for b in batches
        }
        results["rows"].extend(entries.values())
        for (r, _), entry in entries.items():
            if r not in rows:
                entry["status"] = "not run (not selected)"
        ckpt = checkpoint(args.work, arch, args.tiny)
        if args.compile_only:
            compile_only(rows, ckpt, arch, args)
            continue
        args.background = start_background(rows, arch, args) if args.background_compile else None
        dtype = torch.float16 if args.device == "cuda" else torch.float32
        baseline_images: dict[int, Any] = {}
        baseline_ms: dict[int, float] = {}
        source_macs = None
        for r in rows:
            row = ROWS[r]
            marks = []
            if row.untrained is not None and args.training == "untrained":
                marks.append("untrained: speed only")
            if row.quick is not None and args.calibration == "quick":
                marks.append("quick calibration")
            if row.steps is not None:
                marks.append(f"{row.steps} steps")
            if row.recipe == "bk-small":
                marks.append("structure only: speed only")
            for b in batches:
                entries[(r, b)]["marks"] = marks
            spent = time.perf_counter() - started
            reason = None
            compiles = row.peer_compile or row.runtime.get("compile")
            if r != BASELINE and args.time_budget is not None and spent > args.time_budget:
                reason = f"time budget ({args.time_budget:.0f} s) spent after {spent:.0f} s"
            elif compiles and args.device != "cuda" and not args.cpu_compile:
                reason = "torch.compile rows run on CUDA (on CPU: minutes of inductor compile; --cpu-compile)"
            elif missing_module(row.needs):
                reason = f"needs {row.needs} (not installed)"
            if reason:
                for b in batches:
                    entries[(r, b)]["status"] = f"skipped: {reason}"
                write(results, args.out, name, matmul_tflops)
                continue
            log(f"== {arch} {r}")
            pipe = unet = None
            try:
                pipe, unet, setup = build(row, ckpt, args.work, arch, args)
                vae_config = json.loads((ckpt / "vae" / "config.json").read_text())
                vae_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
                if source_macs is None:
                    from diffusers import UNet2DConditionModel

                    with torch.device("meta"):
                        source = UNet2DConditionModel.from_config(
                            json.loads((ckpt / "unet" / "config.json").read_text())
                        )
                    source_macs, _ = unet_macs(source, 0, resolution, vae_scale)
                macs, macs_from = unet_macs(unet, source_macs, resolution, vae_scale)
                for b in batches:
                    entry = entries[(r, b)]
                    entry |= {"setup": setup, "macs_per_unet_image": macs, "macs_from": macs_from}
                    generator = torch.Generator().manual_seed(1000 + b)
                    latents = torch.randn(b, 4, resolution // vae_scale, resolution // vae_scale, generator=generator)
                    # diffusers samples on the device; the torch target's loop keeps latents on the host (its
                    # U-Net wrapper moves them each call): each gets them where its own sampling makes them
                    latents = latents.to(args.device, dtype) if row.recipe is None else latents
                    record = measure(pipe, row, b, latents, args, resolution)
                    images = record.pop("_images")
                    entry |= record
                    entry["status"] = "ok"
                    cfg = 2 if (row.guidance or 0) > 1 else 1  # CFG: one U-Net call of 2 x batch per step
                    if r == "deepcache":
                        entry["unet_tflops"] = None
                        entry["unet_tflops_note"] = "n/a: most calls run only the shallow blocks"
                    elif record["unet_calls_per_s"]:
                        tflops = 2 * macs * b * cfg * record["unet_calls_per_s"] / 1e12
                        entry["unet_tflops"] = sig(tflops)
                        if matmul_tflops:
                            entry["share_of_matmul_rate"] = sig(tflops / matmul_tflops)
                    if r == BASELINE:
                        baseline_images[b], baseline_ms[b] = images, record["ms_per_image"]
                    if b in baseline_images:
                        entry["psnr_db_vs_baseline"] = psnr_db(baseline_images[b], images)
                        entry["speedup_vs_baseline"] = round(baseline_ms[b] / record["ms_per_image"], 3)
                    log(f"{r} batch {b}: {record['ms_per_image']} ms/image, {record['unet_calls_per_s']} U-Net calls/s")
                    write(results, args.out, name, matmul_tflops)
            except Exception as exc:  # noqa: BLE001  (report the row, measure the rest)
                traceback.print_exc()
                message = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
                for b in batches:
                    if entries[(r, b)].get("status") != "ok":
                        entries[(r, b)]["status"] = f"failed: {message}"
            finally:
                pipe = unet = None  # this row's weights, graphs and compiled code go before the next row loads
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                torch._dynamo.reset()
            write(results, args.out, name, matmul_tflops)
        if args.background is not None:
            args.background.wait()
    if args.compile_only:
        return
    results["wall_s"] = round(time.perf_counter() - started, 1)
    write(results, args.out, name, matmul_tflops)
    print((args.out / f"{name}.md").read_text())


# --- output ---------------------------------------------------------------------------------------------------------


def goals(rows: list[dict]) -> list[str]:
    """Issue 13's end-to-end goals, each with its measured value (or why it is missing)."""

    def ok(r, b=1):
        return [x for x in rows if x["arch"] == "sd15" and x["batch"] == b and x["row"] == r and x["status"] == "ok"]

    lines = []
    ours = [x for r in OUR_FP16 for x in ok(r)]
    if ours:
        best = max(ours, key=lambda x: x["unet_calls_per_s"] or 0)
        value = best["unet_calls_per_s"]
        lines.append(
            f"- our best fp16 SD1.5 row >= 100 U-Net it/s (512px, CFG, batch 1): {best['row']} {value} it/s: "
            + ("met" if value and value >= 100 else "not met")
        )
    else:
        lines.append("- our best fp16 SD1.5 row >= 100 U-Net it/s: not measured (no torch-* row ran on sd15 batch 1)")
    fp8, peer = ok("fp8"), ok("diffusers-compile")
    if fp8 and peer:
        ratio = peer[0]["ms_per_image"] / fp8[0]["ms_per_image"]
        lines.append(
            f"- fp8 >= 1.3x the torch.compile peer per image (SD1.5 512px, batch 1): {ratio:.3f}x: "
            + ("met" if ratio >= 1.3 else "not met")
        )
    else:
        lines.append("- fp8 >= 1.3x the torch.compile peer: not measured (fp8 or diffusers-compile did not run)")
    lines.append("- W4A4 GEMM >= 1.0x cuBLAS fp16 at batch-8 FFN shapes: see w4a4_kernel.md (bench_w4a4_kernel.py)")
    return lines


def fmt(value, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec and isinstance(value, (int, float)) else str(value)


def seconds(value) -> str:
    return f"{value} s" if isinstance(value, (int, float)) else str(value)


def markdown(results: dict, matmul_tflops) -> str:
    m, s = results["machine"], results["settings"]
    lines = [
        f"# End-to-end text-to-image: {m.get('device')} ({results['date']})",
        "",
        f"Machine: {m.get('device')} (compute capability {m.get('compute_capability', '-')}, "
        f"{m.get('gpu_memory_gib', '-')} GiB, CUDA {m.get('cuda', '-')}), CPU {m['cpu_model']} x {m['cpu_count']}, "
        f"Python {m['python']}. Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".",
        "",
        f"Settings: {s['unets']}, {s['dtype']}, CFG {s['guidance_scale']}, {s['steps']} steps, "
        f"resolution {s['resolution']}, batches {s['batches']}, {s['warmup']} warm-up + {s['repeats']} timed calls "
        f"(medians), training recipes {s['training']}, peer compile mode {s['peer_mode']}, torch-compile mode "
        f"{s['compile_mode']}.",
        "",
    ]
    ref = results.get("reference")
    if ref:
        mm = ref["matmul"]
        lines += [f"Reference: {mm['dtype']} torch.mm {mm['n']}^3: {mm['tflops']} TFLOP/s ({mm['ms']} ms).", ""]
        lines += [
            "| GEMM (M x K -> N) | F.linear ms | TFLOP/s | torch._int_mm ms | TOPS | int8 speed-up |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {g['layer']} {g['m']}x{g['k']}->{g['n']} | {g['linear_ms']} | {g['linear_tflops']} | "
            f"{g['int_mm_ms']} | {g['int_mm_tops']} | {g['int_mm_speedup']}x |"
            for g in ref["int_mm_vs_linear"]["rows"]
        ]
        lines.append("")
    if results["rows"]:
        lines += ["## Goals (issue 13)", "", *goals(results["rows"]), ""]
    for arch in s["archs"]:
        for b in s["batches"]:
            rows = [r for r in results["rows"] if r["arch"] == arch and r["batch"] == b]
            if not rows:
                continue
            lines += [
                f"## {arch}, batch {b}",
                "",
                "| row | status | steps (U-Net calls) | ms / image | vs baseline | U-Net calls/s | U-Net TFLOP/s | "
                "share of matmul rate | peak GPU GiB | PSNR vs baseline (dB) |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in rows:
                status = r.get("status", "pending") + "".join(f"; {k}" for k in r.get("marks", []))
                share = r.get("share_of_matmul_rate")
                lines.append(
                    f"| {r['row']} | {status} | {fmt(r.get('steps'))} ({fmt(r.get('unet_calls'))}) | {fmt(r.get('ms_per_image'))} | "
                    f"{fmt(r.get('speedup_vs_baseline'), '.3f')}{'x' if r.get('speedup_vs_baseline') else ''} | "
                    f"{fmt(r.get('unet_calls_per_s'))} | {fmt(r.get('unet_tflops'))} | "
                    f"{fmt(None if share is None else f'{share:.1%}')} | {fmt(r.get('peak_gpu_mem_gib'))} | "
                    f"{fmt(r.get('psnr_db_vs_baseline'))} |"
                )
            lines.append("")
    lines += ["## Setup times (artifact compile; load; first call = torch.compile / CUDA-graph capture)", ""]
    for r in results["rows"]:
        if r.get("status") == "ok":
            setup = r.get("setup", {})
            lines.append(
                f"- {r['arch']} {r['row']} batch {r['batch']}: artifact compile "
                f"{seconds(setup.get('artifact_compile_s', 'n/a (diffusers)'))}, load {seconds(setup.get('load_s'))}, "
                f"first call {seconds(r['first_call_s'])}"
            )
    if "wall_s" in results:
        lines += ["", f"Whole run: {results['wall_s']} s."]
    return "\n".join(lines) + "\n"


def write(results: dict, out: Path, name: str, matmul_tflops) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown(results, matmul_tflops))


if __name__ == "__main__":
    main()
