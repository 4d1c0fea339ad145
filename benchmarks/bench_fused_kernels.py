"""Benchmark: the fused GroupNorm+SiLU and GEGLU Triton kernels against eager PyTorch, at SD1.5 U-Net shapes.

    python benchmarks/bench_fused_kernels.py [--warmup 10] [--repeats 100] [--out DIR]

GPU only (exits with a message without CUDA). Needs only torch, Triton and the kernel modules: when
sd-compiler is not installed, `sdcompiler.kernels` is imported from this checkout (as tests/gpu/conftest.py
does), so it runs on a machine without diffusers.

Shapes: SD1.5 at 512x512 (64x64 latent), batch 2 (classifier-free guidance), fp16:

- GroupNorm(32) + SiLU, every (channels, latent size) a ResNet block of the U-Net normalizes (the up blocks see
  the concatenated skip channels, e.g. 960 = 30 per group), in NCHW and channels_last: the fused op
  (`sdcompiler::group_norm_silu`) vs eager `F.silu(F.group_norm(x, 32, w, b))`. (Eager CUDA GroupNorm makes
  channels_last inputs contiguous first, and returns NCHW.)
- GEGLU after the projection, (2, tokens, 2 * inner) for each attention resolution: the fused op
  (`sdcompiler::geglu`) vs eager `a, b = h.chunk(2, -1); a * F.gelu(b)`.

Device time (the "ms" columns, speedup and GB/s): 20 calls captured in a CUDA graph, the median of `--repeats`
replays (after `--warmup`) timed with CUDA events, divided by 20; this is what a graph-captured or compiled
pipeline pays. At these sizes one eager call is bound by host-side launch overhead (the custom-op dispatch and
two Triton launches cost more CPU time than the kernels take on the GPU), so the JSON also records the median
single call (`*_call_ms`, CUDA events around one call). GB/s is the *effective* bandwidth: the bytes a perfect
kernel must move (read the input once, write the output once) divided by the time; both columns use the same
byte count, so their ratio is the speedup. Writes
`fused_kernels.json` and `fused_kernels.md` to `--out` (default benchmarks/results) and prints the table and
the GPU name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_common import (  # noqa: E402
    finish_results,
    graph_ms,
    import_checkout,
    log,
    median_ms,
    new_results,
    write_results,
)

# (channels, latent side) of the GroupNorm+SiLU inputs in SD1.5's U-Net at 512x512.
GROUP_NORM_SHAPES = [
    (320, 64),
    (640, 64),
    (960, 64),
    (640, 32),
    (960, 32),
    (1280, 32),
    (1920, 32),
    (1280, 16),
    (2560, 16),
    (1280, 8),
    (2560, 8),
]
# (tokens, inner) of the GEGLU inputs: one per attention resolution (inner = 4 x channels).
GEGLU_SHAPES = [(4096, 1280), (1024, 2560), (256, 5120), (64, 5120)]
BATCH, GROUPS, DTYPE = 2, 32, torch.float16
GRAPH_CALLS = 20


def compare(name, shape, layout, fused, eager, moved_bytes, warmup, repeats) -> dict:
    max_diff = (fused().float() - eager().float()).abs().max().item()
    fused_ms, eager_ms = graph_ms(fused, warmup, repeats, GRAPH_CALLS), graph_ms(eager, warmup, repeats, GRAPH_CALLS)
    row = {
        "op": name,
        "shape": list(shape),
        "layout": layout,
        "fused_ms": round(fused_ms, 4),
        "eager_ms": round(eager_ms, 4),
        "speedup": round(eager_ms / fused_ms, 2),
        "fused_gbps": round(moved_bytes / fused_ms / 1e6, 1),
        "eager_gbps": round(moved_bytes / eager_ms / 1e6, 1),
        "fused_call_ms": round(median_ms(fused, warmup, repeats), 4),
        "eager_call_ms": round(median_ms(eager, warmup, repeats), 4),
        "max_abs_diff": max_diff,
    }
    log(f"{name} {shape} {layout}: fused {fused_ms:.4f} ms, eager {eager_ms:.4f} ms, x{row['speedup']}")
    return row


def bench_group_norm(groupnorm_silu, warmup, repeats) -> list[dict]:
    rows = []
    for channels, side in GROUP_NORM_SHAPES:
        shape = (BATCH, channels, side, side)
        x = torch.randn(shape, device="cuda", dtype=DTYPE) + 0.5
        weight = torch.randn(channels, device="cuda", dtype=DTYPE)
        bias = torch.randn(channels, device="cuda", dtype=DTYPE)
        for layout in ("nchw", "channels_last"):
            xl = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
            rows.append(
                compare(
                    "group_norm_silu",
                    shape,
                    layout,
                    lambda: groupnorm_silu.group_norm_silu(xl, GROUPS, weight, bias, 1e-5),
                    lambda: F.silu(F.group_norm(xl, GROUPS, weight, bias, 1e-5)),
                    2 * x.numel() * x.element_size(),
                    warmup,
                    repeats,
                )
            )
    return rows


def bench_geglu(geglu, warmup, repeats) -> list[dict]:
    rows = []
    for tokens, inner in GEGLU_SHAPES:
        h = torch.randn(BATCH, tokens, 2 * inner, device="cuda", dtype=DTYPE)

        def eager(h=h):
            hidden, gate = h.chunk(2, dim=-1)
            return hidden * F.gelu(gate)

        rows.append(
            compare(
                "geglu",
                tuple(h.shape),
                "-",
                lambda h=h: geglu.geglu(h),
                eager,
                3 * h.numel() // 2 * h.element_size(),
                warmup,
                repeats,
            )
        )
    return rows


def markdown(results: dict) -> str:
    lines = [
        f"# Fused kernels vs eager ({results['gpu']}, fp16, batch {BATCH})",
        "",
        f"torch {results['torch']}, Triton {results['triton']}. Device time per call: {GRAPH_CALLS} calls in a CUDA "
        f"graph, median of {results['repeats']} replays after {results['warmup']} (CUDA events). GB/s: input read "
        "once + output written once / device time. Call ms: one eager call timed alone (host launch overhead "
        "included).",
        "",
        "| op | shape | layout | fused ms | eager ms | speedup | fused GB/s | eager GB/s | fused call ms "
        "| eager call ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['layout']} | {r['fused_ms']:.4f} | "
            f"{r['eager_ms']:.4f} | {r['speedup']:.2f} | {r['fused_gbps']:.0f} | {r['eager_gbps']:.0f} | "
            f"{r['fused_call_ms']:.4f} | {r['eager_call_ms']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_fused_kernels.py needs a CUDA GPU (the kernels are Triton; on CPU they only run in the "
            "interpreter, which times nothing useful).",
            file=sys.stderr,
        )
        return 1
    import_checkout()
    import triton

    from sdcompiler.kernels import geglu, groupnorm_silu

    gpu = torch.cuda.get_device_name()
    print(f"GPU: {gpu}")
    results = new_results(
        "fused_kernels",
        ("torch", "triton"),
        gpu=gpu,
        torch=torch.__version__,
        triton=triton.__version__,
        warmup=args.warmup,
        repeats=args.repeats,
        dtype="float16",
    )
    torch.manual_seed(0)
    with torch.inference_mode():
        results["rows"] = bench_group_norm(groupnorm_silu, args.warmup, args.repeats)
        results["rows"] += bench_geglu(geglu, args.warmup, args.repeats)
    finish_results(results)
    write_results(results, markdown(results), args.out, "fused_kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
