"""`target="tensorrt"`: TensorRT engines built from the onnx target's graphs, with an engine cache.

Stages, each writing files into the artifact:

1. `export_onnx`: the onnx target's export (`sdcompiler.passes.onnx_export`): optimum's names and dynamic axes,
   TorchScript exporter. Precision lives in the graph, because every engine is built from a strongly
   typed network (TensorRT 10 deprecates the weakly typed FP16/BF16/INT8/FP8 builder flags and 11
   removes them): `fp16` / `bf16` / `fp32` export the U-Net in that type, the text encoders too except
   under `bf16` (the TorchScript exporter fails on bf16 CLIP graphs, so they stay fp32), the VAE decoder
   in `vae_precision`. INT8 / FP8 engines come from the ptq pass (presets `int8`, `fp8`): its modelopt
   backend leaves a fake-quantized U-Net that exports as Q/DQ pairs around each quantized op (standard
   QuantizeLinear / DequantizeLinear for INT8, `trt::TRT_FP8*` for FP8) with scales in the graph's own
   float type (a strongly typed network needs them there) at opset >= 19 (the first whose Q/DQ take
   fp16 / bf16); the strongly typed builder picks INT8 / FP8 kernels from them.
2. `optimize_onnx`: onnx-graphsurgeon cleanup + toposort, constant folding (ONNX Runtime evaluates the
   constant subgraphs, never a Q/DQ node: folding a weight's Q -> DQ would leave a rounded float weight
   and a float kernel), ONNX shape inference before and after -> `<component>/model.opt.onnx`
   (+ `model.opt.onnx.data` over 2 GB); the raw export is dropped. With `verify`, each optimized graph
   is compared with its torch module on the export inputs in ONNX Runtime (as the onnx target does;
   an INT8 Q/DQ U-Net against its fake-quantized module with the onnx target's SQNR floor; bf16 graphs
   and FP8 Q/DQ are skipped: ONNX Runtime has no bf16 CPU kernels and cannot load `trt::` ops).
3. `build_engine`: one engine per component, `<component>/model_sm<major><minor>.plan` (the names Triton's
   `cc_model_filenames` maps compute capabilities to), built with the `tensorrt` Python API: ONNX parser,
   one optimization profile (min / opt / max shapes), workspace limit, builder optimization level and a
   timing cache shared by all builds (`<cache>/engines/timing-trt<version>-sm<cc>.cache`).

Optimization profiles. Every dynamic ONNX dimension has a range (min, opt, max) derived from the target
options: images per call `batch_size` (the U-Net's batch is doubled for classifier-free guidance: opt is
doubled when the artifact's default call guides, max always), pixel `height` / `width` (default
(size / 2, size, 3 size / 2) around the model's native size), divided by the VAE factor for latents,
and the tokenizers' length. `static` collapses every range to its opt value: one shape per engine, which
the runtime captures into a CUDA graph.

Engine cache: key = sha256 of (sha256 of the optimized ONNX files, the build settings, the GPU's compute
capability, the TensorRT version), plans under `<cache>/engines/<key>/model.plan`; a hit skips the build.
At load time an artifact without an engine for the current GPU's compute capability, or one built by
another TensorRT version, is rebuilt from its optimized ONNX through the same cache (with a log line)
instead of failing.

Runtime: `TrtModel` is called like `OrtModel` (torch tensors by input name -> float32 CPU tensors), so the
ONNX Runtime component adapters and `sampling.generate` run unchanged; per call it sets the input shapes
(`set_input_shape`), binds buffers (`set_tensor_address`) and enqueues on a CUDA stream
(`execute_async_v3`); a static engine is captured once into a CUDA graph and replayed.

TensorRT (10 or newer: strongly typed networks, named I/O tensors) is imported lazily
(`pip install 'sd-compiler[tensorrt]'`); without it the first two stages run and `build_engine` stops
with an error naming the extra. The engine build and the runtime have not run yet (no machine here has
TensorRT); tests/gpu/test_tensorrt_gpu.py checks them where TensorRT is installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from sdcompiler import knobs
from sdcompiler.archs import get_arch
from sdcompiler.artifact import sha256_file
from sdcompiler.errors import ArtifactError, ConfigError, LoweringError, PipelineArgumentError, require
from sdcompiler.passes import PassConfig
from sdcompiler.passes.onnx_export import OPSET, component_exports, export_model
from sdcompiler.targets.base import LowerContext, Stage, StageRecord, Target, write_pipeline_files
from sdcompiler.targets.components import cache_settings, make_components, ort_text_encoder, ort_unet, ort_vae_decoder
from sdcompiler.targets.onnx_target import check_verified, served_components, verify_model, write_component_configs
from sdcompiler.targets.served_models import ModelSpec, onnx_model_spec

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS = {dtype: name for name, dtype in DTYPES.items()}
OPTIMIZED = "model.opt.onnx"
QDQ_OPSET = 19  # the first opset whose QuantizeLinear / DequantizeLinear take fp16 and bf16 (the graph's type)
ENGINE_FORMAT = 1  # bump when the same inputs would build a different engine (part of the cache key)
Range = tuple[int, int, int]  # min, opt, max
Shapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # min, opt, max shapes of one input


@dataclass(frozen=True)
class TensorRTTargetConfig(PassConfig):
    precision: Literal["fp16", "bf16", "fp32", "int8", "fp8"] = "fp16"
    vae_precision: Literal["fp32", "fp16", "bf16"] = "fp32"  # fp16 VAE decoders can give black images
    batch_size: tuple[int, ...] = (1, 1, 4)  # images per call: min, opt, max
    height: tuple[int, ...] | None = None  # pixels: min, opt, max; default (size / 2, size, 3 size / 2)
    width: tuple[int, ...] | None = None
    static: bool = False  # min = opt = max (the opt values): one shape per engine, replayed from CUDA graphs
    workspace_gb: float | None = None  # builder workspace limit; None: TensorRT's default (the GPU's memory)
    builder_optimization_level: int = 3  # 0 (fast build) .. 5 (slow build, best kernels); TensorRT's default 3
    opset: int = OPSET
    verify: bool = True  # each optimized graph vs torch in ONNX Runtime (CPU)

    def __post_init__(self):
        if self.precision in ("int8", "fp8"):
            raise ValueError(f"{self.precision} engines come from a Q/DQ U-Net graph that the ptq pass makes: add preset "
                             f"{self.precision!r} to the recipe and keep precision 'fp16' (or 'bf16'), the float type "
                             "around the Q/DQ ops")
        for name in ("batch_size", "height", "width"):
            value = getattr(self, name)
            if value is not None and (len(value) != 3 or not 0 < value[0] <= value[1] <= value[2]):
                raise ValueError(f"{name} must be [min, opt, max] with 0 < min <= opt <= max, got {list(value)}")
        if not 0 <= self.builder_optimization_level <= 5:
            raise ValueError(f"builder_optimization_level must be 0..5, got {self.builder_optimization_level}")
        if self.workspace_gb is not None and self.workspace_gb <= 0:
            raise ValueError(f"workspace_gb must be > 0 (or null for TensorRT's default), got {self.workspace_gb}")


# --- optimization profiles -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSizes:
    """The facts about a model that its optimization profiles derive from."""

    vae_scale_factor: int
    default_size: int  # pixels (the U-Net's sample size x the VAE factor)
    text_length: int = 77  # tokens: the tokenizers' model_max_length
    guidance: bool = True  # the artifact's default call runs classifier-free guidance (U-Net batch doubled)


def dimension_ranges(config: TensorRTTargetConfig, sizes: ModelSizes) -> dict[str, dict[str, Range]]:
    """(min, opt, max) of every named dynamic ONNX dimension, per component kind.

    Kinds: "text_encoder" (each text encoder), "unet", "vae_decoder"; dimension names are the exporter's
    dynamic axes (`batch_size`, `sequence_length`, `height`, `width`, `latent_height`, `latent_width`).
    """
    factor, size = sizes.vae_scale_factor, sizes.default_size
    default = (max(factor, size // 2 // factor * factor), size, (size * 3 // 2 + factor - 1) // factor * factor)
    latent = {}
    for name in ("height", "width"):
        pixels = getattr(config, name) or default
        if any(v % factor for v in pixels):
            raise ConfigError(f"target tensorrt: {name}={list(pixels)} must hold multiples of the VAE factor {factor}")
        latent[name] = tuple(v // factor for v in pixels)
    low, opt, high = config.batch_size
    text = (sizes.text_length,) * 3
    ranges = {
        "text_encoder": {"batch_size": (1, opt, high), "sequence_length": text},  # prompts: at most the images
        "unet": {"batch_size": (low, opt * (2 if sizes.guidance else 1), high * 2), "sequence_length": text,
                 "height": latent["height"], "width": latent["width"]},
        "vae_decoder": {"batch_size": (low, opt, high), "latent_height": latent["height"],
                        "latent_width": latent["width"]},
    }
    if config.static:
        ranges = {kind: {dim: (r[1],) * 3 for dim, r in dims.items()} for kind, dims in ranges.items()}
    return ranges


def component_kind(name: str) -> str:
    return "text_encoder" if name.startswith("text_encoder") else name


def onnx_input_dims(path: Path) -> dict[str, list[int | str]]:
    """Graph inputs (weights excluded) -> dims: an int for a fixed size, the axis name for a dynamic one."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return {i.name: [d.dim_param if d.dim_param else d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in graph.input if i.name not in weights}


def profile_shapes(inputs: Mapping[str, list[int | str]], ranges: Mapping[str, Range]) -> dict[str, Shapes]:
    """The optimization profile: (min, opt, max) shapes of every input that has a dynamic dimension."""
    profile = {}
    for name, dims in inputs.items():
        if all(isinstance(d, int) for d in dims):
            continue
        unknown = [d for d in dims if isinstance(d, str) and d not in ranges]
        if unknown:
            raise LoweringError(f"input {name!r} has dynamic dimension(s) {unknown} that the tensorrt target has no "
                                "range for; report the model")
        profile[name] = tuple(tuple(ranges[d][i] if isinstance(d, str) else d for d in dims) for i in range(3))
    return profile


# --- optimize_onnx ---------------------------------------------------------------------------------


def optimize_onnx(source: Path, target: Path) -> dict[str, Any]:
    """Clean up and constant-fold one exported graph with onnx-graphsurgeon; write `target` (+ `.data`).

    Shape inference runs on files (`infer_shapes_path`), which works past protobuf's 2 GB limit; a graph
    whose export has external data is saved with one `<target>.data` file.
    """
    import onnx

    gs = require("onnx_graphsurgeon", "tensorrt", "the tensorrt target's optimize_onnx stage")
    require("onnxruntime", "cpu", "constant folding in the tensorrt target's optimize_onnx stage")
    external = source.with_name(source.name + ".data").exists()
    inferred = source.with_name(f".inferred-{source.name}")  # beside `source`: its external data path stays valid
    try:
        onnx.shape_inference.infer_shapes_path(str(source), str(inferred))
        model = onnx.load(str(inferred))
    finally:
        inferred.unlink(missing_ok=True)
    nodes = len(model.graph.node)
    with _quiet_graphsurgeon(gs):
        graph = gs.import_onnx(model)
        del model
        graph.cleanup().toposort()
        graph.fold_constants(should_exclude_node=_is_qdq)  # folding a weight's Q -> DQ would drop its INT8 / FP8 form
        graph.cleanup().toposort()
        model = gs.export_onnx(graph)
        del graph
    onnx.save_model(model, str(target), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=target.name + ".data", size_threshold=1024)
    del model
    onnx.shape_inference.infer_shapes_path(str(target), str(target))
    optimized = len(onnx.load(str(target), load_external_data=False).graph.node)
    return {"nodes_before": nodes, "nodes_after": optimized,
            "files": sorted(p.name for p in target.parent.glob(target.name + "*"))}


QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear",
           "TRT_INT4QuantizeLinear", "TRT_INT4DequantizeLinear"}


def _is_qdq(node) -> bool:
    """Q/DQ nodes stay in the graph: TensorRT picks its INT8 / FP8 kernels from them (a weight's constant
    Q -> DQ pair too, which folding would replace by the rounded float weight)."""
    return node.op in QDQ_OPS


@contextlib.contextmanager
def _quiet_graphsurgeon(gs):
    """Folding evaluates subgraphs in ONNX Runtime sessions whose optimizer warns about every node it cannot
    rewrite, and graphsurgeon warns about types NumPy lacks (bf16): hundreds of lines that change nothing."""
    import onnxruntime

    severity = gs.logger.G_LOGGER.severity
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    onnxruntime.set_default_logger_severity(3)
    try:
        yield
    finally:
        onnxruntime.set_default_logger_severity(2)  # ONNX Runtime's default (warnings); it offers no getter
        gs.logger.G_LOGGER.severity = severity


# --- build_engine ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineBuild:
    """What one engine build depends on besides the ONNX graph, the GPU and TensorRT itself."""

    profile: dict[str, Shapes]
    workspace_gb: float | None = None
    builder_optimization_level: int = 3

    def to_dict(self) -> dict[str, Any]:
        return {"format": ENGINE_FORMAT, "strongly_typed": True, "workspace_gb": self.workspace_gb,
                "builder_optimization_level": self.builder_optimization_level,
                "profile": {name: [list(s) for s in shapes] for name, shapes in sorted(self.profile.items())}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EngineBuild":
        profile = {name: tuple(tuple(s) for s in shapes) for name, shapes in data["profile"].items()}
        return cls(profile, data["workspace_gb"], data["builder_optimization_level"])


def build_serialized_engine(trt, onnx_path: Path, build: EngineBuild, timing_cache: Path) -> bytes:
    """Parse `onnx_path` into a strongly typed network and build a serialized engine with `build`'s settings.

    Args:
        trt: the `tensorrt` module.
        onnx_path: the optimized graph (its external data beside it).
        build: the optimization profile, workspace limit and builder optimization level.
        timing_cache: read before the build when present, written back after it.
    """
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors))
        raise LoweringError(f"TensorRT could not parse {onnx_path}: {errors or 'no parser error recorded'}; "
                            f"reproduce with: {trtexec_command(onnx_path, build)}")
    config = builder.create_builder_config()
    if build.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(build.workspace_gb * (1 << 30)))
    config.builder_optimization_level = build.builder_optimization_level
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in build.profile.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise LoweringError(f"TensorRT could not build an engine from {onnx_path} (its log is above); "
                            f"reproduce with: {trtexec_command(onnx_path, build)}")
    _write_atomically(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def trtexec_command(onnx_path: Path, build: EngineBuild) -> str:
    """The trtexec command line that builds the same engine (for error messages)."""
    def shapes(i: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, s[i]))}" for name, s in build.profile.items())

    parts = [f"trtexec --onnx={onnx_path} --stronglyTyped",
             f"--minShapes={shapes(0)} --optShapes={shapes(1)} --maxShapes={shapes(2)}",
             f"--builderOptimizationLevel={build.builder_optimization_level}"]
    if build.workspace_gb is not None:
        parts.append(f"--memPoolSize=workspace:{int(build.workspace_gb * 1024)}")
    return " ".join(parts)


def engine_cache_key(onnx_sha256: str, build: Mapping[str, Any], compute_capability: str, tensorrt_version: str) -> str:
    """sha256 over everything an engine depends on: the graph, the build settings, the GPU arch, TensorRT."""
    blob = json.dumps({"onnx": onnx_sha256, "build": build, "compute_capability": compute_capability,
                       "tensorrt": tensorrt_version}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def onnx_sha256(path: Path) -> str:
    """sha256 over a graph file and its external data file, when it has one."""
    files = [path] + [p for p in (path.with_name(path.name + ".data"),) if p.exists()]
    return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()


def cached_engine(trt, onnx_path: Path, build: EngineBuild, cc: str) -> tuple[Path, dict[str, str]]:
    """The engine for `onnx_path` from the engine cache, built (and cached) on a miss.

    Returns:
        The plan file in the cache, and {"key": cache key, "cache": "hit" | "miss"}.
    """
    key = engine_cache_key(onnx_sha256(onnx_path), build.to_dict(), cc, trt.__version__)
    engines = knobs.cache_dir() / "engines"
    plan = engines / key / "model.plan"
    if plan.is_file():
        return plan, {"key": key, "cache": "hit"}
    timing_cache = engines / f"timing-trt{trt.__version__}-sm{cc.replace('.', '')}.cache"
    _write_atomically(plan, build_serialized_engine(trt, onnx_path, build, timing_cache))
    return plan, {"key": key, "cache": "miss"}


def compute_capability() -> str:
    """The current CUDA device's compute capability, "major.minor" (Triton's cc_model_filenames keys)."""
    return "{}.{}".format(*torch.cuda.get_device_capability())


def plan_filename(compute_capability: str) -> str:
    """"9.0" -> "model_sm90.plan"."""
    return f"model_sm{compute_capability.replace('.', '')}.plan"


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# --- the target ------------------------------------------------------------------------------------


def _component_exports(pipe, spec, config: TensorRTTargetConfig) -> list:
    """The onnx target's exports, each in the dtype this target's precision gives its component."""
    exports = component_exports(pipe, spec, vae_encoder=False)  # text-to-image engines
    text = "fp32" if config.precision == "bf16" else config.precision  # bf16 CLIP graphs fail to export
    precision = {"unet": config.precision, "vae_decoder": config.vae_precision}
    return [dataclasses.replace(e, dtype=DTYPES[precision.get(e.name, text)]) for e in exports]


class TensorRTTarget(Target):
    name = "tensorrt"
    config_class = TensorRTTargetConfig
    serves_components = True

    def lower(self, pipe, out: Path, config: TensorRTTargetConfig, ctx: LowerContext) -> list[StageRecord]:
        from tqdm.auto import tqdm

        handed = ctx.products.unet_quantization  # the ptq pass's record
        if handed is not None and handed.backend != "modelopt":
            raise LoweringError(f"the tensorrt target builds from modelopt's Q/DQ U-Net, not a {handed.backend} "
                                "graph; use ptq backend modelopt (the default for target tensorrt)")
        if cache_settings({"defaults": ctx.defaults}) is not None:
            raise LoweringError("the tensorrt target does not build the feature cache's shallow U-Net yet; "
                                "use target onnx or torch, or drop deepcache")
        records: list[StageRecord] = []
        exports = _component_exports(pipe, ctx.arch, config)
        sizes = ModelSizes(pipe.vae_scale_factor, pipe.unet.config.sample_size * pipe.vae_scale_factor,
                           pipe.tokenizer.model_max_length,
                           ctx.defaults.get("guidance_scale", ctx.arch.default_guidance_scale) > 1.0
                           and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None)  # embedded w: no CFG
        ranges = dimension_ranges(config, sizes)
        dtypes = {e.name: PRECISIONS[e.dtype] for e in exports}
        quantization = handed.settings if handed is not None else None
        if quantization is not None:  # the ptq pass's Q/DQ: scales in the graph's own float type (strongly typed)
            from sdcompiler.passes.ptq_modelopt import set_export_dtype

            set_export_dtype(pipe.unet, DTYPES[dtypes["unet"]])
        params = {"opset": config.opset, "exporter": "torchscript", "dtypes": dtypes, "unet_quantization": quantization}
        with Stage(records, "export_onnx", params) as stage:
            for export in tqdm(exports, desc="export onnx", disable=not ctx.show_progress):
                opset = max(config.opset, QDQ_OPSET) if quantization and export.name == "unet" else config.opset
                export_model(export, out / export.name, opset)
                stage.results[export.name] = sorted(p.name for p in (out / export.name).iterdir())
            write_component_configs(pipe, out, ctx)
            write_pipeline_files(pipe, out, {n: [type(getattr(pipe, n)).__module__.split(".")[0],
                                                 type(getattr(pipe, n)).__name__]
                                             for n in (*ctx.arch.text_encoders, "unet", "vae")})
        with Stage(records, "optimize_onnx", {"tool": "onnx-graphsurgeon", "verify": config.verify}) as stage:
            for export in tqdm(exports, desc="optimize onnx", disable=not ctx.show_progress):
                folder = out / export.name
                stage.results[export.name] = optimize_onnx(folder / "model.onnx", folder / OPTIMIZED)
                for raw in folder.glob("model.onnx*"):
                    raw.unlink()
                if config.verify:
                    quantized = quantization if export.name == "unet" else None
                    stage.results[export.name]["verify"] = _verify(export, folder / OPTIMIZED, quantized)
        settings = {"precision": config.precision, "vae_precision": config.vae_precision, "static": config.static,
                    "workspace_gb": config.workspace_gb, "builder_optimization_level": config.builder_optimization_level}
        with Stage(records, "build_engine", settings) as stage:
            trt = require("tensorrt", "tensorrt", "the tensorrt target's build_engine stage")
            if not torch.cuda.is_available():
                raise LoweringError("building TensorRT engines needs a CUDA GPU and torch sees none; compile on "
                                    "the kind of GPU that will run the artifact, or use target onnx")
            cc = compute_capability()
            stage.results.update(compute_capability=cc, tensorrt=trt.__version__)
            for export in tqdm(exports, desc="build engines", disable=not ctx.show_progress):
                folder = out / export.name
                profile = profile_shapes(onnx_input_dims(folder / OPTIMIZED), ranges[component_kind(export.name)])
                build = EngineBuild(profile, config.workspace_gb, config.builder_optimization_level)
                plan, cache = cached_engine(trt, folder / OPTIMIZED, build, cc)
                shutil.copyfile(plan, folder / plan_filename(cc))
                stage.results[export.name] = {"file": f"{export.name}/{plan_filename(cc)}", **cache,
                                              "build": build.to_dict()}
        return records

    def serving_models(self, root: Path, manifest: dict[str, Any]) -> list[tuple[ModelSpec, list[str]]]:
        built = next(s for s in manifest["lowering"]["stages"] if s["name"] == "build_engine")["results"]
        models = []
        for name in served_components(manifest):
            spec = tensorrt_model_spec(name, root / name, built[name]["build"])
            models.append((spec, sorted(spec.cc_model_filenames.values())))
        return models

    def load(self, root: Path, manifest: dict[str, Any], device: str, providers: list[str] | None):
        if device != "cuda":
            raise ArtifactError(f"{root} holds TensorRT engines, which run on CUDA GPUs only; load it with "
                                "device='cuda', or compile with --target onnx for the CPU")
        trt = require("tensorrt", "tensorrt", "loading a tensorrt artifact")
        spec = get_arch(manifest["arch"])
        built = next(s for s in manifest["lowering"]["stages"] if s["name"] == "build_engine")["results"]
        models = {name: TrtModel(trt, _engine_bytes(trt, root, name, built), name)
                  for name in (*spec.text_encoders, "unet", "vae_decoder")}
        encoders = [ort_text_encoder(models[name], spec.is_sdxl) for name in spec.text_encoders]
        return make_components(root, manifest, encoders, ort_unet(models["unet"]), ort_vae_decoder(models["vae_decoder"]))


def _verify(export, path: Path, quantization: Mapping[str, Any] | None = None) -> dict[str, Any]:
    precision = PRECISIONS[export.dtype]
    if precision == "bf16":
        return {"skipped": "ONNX Runtime's CPU provider has no bf16 kernels"}
    if quantization is not None and quantization["precision"] != "int8":
        return {"skipped": f"{quantization['precision']} Q/DQ are trt:: ops, which ONNX Runtime cannot load"}
    result = verify_model(export, path)
    # INT8 Q/DQ in ONNX Runtime vs modelopt's simulation of it (the fake-quantized module): a value on a
    # rounding boundary lands one step apart and the difference compounds through the layers (on the tiny
    # test U-Net a 1e-6 input change moves the simulation itself by ~30 dB SQNR), hence the SQNR floor
    check_verified(export.name, result, precision, quantized=quantization is not None, graph="optimized ONNX")
    return result


def _engine_bytes(trt, root: Path, name: str, built: Mapping[str, Any]) -> bytes:
    """The artifact's engine for this GPU and TensorRT, or one rebuilt (through the cache) from its ONNX."""
    cc, version = compute_capability(), trt.__version__
    plan = root / name / plan_filename(cc)
    if plan.is_file() and built["compute_capability"] == cc and built["tensorrt"] == version:
        return plan.read_bytes()
    log.warning("%s: the %s engine was built for compute capability %s with TensorRT %s; this GPU has %s and "
                "TensorRT is %s: rebuilding it from %s/%s (engine cache: %s)", root, name, built["compute_capability"],
                built["tensorrt"], cc, version, name, OPTIMIZED, knobs.cache_dir() / "engines")
    rebuilt, _ = cached_engine(trt, root / name / OPTIMIZED, EngineBuild.from_dict(built[name]["build"]), cc)
    return rebuilt.read_bytes()


# --- runtime ---------------------------------------------------------------------------------------


class TrtModel:
    """One TensorRT engine called like `OrtModel`: torch tensors by input name -> {output: float32 CPU tensor}.

    Inputs are cast to the engine's I/O types and checked against its optimization profile (an input
    outside it is the caller's error, named with the target options that widen it).
    """

    def __init__(self, trt, plan: bytes, name: str):
        self.name = name
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ArtifactError(f"TensorRT could not load the {name} engine (its log is above); recompile the artifact")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        types = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
                 trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.INT8: torch.int8,
                 trt.DataType.UINT8: torch.uint8, trt.DataType.BOOL: torch.bool}
        self.dtypes = {n: types[self.engine.get_tensor_dtype(n)] for n in names}
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.profile = {n: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0))
                        for n in self.inputs if -1 in tuple(self.engine.get_tensor_shape(n))}
        self.static = all(low == high for low, _, high in self.profile.values())  # one shape: CUDA graphs
        self.stream = torch.cuda.Stream()
        self.graph = None

    def __call__(self, outputs: list[str] | None = None, **inputs) -> dict[str, torch.Tensor]:
        feed = {n: torch.as_tensor(v).to("cuda", self.dtypes[n]).contiguous()
                for n, v in inputs.items() if n in self.inputs and v is not None}
        if set(feed) != set(self.inputs):
            raise PipelineArgumentError(f"the {self.name} engine takes inputs {self.inputs}, got {sorted(feed)}")
        for name, tensor in feed.items():
            self._check_shape(name, tuple(tensor.shape))
        result = self._replay(feed) if self.static else self._run(feed)
        return {n: result[n].float().cpu() for n in (outputs or self.outputs)}

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if name not in self.profile:
            return
        low, _, high = self.profile[name]
        if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
            raise PipelineArgumentError(
                f"{self.name} input '{name}' has shape {list(shape)}, outside the engine's optimization profile "
                f"(min {list(low)}, max {list(high)}); recompile with target options batch_size / height / width "
                "that cover it")

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


def tensorrt_model_spec(name: str, folder: Path, build: Mapping) -> ModelSpec:
    """A `tensorrt` artifact's engine as Triton sees it.

    I/O names and types are the optimized ONNX graph's (a strongly typed engine keeps them); every plan
    in the folder (`model_sm<major><minor>.plan`) goes into `cc_model_filenames`; the engine's one
    optimization profile is profile "0", and its batch range caps `max_batch_size`: a profile whose
    batch cannot go down to 1 or up past 1 (static engines) makes the model non-batching.
    """
    spec = onnx_model_spec(name, folder / OPTIMIZED)
    plans = {}
    for plan in sorted(folder.glob("model_sm*.plan")):
        digits = plan.stem.removeprefix("model_sm")
        if digits.isdigit() and len(digits) >= 2:
            plans[f"{digits[:-1]}.{digits[-1]}"] = plan.name
    if not plans:
        raise ArtifactError(f"{folder} has no TensorRT engine (model_sm<cc>.plan); recompile the artifact")
    batches = [(shapes[0][0], shapes[2][0]) for shapes in build["profile"].values() if shapes[0]]
    low = max((lo for lo, _ in batches), default=1)
    high = min((hi for _, hi in batches), default=1)
    limit, reason = high, ""
    if low > 1 or high <= 1:
        limit, reason = 0, f"the engine's optimization profile fixes the batch range to [{low}, {high}]"
    return dataclasses.replace(spec, platform="tensorrt_plan", cc_model_filenames=plans, profiles=("0",),
                               batch_limit=limit, unbatched_reason=reason)
