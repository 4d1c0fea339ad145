"""`target="tensorrt"`: the target's stages, its load, and its engines as Triton models.

`TensorRTTarget.lower` runs three stages, each writing files into the artifact:

1. `export_onnx`: the onnx target's export stage (`onnx_target.export_onnx_stage`, through
   `sdcompiler.passes.onnx_export`): optimum's names and dynamic axes, TorchScript exporter. Precision
   lives in the graph, because every engine is built from a strongly typed network: `fp16` / `bf16` /
   `fp32` export the U-Net in that type, the text encoders too except under `bf16` (the TorchScript
   exporter fails on bf16 CLIP graphs, so they stay fp32), the VAE decoder in `vae_precision`. INT8 /
   FP8 engines come from the ptq pass (presets `int8`, `fp8`): its modelopt backend leaves a
   fake-quantized U-Net that exports as Q/DQ pairs around each quantized op (standard QuantizeLinear /
   DequantizeLinear for INT8, `trt::TRT_FP8*` for FP8) with scales in the graph's own float type (a
   strongly typed network needs them there) at opset >= 19 (the first whose Q/DQ take fp16 / bf16); the
   strongly typed builder picks INT8 / FP8 kernels from them.
2. `optimize_onnx`: `build.optimize_onnx` on each graph -> `<component>/model.opt.onnx`; the raw export
   is dropped, its LoRA weight map carried to the optimized graph (`build.carry_lora_map`). With `verify`, each optimized graph is compared with its torch module on the export
   inputs in ONNX Runtime (as the onnx target does; an INT8 Q/DQ U-Net against its fake-quantized module
   with the onnx target's SQNR floor; bf16 graphs and FP8 Q/DQ are skipped: ONNX Runtime has no bf16 CPU
   kernels and cannot load `trt::` ops).
3. `build_engine`: one engine per component, `<component>/model_sm<major><minor>.plan`, built through
   the engine cache (`build.cached_engine`) with the optimization profile `config.dimension_ranges`
   gives the component's graph inputs; `refit` builds them refittable (run-time LoRAs: `refit.switch`). With `engines=false` no TensorRT runs: the stage records each
   component's build (profile, settings) without a plan, and the load builds the engines from the ONNX.
   `check_tools` refuses a missing TensorRT or GPU before `compile_pipeline` loads the checkpoint.

With ControlNets (`compile_pipeline(controlnet=...)`) each net gets its own graph and engine, as in the onnx
target (`<folder>/model.opt.onnx`, `<folder>/model_sm<cc>.plan`; the U-Net graph takes their residuals as
inputs), in the U-Net's precision; the profiles add the control image's pixel range and each residual's
range (`config.dimension_ranges`). UNVERIFIED like the rest of the target's engine code: no TensorRT here.

Loading is `runtime.load_components`; `tensorrt_model_spec` describes an engine to `sdcompiler.serving`.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from sdcompiler.errors import ArtifactError, ConfigError, LoweringError, MissingDependencyError, require
from sdcompiler.passes import QuantizedUNet
from sdcompiler.passes.onnx_export import OnnxExport, component_exports
from sdcompiler.targets.base import LowerContext, Stage, StageRecord, Target, check_runtime_loras
from sdcompiler.targets.components import cache_settings, lora_map_path
from sdcompiler.targets.onnx_target import (
    check_verified,
    controlnet_interface,
    export_onnx_stage,
    served_components,
    verify_model,
)
from sdcompiler.targets.served_models import ModelSpec, onnx_model_spec
from sdcompiler.targets.tensorrt.build import (
    OPTIMIZED,
    EngineBuild,
    built_engines,
    cached_engine,
    carry_lora_map,
    compute_capability,
    optimize_onnx,
    plan_filename,
)
from sdcompiler.targets.tensorrt.config import (
    DTYPES,
    PRECISIONS,
    ModelSizes,
    Range,
    TensorRTTargetConfig,
    component_kind,
    dimension_ranges,
    onnx_input_dims,
    profile_shapes,
)
from sdcompiler.targets.tensorrt.runtime import load_components

QDQ_OPSET = 19  # the first opset whose QuantizeLinear / DequantizeLinear take fp16 and bf16 (the graph's type)


class TensorRTTarget(Target):
    name = "tensorrt"
    config_class = TensorRTTargetConfig
    serves_components = True

    def check_tools(self, config: TensorRTTargetConfig) -> None:
        if not config.engines:
            return  # the optimized ONNX only: nothing of TensorRT's runs
        without = "or compile the optimized ONNX without engines: --option engines=false"
        try:
            require("tensorrt", "tensorrt", "the tensorrt target's build_engine stage")
        except MissingDependencyError as exc:
            raise MissingDependencyError(f"{exc} ({without})") from None
        if not torch.cuda.is_available():
            raise LoweringError(
                "building TensorRT engines needs a CUDA GPU and torch sees none; compile on the kind of GPU "
                f"that will run the artifact, use target onnx, {without}"
            )

    def lower(self, pipe, out: Path, config: TensorRTTargetConfig, ctx: LowerContext) -> list[StageRecord]:
        handed = _handed_quantization(ctx)
        exports = _component_exports(pipe, ctx.arch, config, ctx.controlnets)
        ranges = dimension_ranges(config, _model_sizes(pipe, ctx, exports))  # before any work: checks height / width
        quantization = handed.settings if handed is not None else None
        records: list[StageRecord] = []
        _export_onnx_stage(records, pipe, out, exports, config, quantization, ctx)
        _optimize_onnx_stage(records, out, exports, config, quantization, ctx)
        _build_engine_stage(records, out, exports, config, ranges, ctx)
        return records

    def serving_models(self, root: Path, manifest: dict[str, Any]) -> list[tuple[ModelSpec, dict[str, str]]]:
        built = built_engines(manifest)
        if built["compute_capability"] is None:
            raise ArtifactError(
                f"{root} was compiled with engines=false: it holds the optimized ONNX but no engines to serve; "
                "recompile on the serving GPU without that option"
            )
        models = []
        for name in served_components(manifest):
            spec = tensorrt_model_spec(name, root / name, built[name]["build"])
            models.append((spec, {plan: f"{name}/{plan}" for plan in sorted(spec.cc_model_filenames.values())}))
        return models

    def load(self, root: Path, manifest: dict[str, Any], device: str, providers: list[str] | None):
        return load_components(root, manifest, device)

    def check_loras(self, manifest: dict[str, Any], loras: list[tuple[str, float]]) -> None:
        if loras and not manifest["lowering"]["config"].get("refit", False):
            raise ConfigError(
                "LoRAs switch at run time on tensorrt artifacts whose engines are refittable, and this one was "
                "built without it; recompile with --option refit=true, or merge the LoRAs at compile time (merge_lora)"
            )
        check_runtime_loras(manifest, loras)

    def switch_loras(self, components, root, manifest, loras, touched) -> dict[str, list[str]]:
        """Refit the U-Net and text-encoder engines with the LoRAs' fused weights (`tensorrt.refit`, UNVERIFIED:
        written against TensorRT's refitter API, never run on a real TensorRT); the files stay as they are."""
        from sdcompiler.targets.tensorrt.refit import switch

        return switch(components, root, manifest, loras, touched)


def _handed_quantization(ctx: LowerContext) -> QuantizedUNet | None:
    """The ptq pass's quantized U-Net, if any; refuses what the target cannot build (before any export)."""
    handed = ctx.products.unet_quantization
    if handed is not None and handed.backend != "modelopt":
        raise LoweringError(
            f"the tensorrt target builds from modelopt's Q/DQ U-Net, not a {handed.backend} "
            "graph; use ptq backend modelopt (the default for target tensorrt)"
        )
    if cache_settings({"defaults": ctx.defaults}) is not None:
        raise LoweringError(
            "the tensorrt target does not build the feature cache's shallow U-Net yet; "
            "use target onnx or torch, or drop deepcache"
        )
    return handed


def _model_sizes(pipe, ctx: LowerContext, exports: list[OnnxExport]) -> ModelSizes:
    """The facts about the pipeline's model that its optimization profiles derive from."""
    guidance = ctx.defaults.get("guidance_scale", ctx.arch.default_guidance_scale) > 1.0
    return ModelSizes(
        pipe.vae_scale_factor,
        pipe.unet.config.sample_size * pipe.vae_scale_factor,
        getattr(pipe, ctx.arch.tokenizers[0]).model_max_length,  # the refiner has tokenizer_2 only
        guidance and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None,  # embedded w: no CFG
        _residual_factors(exports),
    )


def _residual_factors(exports: list[OnnxExport]) -> tuple[tuple[str, int], ...]:
    """Each ControlNet residual input of the U-Net graph and the power of 2 its height and width are smaller
    than the latents' by (rounded up, as each stride-2 downsampler rounds), read off the export's example
    inputs."""
    (unet,) = [e for e in exports if e.name == "unet"]
    inputs = dict(zip(unet.input_names, unet.args))
    latent = tuple(inputs["sample"].shape[-2:])
    factors = []
    for name, value in inputs.items():
        if not name.endswith("_additional_residual"):
            continue
        down = 1
        while -(-latent[0] // down) > value.shape[-2] and down < latent[0]:
            down *= 2
        if tuple(value.shape[-2:]) != tuple(-(-side // down) for side in latent):
            raise LoweringError(
                f"ControlNet residual {name} is {tuple(value.shape[-2:])} for {latent} latents, not a power-of-2 "
                "reduction the tensorrt target can give a profile for; use target onnx for this model"
            )
        factors.append((name, down))
    return tuple(factors)


def _component_exports(pipe, spec, config: TensorRTTargetConfig, controlnets=None) -> list:
    """The onnx target's exports, each in the dtype this target's precision gives its component (ControlNet
    graphs in the U-Net's)."""
    exports = component_exports(pipe, spec, vae_encoder=False, controlnets=controlnets or None)  # no VAE encoder
    text = "fp32" if config.precision == "bf16" else config.precision  # bf16 CLIP graphs fail to export
    precision = {"unet": config.precision, "vae_decoder": config.vae_precision}
    precision |= {folder: config.precision for folder in controlnets or {}}
    return [dataclasses.replace(e, dtype=DTYPES[precision.get(e.name, text)]) for e in exports]


def _export_onnx_stage(
    records: list[StageRecord],
    pipe,
    out: Path,
    exports: list[OnnxExport],
    config: TensorRTTargetConfig,
    quantization: Mapping[str, Any] | None,
    ctx: LowerContext,
) -> None:
    """Stage `export_onnx`: the onnx target's, each graph in its precision, a Q/DQ U-Net at `QDQ_OPSET` or later."""
    dtypes = {e.name: PRECISIONS[e.dtype] for e in exports}
    if quantization is not None:  # the ptq pass's Q/DQ: scales in the graph's own float type (strongly typed)
        from sdcompiler.passes.ptq_modelopt import set_export_dtype

        set_export_dtype(pipe.unet, DTYPES[dtypes["unet"]])
    settings = {"opset": config.opset, "exporter": "torchscript", "dtypes": dtypes, "unet_quantization": quantization}
    if ctx.controlnets:  # the onnx target's convention: the ControlNet graphs' outputs, the U-Net's extra inputs
        settings["controlnet_residuals"] = controlnet_interface(exports, list(ctx.controlnets))
    opsets = {"unet": max(config.opset, QDQ_OPSET)} if quantization else None
    export_onnx_stage(records, pipe, out, exports, ctx, settings, config.opset, opsets=opsets)


def _optimize_onnx_stage(
    records: list[StageRecord],
    out: Path,
    exports: list[OnnxExport],
    config: TensorRTTargetConfig,
    quantization: Mapping[str, Any] | None,
    ctx: LowerContext,
) -> None:
    """Stage `optimize_onnx`: each raw export replaced by its optimized graph (checked against torch with `verify`)."""
    from tqdm.auto import tqdm

    with Stage(records, "optimize_onnx", {"tool": "onnx-graphsurgeon", "verify": config.verify}) as stage:
        for export in tqdm(exports, desc="optimize onnx", disable=not ctx.show_progress):
            folder = out / export.name
            stage.results[export.name] = optimize_onnx(folder / "model.onnx", folder / OPTIMIZED)
            if lora_map_path(folder / "model.onnx").is_file():  # U-Net and text encoders
                raw_map = lora_map_path(folder / "model.onnx")
                stage.results[export.name]["lora_map"] = carry_lora_map(raw_map, folder / OPTIMIZED)
            for raw in folder.glob("model.onnx*"):
                raw.unlink()
            if config.verify:
                quantized = quantization if export.name == "unet" else None
                stage.results[export.name]["verify"] = _verify(export, folder / OPTIMIZED, quantized)


def _build_engine_stage(
    records: list[StageRecord],
    out: Path,
    exports: list[OnnxExport],
    config: TensorRTTargetConfig,
    ranges: Mapping[str, Mapping[str, Range]],
    ctx: LowerContext,
) -> None:
    """Stage `build_engine`: one plan per component for this GPU, through the engine cache."""
    from tqdm.auto import tqdm

    settings = {
        "precision": config.precision,
        "vae_precision": config.vae_precision,
        "static": config.static,
        "workspace_gb": config.workspace_gb,
        "builder_optimization_level": config.builder_optimization_level,
        "refit": config.refit,
    }
    with Stage(records, "build_engine", settings | {"engines": config.engines}) as stage:
        if not config.engines:  # each component's build, recorded for the load to build its engine from
            stage.results.update(compute_capability=None, tensorrt=None)
            for export in exports:
                profile = profile_shapes(
                    onnx_input_dims(out / export.name / OPTIMIZED), ranges[component_kind(export.name)]
                )
                build = EngineBuild(profile, config.workspace_gb, config.builder_optimization_level, config.refit)
                stage.results[export.name] = {"file": None, "build": build.to_dict()}
            return
        trt = require("tensorrt", "tensorrt", "the tensorrt target's build_engine stage")
        if not torch.cuda.is_available():
            raise LoweringError(
                "building TensorRT engines needs a CUDA GPU and torch sees none; compile on "
                "the kind of GPU that will run the artifact, or use target onnx"
            )
        cc = compute_capability()
        stage.results.update(compute_capability=cc, tensorrt=trt.__version__)
        for export in tqdm(exports, desc="build engines", disable=not ctx.show_progress):
            folder = out / export.name
            profile = profile_shapes(onnx_input_dims(folder / OPTIMIZED), ranges[component_kind(export.name)])
            build = EngineBuild(profile, config.workspace_gb, config.builder_optimization_level, config.refit)
            plan, cache = cached_engine(trt, folder / OPTIMIZED, build, cc)
            shutil.copyfile(plan, folder / plan_filename(cc))
            stage.results[export.name] = {
                "file": f"{export.name}/{plan_filename(cc)}",
                **cache,
                "build": build.to_dict(),
            }


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
    return dataclasses.replace(
        spec,
        platform="tensorrt_plan",
        cc_model_filenames=plans,
        profiles=("0",),
        batch_limit=limit,
        unbatched_reason=reason,
    )
