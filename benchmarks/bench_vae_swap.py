"""Benchmark: the full SD / SDXL VAE decoder vs TAESD's (`swap_vae`, preset `taesd`), per image.

    python benchmarks/bench_vae_swap.py [--arch sd15|sdxl] [--sizes 256,512] [--repeats 5] [--device cpu|cuda]
                                        [--out DIR]

The arch's real AutoencoderKL architecture (the config shipped in the package; random weights, seed 0)
against diffusers' AutoencoderTiny with its default configuration, which is TAESD's architecture (random
weights: the weights change nothing about speed). Per image size: decoder MACs of one image (counted on
meta, as the pass records them), then one untimed decode each and `--repeats` timed rounds, full and tiny
interleaved in each round; medians and their ratio. Writes vae_swap_<arch>.{json,md} to `--out` (default
benchmarks/results).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_common import finish_results, log, new_results, write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15", choices=["sd15", "sd21", "sdxl"])
    parser.add_argument("--sizes", default="256,512", help="image sides in pixels, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    from diffusers import AutoencoderKL, AutoencoderTiny

    from sdcompiler.archs import shipped_config_dir
    from sdcompiler.passes.accounting import vae_decoder_macs

    torch.manual_seed(0)
    config = AutoencoderKL.load_config(shipped_config_dir(args.arch) / "vae")
    full = AutoencoderKL.from_config(config).to(args.device).eval()
    tiny = AutoencoderTiny().to(args.device).eval()

    def timed(model, latent) -> float:
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.decode(latent)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    rows = []
    for side in (int(s) for s in args.sizes.split(",")):
        latent = torch.randn(1, 4, side // 8, side // 8, device=args.device)
        macs = {name: vae_decoder_macs(m, (side, side), 8) for name, m in (("full", full), ("tiny", tiny))}
        times = {"full": [], "tiny": []}
        with torch.inference_mode():
            full.decode(latent), tiny.decode(latent)
            for _ in range(args.repeats):
                for name, model in (("full", full), ("tiny", tiny)):
                    times[name].append(timed(model, latent))
        medians = {name: statistics.median(t) for name, t in times.items()}
        rows.append(
            {
                "size": side,
                "macs_full": macs["full"],
                "macs_tiny": macs["tiny"],
                "seconds_full": round(medians["full"], 4),
                "seconds_tiny": round(medians["tiny"], 4),
                "speedup": round(medians["full"] / medians["tiny"], 2),
            }
        )
        log(f"{side}px: {rows[-1]}")
    params = {"full": sum(p.numel() for p in full.parameters()), "tiny": sum(p.numel() for p in tiny.parameters())}
    results = new_results(f"vae_swap_{args.arch}", ("torch", "diffusers"), device=args.device, params=params, rows=rows)
    finish_results(results)
    table = [
        f"VAE decoder, {args.arch}: AutoencoderKL {params['full']:,} params vs TAESD (AutoencoderTiny) "
        f"{params['tiny']:,}; {args.device}, batch 1, medians of {args.repeats} interleaved rounds",
        "",
        "| image | decoder MACs full | TAESD | ratio | seconds full | TAESD | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    table += [
        f"| {r['size']}x{r['size']} | {r['macs_full'] / 1e9:.1f} G | {r['macs_tiny'] / 1e9:.1f} G | "
        f"{r['macs_full'] / r['macs_tiny']:.1f}x | {r['seconds_full']:.3f} | {r['seconds_tiny']:.3f} | "
        f"{r['speedup']:.1f}x |"
        for r in rows
    ]
    write_results(results, "\n".join(table) + "\n", args.out, f"vae_swap_{args.arch}")


if __name__ == "__main__":
    main()
