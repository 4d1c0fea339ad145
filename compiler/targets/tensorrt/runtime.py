"""The tensorrt target's run-time side: an artifact's engines loaded and called like ONNX Runtime sessions.

`TrtModel` is called like `OrtModel` (torch tensors by input name -> float32 CPU tensors), so the ONNX
Runtime component adapters and `sampling.generate` run unchanged; per call it sets the input shapes
(`set_input_shape`), binds buffers (`set_tensor_address`) and enqueues on a CUDA stream
(`execute_async_v3`); a static engine is captured once into a CUDA graph and replayed.

An artifact without an engine for the current GPU's compute capability, or one built by another
TensorRT version, is rebuilt from its optimized ONNX through the engine cache (with a log line) instead
of failing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from sdcompiler import knobs
from sdcompiler.archs import get_arch
from sdcompiler.artifact import confined
from sdcompiler.errors import ArtifactError, PipelineArgumentError, require
from sdcompiler.targets.components import (
    FINAL_NORM,
    make_components,
    ort_controlnets,
    ort_text_encoder,
    ort_unet,
    ort_vae_decoder,
)
from sdcompiler.targets.onnx_target import check_residual_inputs, controlnet_config
from sdcompiler.targets.tensorrt.build import (
    OPTIMIZED,
    EngineBuild,
    built_engines,
    cached_engine,
    compute_capability,
    plan_filename,
)

log = logging.getLogger(__name__)


def load_components(root: Path, manifest: dict[str, Any], device: str):
    """`sampling.Components` that run the artifact's engines (`Target.load` of the tensorrt target)."""
    if device != "cuda":
        raise ArtifactError(
            f"{root} holds TensorRT engines, which run on CUDA GPUs only; load it with "
            "device='cuda', or compile with --target onnx for the CPU"
        )
    trt = require("tensorrt", "tensorrt", "loading a tensorrt artifact")
    spec = get_arch(manifest["arch"])
    built = built_engines(manifest)
    models = {
        name: TrtModel(trt, _engine_bytes(trt, root, name, built), name)
        for name in (*spec.text_encoders, "unet", "vae_decoder")
    }
    encoders = [ort_text_encoder(models[n], spec.is_sdxl, root / n / FINAL_NORM) for n in spec.text_encoders]
    unet, decode = ort_unet(models["unet"]), ort_vae_decoder(models["vae_decoder"])
    controlnets = None
    if manifest.get("controlnets"):  # one engine per net, called like its ONNX Runtime session
        folders = [entry["folder"] for entry in manifest["controlnets"]]  # in call order
        configs = [controlnet_config(confined(root, folder, "a ControlNet folder")) for folder in folders]
        nets = [TrtModel(trt, _engine_bytes(trt, root, folder, built), folder) for folder in folders]
        check_residual_inputs(root, models["unet"], nets[0])
        controlnets = ort_controlnets(nets, configs)
    return make_components(
        root, manifest, encoders, unet, decode, backends=models, controlnets=controlnets
    )  # backends: LoRA refit


def _engine_bytes(trt, root: Path, name: str, built: Mapping[str, Any]) -> bytes:
    """The artifact's engine for this GPU and TensorRT, or one rebuilt (through the cache) from its ONNX."""
    cc, version = compute_capability(), trt.__version__
    plan = root / name / plan_filename(cc)
    if plan.is_file() and built["compute_capability"] == cc and built["tensorrt"] == version:
        return plan.read_bytes()
    if built["compute_capability"] is None:
        log.warning("%s: compiled with engines=false: building the %s engine from %s/%s", root, name, name, OPTIMIZED)
        rebuilt, _ = cached_engine(trt, root / name / OPTIMIZED, EngineBuild.from_dict(built[name]["build"]), cc)
        return rebuilt.read_bytes()
    log.warning(
        "%s: the %s engine was built for compute capability %s with TensorRT %s; this GPU has %s and "
        "TensorRT is %s: rebuilding it from %s/%s (engine cache: %s)",
        root,
        name,
        built["compute_capability"],
        built["tensorrt"],
        cc,
        version,
        name,
        OPTIMIZED,
        knobs.cache_dir() / "engines",
    )
    rebuilt, _ = cached_engine(trt, root / name / OPTIMIZED, EngineBuild.from_dict(built[name]["build"]), cc)
    return rebuilt.read_bytes()


class TrtModel:
    """One TensorRT engine called like `OrtModel`: torch tensors by input name -> {output: float32 CPU tensor}.

    Inputs are cast to the engine's I/O types and checked against its optimization profile (an input
    outside it is the caller's error, named with the target options that widen it).
    """

    def __init__(self, trt, plan: bytes, name: str):
        self.trt = trt
        self.name = name
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ArtifactError(f"TensorRT could not load the {name} engine (its log is above); recompile the artifact")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        types = {
            trt.DataType.FLOAT: torch.float32,
            trt.DataType.HALF: torch.float16,
            trt.DataType.BF16: torch.bfloat16,
            trt.DataType.INT32: torch.int32,
            trt.DataType.INT64: torch.int64,
            trt.DataType.INT8: torch.int8,
            trt.DataType.UINT8: torch.uint8,
            trt.DataType.BOOL: torch.bool,
        }
        self.dtypes = {n: types[self.engine.get_tensor_dtype(n)] for n in names}
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.profile = {
            n: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0))
            for n in self.inputs
            if -1 in tuple(self.engine.get_tensor_shape(n))
        }
        self.static = all(low == high for low, _, high in self.profile.values())  # one shape: CUDA graphs
        self.stream = torch.cuda.Stream()
        self.graph = None

    def __call__(self, outputs: list[str] | None = None, **inputs) -> dict[str, torch.Tensor]:
        feed = {
            n: torch.as_tensor(v).to("cuda", self.dtypes[n]).contiguous()
            for n, v in inputs.items()
            if n in self.inputs and v is not None
        }
        if set(feed) != set(self.inputs):
            raise PipelineArgumentError(f"the {self.name} engine takes inputs {self.inputs}, got {sorted(feed)}")
        for name, tensor in feed.items():
            self._check_shape(name, tuple(tensor.shape))
        result = self._replay(feed) if self.static else self._run(feed)
        return {n: result[n].float().cpu() for n in (outputs or self.outputs)}

    def refit(self, weights: Mapping[str, Any], stored) -> None:
        """Refit the engine's weights named in `weights` (numpy arrays in the engine's types; `stored(names)`: the
        artifact's own values of other weights TensorRT asks for), through `tensorrt.refit.refit_engine`.

        No call may run on the engine while its weights change, hence the synchronize. A static engine's CUDA
        graph captured only the enqueue over this model's fixed I/O buffers, and a refit writes the new values
        into the engine's own weight memory, so the graph should replay the new weights as it is; that is
        UNVERIFIED (no TensorRT here), so the graph is dropped and captured again on the next call (one call's
        worth of capture, next to a LoRA switch).
        """
        from sdcompiler.targets.tensorrt.refit import refit_engine

        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.graph = None
        refit_engine(self.trt, self.engine, weights, stored, self.name)

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if name not in self.profile:
            return
        low, _, high = self.profile[name]
        if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
            raise PipelineArgumentError(
                f"{self.name} input '{name}' has shape {list(shape)}, outside the engine's optimization profile "
                f"(min {list(low)}, max {list(high)}); recompile with target options batch_size / height / width "
                "that cover it"
            )

    def _bind(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Set the input shapes and addresses; allocate the outputs at the shapes TensorRT infers and bind them."""
        for name, tensor in feed.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        out = {}
        for name in self.outputs:
            out[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device="cuda")
            self.context.set_tensor_address(name, out[name].data_ptr())
        return out

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise ArtifactError(f"TensorRT failed to run the {self.name} engine (its log is above)")

    def _run(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.stream.wait_stream(torch.cuda.current_stream())  # the inputs were copied on the caller's stream
        with torch.cuda.stream(self.stream):
            out = self._bind(feed)
            self._enqueue()
        torch.cuda.current_stream().wait_stream(self.stream)
        return out

    def _replay(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Static engine: capture the enqueue once into a CUDA graph over fixed buffers, then replay it."""
        if self.graph is None:
            self.static_inputs = {n: t.clone() for n, t in feed.items()}
            self.static_outputs = self._run(self.static_inputs)  # TensorRT applies shape changes on its first run
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=self.stream):
                self._enqueue()
        for name, tensor in feed.items():
            self.static_inputs[name].copy_(tensor)
        self.graph.replay()
        return self.static_outputs  # the caller copies them to the CPU before the next replay overwrites them
