"""The tensorrt target's build side: optimized ONNX graphs and the engines built from them, with a cache.

`optimize_onnx`: onnx-graphsurgeon cleanup + toposort, constant folding (ONNX Runtime evaluates the
constant subgraphs, never a Q/DQ node: folding a weight's Q -> DQ would leave a rounded float weight and
a float kernel), ONNX shape inference before and after -> `<component>/model.opt.onnx` (+
`model.opt.onnx.data` over 2 GB); `carry_lora_map` rewrites the export's LoRA weight map for it
(`model.opt.lora_map.json`: run-time LoRAs through engine refit).

Engines: `build_serialized_engine` parses an optimized graph into a strongly typed network (TensorRT 10
deprecates the weakly typed FP16/BF16/INT8/FP8 builder flags and 11 removes them: precision lives in the
graph) and builds it with one optimization profile (min / opt / max shapes), a workspace limit, a
builder optimization level and a timing cache shared by all builds
(`<cache>/engines/timing-trt<version>-sm<cc>.cache`). Plans are named `model_sm<major><minor>.plan` (the
names Triton's `cc_model_filenames` maps compute capabilities to).

Engine cache (`cached_engine`): key = sha256 of (sha256 of the optimized ONNX files, the build settings,
the GPU's compute capability, the TensorRT version), plans under `<cache>/engines/<key>/model.plan`; a hit
skips the build. The compile's `build_engine` stage and the load-time rebuild both go through it.

`trt` is the `tensorrt` module, passed in: TensorRT is imported lazily by the callers (tests pass a fake).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from sdcompiler import knobs
from sdcompiler.artifact import sha256_file
from sdcompiler.errors import LoweringError, require
from sdcompiler.targets.components import lora_map_path
from sdcompiler.targets.tensorrt.config import Shapes

OPTIMIZED = "model.opt.onnx"
ENGINE_FORMAT = 1  # bump when the same inputs would build a different engine (part of the cache key)


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
    onnx.save_model(
        model,
        str(target),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=target.name + ".data",
        size_threshold=1024,
    )
    del model
    onnx.shape_inference.infer_shapes_path(str(target), str(target))
    optimized = len(onnx.load(str(target), load_external_data=False).graph.node)
    return {
        "nodes_before": nodes,
        "nodes_after": optimized,
        "files": sorted(p.name for p in target.parent.glob(target.name + "*")),
    }


def carry_lora_map(raw_map: Path, optimized: Path) -> dict[str, int]:
    """Rewrite the export's LoRA weight map (`lora_map.json`, naming the raw graph's initializers) for the
    optimized graph: `lora_map_path(optimized)`, each entry with the initializer's shape; the raw map is removed
    with the raw graph.

    Cleanup and folding keep the initializers a node reads directly (a weight is never computed, so never
    folded: checked on the tiny SD1.5 exports in fp32, fp16 and bf16 and the SDXL one in fp16); an entry whose
    initializer is gone all the same is dropped, so a LoRA that changes it is refused rather than refitted into
    nothing.
    """
    import onnx

    entries = json.loads(raw_map.read_text())["weights"]
    graph = onnx.load(str(optimized), load_external_data=False).graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    kept = {p: {**e, "shape": shapes[e["initializer"]]} for p, e in entries.items() if e["initializer"] in shapes}
    lora_map_path(optimized).write_text(json.dumps({"version": 1, "weights": kept}, sort_keys=True) + "\n")
    raw_map.unlink()
    return {"weights": len(kept), "dropped": len(entries) - len(kept)}


QDQ_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "TRT_FP8QuantizeLinear",
    "TRT_FP8DequantizeLinear",
    "TRT_INT4QuantizeLinear",
    "TRT_INT4DequantizeLinear",
}


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
    refit: bool = False  # every weight refittable: run-time LoRAs (`tensorrt.refit`)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ENGINE_FORMAT,
            "strongly_typed": True,
            "workspace_gb": self.workspace_gb,
            "builder_optimization_level": self.builder_optimization_level,
            "refit": self.refit,
            "profile": {name: [list(s) for s in shapes] for name, shapes in sorted(self.profile.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EngineBuild":
        profile = {name: tuple(tuple(s) for s in shapes) for name, shapes in data["profile"].items()}
        return cls(profile, data["workspace_gb"], data["builder_optimization_level"], data.get("refit", False))


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
        raise LoweringError(
            f"TensorRT could not parse {onnx_path}: {errors or 'no parser error recorded'}; "
            f"reproduce with: {trtexec_command(onnx_path, build)}"
        )
    config = builder.create_builder_config()
    if build.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(build.workspace_gb * (1 << 30)))
    config.builder_optimization_level = build.builder_optimization_level
    if build.refit:
        # REFIT: every weight may change after the build, so TensorRT cannot fold weight values into its kernels
        # (a LoRA changes them). Not REFIT_IDENTICAL: that flag promises the refit weights equal the build's (the
        # weight-stripped plans of STRIP_PLAN, refilled at load) and lets TensorRT optimize on their values, so a
        # LoRA's weights would run wrong; not REFIT_INDIVIDUAL, which needs each refittable weight marked on the
        # network (fewer refittable weights, faster kernels: a later step, using the LoRA map's names). TensorRT
        # 11.3's docs list a known issue: a REFIT engine may drop a GEMM bias (tests/gpu compares the images)
        config.set_flag(trt.BuilderFlag.REFIT)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in build.profile.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise LoweringError(
            f"TensorRT could not build an engine from {onnx_path} (its log is above); "
            f"reproduce with: {trtexec_command(onnx_path, build)}"
        )
    _write_atomically(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def trtexec_command(onnx_path: Path, build: EngineBuild) -> str:
    """The trtexec command line that builds the same engine (for error messages)."""

    def shapes(i: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, s[i]))}" for name, s in build.profile.items())

    parts = [
        f"trtexec --onnx={onnx_path} --stronglyTyped",
        f"--minShapes={shapes(0)} --optShapes={shapes(1)} --maxShapes={shapes(2)}",
        f"--builderOptimizationLevel={build.builder_optimization_level}",
    ]
    if build.refit:
        parts.append("--refit")
    if build.workspace_gb is not None:
        parts.append(f"--memPoolSize=workspace:{int(build.workspace_gb * 1024)}")
    return " ".join(parts)


def engine_cache_key(onnx_sha256: str, build: Mapping[str, Any], compute_capability: str, tensorrt_version: str) -> str:
    """sha256 over everything an engine depends on: the graph, the build settings, the GPU arch, TensorRT."""
    blob = json.dumps(
        {"onnx": onnx_sha256, "build": build, "compute_capability": compute_capability, "tensorrt": tensorrt_version},
        sort_keys=True,
    )
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


def built_engines(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The `build_engine` stage's results in an artifact's manifest: the compute capability and TensorRT
    version the plans were built for, and each component's plan file, cache key and `EngineBuild`."""
    return next(s for s in manifest["lowering"]["stages"] if s["name"] == "build_engine")["results"]


def compute_capability() -> str:
    """The current CUDA device's compute capability, "major.minor" (Triton's cc_model_filenames keys)."""
    return "{}.{}".format(*torch.cuda.get_device_capability())


def plan_filename(compute_capability: str) -> str:
    """ "9.0" -> "model_sm90.plan"."""
    return f"model_sm{compute_capability.replace('.', '')}.plan"


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
