"""Benchmark: the ptq pass's modelopt backend (target tensorrt) on the full-size SD1.5 U-Net: eps SQNR per setting.

    python benchmarks/bench_ptq_modelopt_sd15.py [--workdir DIR] [--settings NAME,...] [--results-dir DIR]

On the full-size SD1.5 checkpoint of bench_compile_sd15.py (real architecture, random weights, cached under
`--workdir`), one process: the pass's teacher trajectories are made once (4 calibration prompts x 4 steps
and 1 held-out prompt at 256 px, the pass's CPU defaults; cached in `<workdir>/ptq-cache`), then every
setting quantizes a fresh copy of the float U-Net with `mtq.quantize` and records the pass's
`sqnr_db` (eps of the fake-quantized U-Net vs the float one on the held-out trajectories) and its seconds.
TensorRT does not run here: these are the fidelity of the Q/DQ graph the tensorrt target exports, not an
engine's speed. Settings: int8 level 3 with SmoothQuant 0.8 (the `int8` preset), without it, with
percentile ranges on conv inputs, int8 level 1 (convs only), fp8 level 3 (the `fp8` preset), fp8 level 4.

Results: benchmarks/results/ptq_modelopt_sd15.{json,md}; the Markdown table is printed.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_common import finish_results, log, new_results, peak_rss_gib, write_results  # noqa: E402
from bench_compile_sd15 import ensure_checkpoint  # noqa: E402

SETTINGS = {
    "int8-l3-smoothquant": {"precision": "int8", "level": 3.0},
    "int8-l3-max": {"precision": "int8", "level": 3.0, "smoothquant_alpha": None},
    "int8-l3-percentile": {"precision": "int8", "level": 3.0, "calibration": "percentile", "percentile": 99.99},
    "int8-l1": {"precision": "int8", "level": 1.0},
    "fp8-l3": {"precision": "fp8", "level": 3.0},
    "fp8-l4": {"precision": "fp8", "level": 4.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args()

    import torch

    from sdcompiler.loading import load_checkpoint
    from sdcompiler.passes import PassContext, get_pass

    torch.manual_seed(0)
    checkpoint, _ = ensure_checkpoint(args.workdir)
    results = new_results(
        "ptq_modelopt_sd15",
        ("torch", "diffusers", "nvidia-modelopt"),
        checkpoint="SD1.5 architecture, random weights (sdcompiler.testing.make_checkpoint full)",
    )
    pipe = load_checkpoint(checkpoint).pipeline
    float_unet = pipe.unet
    ptq = get_pass("ptq")
    ctx = PassContext(
        arch="sd15",
        macs_resolution=(512, 512),
        cache_dir=args.workdir / "ptq-cache",
        show_progress=False,
        target="tensorrt",
        model_key="bench-sd15-full",
    )
    rows = []
    for name in args.settings.split(","):
        pipe.unet = copy.deepcopy(float_unet)
        config = ptq.config_class.from_dict(SETTINGS[name], owner="ptq")
        log(f"{name}: quantizing ({SETTINGS[name]})")
        start = time.perf_counter()
        metrics = ptq.run(pipe, config, ctx)  # the first setting also makes the trajectories (cached)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "setting": name,
                "config": SETTINGS[name],
                "sqnr_db": round(metrics["sqnr_db"], 2),
                "quantized_layers": metrics["quantized_layers"],
                "quantizers": metrics["quantizers"],
                "calibration_inputs": metrics["calibration_inputs"],
                "seconds": round(seconds, 1),
            }
        )
        log(f"{name}: eps SQNR {metrics['sqnr_db']:.2f} dB, {metrics['quantized_layers']} layers, {seconds:.0f} s")
        pipe.unet = float_unet
    results["rows"] = rows
    results["peak_rss_gib"] = round(peak_rss_gib(), 2)
    finish_results(results)
    table = ["| setting | quantized layers | eps SQNR vs float (dB) | seconds |", "|---|---|---|---|"]
    table += [f"| {r['setting']} | {r['quantized_layers']} | {r['sqnr_db']:.2f} | {r['seconds']:.0f} |" for r in rows]
    write_results(results, "\n".join(table), args.results_dir, "ptq_modelopt_sd15")


if __name__ == "__main__":
    main()
