"""W4A4 Triton GEMM vs torch fp16/bf16 matmul (and cuBLAS int8) at SD1.5 U-Net linear shapes; GPU only.

    python benchmarks/bench_w4a4_kernel.py [--out DIR] [--batch 2] [--warmup 10] [--repeats 50] [--sweep]

Shapes: tokens x in -> out of SD1.5 at 512x512 per image: attention projections 4096x320->320, 1024x640->640,
256x1280->1280 and each stage's FFN, GEGLU proj (K -> 2*4*K) and down (4*K -> K). `--batch` multiplies the tokens
(default 2: the cond + uncond CFG batch).

Rows per shape:
- `fp16`, `bf16`: `F.linear(x, W)` (cuBLAS);
- `int8 cuBLAS`: `torch._int_mm` on int8 codes (dense W8A8 tensor-core GEMM, no scales: the int8 roofline);
- `fp8 cuBLASLt`: `torch._scaled_mm` on E4M3 copies with per-tensor scales, fp16 out (compute capability >= 8.9
  and shapes cuBLASLt takes; skipped elsewhere);
- `w4a4 codes`: the W4A4 kernel on int8 activation codes with per-token scales (the GEMM alone);
- `w4a4 fused static`: fp16 activations with one static scale, quantised in registers in the GEMM;
- `w4a4 static 2-pass`: the same static-scale linear as quantisation kernel + code GEMM;
- `w4a4 dynamic`: the whole per-token linear (quantisation kernel + GEMM).

Each timing: median over `--repeats` of CUDA-event time around one call replayed from a CUDA graph (GPU time
without Python/launch overhead), each replay after an L2 flush (a 256 MB write; weights come from HBM as in a U-Net
forward), after `--warmup` calls. TOPS = 2*M*N*K / time; `% INT8 peak`
is against the dense INT8 tensor-core peak, assumed 1979 TOPS for H100 SXM and H200 and 1513 for H100 PCIe/NVL
(detected from the device name; other GPUs: no percentage). Weight bytes: packed int4 codes + fp32 scale + int32
zero per channel vs fp16. `--sweep` also times a few fixed block configs per shape for the W4A4 rows (reports
the best next to the shape heuristic's choice).

Writes `w4a4_kernel.json` and `w4a4_kernel.md` to `--out` (default benchmarks/results) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import import_checkout  # noqa: E402


def sd15_shapes(batch: int) -> list[tuple[str, int, int, int]]:
    """(layer, M tokens, K in, N out) for SD1.5 at 512x512."""
    shapes = []
    for tokens, width in ((4096, 320), (1024, 640), (256, 1280)):
        m = batch * tokens
        shapes.append((f"attn proj {width}", m, width, width))
        shapes.append((f"ffn geglu {width}", m, width, 8 * width))
        shapes.append((f"ffn down {width}", m, 4 * width, width))
    return shapes


def int8_peak_tops(name: str) -> float | None:
    if "H200" in name or ("H100" in name and ("SXM" in name or "HBM3" in name)):
        return 1979.0
    if "H100" in name:  # PCIe / NVL
        return 1513.0
    return None


class Timer:
    """Median GPU time of one call, replayed from a CUDA graph (so Python and launch overhead are not timed), each
    replay after an L2 flush."""

    def __init__(self, warmup: int, repeats: int):
        self.warmup, self.repeats = warmup, repeats
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")

    def median_ms(self, fn) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compiles, cuBLAS workspaces) off the capture
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        times = []
        for _ in range(self.repeats):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


SWEEP = [
    (128, 128, 128, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 64, 128, 4, 4),
    (64, 128, 128, 4, 4),
    (64, 64, 128, 4, 4),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
]


def bench_shape(w4a4, timer: Timer, layer: str, m: int, k: int, n: int, sweep: bool) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, generator=g, device="cuda", dtype=torch.float16)
    w = torch.randn(n, k, generator=g, device="cuda") / k**0.5
    scale, zero = w4a4.minmax_weight_params(w, 4)
    packed = w4a4.pack_weight_codes(w4a4.quantize_weight(w, scale, zero, 4), 4)
    bias = torch.randn(n, generator=g, device="cuda", dtype=torch.float16)
    static = torch.tensor(3.0 / 7, device="cuda")
    q, s_tok = w4a4.quantize_act_triton(x, None, 4)
    w16, wb16, xb16 = w.half(), w.bfloat16(), x.bfloat16()
    w8 = torch.randint(-8, 8, (n, k), generator=g, device="cuda", dtype=torch.int8).t()  # column-major (K, N)

    fp16_bytes = n * k * 2
    w4_bytes = packed.numel() + 8 * n
    variants = {
        "fp16": (lambda: F.linear(x, w16, bias), fp16_bytes),
        "bf16": (lambda: F.linear(xb16, wb16, bias.bfloat16()), fp16_bytes),
        "int8 cuBLAS": (lambda: torch._int_mm(q, w8), n * k),
        "w4a4 codes": (
            lambda: w4a4.w4a4_gemm_triton(q, s_tok, packed, scale, zero, bias, 4, k, torch.float16),
            w4_bytes,
        ),
        "w4a4 fused static": (
            lambda: w4a4.w4a4_linear_triton(x, packed, scale, zero, bias, static, 4, 4, k, fused=True),
            w4_bytes,
        ),
        "w4a4 static 2-pass": (
            lambda: w4a4.w4a4_linear_triton(x, packed, scale, zero, bias, static, 4, 4, k, fused=False),
            w4_bytes,
        ),
        "w4a4 dynamic": (lambda: w4a4.w4a4_linear_triton(x, packed, scale, zero, bias, None, 4, 4, k), w4_bytes),
    }
    fp8 = _fp8_gemm(x, w16)  # the FP8 point of the FP16 / INT8 / FP8 comparison, where the GPU has FP8
    if fp8 is not None:
        variants["fp8 cuBLASLt"] = (fp8, n * k)
    rows = []
    for name, (fn, wbytes) in variants.items():
        ms = timer.median_ms(fn)
        row = dict(layer=layer, m=m, k=k, n=n, kernel=name, ms=ms, tops=2 * m * n * k / ms / 1e9, weight_bytes=wbytes)
        if name in ("w4a4 codes", "w4a4 fused static"):
            row["blocks"] = w4a4.gemm_blocks(m, n, k, x.device, a_float=name.endswith("static")).__dict__
            if sweep:
                row["sweep"] = sweep_blocks(w4a4, timer, name, x, q, s_tok, packed, scale, zero, bias, static, k)
        rows.append(row)
    return rows


def _fp8_gemm(x: torch.Tensor, w: torch.Tensor):
    """`torch._scaled_mm` on E4M3 copies of x (M, K) and w (N, K) with per-tensor scales, fp16 out; None where
    the GPU (compute capability < 8.9), torch or the shape (cuBLASLt wants multiples of 16) has no FP8 GEMM."""
    if not hasattr(torch, "_scaled_mm") or torch.cuda.get_device_capability() < (8, 9):
        return None
    x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn).t()  # w8: (K, N), column-major
    one = torch.ones((), device=x.device, dtype=torch.float32)

    def fn():
        return torch._scaled_mm(x8, w8, scale_a=one, scale_b=one, out_dtype=torch.float16)

    try:
        fn()
        torch.cuda.synchronize()
    except (RuntimeError, TypeError) as exc:
        print(f"fp8 GEMM skipped at {tuple(x.shape)} x {tuple(w.shape)}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return None
    return fn


def sweep_blocks(w4a4, timer, name, x, q, s_tok, packed, scale, zero, bias, static, k) -> list[dict]:
    out = []
    for bm, bn, bk, warps, stages in SWEEP:
        blocks = w4a4.GemmBlocks(bm, bn, bk, num_warps=warps, num_stages=stages)
        if name == "w4a4 codes":

            def fn(blocks=blocks):
                return w4a4.w4a4_gemm_triton(q, s_tok, packed, scale, zero, bias, 4, k, torch.float16, blocks)
        else:

            def fn(blocks=blocks):
                return w4a4.w4a4_linear_triton(x, packed, scale, zero, bias, static, 4, 4, k, blocks, fused=True)

        try:
            out.append(dict(blocks=blocks.__dict__, ms=timer.median_ms(fn)))
        except Exception as error:  # a config can exceed shared memory on this GPU: skip it
            out.append(dict(blocks=blocks.__dict__, error=str(error).splitlines()[0][:200]))
    return out


def markdown(results: dict) -> str:
    peak = results["int8_peak_tops"]
    lines = [
        f"# W4A4 kernel vs fp16/bf16 ({results['gpu']})",
        "",
        f"Batch {results['batch']} (CFG), SD1.5 512x512 shapes; median of {results['repeats']} CUDA-graph "
        f"replays of one call, each after an L2 flush; % INT8 peak against {peak} dense INT8 TOPS."
        if peak
        else f"Batch {results['batch']}; no INT8 peak known for this GPU.",
        "",
        "| layer | M x K -> N | kernel | ms | TOPS | % INT8 peak | vs fp16 | weight MB | best sweep ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    fp16 = {(r["m"], r["k"], r["n"]): r["ms"] for r in results["rows"] if r["kernel"] == "fp16"}
    for r in results["rows"]:
        pct = f"{100 * r['tops'] / peak:.1f}" if peak else "-"
        best = [s["ms"] for s in r.get("sweep", []) if "ms" in s]
        lines.append(
            f"| {r['layer']} | {r['m']}x{r['k']}->{r['n']} | {r['kernel']} | {r['ms']:.4f} | "
            f"{r['tops']:.1f} | {pct} | {fp16[(r['m'], r['k'], r['n'])] / r['ms']:.2f}x | "
            f"{r['weight_bytes'] / 1e6:.3f} | {f'{min(best):.4f}' if best else '-'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--sweep", action="store_true", help="also time fixed block configs for the W4A4 rows")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_w4a4_kernel.py needs a CUDA GPU (the W4A4 kernels are Triton GPU kernels); none found")
    import_checkout()
    import triton

    from sdcompiler.kernels import w4a4

    gpu = torch.cuda.get_device_name()
    timer = Timer(args.warmup, args.repeats)
    rows = []
    for layer, m, k, n in sd15_shapes(args.batch):
        rows.extend(bench_shape(w4a4, timer, layer, m, k, n, args.sweep))
        print(f"[bench] {layer} {m}x{k}->{n} done", file=sys.stderr, flush=True)
    results = dict(
        gpu=gpu,
        int8_peak_tops=int8_peak_tops(gpu),
        batch=args.batch,
        warmup=args.warmup,
        repeats=args.repeats,
        torch=torch.__version__,
        triton=triton.__version__,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        rows=rows,
    )
    table = markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "w4a4_kernel.json").write_text(json.dumps(results, indent=1))
    (args.out / "w4a4_kernel.md").write_text(table)
    print(f"GPU: {gpu}")
    print(table)


if __name__ == "__main__":
    main()
