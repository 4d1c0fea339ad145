"""Benchmark: the torch target's runtime options end to end on one U-Net call (GPU): fused kernels, CUDA graphs, GRI.

    python benchmarks/bench_torch_target_gpu.py [--latent 64] [--batch 2] [--warmup 5] [--repeats 30] [--out DIR]
                                                [--compile] [--tiny] [--device cuda]

The SD1.5 U-Net architecture (compiler/configs/sd15/unet, random weights, seed 0), fp16, channels-first,
batch `--batch` (2: one classifier-free-guidance step), latent `--latent` (64: 512x512 images), 77 tokens,
one fixed timestep, in one process; each variant is a copy of the same weights, set up as the torch target
sets it up, and timed in turn, rounds interleaved:

- `eager`: the diffusers U-Net as loaded (SDPA attention);
- `fused`: `kernels.lowering.lower_unet` (GroupNorm+SiLU and GEGLU Triton kernels), eager launches;
- `eager+graphs`, `fused+graphs`: the same called through `cuda_graphs.GraphedCallable` (the target's
  `cuda_graphs: true`: one capture per input signature, then replays);
- `gri+fused+graphs`: the `gri` preset's attention swap (default window and pooling; the GRI Triton kernel on
  CUDA) on top;
- with `--compile`: `compile` and `compile+reduce-overhead`, the target's `compile: true` with
  `compile_mode` default / reduce-overhead (inductor's own CUDA graphs) on the diffusers U-Net; the compile
  time of each is logged and recorded (it happens in the warm-up calls).

Per variant: median milliseconds per U-Net call over `--repeats` rounds after `--warmup` (CUDA events around
the call, inputs already on the GPU), the ratio to `eager` in the same rounds, and the output's SQNR vs
`eager` (fused kernels reorder the reductions; GRI changes the function, so its SQNR is a distance, not an
error). Writes torch_target_gpu.{json,md} to `--out` (default benchmarks/results).

Needs torch, Triton and diffusers (the lent GPU machine has no diffusers: `run_gpu_checks.sh` installs the
carried wheel); sd-compiler's modules are imported from this checkout when it is not installed. `--tiny
--device cpu` runs the same code on the tiny test U-Net on a CPU (no graph variants), as a check of the script.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_common import finish_results, import_checkout, log, new_results, write_results  # noqa: E402

TINY = dict(
    block_out_channels=[32, 64],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
    sample_size=16,
)


def build_unet(tiny: bool, device: str, dtype: torch.dtype):
    import diffusers

    config = json.loads((ROOT / "compiler" / "configs" / "sd15" / "unet" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")} | (TINY if tiny else {})
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel.from_config(config).to(device, dtype).eval()


def variants(unet, device: str, compile_modes: tuple[str, ...] = ()) -> dict:
    """name -> callable(sample, timestep, context) -> eps, each on its own copy of `unet`."""
    from sdcompiler.kernels.lowering import lower_unet

    def plain(model):
        return lambda sample, timestep, context: model(sample, timestep, context).sample

    def fused():
        model = copy.deepcopy(unet)
        lower_unet(model)
        return model

    def gri():
        from sdcompiler.passes.swap_attention import SwapAttentionConfig, apply_gri

        model = fused()
        swapped = apply_gri(model, SwapAttentionConfig())
        log(f"gri: {swapped} self-attentions swapped")
        return model

    result = {"eager": plain(unet), "fused": plain(fused())}
    if device == "cuda":
        from sdcompiler.cuda_graphs import GraphedCallable

        result["eager+graphs"] = GraphedCallable(plain(unet))
        result["fused+graphs"] = GraphedCallable(plain(fused()))
        try:
            result["gri+fused+graphs"] = GraphedCallable(plain(gri()))
        except Exception as exc:  # noqa: BLE001  (report and measure the rest)
            log(f"gri variant skipped: {type(exc).__name__}: {exc}")
    else:
        result["gri+fused"] = plain(gri())
    for mode in compile_modes:
        from sdcompiler.cuda_graphs import compiled

        result["compile" if mode == "default" else f"compile+{mode}"] = compiled(plain(copy.deepcopy(unet)), mode)
    return result


def timed_ms(fn, args, device: str) -> tuple[float, torch.Tensor]:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end), out
    begin = time.perf_counter()
    out = fn(*args)
    return (time.perf_counter() - begin) * 1e3, out


def sqnr_db(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    reference, estimate = reference.double(), estimate.double()
    noise = (estimate - reference).pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * torch.log10(reference.pow(2).sum() / noise).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--compile", action="store_true", help="add torch.compile variants (minutes of compiling)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark measures the GPU path (--tiny --device cpu checks the script)")
    import_checkout(with_passes=True)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    unet = build_unet(args.tiny, args.device, dtype)
    latent = TINY["sample_size"] if args.tiny else args.latent
    generator = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(args.batch, 4, latent, latent, generator=generator).to(args.device, dtype),
        torch.tensor(500.0, device=args.device),
        torch.randn(args.batch, 77, unet.config.cross_attention_dim, generator=generator).to(args.device, dtype),
    )
    modes = (("default", "reduce-overhead") if args.device == "cuda" else ("default",)) if args.compile else ()
    calls = variants(unet, args.device, modes)
    times = {name: [] for name in calls}
    outputs, setup_s = {}, {}
    with torch.inference_mode():
        for name, fn in calls.items():
            begin = time.perf_counter()
            for _ in range(args.warmup):
                timed_ms(fn, inputs, args.device)
            setup_s[name] = round(time.perf_counter() - begin, 1)
            log(f"{name}: warm-up {setup_s[name]} s")
            outputs[name] = fn(*inputs).float().cpu()
        for _ in range(args.repeats):  # rounds: every variant once, so drift hits them alike
            for name, fn in calls.items():
                times[name].append(timed_ms(fn, inputs, args.device)[0])
    eager = statistics.median(times["eager"])
    rows = [
        {
            "variant": name,
            "median_ms": round(statistics.median(t), 3),
            "speedup_vs_eager": round(eager / statistics.median(t), 3),
            "sqnr_vs_eager_db": round(sqnr_db(outputs["eager"], outputs[name]), 1),
            "warmup_s": setup_s[name],
        }
        for name, t in times.items()
    ]
    name = "torch_target_gpu" if args.device == "cuda" else "torch_target_cpu_check"
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    results = new_results(
        name,
        ("torch", "triton", "diffusers"),
        device=device,
        shape={
            "batch": args.batch,
            "latent": latent,
            "tokens": 77,
            "dtype": str(dtype),
            "unet": "tiny" if args.tiny else "SD1.5",
        },
        rows=rows,
    )
    finish_results(results)
    table = [
        "| variant | median ms / U-Net call | speedup vs eager | SQNR vs eager (dB) | warm-up s (incl. compile) |",
        "|---|---|---|---|---|",
    ]
    table += [
        f"| {r['variant']} | {r['median_ms']:.3f} | {r['speedup_vs_eager']:.2f}x | {r['sqnr_vs_eager_db']} | "
        f"{r['warmup_s']} |"
        for r in rows
    ]
    print(f"{device}: batch {args.batch}, latent {latent}, {dtype}")
    write_results(results, "\n".join(table), args.out, name)


if __name__ == "__main__":
    main()
