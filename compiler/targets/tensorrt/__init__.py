"""`target="tensorrt"`: TensorRT engines built from the onnx target's graphs, with an engine cache.

The target lowers in three stages, `export_onnx` (shared with the onnx target), `optimize_onnx` and
`build_engine`, and loads the engines it built, rebuilding them on a GPU arch or TensorRT version they
were not built for. Its modules, each importing only the ones above it:

- `config`: the target options (`TensorRTTargetConfig`) and the optimization profiles derived from them
  (`dimension_ranges`, `profile_shapes`).
- `build`: `optimize_onnx` (onnx-graphsurgeon cleanup and constant folding), the engine build from a
  strongly typed network, and the engine cache and timing cache.
- `runtime`: `TrtModel` (an engine called like an ONNX Runtime session) and the load side.
- `target`: `TensorRTTarget` (its stages, load and serving models) and `tensorrt_model_spec`.
- `refit`: run-time LoRAs on engines built with `refit=true`, through TensorRT's refitter (UNVERIFIED).

TensorRT (10 or newer: strongly typed networks, named I/O tensors) is imported lazily
(`pip install 'sd-compiler[tensorrt]'`); without it (or without a CUDA GPU) the compile stops before the
checkpoint loads, with an error naming the extra, unless `engines=false` asks for the optimized ONNX only
(the load then builds the engines from it). The engine build, the runtime and the refit have not run yet
(no machine here has TensorRT); tests/gpu/test_tensorrt_gpu.py checks them where TensorRT is installed.
"""

from sdcompiler.targets.tensorrt.config import TensorRTTargetConfig
from sdcompiler.targets.tensorrt.runtime import TrtModel
from sdcompiler.targets.tensorrt.target import TensorRTTarget, tensorrt_model_spec

__all__ = ["TensorRTTarget", "TensorRTTargetConfig", "TrtModel", "tensorrt_model_spec"]
