"""Benchmark: what GRI attention (`swap_attention`) and the feature cache (`deepcache`) buy on the full SD1.5 U-Net.

    python benchmarks/bench_gri_deepcache.py [--latents 32,64] [--repeats N] [--warmup N] [--intervals 3,5]
                                             [--steps 50] [--skip-latency] [--quiet-threshold 0.25]
                                             [--max-wait 300] [--results-dir DIR]

On the real SD1.5 U-Net (built like bench_prune.py: `UNet2DConditionModel.from_config` of the shipped
`compiler/configs/sd15/unet/config.json`, random weights after `torch.manual_seed(0)`), fp32 torch eager on CPU,
batch 2 (classifier-free guidance), 77 tokens:

1. **gri**: `apply_gri(unet, SwapAttentionConfig())` (the `swap_attention` pass with its defaults) on a second
   U-Net built on the meta device whose parameters are *assigned* the baseline's tensors
   (`load_state_dict(..., assign=True)`), so both share one copy of the weights (checked). The resolved blocks,
   window and global pool (`resolve_geometry`) are recorded. `TRITON_INTERPRET` is removed from the environment
   first, so on CPU the op runs `gri_attention_sdpa` (the reference tiling through PyTorch SDPA), as the compiled `torch`
   target would on a CPU.
2. **deepcache**: `SplitUNet(unet, 0)` (branch 0, the pass's default) on the baseline U-Net: one full step
   (`.full`, which also returns the deep features) and one shallow step (`.shallow(..., deep=...)`, the deep
   features computed once beforehand from the same inputs). MACs of the full path and of the shallow path are
   counted as the `feature_cache` pass counts them (full = the U-Net's; shallow =
   full+shallow minus full). Per image: the default PNDM scheduler (shipped config) at `--steps` inference
   steps gives the U-Net call count (51 at 50 steps), `full_steps(calls, CacheSettings(interval=I))` the plan;
   MACs per image = (MACs per batch-1 forward) x calls x 2 (CFG), and the projected U-Net latency per image =
   median(batch-2 call) x calls, before (every call the plain U-Net) and after (full calls at the full step's
   median, the rest at the shallow step's), for each `--intervals` value.
3. MACs (`count_macs`, meta device, batch 1, 77 tokens) at 512x512 and at each timed latent's pixel size.

Latency: one round runs the baseline `unet(...)`, the GRI U-Net, the full step and the shallow step, in that
order, through bench_prune's `time_round_robin` (warm-up, then rounds that count only when other processes used
<= `--quiet-threshold` cores during each run; before each round it waits, within `--max-wait` seconds in all,
for the machine to go quiet; see bench_prune.py). Defaults: latent 32x32 (256 px) 3 rounds, 64x64 (512 px)
2 rounds, 1 warm-up each. Results: benchmarks/results/gri_deepcache.{json,md}; the Markdown table is printed.
About 5 minutes on 2 quiet cores; peak RSS ~5 GB (one U-Net's weights, shared).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_common import finish_results, log, new_results, peak_rss_gib, write_results  # noqa: E402
from bench_prune import (  # noqa: E402
    SEED,
    UNPRUNED,
    QuietWaiter,
    build_teacher,
    storage_ptrs,
    time_round_robin,
)

NAME = "gri_deepcache"
PACKAGES = ("sd-compiler", "torch", "diffusers")
ARCH = "sd15"
RESOLUTION = (512, 512)
BATCH = 2  # classifier-free guidance: one U-Net call per step on a batch of 2
BRANCH = 0  # the feature_cache pass's default
DEFAULT_LATENTS = (32, 64)
DEFAULT_REPEATS = {32: 3, 64: 2}
BASELINE, GRI, FULL, SHALLOW = "baseline", "gri", "deepcache_full", "deepcache_shallow"
# time_round_robin computes speedups against the model named bench_prune.UNPRUNED: the baseline runs under that
# name and is renamed BASELINE in the results.


class _Step:
    """A `SplitUNet` path called like a U-Net (`time_round_robin` calls `model(**inputs, return_dict=False)`)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, sample, timestep, encoder_hidden_states, return_dict=False, **_):
        return self.fn(sample, timestep, encoder_hidden_states)


def build_gri_unet(unet):
    """A second U-Net whose parameters and buffers are `unet`'s tensors (assigned on meta), with GRI applied."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdcompiler.passes.swap_attention import SwapAttentionConfig, apply_gri, resolve_geometry

    with torch.device("meta"):
        twin = UNet2DConditionModel.from_config(unet.config).eval()
    twin.load_state_dict(unet.state_dict(), assign=True, strict=True)
    left_on_meta = [n for n, t in list(twin.named_parameters()) + list(twin.named_buffers()) if t.is_meta]
    if left_on_meta:
        raise SystemExit(f"the GRI U-Net still has meta tensors: {left_on_meta[:5]}")
    if storage_ptrs(twin) != storage_ptrs(unet):
        raise SystemExit("the GRI U-Net does not share the baseline's parameters")
    config = SwapAttentionConfig()
    blocks, window, pool = resolve_geometry(twin, config)
    swapped = apply_gri(twin, config)
    if any(type(p).__name__ == "GRIAttnProcessor" for p in unet.attn_processors.values()):
        raise SystemExit("apply_gri changed the baseline U-Net's processors")
    return twin, {
        "config": config.to_dict(),
        "blocks": blocks,
        "window": window,
        "global_pool": pool,
        "swapped_attentions": swapped,
    }


def unet_calls(steps: int) -> int:
    """U-Net calls per image at `steps` with the shipped SD1.5 scheduler (PNDM adds a warm-up call)."""
    import json

    from diffusers import PNDMScheduler

    from sdcompiler.passes.feature_cache import _timestep_count

    config = json.loads((REPO / "compiler" / "configs" / ARCH / "scheduler" / "scheduler_config.json").read_text())
    return _timestep_count(PNDMScheduler.from_config(config), {"num_inference_steps": steps})


def count_all_macs(unet, gri_unet, resolution: tuple[int, int]) -> dict[str, int]:
    """MACs of one batch-1 forward of each variant at `resolution` (the shallow step as the pass derives it)."""
    from sdcompiler.passes import count_macs
    from sdcompiler.passes.feature_cache import _shallow_only

    full = count_macs(unet, resolution)  # the full step runs the same ops as the U-Net
    with_shallow = count_macs(unet, resolution, forward=_shallow_only(BRANCH))
    return {BASELINE: full, GRI: count_macs(gri_unet, resolution), FULL: full, SHALLOW: with_shallow - full}


def _rename(mapping: dict) -> dict:
    return {(BASELINE if k == UNPRUNED else k): v for k, v in mapping.items()}


def relabel(timing: dict) -> dict:
    """time_round_robin's result with the baseline's key renamed from UNPRUNED to BASELINE."""
    timing["warmup_seconds"] = _rename(timing["warmup_seconds"])
    timing["models"] = _rename(timing["models"])
    for r in timing["rounds"]:
        r["seconds"], r["others_cores"] = _rename(r["seconds"]), _rename(r["others_cores"])
    return timing


def time_latent(unet, gri_unet, latent: int, repeats: int, warmup: int, args, waiter: QuietWaiter) -> dict:
    import torch

    from sdcompiler.passes import unet_example_inputs
    from sdcompiler.passes.feature_cache import SplitUNet

    split = SplitUNet(unet, BRANCH)
    inputs = unet_example_inputs(unet, BATCH, (latent, latent), generator=torch.Generator().manual_seed(SEED))
    with torch.inference_mode():
        _, deep = split.full(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    models = {
        UNPRUNED: unet,
        GRI: gri_unet,
        FULL: _Step(lambda s, t, e: split.full(s, t, e)),
        SHALLOW: _Step(lambda s, t, e: split.shallow(s, t, e, deep=deep)),
    }
    label = f"{ARCH} {latent}x{latent} batch {BATCH}"
    log(
        f"[{label}] timing baseline ('{UNPRUNED}' in these logs), gri, full step, shallow step: {warmup} warm-up, "
        f"{repeats} interleaved rounds, torch threads {torch.get_num_threads()}"
    )
    timing = relabel(time_round_robin(models, inputs, warmup, repeats, label, args.quiet_threshold, waiter))
    timing.update(
        {
            "latent": [latent, latent],
            "batch": BATCH,
            "text_length": 77,
            "torch_threads": torch.get_num_threads(),
            "deep_features_shape": list(deep.shape),
        }
    )
    return timing


def per_image(results: dict) -> list[dict]:
    """MACs per image (at 512x512) and projected U-Net latency per image (per timed latent), for each variant."""
    from sdcompiler.passes.feature_cache import CacheSettings, full_steps

    calls, cfg = results["unet_calls_per_image"], 2
    macs = results["macs"]["512x512"]
    rows = [
        {"variant": BASELINE, "full_calls": calls, "shallow_calls": 0, "macs_per_image": macs[BASELINE] * calls * cfg},
        {"variant": GRI, "full_calls": calls, "shallow_calls": 0, "macs_per_image": macs[GRI] * calls * cfg},
    ]
    for interval in results["settings"]["intervals"]:
        plan = full_steps(calls, CacheSettings(interval=interval, branch=BRANCH))
        n_full = sum(plan)
        rows.append(
            {
                "variant": f"deepcache i{interval}",
                "interval": interval,
                "full_calls": n_full,
                "shallow_calls": calls - n_full,
                "macs_per_image": (macs[FULL] * n_full + macs[SHALLOW] * (calls - n_full)) * cfg,
            }
        )
    before_macs = rows[0]["macs_per_image"]
    for row in rows:
        row["macs_ratio"] = round(row["macs_per_image"] / before_macs, 4)
        row["macs_reduction"] = round(before_macs / row["macs_per_image"], 3)
        row["latency"] = {}
        for size, t in results["latency"].items():
            med = {name: e["median_ms"] / 1000 for name, e in t["models"].items()}
            before = med[BASELINE] * calls
            if row["variant"] == BASELINE:
                after = before
            elif row["variant"] == GRI:
                after = med[GRI] * calls
            else:
                after = med[FULL] * row["full_calls"] + med[SHALLOW] * row["shallow_calls"]
            row["latency"][size] = {
                "before_s": round(before, 1),
                "after_s": round(after, 1),
                "speedup": round(before / after, 3),
            }
    return rows


# --- report -------------------------------------------------------------------------------------------------------


def _tiles(side: int, tile: int) -> int:
    """Tiles (or pooled tokens) of a `side` x `side` map cut into `tile` x `tile` pieces, ragged edges included."""
    return ((side + tile - 1) // tile) ** 2 if tile else 0


def markdown(results: dict) -> str:
    sizes = list(results["latency"])
    macs = results["macs"]
    small = [px for px in macs if px != "512x512"]  # the timed latents' pixel sizes
    head = ["variant", "GMACs @512x512", "MACs ratio"]
    head += [f"MACs ratio @{px}" for px in small]
    for size in sizes:
        head += [f"ms @{size}", f"speedup @{size}"]
    lines = [
        f"## gri_deepcache ({results['date']})",
        "",
        f"Per U-Net call (SD1.5, fp32 torch eager CPU; MACs batch 1, latency batch {BATCH} = CFG):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    labels = {
        BASELINE: "baseline (unet)",
        GRI: "**gri**",
        FULL: "deepcache full step",
        SHALLOW: "**deepcache shallow step**",
    }
    for name, label in labels.items():
        row = [label, f"{macs['512x512'][name] / 1e9:.1f}", f"{macs['512x512'][name] / macs['512x512'][BASELINE]:.3f}"]
        row += [f"{macs[px][name] / macs[px][BASELINE]:.3f}" for px in small]
        for size in sizes:
            t = results["latency"][size]
            e = t["models"][name]
            mark = " (contended)" if t["contended"] else ""
            row += [f"{e['median_ms']:.0f}", "" if name == BASELINE else f"**{e['speedup']:.2f}x**{mark}"]
        lines.append("| " + " | ".join(row) + " |")

    calls = results["unet_calls_per_image"]
    head = ["variant", "full / shallow calls", "TMACs per image @512x512", "MACs ratio"]
    for size in sizes:
        head += [f"U-Net s/image @{size}", f"speedup @{size}"]
    lines += [
        "",
        f"Per image ({results['settings']['steps']} steps = {calls} U-Net calls with the default PNDM "
        f"scheduler, CFG; latency projected as medians x calls):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in results["per_image"]:
        cells = [
            f"**{row['variant']}**" if row["variant"] != BASELINE else BASELINE,
            f"{row['full_calls']} / {row['shallow_calls']}",
            f"{row['macs_per_image'] / 1e12:.1f}",
            f"{row['macs_ratio']:.3f}",
        ]
        for size in sizes:
            lat = row["latency"][size]
            if row["variant"] == BASELINE:
                cells += [f"{lat['before_s']:.0f}", ""]
            else:
                mark = " (contended)" if results["latency"][size]["contended"] else ""
                cells += [f"{lat['before_s']:.0f} -> {lat['after_s']:.0f}", f"**{lat['speedup']:.2f}x**{mark}"]
        lines.append("| " + " | ".join(cells) + " |")

    m, g = results["machine"], results["gri"]
    notes = [
        f"Machine: {m['cpu_model']}, {m['cpu_count']} cores, {m['mem_total_gib']} GiB RAM; "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items())
        + ".",
        "Real SD1.5 U-Net architecture, random weights (seed 0). MACs = FLOPs/2 from `count_macs` (meta device, "
        "batch 1, 77 tokens); `MACs ratio @NxN` is the count at the timed latent's pixel size.",
        f"gri: `swap_attention` defaults: blocks {', '.join(g['blocks'])} ({g['swapped_attentions']} self-attentions), "
        f"window {g['window']}, global pool {g['global_pool']} (a 64x64 map: {_tiles(64, g['window'])} tiles of "
        f"<= {g['window'] ** 2} tokens + {_tiles(64, g['global_pool'])} global tokens; 32x32: "
        f"{_tiles(32, g['window'])} tiles + {_tiles(32, g['global_pool'])} global). Attention implementation on this CPU: {results['gri_attention_impl']}; the baseline uses "
        "diffusers' default processor (`F.scaled_dot_product_attention`).",
        f"deepcache: `SplitUNet(unet, {BRANCH})`; the shallow step reruns conv_in, down_blocks.0 (no downsampler), "
        "up_blocks.3 and the output head from cached deep features; its MACs are the pass's difference "
        "(full+shallow minus full). Plans: `full_steps(calls, CacheSettings(interval=I))` (uniform).",
    ]
    load_parts = []
    for size, t in results["latency"].items():
        which = "quiet" if not t["contended"] and t["quiet_rounds"] else "all"
        load_parts.append(
            f"@{size}: medians of {t['rounds_used']} {which} rounds ({t['quiet_rounds']} of "
            f"{t['rounds_run']} quiet; others used {t['others_cores_during_used_runs']} cores during the "
            f"runs used, {t['others_cores_during_runs']} during all; waited "
            f"{t['waited_for_quiet_s']:.0f} s for quiet)"
        )
    if load_parts:
        notes.append(
            f"Latency: torch eager fp32, `inference_mode`, batch {BATCH}, 77 tokens, torch threads "
            f"{results['torch_threads']}; each round runs baseline, gri, full step, shallow step; speedup = "
            "median(baseline) / median(variant). A round is quiet when other processes used <= "
            f"{results['settings']['quiet_threshold']} cores during each of its runs. " + "; ".join(load_parts) + "."
        )
        contended = [s for s, t in results["latency"].items() if t["contended"]]
        if contended:
            notes.append(
                "**Contended** at " + ", ".join(contended) + " (too few quiet rounds; all rounds used, "
                "absolute times inflated)."
                + (" Likely: " + "; ".join(results["other_busy_processes"]) if results["other_busy_processes"] else "")
            )
    else:
        notes.append("Latency skipped (--skip-latency).")
    notes.append(
        f"Total {results['total_seconds']:.0f} s; peak RSS {results['peak_rss_gib']:.1f} GiB; load average "
        f"{results['load_average']['start']} at start, {results['load_average']['end']} at end."
    )
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--latents",
        type=parse_ints,
        default=DEFAULT_LATENTS,
        help="latent sizes to time (default 32,64 = 256 and 512 px)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds at every latent size (default 3 at 32x32, 2 at 64x64)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="warm-up runs per variant (default 1)")
    parser.add_argument(
        "--intervals",
        type=parse_ints,
        default=(3, 5),
        help="feature-cache intervals to project per image (default 3,5)",
    )
    parser.add_argument("--steps", type=int, default=50, help="inference steps per image (default 50)")
    parser.add_argument("--skip-latency", action="store_true", help="MACs only")
    parser.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.25,
        help="a round counts as quiet when other processes used at most this many cores during "
        "each of its runs (default 0.25)",
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        default=300.0,
        help="seconds in all to wait for other processes to go quiet (default 300; 0 = never)",
    )
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)

    # Under TRITON_INTERPRET=1 the GRI op would run its Triton kernel in the (very slow) interpreter on CPU.
    if os.environ.pop("TRITON_INTERPRET", None) is not None:
        log("TRITON_INTERPRET was set: removed it, so GRI runs its torch reference on CPU")

    import torch

    from sdcompiler.kernels._common import use_triton

    start = time.perf_counter()
    results = new_results(NAME, PACKAGES, torch_threads=torch.get_num_threads())
    impl = (
        "Triton kernel"
        if use_triton(torch.empty(1))
        else "`gri_attention_sdpa` (tiles through F.scaled_dot_product_attention)"
    )
    results.update(
        {
            "settings": {
                "arch": ARCH,
                "batch": BATCH,
                "latents": list(args.latents),
                "repeats": args.repeats,
                "warmup": args.warmup,
                "intervals": list(args.intervals),
                "steps": args.steps,
                "branch": BRANCH,
                "skip_latency": args.skip_latency,
                "quiet_threshold": args.quiet_threshold,
                "max_wait": args.max_wait,
                "seed": SEED,
            },
            "gri_attention_impl": impl,
            "triton_interpret_env": os.environ.get("TRITON_INTERPRET"),
        }
    )

    log(f"building the U-Net from compiler/configs/{ARCH}/unet/config.json (seed {SEED}, fp32)")
    unet, init_seconds = build_teacher(ARCH)
    gri_unet, gri = build_gri_unet(unet)
    results["init_seconds"] = round(init_seconds, 1)
    results["gri"] = gri
    log(
        f"gri: {gri['swapped_attentions']} self-attentions in {', '.join(gri['blocks'])}, window {gri['window']}, "
        f"global pool {gri['global_pool']}; parameters shared with the baseline; attention: {impl}"
    )

    results["unet_calls_per_image"] = unet_calls(args.steps)
    resolutions = [RESOLUTION] + [(8 * n, 8 * n) for n in args.latents if (8 * n, 8 * n) != RESOLUTION]
    results["macs"] = {}
    for res in resolutions:
        results["macs"][f"{res[0]}x{res[1]}"] = macs = count_all_macs(unet, gri_unet, res)
        log(
            f"MACs @{res[0]}x{res[1]}: "
            + ", ".join(f"{n} {v / 1e9:.1f}G ({v / macs[BASELINE]:.3f})" for n, v in macs.items())
        )

    results["latency"] = {}
    if not args.skip_latency:
        waiter = QuietWaiter(args.quiet_threshold, args.max_wait)
        for latent in args.latents:
            repeats = args.repeats or DEFAULT_REPEATS.get(latent, 2)
            results["latency"][f"{latent}x{latent}"] = time_latent(
                unet, gri_unet, latent, repeats, args.warmup, args, waiter
            )
        results["waited_for_quiet_s"] = round(waiter.waited_s, 1)
    results["per_image"] = per_image(results)
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    results["peak_rss_gib"] = peak_rss_gib()
    finish_results(results)
    write_results(results, markdown(results), args.results_dir, NAME)
    log(f"wrote {args.results_dir / (NAME + '.json')} and .md in {results['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
