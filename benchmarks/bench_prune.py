"""Benchmark: what block pruning (BK-SDM) and U-Net slimming (KOALA) buy on the real architectures.

    python benchmarks/bench_prune.py [--arch sd15,sdxl] [--repeats N] [--warmup N] [--skip-latency]
                                     [--latents-sd15 32,64] [--latents-sdxl 32] [--quiet-threshold 0.25]
                                     [--max-wait 600] [--results-dir DIR]

For each preset (bk-base, bk-small, bk-tiny on SD1.5; koala-1b, koala-700m on SDXL), on the real U-Net built
from the shipped config (`compiler/configs/{sd15,sdxl}/unet/config.json`, `UNet2DConditionModel.from_config`,
random weights after `torch.manual_seed(0)`):

1. The preset is applied as the compiler applies it: `resolve_recipe(name)` gives its `PassStep`, and the pass
   runs (`requires`, `run`, `ensures`, as `PassManager` calls them) on a stand-in pipeline (a `.unet` attribute
   and `register_modules(unet=...)`, which `restructure` calls) with a `PassContext` at the arch's native
   resolution. The student's parameters are the teacher's tensors (assigned, not copied) and the pass leaves
   the teacher untouched, so every preset of one arch is applied to the *same* teacher and all students share
   its storage: memory stays one U-Net's (SD1.5 3.4 GB, SDXL 10.3 GB fp32). The script checks both facts
   (teacher unchanged, student storage a subset of the teacher's).
2. Params (exact, `count_params`) and MACs (`count_macs`, meta device, batch 1, 77 tokens) at 512x512 (SD1.5)
   or 1024x1024 (SDXL), both also as ratios to the unpruned U-Net; published params and the relative deviation.
3. CPU latency of one U-Net forward (torch eager fp32, `torch.inference_mode()`, batch 1, 77 tokens, torch's
   default threads), per latent size: warm-up runs, then N rounds that each run the unpruned U-Net and then
   every pruned one (unpruned, bk-base, bk-small, bk-tiny, unpruned, ...), so machine noise hits all alike and
   one unpruned series serves every preset. Reports medians and the speedup median(unpruned) /
   median(pruned); the JSON also holds the median of the per-round ratios. The CPU time other processes took
   during each run is measured (/proc/stat minus our own rusage, as in bench_compile_sd15.py): on 2 cores one
   busy process slows torch's 2 threads up to 6x, so only *quiet* rounds count (see `time_round_robin`),
   and before each round the script waits, within `--max-wait` seconds in all, for the machine to go quiet.

Defaults: SD1.5 at 32x32 (5 repeats, 2 warm-up) and 64x64 (3 repeats, 1 warm-up); SDXL at 32x32 (3 repeats,
1 warm-up). `--repeats` / `--warmup` override every size. Results go to benchmarks/results/prune.{json,md};
the Markdown table is printed. About 4 minutes of measuring on 2 quiet cores, plus any waiting; peak RSS
~10 GB (the SDXL teacher).
"""

from __future__ import annotations

import argparse
import gc
import json
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

PACKAGES = ("sd-compiler", "torch", "diffusers", "accelerate")
SEED = 0
PRESETS = {
    "sd15": ("bk-base", "bk-small", "bk-tiny"),
    "sdxl": ("koala-1b", "koala-700m"),
}
RESOLUTION = {"sd15": (512, 512), "sdxl": (1024, 1024)}
# Published U-Net sizes: BK-SDM (Kim et al., 2023) and KOALA (Lee et al., 2024).
PUBLISHED_PARAMS = {
    "bk-base": 0.58e9,
    "bk-small": 0.49e9,
    "bk-tiny": 0.33e9,
    "koala-1b": 1161e6,
    "koala-700m": 782e6,
}
PUBLISHED_TEXT = {
    "bk-base": "0.58B",
    "bk-small": "0.49B",
    "bk-tiny": "0.33B",
    "koala-1b": "1,161M",
    "koala-700m": "782M",
}
DEFAULT_LATENTS = {"sd15": (32, 64), "sdxl": (32,)}
DEFAULT_REPEATS = {32: 5, 64: 3}  # SD1.5; SDXL uses 3 at every size
UNPRUNED = "unpruned"


class StandInPipe:
    """What the block-pruning passes touch of a diffusers pipeline: `.unet` and `register_modules`."""

    vae_scale_factor = 8

    def __init__(self, unet):
        self.unet = unet

    def register_modules(self, **modules):
        for name, module in modules.items():
            setattr(self, name, module)


def build_teacher(arch: str):
    import torch
    from diffusers import UNet2DConditionModel

    config = json.loads((REPO / "compiler" / "configs" / arch / "unet" / "config.json").read_text())
    torch.manual_seed(SEED)
    start = time.perf_counter()
    unet = UNet2DConditionModel.from_config(config).eval()
    return unet, time.perf_counter() - start


def storage_ptrs(module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def apply_preset(teacher, arch: str, preset: str, cache_dir: Path):
    """Run the preset's pass on a stand-in pipeline whose U-Net is `teacher`; return (student, record)."""
    from sdcompiler.passes import PassContext
    from sdcompiler.recipe import resolve_recipe

    steps = resolve_recipe(preset)
    if len(steps) != 1:
        raise SystemExit(f"preset {preset} resolves to {len(steps)} passes; this benchmark expects one")
    step = steps[0]
    pipe = StandInPipe(teacher)
    ctx = PassContext(arch=arch, macs_resolution=RESOLUTION[arch], cache_dir=cache_dir, seed=SEED, show_progress=False)
    step.pass_.requires(pipe, step.config, ctx)
    start = time.perf_counter()
    metrics = step.pass_.run(pipe, step.config, ctx) or {}
    seconds = time.perf_counter() - start
    step.pass_.ensures(pipe, step.config, ctx)
    student = pipe.unet
    if student is teacher:
        raise SystemExit(f"preset {preset}: the pass did not replace the U-Net")
    student.eval()
    return student, {
        "pass": step.name,
        "config": step.config.to_dict(),
        "pass_seconds": round(seconds, 3),
        "pass_metrics": metrics,
    }


class QuietWaiter:
    """Waits, before each timing round, until other processes leave the cores alone, within a total budget."""

    def __init__(self, threshold: float, budget_s: float):
        self.threshold, self.budget_s, self.waited_s = threshold, budget_s, 0.0

    def wait(self, label: str) -> float:
        """Sample 2 s windows until others use <= threshold cores; return the seconds waited."""
        start = time.perf_counter()
        announced = False
        while self.waited_s + (time.perf_counter() - start) < self.budget_s:
            meter = CpuMeter()
            time.sleep(2.0)
            if meter.stop().get("others_cores", 0.0) <= self.threshold:
                break
            if not announced:
                log(
                    f"[{label}] other processes are busy: waiting for a quiet moment "
                    f"(budget left {self.budget_s - self.waited_s:.0f} s)"
                )
                announced = True
        waited = time.perf_counter() - start
        self.waited_s += waited
        return waited


def others_during_runs(rounds: list[dict]) -> float:
    """Average cores other processes used while the given rounds' runs ran (time-weighted)."""
    total = sum(t for r in rounds for t in r["seconds"].values())
    busy = sum(t * r["others_cores"][n] for r in rounds for n, t in r["seconds"].items())
    return round(busy / total, 2) if total else 0.0


def time_round_robin(
    models: dict, inputs: dict, warmup: int, repeats: int, label: str, quiet_threshold: float, waiter: QuietWaiter
) -> dict:
    """Warm up each model, then rounds running every model once in order; per-model times (s).

    Each run records the cores other processes used meanwhile. A round is *quiet* when no run in it saw more
    than `quiet_threshold` cores of others. Rounds continue until `repeats` quiet rounds are in, or
    2 * `repeats` rounds ran; the medians then use the quiet rounds if there are `repeats` of them, else all
    rounds (and the result is marked contended). On 2 cores, one busy process slows torch's 2 OpenMP threads
    up to 6x, and a round half inside such a burst skews every ratio it feeds.
    """
    import torch

    def timed(unet) -> tuple[float, float]:
        meter = CpuMeter()
        start = time.perf_counter()
        with torch.inference_mode():
            unet(**inputs, return_dict=False)
        seconds = time.perf_counter() - start
        return seconds, meter.stop().get("others_cores", 0.0)

    waited = [waiter.wait(label)]
    warm = {name: [] for name in models}
    for _ in range(warmup):
        for name, unet in models.items():
            warm[name].append(round(timed(unet)[0], 3))
    log(f"[{label}] warm-up: " + ", ".join(f"{n} {v}" for n, v in warm.items()))
    rounds: list[dict] = []
    meter = CpuMeter()
    while sum(r["quiet"] for r in rounds) < repeats and len(rounds) < 2 * repeats:
        waited.append(waiter.wait(label))
        runs = {name: timed(unet) for name, unet in models.items()}
        others = max(load for _, load in runs.values())
        rounds.append(
            {
                "seconds": {n: round(t, 4) for n, (t, _) in runs.items()},
                "others_cores": {n: load for n, (_, load) in runs.items()},
                "quiet": others <= quiet_threshold,
            }
        )
        log(
            f"[{label}] round {len(rounds)} ({'quiet' if rounds[-1]['quiet'] else f'contended: others {others:.2f} cores'}"
            f", {sum(r['quiet'] for r in rounds)}/{repeats} quiet): "
            + ", ".join(f"{n} {t:.3f} s" for n, (t, _) in runs.items())
        )
    cpu_load = meter.stop()  # the whole phase, waits included
    quiet = [r for r in rounds if r["quiet"]]
    used = quiet if len(quiet) >= repeats else rounds
    out = {
        "warmup": warmup,
        "repeats": repeats,
        "quiet_threshold_cores": quiet_threshold,
        "rounds_run": len(rounds),
        "quiet_rounds": len(quiet),
        "rounds_used": len(used),
        "contended": used is rounds and len(quiet) < len(rounds),
        "waited_for_quiet_s": round(sum(waited), 1),
        "warmup_seconds": warm,
        "cpu_load_phase": cpu_load,
        "others_cores_during_runs": others_during_runs(rounds),
        "others_cores_during_used_runs": others_during_runs(used),
        "rounds": rounds,
        "models": {},
    }
    base = [r["seconds"][UNPRUNED] for r in used]
    for name in models:
        series = [r["seconds"][name] for r in used]
        entry = {"median_ms": round(1000 * statistics.median(series), 1), "min_ms": round(1000 * min(series), 1)}
        if name != UNPRUNED:
            entry["speedup"] = round(statistics.median(base) / statistics.median(series), 3)
            entry["speedup_median_of_rounds"] = round(statistics.median(b / t for b, t in zip(base, series)), 3)
            entry["speedup_of_minimums"] = round(min(base) / min(series), 3)
        out["models"][name] = entry
    return out


def bench_arch(arch: str, args, cache_dir: Path, waiter: QuietWaiter) -> dict:
    import torch

    from sdcompiler.passes import count_macs, count_params, unet_example_inputs

    log(f"[{arch}] building the U-Net from compiler/configs/{arch}/unet/config.json (seed {SEED}, fp32)")
    teacher, init_seconds = build_teacher(arch)
    teacher_ptrs = storage_ptrs(teacher)
    resolution = RESOLUTION[arch]
    params0 = count_params(teacher)
    macs0 = count_macs(teacher, resolution)
    log(
        f"[{arch}] unpruned: {params0:,} params, {macs0 / 1e9:.1f} GMACs at {resolution[0]}x{resolution[1]} "
        f"(init {init_seconds:.0f} s)"
    )
    result = {
        "arch": arch,
        "resolution": list(resolution),
        "init_seconds": round(init_seconds, 1),
        "unpruned": {"params": params0, "macs": macs0},
        "presets": {},
        "latency": {},
    }
    models = {UNPRUNED: teacher}
    for preset in PRESETS[arch]:
        student, record = apply_preset(teacher, arch, preset, cache_dir)
        if count_params(teacher) != params0 or storage_ptrs(teacher) != teacher_ptrs:
            raise SystemExit(f"preset {preset} changed the teacher; this benchmark shares one teacher")
        if not storage_ptrs(student) <= teacher_ptrs:
            raise SystemExit(f"preset {preset}: the student does not share the teacher's tensors")
        params, macs = count_params(student), count_macs(student, resolution)
        published = PUBLISHED_PARAMS[preset]
        record.update(
            {
                "params": params,
                "params_ratio": round(params / params0, 4),
                "macs": macs,
                "macs_ratio": round(macs / macs0, 4),
                "published_params": published,
                "published_params_text": PUBLISHED_TEXT[preset],
                "deviation_from_published": round((params - published) / published, 4),
                "student_config": {
                    k: student.config[k]
                    for k in (
                        "layers_per_block",
                        "mid_block_type",
                        "block_out_channels",
                        "transformer_layers_per_block",
                    )
                },
            }
        )
        result["presets"][preset] = record
        models[preset] = student
        log(
            f"[{arch}] {preset}: {params:,} params ({params / params0:.3f}x, published {PUBLISHED_TEXT[preset]}), "
            f"{macs / 1e9:.1f} GMACs ({macs / macs0:.3f}x); pass {record['pass_seconds']} s"
        )

    if not args.skip_latency:
        generator = torch.Generator().manual_seed(SEED)
        for latent in args.latents_sd15 if arch == "sd15" else args.latents_sdxl:
            repeats = args.repeats or (DEFAULT_REPEATS.get(latent, 3) if arch == "sd15" else 3)
            warmup = args.warmup if args.warmup is not None else (2 if arch == "sd15" and latent <= 32 else 1)
            inputs = unet_example_inputs(teacher, 1, (latent, latent), generator=generator)
            label = f"{arch} {latent}x{latent}"
            log(
                f"[{label}] timing {', '.join(models)}: {warmup} warm-up, {repeats} interleaved rounds, "
                f"torch threads {torch.get_num_threads()}"
            )
            timing = time_round_robin(models, inputs, warmup, repeats, label, args.quiet_threshold, waiter)
            timing.update(
                {"latent": [latent, latent], "batch": 1, "text_length": 77, "torch_threads": torch.get_num_threads()}
            )
            # MACs at the timed size: the attention share shrinks with the latent, so the ratio differs.
            macs = {name: count_macs(unet, (8 * latent, 8 * latent)) for name, unet in models.items()}
            for name, entry in timing["models"].items():
                entry["macs"] = macs[name]
                entry["macs_ratio"] = round(macs[name] / macs[UNPRUNED], 4)
            result["latency"][f"{latent}x{latent}"] = timing
    del models, teacher
    gc.collect()
    result["peak_rss_gib_so_far"] = peak_rss_gib()
    return result


# --- report -------------------------------------------------------------------------------------------------------


def _ms(timing: dict | None, name: str) -> str:
    if not timing:
        return "-"
    return f"{timing['models'][UNPRUNED]['median_ms']:.0f} / {timing['models'][name]['median_ms']:.0f}"


def markdown(results: dict) -> str:
    sizes = sorted({key for a in results["archs"].values() for key in a["latency"]}, key=lambda s: int(s.split("x")[0]))
    head = ["preset", "arch", "params", "params ratio", "published", "deviation", "MACs", "MACs ratio"]
    for size in sizes:
        head += [f"MACs ratio @{size}", f"ms unpruned / pruned @{size}", f"speedup @{size}"]
    lines = [f"## prune ({results['date']})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arch, a in results["archs"].items():
        res = "x".join(map(str, a["resolution"]))
        row = [
            "(unpruned)",
            arch,
            f"{a['unpruned']['params'] / 1e6:,.1f}M",
            "1.000",
            "",
            "",
            f"{a['unpruned']['macs'] / 1e9:.1f}G @{res}",
            "1.000",
        ]
        for size in sizes:
            t = a["latency"].get(size)
            row += ["1.000" if t else "-", f"{t['models'][UNPRUNED]['median_ms']:.0f}" if t else "-", ""]
        lines.append("| " + " | ".join(row) + " |")
        for preset, p in a["presets"].items():
            row = [
                f"**{preset}**",
                arch,
                f"{p['params'] / 1e6:,.1f}M",
                f"{p['params_ratio']:.3f}",
                p["published_params_text"],
                f"{100 * p['deviation_from_published']:+.1f}%",
                f"{p['macs'] / 1e9:.1f}G",
                f"{p['macs_ratio']:.3f}",
            ]
            for size in sizes:
                t = a["latency"].get(size)
                mark = " (contended)" if t and t["contended"] else ""
                row += [
                    f"{t['models'][preset]['macs_ratio']:.3f}" if t else "-",
                    _ms(t, preset),
                    f"**{t['models'][preset]['speedup']:.2f}x**{mark}" if t else "-",
                ]
            lines.append("| " + " | ".join(row) + " |")
    m = results["machine"]
    notes = [
        f"Machine: {m['cpu_model']}, {m['cpu_count']} cores, {m['mem_total_gib']} GiB RAM; "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items())
        + ".",
        "Real U-Net architectures with random weights (seed 0); each preset applied by its pass exactly as the "
        "compiler resolves it. Params exact; MACs = FLOPs/2 from `count_macs` (meta device, batch 1, 77 tokens) "
        "at 512x512 (SD1.5) / 1024x1024 (SDXL); `MACs ratio @NxN` is the same count at the timed latent "
        "(pixel size 8N), where attention is a smaller share of the work.",
    ]
    load_parts, contended = [], []
    for arch, a in results["archs"].items():
        for size, t in a["latency"].items():
            which = "quiet" if not t["contended"] and t["quiet_rounds"] else "all"
            load_parts.append(
                f"{arch} @{size}: medians of {t['rounds_used']} {which} rounds "
                f"({t['quiet_rounds']} of {t['rounds_run']} quiet; others used "
                f"{t['others_cores_during_used_runs']} cores during the runs used, "
                f"{t['others_cores_during_runs']} during all; waited "
                f"{t['waited_for_quiet_s']:.0f} s for quiet)"
            )
            if t["contended"]:
                contended.append(
                    f"{arch} @{size} (speedups from minimums: "
                    + ", ".join(f"{n} {e['speedup_of_minimums']:.2f}x" for n, e in t["models"].items() if n != UNPRUNED)
                    + ")"
                )
    if load_parts:
        notes.append(
            "Latency: torch eager fp32, `inference_mode`, batch 1, 77 tokens, torch threads "
            f"{results['torch_threads']}; each round runs the unpruned U-Net then every pruned one; speedup "
            "= median(unpruned) / median(pruned) over the rounds used. A round is quiet when other "
            f"processes used <= {results['settings']['quiet_threshold']} cores during each of its runs; "
            "before each round the script waits (within a budget) for the machine to go quiet. "
            + "; ".join(load_parts)
            + "."
        )
        if contended:
            notes.append(
                "**Contended** (too few quiet rounds, so all rounds were used and absolute times are "
                "inflated): "
                + "; ".join(contended)
                + "."
                + (" Likely: " + "; ".join(results["other_busy_processes"]) if results["other_busy_processes"] else "")
            )
    else:
        notes.append("Latency skipped (--skip-latency).")
    notes.append(
        f"Total {results['total_seconds']:.0f} s; peak RSS {results['peak_rss_gib']:.1f} GiB; load average "
        f"{results['load_average']['start']} at start, {results['load_average']['end']} at end."
    )
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def parse_archs(text: str) -> list[str]:
    archs = [a.strip() for a in text.split(",") if a.strip()]
    unknown = set(archs) - set(PRESETS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown arch(s) {', '.join(sorted(unknown))}; choose from sd15, sdxl")
    return archs


def parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=parse_archs, default=["sd15", "sdxl"], help="sd15,sdxl (default both)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds at every latent size (default: SD1.5 5 at 32x32, 3 at 64x64; SDXL 3)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up runs per model (default: 2 for SD1.5 at 32x32, else 1)"
    )
    parser.add_argument("--skip-latency", action="store_true", help="params and MACs only")
    parser.add_argument(
        "--latents-sd15",
        type=parse_ints,
        default=DEFAULT_LATENTS["sd15"],
        help="SD1.5 latent sizes to time (default 32,64)",
    )
    parser.add_argument(
        "--latents-sdxl",
        type=parse_ints,
        default=DEFAULT_LATENTS["sdxl"],
        help="SDXL latent sizes to time (default 32; 64x64 takes ~18 s per unpruned forward)",
    )
    parser.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.25,
        help="a timing round counts as quiet when other processes used at most this many cores "
        "during each of its runs (default 0.25); up to 2x --repeats rounds run to collect "
        "--repeats quiet ones",
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        default=600.0,
        help="seconds in all to wait, before timing rounds, for other processes to go quiet "
        "(default 600; 0 = never wait)",
    )
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)

    import torch

    start = time.perf_counter()
    results = new_results("prune", PACKAGES, torch_threads=torch.get_num_threads())
    results.update(
        {
            "settings": {
                "arch": args.arch,
                "repeats": args.repeats,
                "warmup": args.warmup,
                "skip_latency": args.skip_latency,
                "latents_sd15": list(args.latents_sd15),
                "latents_sdxl": list(args.latents_sdxl),
                "quiet_threshold": args.quiet_threshold,
                "max_wait": args.max_wait,
                "seed": SEED,
            },
            "archs": {},
        }
    )
    waiter = QuietWaiter(args.quiet_threshold, args.max_wait)
    with tempfile.TemporaryDirectory(prefix="bench_prune_") as tmp:
        for arch in args.arch:
            results["archs"][arch] = bench_arch(arch, args, Path(tmp), waiter)
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    results["waited_for_quiet_s"] = round(waiter.waited_s, 1)
    results["peak_rss_gib"] = peak_rss_gib()
    finish_results(results)
    write_results(results, markdown(results), args.results_dir, "prune")
    log(f"wrote {args.results_dir / 'prune.json'} and .md in {results['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
