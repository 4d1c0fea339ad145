"""`target="onnx"`: ONNX models in optimum's diffusers layout, run by ONNX Runtime.

Stages: `export_onnx` (U-Net, text encoder(s), VAE decoder with the
TorchScript exporter at opset 18: faster and leaner than the dynamo exporter
for these models, environment.md), `quantize_onnx` when the `ptq` pass left an
int8 U-Net graph (`pipe.unet.onnx_quantization`, see `sdcompiler.passes.ptq`:
it replaces the float U-Net export after an interface check; its settings go
to the stage record), then `verify` (each ONNX model vs its torch module on
the export inputs: max abs error and SQNR recorded; a quantized U-Net must
keep `MIN_SQNR_DB` instead of the float tolerance). Names, dtypes and
dynamic axes follow optimum's exporter, so `ORTDiffusionPipeline` loads the
artifact too: U-Net `sample, timestep (float scalar), encoder_hidden_states
[, text_embeds, time_ids] -> out_sample`; text encoders `input_ids ->
last_hidden_state, pooler_output | text_embeds [, hidden_states.i]`; VAE
decoder `latent_sample -> sample`.

The U-Net is traced at a latent size that is not a multiple of its overall
down-sampling factor, so diffusers takes its explicit-upsample-size path and
the graph computes every skip shape from its input: any latent size then
runs, not only multiples of 8. Models over 2 GB are saved with one
`model.onnx.data` file next to `model.onnx`.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from sdcompiler.archs import get_arch
from sdcompiler.errors import LoweringError
from sdcompiler.passes import PassConfig, unet_example_inputs
from sdcompiler.passes.accounting import VaeDecode
from sdcompiler.targets.base import LowerContext, Stage, StageRecord, Target, register_target, write_pipeline_files
from sdcompiler.targets.components import (
    OrtModel, cache_settings, make_components, ort_feature_cache, ort_text_encoder, ort_unet, ort_vae_decoder,
    ort_vae_encoder, vae_encoding,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's limit is 2 GiB: leave room for the graph itself
TRACE_LATENT = 10  # not a multiple of 4 or 8: forces diffusers' shape-generic upsampling path
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
    opset: int = 18
    verify: bool = True
    vae_encoder: bool = True  # export the VAE encoder too (image-to-image; optimum's vae_encoder folder)


class _UNetForExport(torch.nn.Module):
    """The U-Net with positional inputs: sample, timestep, encoder_hidden_states, then `extra` by name
    (SDXL: text_embeds, time_ids; a guidance embedding: timestep_cond)."""

    def __init__(self, unet, extra: list[str]):
        super().__init__()
        self.unet, self.extra = unet, list(extra)

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        named = dict(zip(self.extra, rest))
        added = {"text_embeds": named["text_embeds"], "time_ids": named["time_ids"]} if "time_ids" in named else None
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added,
                         timestep_cond=named.get("timestep_cond"), return_dict=False)[0]


class _CachedUNetForExport(torch.nn.Module):
    """Feature cache: the full U-Net returning (out_sample, deep_features), or the shallow branch."""

    def __init__(self, unet, branch: int, shallow: bool):
        super().__init__()
        from sdcompiler.feature_cache import SplitUNet

        self.split, self.shallow = SplitUNet(unet, branch), shallow

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        if self.shallow:
            *added, deep = rest
            return self.split.shallow(sample, timestep, encoder_hidden_states, *added, deep=deep)
        return self.split.full(sample, timestep, encoder_hidden_states, *rest)


class _TextEncoderForExport(torch.nn.Module):
    def __init__(self, model, hidden_states: bool):
        super().__init__()
        self.model, self.hidden_states = model, hidden_states

    def forward(self, input_ids):
        out = self.model(input_ids, output_hidden_states=self.hidden_states, return_dict=True)
        first = [out.text_embeds, out.last_hidden_state] if hasattr(out, "text_embeds") else [
            out.last_hidden_state, out.pooler_output]
        return tuple(first) + (tuple(out.hidden_states) if self.hidden_states else ())


class _VaeEncoderForExport(torch.nn.Module):
    """Images in [-1, 1] -> the posterior's parameters (mean and log-variance on the channel axis), or a tiny
    VAE's latents."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return vae_encoding(self.vae.encode(sample))


@dataclass
class _Export:
    name: str
    module: torch.nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    dtype: torch.dtype


def _exports(pipe, spec, config: OnnxTargetConfig, cache=None) -> list[_Export]:
    dtype, vae_dtype = DTYPES[config.precision], DTYPES[config.vae_precision]
    generator = torch.Generator().manual_seed(0)
    exports = []
    batch = {0: "batch_size"}
    for name in spec.text_encoders:
        encoder = getattr(pipe, name)
        hidden = spec.is_sdxl
        first = ["text_embeds", "last_hidden_state"] if "WithProjection" in type(encoder).__name__ else [
            "last_hidden_state", "pooler_output"]
        layers = encoder.config.num_hidden_layers
        outputs = first + ([f"hidden_states.{i}" for i in range(layers + 1)] if hidden else [])
        ids = torch.randint(0, encoder.config.vocab_size, (2, 77), generator=generator)
        seq = {0: "batch_size", 1: "sequence_length"}
        axes = {"input_ids": seq} | {o: (batch if o in ("pooler_output", "text_embeds") else seq) for o in outputs}
        exports.append(_Export(name, _TextEncoderForExport(encoder, hidden), (ids,), ["input_ids"], outputs, axes, dtype))

    inputs = unet_example_inputs(pipe.unet, 2, (TRACE_LATENT, TRACE_LATENT), generator=generator)
    args = [inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]]
    names = ["sample", "timestep", "encoder_hidden_states"]
    axes = {"sample": {0: "batch_size", 2: "height", 3: "width"}, "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
            "out_sample": {0: "batch_size", 2: "height", 3: "width"}}
    if spec.is_sdxl:
        args += [inputs["added_cond_kwargs"]["text_embeds"], inputs["added_cond_kwargs"]["time_ids"]]
        names += ["text_embeds", "time_ids"]
        axes |= {"text_embeds": batch, "time_ids": batch}
    if "timestep_cond" in inputs:  # optimum's name for the guidance embedding input
        args.append(inputs["timestep_cond"])
        names.append("timestep_cond")
        axes |= {"timestep_cond": batch}
    if cache is None:
        exports.append(_Export("unet", _UNetForExport(pipe.unet, names[3:]), tuple(args), names, ["out_sample"],
                               axes, dtype))
    else:  # the U-Net also returns the deep features; a second graph runs the shallow branch from them
        deep_axes = {"deep_features": {0: "batch_size", 2: "deep_height", 3: "deep_width"}}
        full = _CachedUNetForExport(pipe.unet, cache.branch, shallow=False)
        exports.append(_Export("unet", full, tuple(args), names, ["out_sample", "deep_features"], axes | deep_axes,
                               dtype))
        with torch.no_grad():
            deep = full(*args)[1]
        exports.append(_Export("unet_shallow", _CachedUNetForExport(pipe.unet, cache.branch, shallow=True),
                               (*args, deep), [*names, "deep_features"], ["out_sample"], axes | deep_axes, dtype))

    latent = torch.randn(1, pipe.vae.config.latent_channels, 8, 8, generator=generator)
    axes = {"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
            "sample": {0: "batch_size", 2: "height", 3: "width"}}
    exports.append(_Export("vae_decoder", VaeDecode(pipe.vae), (latent,), ["latent_sample"], ["sample"], axes, vae_dtype))
    if config.vae_encoder:
        pixels = torch.rand(1, 3, 8 * pipe.vae_scale_factor, 8 * pipe.vae_scale_factor, generator=generator) * 2 - 1
        output = "latent_parameters" if type(pipe.vae).__name__ == "AutoencoderKL" else "latent_sample"  # tiny VAE
        axes = {"sample": {0: "batch_size", 2: "sample_height", 3: "sample_width"},
                output: {0: "batch_size", 2: "latent_height", 3: "latent_width"}}
        exports.append(_Export("vae_encoder", _VaeEncoderForExport(pipe.vae), (pixels,), ["sample"], [output], axes,
                               vae_dtype))
    return exports


def _cast_args(args: tuple, dtype: torch.dtype) -> tuple:
    return tuple(a.to(dtype) if a.is_floating_point() and a.ndim > 0 else a for a in args)


def export_model(export: _Export, folder: Path, opset: int) -> Path:
    """Export one component to `folder/model.onnx` (+ `model.onnx.data` when large)."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.onnx"
    module = export.module.to(export.dtype).eval()
    args = _cast_args(export.args, export.dtype)
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with tempfile.TemporaryDirectory(dir=folder) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "model.onnx"
        try:
            with torch.no_grad():
                torch.onnx.export(module, args, str(raw), dynamo=False, opset_version=opset,
                                  input_names=export.input_names, output_names=export.output_names,
                                  dynamic_axes=export.dynamic_axes, do_constant_folding=True)
        except Exception as exc:  # the exporter raises many types; name the component
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LoweringError(f"ONNX export of {export.name} failed: {first}; rerun with --debug for the trace") from exc
        if nbytes > EXTERNAL_DATA_BYTES:  # the TorchScript exporter wrote one file per tensor: gather them
            model = onnx.load(str(raw))
            onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data", size_threshold=1024)
            del model
        else:
            shutil.move(str(raw), target)
    module.to(torch.float32)
    return target


def verify_model(export: _Export, path: Path) -> dict[str, float]:
    """Compare the ONNX model with its torch module on the export inputs."""
    session = OrtModel(path, ["CPUExecutionProvider"])
    with torch.no_grad():
        expected = export.module(*export.args)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = session(export.output_names, **dict(zip(export.input_names, export.args)))
    error, scale, signal, noise = 0.0, 1.0, 0.0, 0.0
    for name, ref in zip(export.output_names, expected):
        error = max(error, (got[name] - ref.float()).abs().max().item())
        scale = max(scale, ref.abs().max().item())
        signal += ref.float().pow(2).sum().item()
        noise += (got[name] - ref.float()).pow(2).sum().item()
    del session
    return {"max_abs_error": error, "relative_error": error / scale,
            "sqnr_db": 10 * math.log10(max(signal, 1e-20) / max(noise, 1e-20))}


def check_verified(name: str, result: Mapping[str, float], precision: str, quantized: bool,
                   graph: str = "ONNX") -> None:
    """Raise when `verify_model`'s `result` shows the graph disagreeing with its torch module.

    A float graph must stay within `TOLERANCE[precision]`; a quantized U-Net (int8 Q/DQ) only above
    `MIN_SQNR_DB`, a floor for a wrong or mis-wired graph: quantization error itself is the ptq pass's
    measurement, on real trajectories.
    """
    if quantized:
        if result["sqnr_db"] < MIN_SQNR_DB:
            raise LoweringError(f"the int8 {graph} U-Net disagrees with torch (SQNR {result['sqnr_db']:.1f} dB < "
                                f"{MIN_SQNR_DB:.0f} dB on the export inputs); report the model")
    elif result["relative_error"] > TOLERANCE[precision]:
        raise LoweringError(f"{graph} {name} disagrees with torch (relative error {result['relative_error']:.2e} "
                            f"> {TOLERANCE[precision]:.0e} at {precision}); try precision='fp32' or report the model")


def install_quantized_unet(source: Path, folder: Path, export: _Export) -> dict[str, Any]:
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
    got = ([(i.name, len(i.type.tensor_type.shape.dim)) for i in quantized.graph.input if i.name not in weights],
           [o.name for o in quantized.graph.output])
    if got != expected:
        raise LoweringError(f"the ptq pass's int8 U-Net has inputs/outputs {got}, the exported U-Net would have "
                            f"{expected}; the two exports drifted apart: report this")
    folder.mkdir(parents=True, exist_ok=True)
    for file in folder.glob("model.onnx*"):
        file.unlink()
    for file in sorted(source.glob("model.onnx*")):
        shutil.copyfile(file, folder / file.name)
    ops = [node.op_type for node in quantized.graph.node]
    return {"files": sorted(p.name for p in folder.iterdir()), "quantize_linear": ops.count("QuantizeLinear"),
            "dequantize_linear": ops.count("DequantizeLinear")}


@register_target
class OnnxTarget(Target):
    name = "onnx"
    config_class = OnnxTargetConfig

    def lower(self, pipe, out: Path, config: OnnxTargetConfig, ctx: LowerContext) -> list[StageRecord]:
        from tqdm.auto import tqdm

        records: list[StageRecord] = []
        quantized = getattr(pipe.unet, "onnx_quantization", None)  # left by the ptq pass
        cache = cache_settings({"defaults": ctx.defaults})
        if quantized is not None and cache is not None:
            raise LoweringError("the onnx target cannot split a ptq int8 U-Net for feature_cache yet; "
                                "drop one of the two passes")
        exports = _exports(pipe, ctx.arch, config, cache)
        paths = {}
        with Stage(records, "export_onnx", {"opset": config.opset, "exporter": "torchscript",
                                            "precision": config.precision, "vae_precision": config.vae_precision}) as stage:
            for export in tqdm(exports, desc="export onnx", disable=not ctx.show_progress):
                if export.name == "unet" and quantized is not None:  # quantize_onnx puts the pass's graph here
                    (out / "unet").mkdir(parents=True, exist_ok=True)
                    paths["unet"] = out / "unet" / "model.onnx"
                    stage.results["unet"] = "replaced by the ptq pass's graph (quantize_onnx)"
                    continue
                paths[export.name] = export_model(export, out / export.name, config.opset)
                stage.results[export.name] = sorted(p.name for p in (out / export.name).iterdir())
            write_component_configs(pipe, out, ctx)
            write_pipeline_files(pipe, out, {n: [type(getattr(pipe, n)).__module__.split(".")[0],
                                                 type(getattr(pipe, n)).__name__]
                                             for n in (*ctx.arch.text_encoders, "unet", "vae")})
        if quantized is not None:
            with Stage(records, "quantize_onnx", quantized.settings) as stage:
                unet_export = next(e for e in exports if e.name == "unet")
                stage.results["unet"] = install_quantized_unet(quantized.folder, out / "unet", unet_export)
        if config.verify:
            with Stage(records, "verify", {"provider": "CPUExecutionProvider"}) as stage:
                for export in tqdm(exports, desc="verify onnx", disable=not ctx.show_progress):
                    precision = config.vae_precision if export.name.startswith("vae_") else config.precision
                    result = verify_model(export, paths[export.name])
                    stage.results[export.name] = result
                    int8 = export.name == "unet" and quantized is not None
                    check_verified(export.name, result, precision, quantized=int8)
        return records

    def load(self, root: Path, manifest: dict[str, Any], device: str, providers: list[str] | None):
        from sdcompiler import knobs

        spec = get_arch(manifest["arch"])
        if providers is None:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        threads = knobs.num_threads()
        encoders = [ort_text_encoder(OrtModel(root / n / "model.onnx", providers, threads), spec.is_sdxl)
                    for n in spec.text_encoders]
        unet_model = OrtModel(root / "unet" / "model.onnx", providers, threads)
        decode = ort_vae_decoder(OrtModel(root / "vae_decoder" / "model.onnx", providers, threads))
        encoder_file = root / "vae_encoder" / "model.onnx"  # absent in artifacts compiled with vae_encoder=false
        encode = ort_vae_encoder(OrtModel(encoder_file, providers, threads)) if encoder_file.is_file() else None
        settings, cache = cache_settings(manifest), None
        if settings is not None:
            shallow = OrtModel(root / "unet_shallow" / "model.onnx", providers, threads)
            cache = ort_feature_cache(unet_model, shallow, settings)
        return make_components(root, manifest, encoders, ort_unet(unet_model), decode, feature_cache=cache,
                               encode_image=encode)


def write_component_configs(pipe, out: Path, ctx: LowerContext) -> None:
    """Each component folder gets its config.json, as optimum's ORT models read them."""
    for name in ctx.arch.text_encoders:
        config = getattr(pipe, name).config.to_dict()
        _write_config(out / name / "config.json", config)
    _write_config(out / "unet" / "config.json", dict(pipe.unet.config))
    _write_config(out / "vae_decoder" / "config.json", dict(pipe.vae.config))
    if (out / "vae_encoder").is_dir():
        _write_config(out / "vae_encoder" / "config.json", dict(pipe.vae.config))


def _write_config(path: Path, config: dict) -> None:
    """Write a component config; `_name_or_path` would point back at the source checkpoint."""
    config = {k: v for k, v in config.items() if k != "_name_or_path"}
    path.write_text(json.dumps(config, indent=2, sort_keys=True, default=list) + "\n")
