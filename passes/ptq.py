"""ptq: post-training static quantization of the U-Net (presets `int8`, `fp8`) for ONNX Runtime and TensorRT.

INT8 for ONNX Runtime (target "onnx") is static QDQ on the exported float graph, in the form ORT's CPU
kernels run fast: activations uint8, asymmetric, one (scale, zero point) per tensor,

    x_q = clamp(round(x / s) + z, 0, 255),   s = (max - min) / 255,   z = round(-min / s),

with [min, max] calibrated on the teacher's own trajectories; weights int8, symmetric, one scale per
output channel (`per_channel`), 7-bit when `reduce_range` (AVX2 without VNNI adds pairs of u8 x s8
products in int16, which full 8-bit weights can saturate). At session creation ORT fuses each
DequantizeLinear -> op -> QuantizeLinear group into an integer kernel (QLinearConv, QLinearMatMul, ...).
Signed activations are not offered: S8 x S8 runs slower than float on CPUs without VNNI.

Activation ranges (`calibration`): `minmax` (global min and max over all calibration inputs),
`percentile` (two-sided: cut (100 - percentile) / 2 % of the values at each end, from 2048-bin
histograms), `entropy` (ONNX Runtime's KL-divergence threshold search; `quantize_static` fixes its
histogram at 128 bins, so it clips far less than TensorRT's). `op_types` are the ONNX op types that
get quantized; `exclude` globs keep nodes in float. They match the module path of each node (the
TorchScript exporter names nodes by module scope: `/unet/down_blocks.0/resnets.0/conv1/Conv` belongs to
`down_blocks.0.resnets.0.conv1`), and a pattern that matches a module covers everything inside it. The
default keeps the time and added embeddings, every ResNet's `time_emb_proj`, `conv_in` and `conv_out` in
float, as modelopt's diffusers example does: a negligible share of the MACs, a large share of the error.

Steps (the pass makes the deployed graph itself, so the SQNR it records is that graph's):
1. calibration data: every U-Net input along the teacher's own CFG sampling trajectories
   (`teacher_data.teacher_trajectories`: `calib_prompts` prompts x `calib_steps` steps, seeded by the compile
   seed, cached by content hash) and held-out trajectories of `held_out_prompts` other prompts (seed + 1); an
   inpainting U-Net's through the inpainting pipeline with seeded synthetic images and masks, the refiner's
   image-to-image (`teacher_data.teacher_task`); with ControlNets through diffusers' ControlNet pipeline with
   seeded synthetic control images, the U-Net fed their residuals; the record's notes name them
   (`calibration_data`) and say whether conv_in (9 input channels on an inpainting U-Net) was quantized
   (`conv_in`: default float) and how the ControlNets were (`controlnets`);
2. export of the float U-Net with the onnx target's interface (TorchScript exporter; inputs `sample`,
   `timestep`, `encoder_hidden_states` [, `text_embeds`, `time_ids`], output `out_sample`, dynamic
   batch and latent size) to a work folder;
3. `onnxruntime.quantization.quantize_static` (QDQ), fed one CFG row of one step at a time;
4. `sqnr_db`: eps SQNR of the quantized graph (ORT, CPU execution provider) vs the float torch U-Net on
   the held-out inputs.

The quantized graph is kept in the cache (`<cache>/ptq/<key>/`, key = the model, config, seed, opset and
tool versions; a rerun reuses it, metrics included) and handed to the target as
`ctx.products.unet_quantization`, a `QuantizedUNet` (backend "onnxruntime"): the onnx target's
`quantize_onnx` stage puts its graph in place of its own float U-Net export and records its settings. The torch U-Net is not changed, so the
`torch` target, which would run it in float, is refused up front (`targets`).

With ControlNets and `quantize_controlnets` (modelopt backend, target torch) the nets are quantized too, with the
U-Net's precision, level and scheme (`CONTROLNET_EXCLUDE` kept float besides `exclude`): each calibrated first on
its own inputs along the calibration trajectories, then the U-Net on the residuals of the quantized nets; the
target deploys them as INT8 / FP8 layers (`QuantizedUNet.controlnet_layers`) and `rebuild_controlnet` makes them
again at load. Metrics: `controlnet_residual_sqnr_db` (summed residuals, fake-quant vs float nets, held out) and
`controlnet_quantized_layers`; `sqnr_db` is then the eps of the quantized U-Net fed by the quantized nets.

For target "tensorrt" (and for fp8) the pass runs its modelopt backend instead (`ptq_modelopt`):
`mtq.quantize` fake-quantizes `pipe.unet` in place (INT8 with SmoothQuant, or FP8 E4M3; TensorRT demo's
quantization levels 1 / 2 / 2.5 / 3 / 4), calibrated on the same trajectories, and the tensorrt target
exports it as a Q/DQ graph for a strongly typed engine. TensorRT's INT8 is symmetric and ONNX Runtime's
fast CPU path is U8 asymmetric, so neither backend's graph serves the other target: `supported_targets`
makes `compile_pipeline` refuse a mismatch (fp8 with target onnx included: FP8 Q/DQ export as `trt::`
ops that only TensorRT loads) before loading the checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from sdcompiler.passes.accounting import activation_bytes
from sdcompiler.passes.architectures import ArchSpec
from sdcompiler.passes.base import Pass, PassContext, QuantizedUNet, register_pass
from sdcompiler.passes.config import PassConfig
from sdcompiler.passes.errors import PassError, require
from sdcompiler.passes.onnx_export import MID_RESIDUAL, OPSET, component_exports, down_residual_names, export_model
from sdcompiler.passes.ptq_modelopt import DEFAULT_EXCLUDE as MODELOPT_EXCLUDE
from sdcompiler.passes.ptq_modelopt import MODELOPT_LEVELS, module_excluded
from sdcompiler.passes.teacher_data import Trajectories, calibration_inputs, take_prompts, teacher_trajectories
from sdcompiler.passes.training import sqnr_db

CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
FORMAT_VERSION = "ptq-ort-v2"  # bump when the pass's output for the same inputs changes
DEFAULT_MAX_RESOLUTION = 256  # pixels: calibration size when the config names none (or the native size if less)
ORT_EXCLUDE = ("time_embedding", "add_embedding", "*.time_emb_proj", "conv_in", "conv_out")


@dataclass(frozen=True)
class PtqConfig(PassConfig):
    precision: Literal["int8", "fp8"] = "int8"
    # onnxruntime: QDQ graph for ONNX Runtime (target onnx); modelopt: fake-quantized U-Net that the tensorrt
    # target exports as Q/DQ (TensorRT) and the torch target turns into INT8 / FP8 layers (`ptq_lowp`);
    # auto: modelopt for targets tensorrt and torch and for fp8, else onnxruntime
    backend: Literal["auto", "onnxruntime", "modelopt"] = "auto"
    calibration: Literal["minmax", "percentile", "entropy"] = "minmax"
    percentile: float = 99.999  # `percentile` calibration: share of the values kept inside the range
    calib_prompts: int = 4
    held_out_prompts: int = 1
    prompts_file: str | None = None  # calibration prompts, one per line (default: the shipped list)
    calib_steps: int = 4  # sampling steps per trajectory; every visited U-Net input calibrates
    guidance_scale: float = 7.5
    # pixels; calibration and SQNR (null: the model's native size, at most 256: `calibration_resolution`)
    resolution: int | None = None
    # onnxruntime: refuse (before any work) when one calibration input's activations, estimated on meta
    # (`activation_bytes`), exceed this; ORT holds them all per input, and they grow with resolution^2 (more
    # with attention)
    max_calibration_gib: float = 4.0
    per_channel: bool = True  # onnxruntime: one weight scale per output channel (modelopt int8: always)
    reduce_range: bool = True  # onnxruntime: 7-bit weights, no int16 saturation on AVX2 without VNNI
    op_types: tuple[str, ...] = ("Conv", "MatMul", "Gemm")  # onnxruntime: the ONNX op types quantized
    # modules kept in float; null: the backend's default (both: embeddings, time_emb_proj, conv_in/out;
    # modelopt also the ResNet shortcut convs, as modelopt's diffusers example)
    exclude: tuple[str, ...] | None = None
    level: float = 3.0  # modelopt: TensorRT demo's quantization level 1 / 2 / 2.5 / 3 / 4 (ptq_modelopt)
    smoothquant_alpha: float | None = 0.8  # modelopt int8: SmoothQuant migration strength; null: off
    # with ControlNets (target torch): quantize the nets too, same precision, level and scheme, calibrated on
    # their own inputs along the same trajectories; `exclude` plus CONTROLNET_EXCLUDE stay float in them
    quantize_controlnets: bool = False

    def __post_init__(self):
        if self.calib_prompts < 1 or self.held_out_prompts < 1 or self.calib_steps < 1:
            raise ValueError("calib_prompts, held_out_prompts and calib_steps must be >= 1")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.guidance_scale <= 1.0:
            raise ValueError("calibration samples with classifier-free guidance: guidance_scale must be > 1")
        if not self.op_types:
            raise ValueError("op_types must name at least one ONNX op type")
        if self.level not in MODELOPT_LEVELS:
            raise ValueError(f"level must be one of {', '.join(f'{v:g}' for v in MODELOPT_LEVELS)}, got {self.level:g}")
        if self.level >= 4 and self.precision != "fp8":
            raise ValueError(
                "level 4 quantizes attention (fused FP8 MHA), which TensorRT runs in fp8 only: "
                "use precision 'fp8', or level 3"
            )
        if self.max_calibration_gib <= 0:
            raise ValueError(f"max_calibration_gib must be > 0, got {self.max_calibration_gib}")
        if self.smoothquant_alpha is not None and not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ValueError(f"smoothquant_alpha must be in [0, 1] (or null), got {self.smoothquant_alpha}")
        if self.precision == "fp8" and self.backend == "onnxruntime":
            raise ValueError(
                "precision 'fp8' exports trt:: Q/DQ ops that ONNX Runtime cannot load: use backend "
                "'modelopt' with target tensorrt, or precision 'int8'"
            )

    def backend_for(self, target: str) -> str:
        """The backend this config runs with when compiling for `target`."""
        if self.backend != "auto":
            return self.backend
        return "modelopt" if target in ("tensorrt", "torch") or self.precision == "fp8" else "onnxruntime"

    def excluded(self, backend: str) -> tuple[str, ...]:
        if self.exclude is not None:
            return self.exclude
        return MODELOPT_EXCLUDE if backend == "modelopt" else ORT_EXCLUDE


# a ControlNet's layers kept in float besides `exclude`: the first conv of its control-image encoder (3 input
# channels, as conv_in) and the 1x1 zero convs whose outputs are the residuals (as conv_out)
CONTROLNET_EXCLUDE = ("controlnet_cond_embedding.conv_in", "controlnet_down_blocks", "controlnet_mid_block")


def controlnet_excluded(config: PtqConfig) -> tuple[str, ...]:
    """The module patterns `quantize_controlnets` keeps float in a ControlNet: the U-Net's, `CONTROLNET_EXCLUDE` too."""
    return (*config.excluded("modelopt"), *CONTROLNET_EXCLUDE)


def controlnet_layers(net, config: PtqConfig) -> dict[str, str]:
    """The layers of a ControlNet that `quantize_controlnets` quantizes."""
    from sdcompiler.passes import ptq_modelopt as mo

    return mo.selected_layers(net, config.level, controlnet_excluded(config))


def calibration_resolution(config: PtqConfig, pipe) -> int:
    """Pixels the pass calibrates and measures at: `config.resolution`, else the model's native size capped at
    `DEFAULT_MAX_RESOLUTION` (a full-size model calibrates at 256 px in minutes on a CPU; a tiny one at its
    own size, not 64x the pixels it was made for)."""
    if config.resolution is not None:
        return config.resolution
    return min(pipe.unet.config.sample_size * pipe.vae_scale_factor, DEFAULT_MAX_RESOLUTION)


def check_calibration_memory(pipe, config: PtqConfig, resolution: int) -> None:
    """Refuse, in one line, a calibration whose per-input activations exceed `config.max_calibration_gib`."""
    needed = activation_bytes(pipe.unet, (resolution, resolution), pipe.vae_scale_factor) / (1 << 30)
    if needed > config.max_calibration_gib:
        raise PassError(
            f"calibrating at {resolution} px holds about {needed:.1f} GiB of activations per input, more than "
            f"max_calibration_gib {config.max_calibration_gib:g}; lower 'resolution' (native: "
            f"{pipe.unet.config.sample_size * pipe.vae_scale_factor} px) or raise 'max_calibration_gib'"
        )


# --- export -------------------------------------------------------------------------------------------


def export_float_unet(pipe, spec: ArchSpec, folder: Path, controlnets=None) -> Path:
    """The float U-Net exported exactly as the onnx target exports it (its wrapper, input/output names,
    dynamic axes, trace size and opset; with `controlnets`, the residual inputs), to `folder/model.onnx` (+
    `model.onnx.data` when large)."""
    (unet,) = [e for e in component_exports(pipe, spec, controlnets=controlnets) if e.name == "unet"]
    return export_model(unet, folder, OPSET)


def simplify_graph(source: Path, target: Path) -> None:
    """ONNX Runtime's basic (hardware-independent, standard-op) graph optimizations, saved to `target`.

    Constant folding and redundant-node elimination halve the exported U-Net's node count; the
    quantizer's passes grow with nodes x quantized tensors, so this also halves its time. Surviving
    nodes keep their names.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    if source.with_name(source.name + ".data").exists():
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", target.name + ".data"
        )
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(source), sess_options=options, providers=["CPUExecutionProvider"])


def module_path(node_name: str) -> str:
    """`/unet/down_blocks.0/resnets.0/conv1/Conv` -> `down_blocks.0.resnets.0.conv1` (exporter scopes)."""
    scopes = node_name.strip("/").split("/")[:-1]  # the last part names the op
    if scopes and scopes[0] == "unet":
        scopes = scopes[1:]
    return ".".join(scopes)


def excluded_nodes(model, patterns: tuple[str, ...]) -> list[str]:
    """Names of the graph's nodes whose module (or a module containing it) matches one of `patterns`."""
    return [node.name for node in model.graph.node if module_excluded(module_path(node.name), patterns)]


# --- calibration and quantization -------------------------------------------------------------------


class StepResiduals:
    """The ControlNets' residuals along trajectories as U-Net graph feeds: one step's, for every row at once,
    kept until another step is asked for (feeds go step by step). No nets: no feeds."""

    def __init__(self, data: Trajectories, controlnets=()):
        self.data, self.nets = data, list(controlnets)
        self.step, self.values = None, []

    def __call__(self, step: int, row: int) -> dict[str, np.ndarray]:
        if not self.nets:
            return {}
        if step != self.step:
            self.step, self.values = step, self.data.step_residuals(self.nets, step)
        names = [*down_residual_names(len(self.values) - 1), MID_RESIDUAL]
        return {name: value[row : row + 1].numpy() for name, value in zip(names, self.values)}


def _feed(data: Trajectories, step: int, row: int) -> dict[str, np.ndarray]:
    """One U-Net input of the trajectories as an ONNX Runtime feed (batch 1; the residuals come separately)."""
    feed = {
        "sample": data.samples[step, row : row + 1].numpy(),
        "timestep": np.asarray(data.timesteps[step].item(), dtype=np.float32),
        "encoder_hidden_states": data.context[row : row + 1].numpy(),
    }
    if data.text_embeds is not None:
        feed |= {
            "text_embeds": data.text_embeds[row : row + 1].numpy(),
            "time_ids": data.time_ids[row : row + 1].numpy(),
        }
    return feed


def _feeds(data: Trajectories) -> list[tuple[int, int]]:
    return [(step, row) for step in range(len(data.timesteps)) for row in range(data.samples.shape[1])]


def _reader(data: Trajectories, controlnets=()):
    """A CalibrationDataReader over every (step, row) input (+ the float `controlnets`' residuals); `set_range`
    lets ORT calibrate in chunks."""
    from onnxruntime.quantization import CalibrationDataReader

    residuals = StepResiduals(data, controlnets)

    class TrajectoryReader(CalibrationDataReader):
        def __init__(self):
            self.items = _feeds(data)
            self.set_range(0, len(self.items))

        def __len__(self):
            return len(self.items)

        def set_range(self, start_index: int, end_index: int):
            self.pending = iter(self.items[start_index:end_index])

        def get_next(self):
            item = next(self.pending, None)
            return None if item is None else _feed(data, *item) | residuals(*item)

    return TrajectoryReader()


class _PreprocessHint(logging.Filter):
    """Drop quantize_static's advice to run ORT's pre-processing (its graph optimizations run at load)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


def quantize_unet(source: Path, target: Path, calib: Trajectories, config: PtqConfig, controlnets=()) -> dict[str, Any]:
    """Quantize the float graph `source` into `target` (QDQ; with `controlnets`, the graph takes their residuals,
    computed along `calib` by the float nets); returns the settings for the record."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    graph = onnx.load(str(source), load_external_data=False)
    excluded = excluded_nodes(graph, config.excluded("onnxruntime"))
    large = any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)
    del graph
    extra = {
        "CalibTensorRangeSymmetric": False,  # asymmetric ranges for the uint8 activations
        "CalibPercentile": config.percentile,
        "CalibStridedMinMax": 1,  # one input per calibration pass: histograms never hold all tensors at once
    }
    root = logging.getLogger()
    hint = _PreprocessHint()
    root.addFilter(hint)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress
            quantize_static(
                str(source),
                str(target),
                _reader(calib, controlnets),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(config.op_types),
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded,
                use_external_data_format=large,
                calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[config.calibration]),
                extra_options=extra,
            )
    finally:
        root.removeFilter(hint)
    return {
        "format": "QDQ",
        "activation_type": "uint8",
        "weight_type": "int8",
        "per_channel": config.per_channel,
        "reduce_range": config.reduce_range,
        "calibration": config.calibration,
        "percentile": config.percentile if config.calibration == "percentile" else None,
        "op_types": list(config.op_types),
        "excluded_nodes": len(excluded),
        "calibration_inputs": len(_feeds(calib)),
    }


def eps_sqnr(unet, graph: Path, data: Trajectories, controlnets=()) -> float:
    """eps SQNR (dB) of the ONNX graph (CPU execution provider) vs the torch U-Net, over every input (both fed
    the float `controlnets`' residuals)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(graph), sess_options=options, providers=["CPUExecutionProvider"])
    reference, estimate = [], []
    residuals = StepResiduals(data, controlnets)
    with torch.no_grad():
        for step, row in _feeds(data):
            extra = residuals(step, row)
            feed = _feed(data, step, row) | extra
            estimate.append(torch.from_numpy(session.run(["out_sample"], feed)[0]))
            fed = [torch.from_numpy(value) for value in extra.values()]
            added = (
                None
                if data.text_embeds is None
                else {
                    "text_embeds": torch.from_numpy(feed["text_embeds"]),
                    "time_ids": torch.from_numpy(feed["time_ids"]),
                }
            )
            reference.append(
                unet(
                    torch.from_numpy(feed["sample"]),
                    data.timesteps[step],
                    torch.from_numpy(feed["encoder_hidden_states"]),
                    added_cond_kwargs=added,
                    down_block_additional_residuals=fed[:-1] or None,
                    mid_block_additional_residual=fed[-1] if fed else None,
                ).sample
            )
    return sqnr_db(torch.cat(reference), torch.cat(estimate))


def _cache_key(config: PtqConfig, ctx: PassContext, resolution: int) -> str:
    versions = {p: version(p) for p in ("torch", "onnx", "onnxruntime")}
    text = json.dumps(
        [FORMAT_VERSION, ctx.model_key, config.to_dict(), ctx.seed, resolution, OPSET, versions]
        + ([ctx.controlnets_key] if ctx.controlnets else []),
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@register_pass
class Ptq(Pass):
    name = "ptq"
    config_class = PtqConfig
    stage = "quantize"
    # the U-Net's layers are quantized in place; ControlNets stay float unless `quantize_controlnets`
    controlnet = "keeps_layout"
    targets = ("onnx", "tensorrt", "torch")
    deploys_modules = True  # target torch: INT8 / FP8 layers that `rebuild` makes again at load
    description = (
        "post-training static quantization: INT8 QDQ for ONNX Runtime (U8 activations, S8 per-channel "
        "weights); INT8 / FP8 through nvidia-modelopt, as Q/DQ for TensorRT or as torch._int_mm / "
        "torch._scaled_mm layers for the torch target"
    )

    def supported_targets(self, config: PtqConfig) -> tuple[str, ...]:
        # each backend's graph runs on one target only: ONNX Runtime's U8 QDQ is not TensorRT's symmetric
        # INT8, and fp8 exports as trt:: ops. compile_pipeline refuses a mismatch before loading anything
        if config.backend == "onnxruntime":
            return ("onnx",)
        if config.backend == "modelopt" or config.precision == "fp8":
            return ("tensorrt", "torch")
        return self.targets

    def requires(self, pipe, config: PtqConfig, ctx: PassContext) -> None:
        if ctx.products.unet_quantization is not None:
            raise PassError("the U-Net is already quantized")
        if getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
            raise PassError(
                "ptq calibrates on inputs without a guidance embedding (timestep_cond), which this U-Net "
                "takes (time_cond_proj_dim); quantize a model without one"
            )
        backend = config.backend_for(ctx.target)
        if config.quantize_controlnets and not ctx.controlnets:
            raise PassError(
                "quantize_controlnets is set but this compile has no ControlNet; pass controlnet=PATH (CLI: "
                "--controlnet PATH) or drop quantize_controlnets"
            )
        if config.quantize_controlnets and (backend != "modelopt" or ctx.target != "torch"):
            raise PassError(
                f"quantize_controlnets makes INT8 / FP8 ControlNet layers for target 'torch' (modelopt backend); "
                f"this compile is target {ctx.target!r} with backend {backend!r}: use target='torch'"
            )
        if backend == "modelopt":
            if config.calibration == "entropy":
                raise PassError(
                    "calibration 'entropy' is ONNX Runtime's; the modelopt backend (targets tensorrt and torch) "
                    "offers 'minmax' and 'percentile'"
                )
            if ctx.target == "torch" and config.level >= 4:
                raise PassError(
                    "level 4 quantizes attention itself, which only TensorRT's fused FP8 MHA runs; the torch "
                    "target runs quantized convolutions and linears: use level 3"
                )
            require("modelopt.torch.quantization", "modelopt", "ptq for targets tensorrt and torch (and fp8)")
        else:
            require("onnxruntime", "cpu", "ptq int8 for target onnx")  # or [gpu]: onnxruntime-gpu
            check_calibration_memory(pipe, config, calibration_resolution(config, pipe))

    def run(self, pipe, config: PtqConfig, ctx: PassContext) -> dict[str, float | str]:
        pipe.unet.eval()
        resolution = calibration_resolution(config, pipe)
        backend = config.backend_for(ctx.target)
        # inpainting / refiner: synthetic images (+ masks); ControlNets: synthetic control images
        notes = {"calibration_data": calibration_inputs(pipe, len(ctx.controlnets))}
        if ctx.controlnets:
            notes["controlnets"] = (
                f"{config.precision}, the U-Net's level and scheme ({', '.join(CONTROLNET_EXCLUDE)} kept float)"
                if config.quantize_controlnets
                else "float (quantize_controlnets: false)"
            )
        if backend == "modelopt":
            metrics = self._quantize_modelopt(pipe, config, ctx, resolution)
            quantized = "conv_in" in ctx.products.unet_quantization.layers
        else:
            folder = ctx.cache_dir / "ptq" / _cache_key(config, ctx, resolution)
            if not (folder / "metrics.json").exists():
                self._quantize(pipe, config, ctx, resolution, folder)
            record = json.loads((folder / "metrics.json").read_text())
            ctx.products.unet_quantization = QuantizedUNet("onnxruntime", config.precision, record["settings"], folder)
            metrics = record["metrics"]
            quantized = not module_excluded("conv_in", config.excluded(backend))
        width = pipe.unet.conv_in.in_channels
        notes["conv_in"] = (
            f"{config.precision} over all {width} input channels" if quantized else f"float ({width} input channels)"
        )
        return metrics | {"resolution": resolution} | notes

    def rebuild(self, pipe, config: PtqConfig) -> None:
        """Target torch: the INT8 / FP8 layers the artifact stores, empty (filled by the stored state)."""
        from sdcompiler.passes import ptq_modelopt as mo
        from sdcompiler.passes.ptq_lowp import lowp_modules

        layers = mo.selected_layers(pipe.unet, config.level, config.excluded("modelopt"))
        smoothed = mo.uses_smoothquant(config.precision, config.smoothquant_alpha)
        lowp_modules(pipe.unet, layers, config.precision, smoothed, empty=True)

    def rebuild_controlnet(self, controlnet, config: PtqConfig) -> bool:
        """Target torch with `quantize_controlnets`: the net's INT8 / FP8 layers, empty (the stored state fills
        them)."""
        if not config.quantize_controlnets:
            return False
        from sdcompiler.passes import ptq_modelopt as mo
        from sdcompiler.passes.ptq_lowp import lowp_modules

        smoothed = mo.uses_smoothquant(config.precision, config.smoothquant_alpha)
        lowp_modules(controlnet, controlnet_layers(controlnet, config), config.precision, smoothed, empty=True)
        return True

    def _trajectories(
        self, pipe, config: PtqConfig, ctx: PassContext, resolution: int
    ) -> tuple[Trajectories, Trajectories]:
        """Calibration trajectories (seed) and held-out ones (seed + 1, other prompts), cached."""
        prompts = take_prompts(config, "calib_prompts")
        common = dict(
            steps=config.calib_steps,
            guidance=config.guidance_scale,
            resolution=resolution,
            cache_dir=ctx.cache_dir,
            model_key=ctx.model_key,
        )
        if ctx.controlnets:  # sampled through the ControlNet pipeline: the U-Net sees the nets' residuals
            common |= {"controlnets": list(ctx.controlnets.values()), "controlnets_key": ctx.controlnets_key}
        calib = teacher_trajectories(pipe, prompts[: config.calib_prompts], seed=ctx.seed, **common)
        held = teacher_trajectories(pipe, prompts[config.calib_prompts :], seed=ctx.seed + 1, **common)
        return calib, held

    def _quantize(self, pipe, config: PtqConfig, ctx: PassContext, resolution: int, folder: Path) -> None:
        """Calibrate, quantize and measure into `folder`, atomically (a partial sibling renamed into place)."""
        calib, held = self._trajectories(pipe, config, ctx, resolution)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{folder.name}.partial-", dir=folder.parent) as tmp:
            work, result = Path(tmp) / "work", Path(tmp) / "result"
            work.mkdir()
            result.mkdir()
            nets = list(ctx.controlnets.values())
            exported = export_float_unet(pipe, ctx.spec, work / "exported", ctx.controlnets or None)
            simplify_graph(exported, work / "model.onnx")
            settings = quantize_unet(work / "model.onnx", result / "model.onnx", calib, config, nets)
            shutil.rmtree(work)  # the float graph: up to 10 GB (SDXL) that the SQNR session does not need
            metrics = {
                "sqnr_db": eps_sqnr(pipe.unet, result / "model.onnx", held, nets),
                "calibration_inputs": settings["calibration_inputs"],
                "excluded_nodes": settings["excluded_nodes"],
            }
            (result / "metrics.json").write_text(json.dumps({"metrics": metrics, "settings": settings}, indent=2))
            with contextlib.suppress(OSError):  # another compile finished the same key first: keep its folder
                os.rename(result, folder)

    def _quantize_modelopt(self, pipe, config: PtqConfig, ctx: PassContext, resolution: int) -> dict[str, Any]:
        """Insert and calibrate modelopt quantizers in `pipe.unet` (in place); eps SQNR vs the float U-Net."""
        from sdcompiler.passes import ptq_modelopt as mo

        calib, held = self._trajectories(pipe, config, ctx, resolution)
        unet = pipe.unet
        exclude = config.excluded("modelopt")
        quant = mo.quant_config(
            unet,
            config.precision,
            config.level,
            exclude,
            smoothquant_alpha=config.smoothquant_alpha,
            calibration=config.calibration,
            percentile=config.percentile,
        )
        label = (lambda text: f"ptq {config.precision} {text}") if ctx.show_progress else (lambda text: None)
        nets = list(ctx.controlnets.values())
        reference = held.eps(unet, label("reference"), nets)
        net_layers, net_metrics = {}, {}
        if config.quantize_controlnets:  # the nets first: their inputs do not depend on the U-Net, its do on them
            reference_residuals = held.residuals(nets, label("controlnet reference"))
            for folder, net in ctx.controlnets.items():
                net_quant = mo.quant_config(
                    net,
                    config.precision,
                    config.level,
                    controlnet_excluded(config),
                    smoothquant_alpha=config.smoothquant_alpha,
                    calibration=config.calibration,
                    percentile=config.percentile,
                )
                loop = lambda model, folder=folder: calib.residuals([model], label(f"calibrate {folder}"))  # noqa: E731
                mo.quantize(net, net_quant, loop)
                net_layers[folder] = net_quant["layers"]
            net_metrics = {
                "controlnet_residual_sqnr_db": sqnr_db(
                    reference_residuals, held.residuals(nets, label("controlnet measure"))
                ),
                "controlnet_quantized_layers": sum(len(v) for v in net_layers.values()),
            }
        mo.quantize(unet, quant, lambda model: calib.eps(model, label("calibrate"), nets))
        estimate = held.eps(unet, label("measure"), nets)
        layers = quant["layers"]
        settings = {
            "backend": "modelopt",
            "modelopt": version("nvidia-modelopt"),
            "precision": config.precision,
            "level": config.level,
            "weights": "per-channel" if config.precision == "int8" else "per-tensor",
            "activations": "per-tensor",
            "algorithm": quant["algorithm"],
            "smoothquant": mo.uses_smoothquant(config.precision, config.smoothquant_alpha),
            "calibration": config.calibration,
            "percentile": config.percentile if config.calibration == "percentile" else None,
            "quantized_layers": len(layers),
            "quantized_attention": config.level >= 4,
            "exclude": list(exclude),
            "sqnr_of": "the fake-quantized torch U-Net (modelopt's simulation of the Q/DQ graph)"
            + (" fed by the ControlNets' residuals" if nets else ""),
        }
        if net_layers:
            settings["controlnets"] = {folder: len(v) for folder, v in net_layers.items()}
            settings["controlnet_exclude"] = list(CONTROLNET_EXCLUDE)
        ctx.products.unet_quantization = QuantizedUNet(
            "modelopt", config.precision, settings, layers=dict(layers), controlnet_layers=net_layers
        )
        return {
            "sqnr_db": sqnr_db(reference, estimate),
            "calibration_inputs": calib.samples.shape[0] * calib.samples.shape[1],
            "quantized_layers": len(layers),
            "quantizers": len(mo.quantizers(unet)),
        } | net_metrics
