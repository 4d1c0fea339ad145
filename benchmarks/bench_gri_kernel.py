"""GRI attention on the GPU: the fused Triton kernel vs the torch reference of GRI vs full attention (SDPA).

    python benchmarks/bench_gri_kernel.py [--out DIR] [--warmup 10] [--repeats 50]

At Stable Diffusion attention shapes, fp16, batch 2 (classifier-free guidance): SD1.5 level 1 (8 heads x 40,
64 x 64 latent map at 512 px), SDXL-like level 1 (10 heads x 64, 64 x 64 map at 1024 px), and SD1.5 levels 2
and 3 (d = 80 and 160: the kernel's other block configurations); GRI with 16 x 16 windows and 16 global
tokens. Each variant is timed with CUDA events two ways: GPU time per call from CUDA-graph replays (the
kernels alone; ratios and TFLOP/s use it) and eager time per call (launch overhead included), medians over
`--repeats` after `--warmup` calls. Effective TFLOP/s counts the FLOPs the variant needs (`2 * gri_macs` for
GRI, `4 * B * heads * d * N^2` for full attention). Full attention runs `F.scaled_dot_product_attention`
with the flash backend (the default backends where flash cannot run). Writes `gri_kernel.json` and
`gri_kernel.md` to `--out` (default `benchmarks/results`) and prints the Markdown table.

Needs only torch, Triton and the kernel module: when sd-compiler is not installed, `sdcompiler.kernels` is
imported from this checkout (as `tests/gpu/conftest.py` does).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import graph_ms, import_checkout, median_ms  # noqa: E402

# (name, batch, heads, height, width, head_dim); window and global tokens below.
SHAPES = [
    ("SD1.5 level 1 (8 x 40, 64x64)", 2, 8, 64, 64, 40),
    ("SDXL-like level 1 (10 x 64, 64x64)", 2, 10, 64, 64, 64),
    ("SD1.5 level 2 (8 x 80, 32x32)", 2, 8, 32, 32, 80),
    ("SD1.5 level 3 (8 x 160, 16x16)", 2, 8, 16, 16, 160),
]
WINDOW = 16
NUM_GLOBAL = 16


def sdpa_backends(q, k, v) -> tuple[list, str]:
    """SDPA backends for full attention: flash, or every backend where flash cannot run these inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, k, v)
        return [SDPBackend.FLASH_ATTENTION], "flash"
    except RuntimeError:
        return list(SDPBackend), "default"


def bench_shape(gri, name, batch, heads, height, width, head_dim, warmup, repeats) -> dict:
    from torch.nn.attention import sdpa_kernel

    gen = torch.Generator(device="cuda").manual_seed(0)
    n = height * width
    q, k, v = (
        torch.randn(batch, heads, n, head_dim, generator=gen, device="cuda", dtype=torch.float16) for _ in range(3)
    )
    k_global, v_global = (
        torch.randn(batch, heads, NUM_GLOBAL, head_dim, generator=gen, device="cuda", dtype=torch.float16)
        for _ in range(2)
    )
    args = (q, k, v, k_global, v_global, height, width, WINDOW)
    backends, backend_name = sdpa_backends(q, k, v)
    variants = {
        "triton": lambda: gri.gri_attention_triton(*args),
        "reference": lambda: gri.gri_attention_reference(*args),
        "full_sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    gri_flops = 2 * gri.gri_macs(batch, heads, height, width, WINDOW, NUM_GLOBAL, head_dim)
    full_flops = 4 * batch * heads * head_dim * n * n
    row = {
        "name": name,
        "batch": batch,
        "heads": heads,
        "height": height,
        "width": width,
        "head_dim": head_dim,
        "window": WINDOW,
        "num_global": NUM_GLOBAL,
        "dtype": "float16",
        "sdpa_backend": backend_name,
        "gri_gflop": gri_flops / 1e9,
        "full_gflop": full_flops / 1e9,
    }
    with sdpa_kernel(backends):
        for variant, fn in variants.items():
            row[f"{variant}_gpu_ms"] = graph_ms(fn, warmup, repeats, side_calls=3)
            row[f"{variant}_eager_ms"] = median_ms(fn, warmup, repeats)
    for variant, flops in (("triton", gri_flops), ("reference", gri_flops), ("full_sdpa", full_flops)):
        row[f"{variant}_tflops"] = flops / row[f"{variant}_gpu_ms"] / 1e9
    row["reference_over_triton"] = row["reference_gpu_ms"] / row["triton_gpu_ms"]
    row["full_over_triton"] = row["full_sdpa_gpu_ms"] / row["triton_gpu_ms"]
    difference = gri.gri_attention_triton(*args).float() - gri.gri_attention_reference(*args).float()
    row["max_abs_diff_triton_vs_reference"] = difference.abs().max().item()
    return row


def markdown(result: dict) -> str:
    lines = [
        f"# GRI attention kernel ({result['device']})",
        "",
        f"fp16, batch 2, window {WINDOW}, {NUM_GLOBAL} global tokens. torch {result['torch']}, "
        f"Triton {result['triton']}. GPU ms: per call, from CUDA-graph replays of 20 calls (median of "
        f"{result['repeats']} replays); eager ms: one call between CUDA events, launch overhead included "
        f"(median of {result['repeats']} after {result['warmup']} warm-up calls). Ratios and TFLOP/s use GPU ms; "
        "TFLOP/s counts the FLOPs each variant needs (GRI: `2 * gri_macs`; full: `4 B h d N^2`).",
        "",
        "| shape | Triton GRI ms | torch GRI ms | full SDPA ms | torch / Triton | full / Triton "
        "| Triton TFLOP/s | torch TFLOP/s | SDPA TFLOP/s | eager ms (Triton / torch / SDPA) | max abs diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['name']} | {row['triton_gpu_ms']:.4f} | {row['reference_gpu_ms']:.4f} "
            f"| {row['full_sdpa_gpu_ms']:.4f} ({row['sdpa_backend']}) | {row['reference_over_triton']:.2f}x "
            f"| {row['full_over_triton']:.2f}x | {row['triton_tflops']:.1f} | {row['reference_tflops']:.1f} "
            f"| {row['full_sdpa_tflops']:.1f} | {row['triton_eager_ms']:.3f} / {row['reference_eager_ms']:.3f} / "
            f"{row['full_sdpa_eager_ms']:.3f} | {row['max_abs_diff_triton_vs_reference']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gri_kernel: needs a CUDA GPU (the Triton kernel runs on CUDA only); nothing measured.")
        return 1
    import triton

    import_checkout()
    import sdcompiler.kernels.gri_attention as gri

    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": [bench_shape(gri, *shape, args.warmup, args.repeats) for shape in SHAPES],
    }
    table = markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gri_kernel.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "gri_kernel.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
