"""ONNX Runtime's own static INT8 of optimum's U-Net export: the peer of our `int8` preset in bench_report.py.

    python benchmarks/bench_ort_int8.py EXPORT OUT [--prompt P ...] [--steps 4] [--size 256]

EXPORT is an optimum ONNX export of an SD 1.x/2.x checkpoint (`main_export(..., task="text-to-image")`). The
calibration inputs are the U-Net's own inputs while the fp32 export samples the prompts (CFG 7.5, seed 0,
`--steps` steps, `--size` px), as ONNX Runtime's quantization guide does it: a CalibrationDataReader feeding
real activations. `onnxruntime.quantization.quantize_static` with the settings ORT's documentation gives for
x86 CPUs: QDQ format, uint8 activations, int8 per-channel weights, MinMax calibration, all supported ops
(no node kept float: a user following the guide does not hand-pick them). OUT gets the export's other
components linked and `unet/model.onnx` (+ external data) quantized; `OUT/quantization.json` records the
settings and the number of calibration inputs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path


def calibration_inputs(export: Path, prompts: list[str], steps: int, size: int) -> list[dict]:
    import numpy as np
    import torch
    from optimum.onnxruntime import ORTDiffusionPipeline

    pipe = ORTDiffusionPipeline.from_pretrained(export)
    captured: list[dict] = []
    session = pipe.unet.session
    run = session.run

    def capture(output_names, feed, *args, **kwargs):  # the exact feeds optimum gives ONNX Runtime
        captured.append({name: np.array(value) for name, value in feed.items()})
        return run(output_names, feed, *args, **kwargs)

    session.run = capture
    for index, prompt in enumerate(prompts):
        pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=7.5,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(index),
            output_type="np",
        )
    return captured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--prompt", action="append", default=None)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    prompts = args.prompt or ["a photo of a cat on a sofa", "a mountain lake at dawn"]

    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    feeds = calibration_inputs(args.export, prompts, args.steps, args.size)
    names = {i.name for i in onnx.load(str(args.export / "unet" / "model.onnx"), load_external_data=False).graph.input}
    feeds = [{k: v for k, v in f.items() if k in names} for f in feeds]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    staging = Path(tempfile.mkdtemp(prefix=args.out.name + ".", dir=args.out.parent))
    staging.chmod(0o755)
    try:
        for item in args.export.iterdir():
            if item.name != "unet":
                (staging / item.name).symlink_to(item.resolve())
        (staging / "unet").mkdir()
        shutil.copy(args.export / "unet" / "config.json", staging / "unet" / "config.json")
        settings = {
            "quant_format": "QDQ",
            "activation_type": "QUInt8",
            "weight_type": "QInt8",
            "per_channel": True,
            "calibrate_method": "MinMax",
        }
        # >2 GB models need use_external_data_format (the calibrator writes its augmented copy to a temp dir)
        quantize_static(
            str(args.export / "unet" / "model.onnx"),
            str(staging / "unet" / "model.onnx"),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=True,
            extra_options={"CalibTensorRangeSymmetric": False},
            calibration_providers=["CPUExecutionProvider"],
        )
        settings["calibration_inputs"] = len(feeds)
        settings["calibration"] = f"{len(prompts)} prompts x {args.steps} steps, CFG 7.5, {args.size} px"
        (staging / "quantization.json").write_text(json.dumps(settings, indent=2) + "\n")
        shutil.rmtree(args.out, ignore_errors=True)
        staging.rename(args.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    main()
