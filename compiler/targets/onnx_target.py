"""`target="onnx"`: ONNX models in optimum's diffusers layout, run by ONNX Runtime.

Stages: `export_onnx` (U-Net, text encoder(s), VAE decoder and encoder through
the ONNX component interface, `sdcompiler.passes.onnx_export`, at opset 18:
optimum's names, dtypes and dynamic axes, so `ORTDiffusionPipeline` loads the
artifact too), `quantize_onnx` when the `ptq` pass left an int8 U-Net graph
(`LowerContext.products.unet_quantization`, see `sdcompiler.passes.ptq`: it replaces the float U-Net export after an
interface check; its settings go to the stage record), then `verify` (each
ONNX model vs its torch module on the export inputs: max abs error and SQNR
recorded; a quantized U-Net must keep `MIN_SQNR_DB` instead of the float
tolerance).

A `feature_cache` (preset `deepcache`) artifact's U-Net is three graphs (see
`sdcompiler.passes.onnx_export`): `unet/model.onnx`, the plain U-Net optimum
runs; `unet/refresh.onnx` (component `unet_refresh`), the same graph with the
deep features as a second output, sharing `unet/model.onnx.data` with it (the
weights are stored once); and `unet_shallow/model.onnx`. The runtime runs the
refresh graph on the plan's full steps (and for uncached calls: one session
holds the U-Net) and the shallow graph in between. Artifacts compiled before
the refresh graph existed (a two-output `unet/model.onnx`) still load.

The `export_onnx` stage (`export_onnx_stage`), the export check (`verify_model`,
`check_verified`) and the served components are shared with the tensorrt
target, which builds its engines from the same graphs.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from sdcompiler.archs import get_arch
from sdcompiler.artifact import confined
from sdcompiler.errors import ArtifactError, LoweringError
from sdcompiler.passes import PassConfig, QuantizedUNet
from sdcompiler.passes.onnx_export import (
    OPSET,
    UNET_REFRESH,
    WEIGHTS_FILE,
    OnnxExport,
    component_exports,
    export_model,
    graph_path,
    initializer_names,
    lora_weight_map,
    shallow_controlnet_graph,
    write_graph_view,
)
from sdcompiler.targets.base import (
    LowerContext,
    Stage,
    StageRecord,
    Target,
    check_runtime_loras,
    write_pipeline_files,
)
from sdcompiler.targets.components import (
    FINAL_NORM,
    OrtModel,
    cache_settings,
    lora_component,
    lora_map_path,
    make_components,
    ort_controlnets,
    ort_feature_cache,
    ort_text_encoder,
    ort_unet,
    ort_vae_decoder,
    ort_vae_encoder,
)
from sdcompiler.targets.served_models import ModelSpec, onnx_model_spec

# Relative tolerance of the export check: |onnx - torch|max / max(1, |torch|max).
TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}
# Floor of the export check for an int8 U-Net (eps SQNR vs torch on the random export inputs): it catches a
# wrong or mis-wired graph, not quantization error, which the ptq pass measures on real trajectories.
MIN_SQNR_DB = 10.0


@dataclass(frozen=True)
class OnnxTargetConfig(PassConfig):
    # bf16 is not offered: the TorchScript exporter at torch 2.13 fails on bf16 CLIP graphs
    # ("ScalarType ComplexDouble is an unexpected tensor scalar type") and ORT's CPU EP lacks bf16 kernels.
    precision: Literal["fp32", "fp16"] = "fp32"  # U-Net and text encoders
    vae_precision: Literal["fp32", "fp16"] = "fp32"  # fp16 VAE decoders can give black images
    opset: int = OPSET
    verify: bool = True
    vae_encoder: bool = True  # export the VAE encoder too (image-to-image; optimum's vae_encoder folder)


def verify_model(export: OnnxExport, path: Path) -> dict[str, float]:
    """Compare the ONNX model with its torch module on the export inputs."""
    session = OrtModel(path, ["CPUExecutionProvider"])
    with torch.no_grad():
        expected = export.module(*export.args)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = session(export.output_names, **dict(zip(export.input_names, export.args)))
    error, scale, signal, noise, nonfinite = 0.0, 1.0, 0.0, 0.0, 0
    for name, ref in zip(export.output_names, expected):
        ref, out = ref.float(), got[name]
        # max() would drop a NaN (max(0.0, nan) is 0.0): count non-finite values on their own
        nonfinite += int((~torch.isfinite(ref)).sum() + (~torch.isfinite(out)).sum())
        error = max(error, (out - ref).abs().max().item())
        scale = max(scale, ref.abs().max().item())
        signal += ref.pow(2).sum().item()
        noise += (out - ref).pow(2).sum().item()
    del session
    result = {
        "max_abs_error": error,
        "relative_error": error / scale,
        "sqnr_db": 10 * math.log10(max(signal, 1e-20) / max(noise, 1e-20)),
    }
    return result | ({"nonfinite_values": nonfinite} if nonfinite else {})


def check_verified(
    name: str, result: Mapping[str, float], precision: str, quantized: bool, graph: str = "ONNX"
) -> None:
    """Raise when `verify_model`'s `result` shows the graph disagreeing with its torch module.

    A float graph must stay within `TOLERANCE[precision]`; a quantized U-Net (int8 Q/DQ) only above
    `MIN_SQNR_DB`, a floor for a wrong or mis-wired graph: quantization error itself is the ptq pass's
    measurement, on real trajectories. Non-finite outputs (of the graph or of torch itself) fail either way.
    """
    if result.get("nonfinite_values"):
        raise LoweringError(
            f"{graph} {name} gives {result['nonfinite_values']} NaN/Inf values on the export inputs (the torch "
            "module too, if the checkpoint's weights hold NaN/Inf); check the checkpoint and the passes' metrics"
        )
    if quantized:
        if result["sqnr_db"] < MIN_SQNR_DB:
            raise LoweringError(
                f"the int8 {graph} U-Net disagrees with torch (SQNR {result['sqnr_db']:.1f} dB < "
                f"{MIN_SQNR_DB:.0f} dB on the export inputs); report the model"
            )
    elif result["relative_error"] > TOLERANCE[precision]:
        raise LoweringError(
            f"{graph} {name} disagrees with torch (relative error {result['relative_error']:.2e} "
            f"> {TOLERANCE[precision]:.0e} at {precision}); try precision='fp32' or report the model"
        )


def install_quantized_unet(source: Path, folder: Path, export: OnnxExport) -> dict[str, Any]:
    """Put the quantized U-Net graph in `source` into `folder`, in place of the float export it replaces.

    The graph must have the interface the float export would have (input and output names, input
    ranks): the ptq pass exports the same module through the same wrapper, and this check catches any
    drift between them without exporting the float U-Net a second time.
    """
    import onnx

    args = [a for a in export.args if a is not None]
    expected = ([(name, a.dim()) for name, a in zip(export.input_names, args)], list(export.output_names))
    quantized = onnx.load(str(source / "model.onnx"), load_external_data=False)
    weights = {t.name for t in quantized.graph.initializer}
    got = (
        [(i.name, len(i.type.tensor_type.shape.dim)) for i in quantized.graph.input if i.name not in weights],
        [o.name for o in quantized.graph.output],
    )
    if got != expected:
        raise LoweringError(
            f"the ptq pass's int8 U-Net has inputs/outputs {got}, the exported U-Net would have "
            f"{expected}; the two exports drifted apart: report this"
        )
    folder.mkdir(parents=True, exist_ok=True)
    for file in folder.glob("model.onnx*"):
        file.unlink()
    for file in sorted(source.glob("model.onnx*")):
        shutil.copyfile(file, folder / file.name)
    ops = [node.op_type for node in quantized.graph.node]
    return {
        "files": sorted(p.name for p in folder.iterdir()),
        "quantize_linear": ops.count("QuantizeLinear"),
        "dequantize_linear": ops.count("DequantizeLinear"),
    }


class OnnxTarget(Target):
    name = "onnx"
    config_class = OnnxTargetConfig
    serves_components = True

    def lower(self, pipe, out: Path, config: OnnxTargetConfig, ctx: LowerContext) -> list[StageRecord]:
        quantized = ctx.products.unet_quantization  # left by the ptq pass
        if quantized is not None and quantized.backend != "onnxruntime":
            raise LoweringError(
                f"the onnx target runs ONNX Runtime's int8 graphs, not a {quantized.backend} "
                f"{quantized.precision} U-Net; use ptq backend onnxruntime or target tensorrt"
            )
        cache = cache_settings({"defaults": ctx.defaults})
        if quantized is not None and cache is not None:
            raise LoweringError(
                "the onnx target cannot split a ptq int8 U-Net for feature_cache yet; drop one of the two passes"
            )
        exports = component_exports(
            pipe,
            ctx.arch,
            config.precision,
            config.vae_precision,
            config.vae_encoder,
            cache,
            controlnets=ctx.controlnets,
        )
        records: list[StageRecord] = []
        settings = {
            "opset": config.opset,
            "exporter": "torchscript",
            "precision": config.precision,
            "vae_precision": config.vae_precision,
        }
        if ctx.controlnets:  # the convention the ControlNet graphs and the U-Net's residual inputs follow
            settings["controlnet_residuals"] = controlnet_interface(exports, list(ctx.controlnets))
        replaced = {"unet": "replaced by the ptq pass's graph (quantize_onnx)"} if quantized is not None else None
        paths = export_onnx_stage(records, pipe, out, exports, ctx, settings, config.opset, replaced=replaced)
        if quantized is not None:
            _quantize_onnx_stage(records, out, exports, quantized)
        if config.verify:
            _verify_stage(records, exports, paths, config, quantized is not None, ctx)
        return records

    def serving_models(self, root: Path, manifest: dict[str, Any]) -> list[tuple[ModelSpec, dict[str, str]]]:
        # each graph as it lies in the artifact, as model.onnx [+ its folder's external-data file]
        models = []
        for name in served_components(manifest):
            graph = graph_path(name)
            weights = f"{Path(graph).parent.as_posix()}/{WEIGHTS_FILE}"
            files = {"model.onnx": graph} | ({WEIGHTS_FILE: weights} if (root / weights).is_file() else {})
            models.append((onnx_model_spec(name, root / graph), files))
        return models

    def check_loras(self, manifest: dict[str, Any], loras: list[tuple[str, float]]) -> None:
        check_runtime_loras(manifest, loras)

    def switch_loras(self, components, root, manifest, loras, touched) -> dict[str, list[str]]:
        """Rebuild the U-Net and text-encoder sessions with the LoRAs' fused weights as initializer overrides
        (`sdcompiler.targets.onnx_loras`); the artifact's files stay as they are."""
        from sdcompiler.targets.lora_weights import check_maps, lora_graphs
        from sdcompiler.targets.onnx_loras import switch

        if loras:
            check_maps({n: root / graph_path(n) for n in lora_graphs(manifest, components.backends)}, "onnx")
        return switch(components, root, manifest, loras)

    def load(self, root: Path, manifest: dict[str, Any], device: str, providers: list[str] | None):
        from sdcompiler import knobs

        spec = get_arch(manifest["arch"])
        if providers is None:
            providers = (
                ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
            )
        threads = knobs.apply_num_threads()  # torch's count: the sampling loop runs torch ops between sessions
        models = {}

        def session(name: str) -> OrtModel:
            models[name] = OrtModel(root / graph_path(name), providers, threads)
            return models[name]

        encoders = [ort_text_encoder(session(n), spec.is_sdxl, root / n / FINAL_NORM) for n in spec.text_encoders]
        # with a feature cache, the refresh graph serves the uncached calls too: one session holds the U-Net
        unet_name = unet_component(manifest)
        unet_model = session(unet_name)
        decode = ort_vae_decoder(session("vae_decoder"))
        # absent in artifacts compiled with vae_encoder=false
        encode = ort_vae_encoder(session("vae_encoder")) if (root / "vae_encoder" / "model.onnx").is_file() else None
        settings, cache = cache_settings(manifest), None
        if settings is not None:
            check_refresh_graph(root, unet_name, unet_model.outputs)
            cache = ort_feature_cache(unet_model, session("unet_shallow"), settings)
        controlnets = None
        if manifest.get("controlnets"):
            nets, configs = [], []
            for entry in manifest["controlnets"]:  # in call order
                configs.append(controlnet_config(confined(root, entry["folder"], "a ControlNet folder")))
                nets.append(session(entry["folder"]))
            check_residual_inputs(root, unet_model, nets[0])
            shallow = None
            if cache is not None:  # the shallow graph takes the shallow skips' residuals (at least conv_in's)
                check_residual_inputs(root, models["unet_shallow"], nets[0], shallow=True)
                names = [shallow_controlnet_graph(entry["folder"]) for entry in manifest["controlnets"]]
                if all((root / graph_path(name)).is_file() for name in names):  # (absent: the whole nets run)
                    shallow = [session(name) for name in names]
            controlnets = ort_controlnets(nets, configs, shallow)
        return make_components(
            root,
            manifest,
            encoders,
            ort_unet(unet_model),
            decode,
            feature_cache=cache,
            encode_image=encode,
            backends=models,
            controlnets=controlnets,
        )


def export_onnx_stage(
    records: list[StageRecord],
    pipe,
    out: Path,
    exports: list[OnnxExport],
    ctx: LowerContext,
    settings: dict[str, Any],
    opset: int,
    opsets: Mapping[str, int] | None = None,
    replaced: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Stage `export_onnx`: each export to `<out>/<name>/model.onnx`, then the component configs and the
    pipeline files (tokenizers, scheduler, `model_index.json`) of optimum's diffusers layout.

    The onnx and tensorrt targets both start with this stage, so their artifacts share one layout. Its
    record's results hold, per component, the files of its folder (or the `replaced` note).

    Args:
        records: the lowering's stage records; this stage's record is appended.
        pipe: the transformed pipeline.
        out: the artifact folder being written.
        exports: the components to export (`component_exports`), in order (a view after the graph it views).
        ctx: the lowering context (the arch's text encoders, the progress bar switch).
        settings: the stage's recorded settings.
        opset: the ONNX opset of every export not in `opsets`.
        opsets: per-component opsets that differ from `opset` (the tensorrt target's Q/DQ U-Net).
        replaced: components a later stage installs instead of exporting them (the ptq pass's U-Net
            graph), each with the note recorded as its result; only their folder is made.

    Returns:
        Each component's graph path (`<out>/<name>/model.onnx`, or where `graph_path` puts it), replaced
        components included.
    """
    from tqdm.auto import tqdm

    opsets, replaced = opsets or {}, replaced or {}
    paths, lora_maps = {}, {}
    with Stage(records, "export_onnx", settings) as stage:
        for export in tqdm(exports, desc="export onnx", disable=not ctx.show_progress):
            path = out / export.path
            if export.name in replaced:
                path.parent.mkdir(parents=True, exist_ok=True)
                paths[export.name] = path
                stage.results[export.name] = replaced[export.name]
                continue
            if export.view_of is not None:  # not traced: a cut-down copy of an exported graph, same weights file
                paths[export.name] = write_graph_view(paths[export.view_of], path, export.output_names)
            else:
                paths[export.name] = export_model(export, path.parent, opsets.get(export.name, opset))
            component = lora_component(export.name, ctx.arch.text_encoders)
            if component is not None:
                # a view holds its source's initializers under the same names: its source's map
                source = export.view_of or export.name
                if source not in lora_maps:
                    lora_maps[source] = lora_weight_map(getattr(pipe, component), paths[source], export.dtype)
                held = initializer_names(paths[export.name])
                weights = {k: v for k, v in lora_maps[source].items() if v["initializer"] in held}
                lora_map_path(paths[export.name]).write_text(
                    json.dumps({"version": 1, "weights": weights}, sort_keys=True) + "\n"
                )
            stage.results[export.name] = sorted(p.name for p in path.parent.iterdir())
        write_component_configs(pipe, out, ctx)
        write_pipeline_files(
            pipe,
            out,
            {
                n: [type(getattr(pipe, n)).__module__.split(".")[0], type(getattr(pipe, n)).__name__]
                for n in (*ctx.arch.text_encoders, "unet", "vae")
            },
        )
    return paths


def _quantize_onnx_stage(
    records: list[StageRecord], out: Path, exports: list[OnnxExport], quantized: QuantizedUNet
) -> None:
    """Stage `quantize_onnx`: the ptq pass's int8 U-Net graph in place of the float export it replaces."""
    with Stage(records, "quantize_onnx", quantized.settings) as stage:
        unet_export = next(e for e in exports if e.name == "unet")
        stage.results["unet"] = install_quantized_unet(quantized.onnx_folder, out / "unet", unet_export)


def _verify_stage(
    records: list[StageRecord],
    exports: list[OnnxExport],
    paths: Mapping[str, Path],
    config: OnnxTargetConfig,
    int8_unet: bool,
    ctx: LowerContext,
) -> None:
    """Stage `verify`: each graph vs its torch module on the export inputs in ONNX Runtime (CPU)."""
    from tqdm.auto import tqdm

    with Stage(records, "verify", {"provider": "CPUExecutionProvider"}) as stage:
        for export in tqdm(exports, desc="verify onnx", disable=not ctx.show_progress):
            precision = config.vae_precision if export.name.startswith("vae_") else config.precision
            result = verify_model(export, paths[export.name])
            stage.results[export.name] = result
            check_verified(export.name, result, precision, quantized=int8_unet and export.name == "unet")


def write_component_configs(pipe, out: Path, ctx: LowerContext) -> None:
    """Each component folder gets its config.json, as optimum's ORT models read them."""
    for name in ctx.arch.text_encoders:
        config = getattr(pipe, name).config.to_dict()
        _write_config(out / name / "config.json", config)
        if not ctx.arch.is_sdxl:  # SD's clip_skip normalizes an earlier layer's output with it
            write_final_norm(getattr(pipe, name), out / name / FINAL_NORM)
    _write_config(out / "unet" / "config.json", dict(pipe.unet.config))
    for folder, controlnet in ctx.controlnets.items():  # the runtime reads global_pool_conditions from it
        _write_config(out / folder / "config.json", dict(controlnet.config))
    _write_config(out / "vae_decoder" / "config.json", dict(pipe.vae.config))
    if (out / "vae_encoder").is_dir():
        _write_config(out / "vae_encoder" / "config.json", dict(pipe.vae.config))


def write_final_norm(encoder, path: Path) -> None:
    """The CLIP text encoder's final layer norm (weight, bias, eps) as a small safetensors file."""
    from safetensors.torch import save_file

    norm = encoder.text_model.final_layer_norm
    tensors = {"weight": norm.weight, "bias": norm.bias, "eps": torch.tensor(norm.eps, dtype=torch.float64)}
    save_file({k: v.detach().float().cpu().contiguous() if k != "eps" else v for k, v in tensors.items()}, path)


def _write_config(path: Path, config: dict) -> None:
    """Write a component config; `_name_or_path` would point back at the source checkpoint."""
    config = {k: v for k, v in config.items() if k != "_name_or_path"}
    path.write_text(json.dumps(config, indent=2, sort_keys=True, default=list) + "\n")


def controlnet_interface(exports: list[OnnxExport], folders: list[str]) -> dict[str, Any]:
    """The names through which the ControlNet graphs feed the U-Net graph (recorded in the export stage)."""
    net = next(e for e in exports if e.name == folders[0])
    return {
        "convention": "onnxruntime-olive",  # optimum exports no ControlNet: ONNX Runtime's (Olive's) names
        "graphs": [graph_path(folder) for folder in folders],
        "controlnet_inputs": list(net.input_names),
        "down_residuals": net.output_names[:-1],
        "mid_residual": net.output_names[-1],
        "scaled_by": "conditioning_scale (guess mode's per-block scales: the runtime's)",
        "summed_over_nets": "by the runtime, as diffusers' MultiControlNetModel",
    }


def check_residual_inputs(root: Path, unet: OrtModel, controlnet: OrtModel, shallow: bool = False) -> None:
    """Refuse a ControlNet artifact whose U-Net graph does not take every residual its ControlNets return
    (ONNX Runtime would otherwise leave them out without a word); `shallow`: the feature cache's shallow graph,
    which takes the first down residuals only (those of the skips it makes)."""
    wanted = controlnet.outputs[:1] if shallow else controlnet.outputs
    missing = [name for name in wanted if name not in unet.inputs]
    if missing:
        graph = graph_path("unet_shallow" if shallow else "unet")
        raise ArtifactError(
            f"artifact {root} has ControlNets but its {graph} has no input(s) {', '.join(missing)}; recompile it"
        )


def controlnet_config(folder: Path) -> dict[str, Any]:
    """A ControlNet folder's `config.json` (diffusers' ControlNetModel config), `{}` where it is absent."""
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def served_components(manifest: dict[str, Any]) -> list[str]:
    """The component graphs an artifact of the onnx layout serves as separate models (the VAE encoder is not
    served: the served pipeline is text-to-image; with a feature cache, `unet_refresh` and `unet_shallow`
    stand in for `unet`, as in `OnnxTarget.load`)."""
    unet = [unet_component(manifest)] + (["unet_shallow"] if cache_settings(manifest) is not None else [])
    return [*get_arch(manifest["arch"]).text_encoders, *unet, "vae_decoder"]


def unet_component(manifest: dict[str, Any]) -> str:
    """The U-Net graph the runtime loads: `unet_refresh` in a feature-cache artifact that has one, else `unet`
    (which, in feature-cache artifacts compiled before `unet_refresh` existed, returns the deep features)."""
    return UNET_REFRESH if graph_path(UNET_REFRESH) in manifest.get("files", {}) else "unet"


def check_refresh_graph(root: Path, name: str, outputs: list[str]) -> None:
    """Refuse a feature-cache artifact whose U-Net graph `name` does not return the deep features."""
    if "deep_features" not in outputs:
        raise ArtifactError(
            f"artifact {root} caches features but its {graph_path(name)} has no deep_features output; recompile it"
        )
