"""The tensorrt target's options and the optimization profiles derived from them.

Every dynamic ONNX dimension gets a range (min, opt, max) from the target options: images per call
`batch_size` (the U-Net's batch is doubled for classifier-free guidance: opt is doubled when the
artifact's default call guides, max always), pixel `height` / `width` (default (size / 2, size,
3 size / 2) around the model's native size), divided by the VAE factor for latents, and the tokenizers'
length. `static` collapses every range to its opt value: one shape per engine, which the runtime
captures into a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

import torch

from sdcompiler.errors import ConfigError, LoweringError
from sdcompiler.passes import PassConfig
from sdcompiler.passes.onnx_export import OPSET

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS = {dtype: name for name, dtype in DTYPES.items()}
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
    # false: no TensorRT at compile, on purpose: the artifact holds the optimized ONNX and each component's
    # optimization profile (the build_engine stage's record, without plans); loading builds the engines
    engines: bool = True
    # engines built refittable (`BuilderFlag.REFIT`), so `set_loras` can change their weights at run time
    # (`tensorrt.refit`); TensorRT may pick slower kernels for a refittable engine
    refit: bool = False

    def __post_init__(self):
        if self.precision in ("int8", "fp8"):
            raise ValueError(
                f"{self.precision} engines come from a Q/DQ U-Net graph that the ptq pass makes: add preset "
                f"{self.precision!r} to the recipe and keep precision 'fp16' (or 'bf16'), the float type "
                "around the Q/DQ ops"
            )
        for name in ("batch_size", "height", "width"):
            value = getattr(self, name)
            if value is not None and (len(value) != 3 or not 0 < value[0] <= value[1] <= value[2]):
                raise ValueError(f"{name} must be [min, opt, max] with 0 < min <= opt <= max, got {list(value)}")
        if not 0 <= self.builder_optimization_level <= 5:
            raise ValueError(f"builder_optimization_level must be 0..5, got {self.builder_optimization_level}")
        if self.workspace_gb is not None and self.workspace_gb <= 0:
            raise ValueError(f"workspace_gb must be > 0 (or null for TensorRT's default), got {self.workspace_gb}")


@dataclass(frozen=True)
class ModelSizes:
    """The facts about a model that its optimization profiles derive from."""

    vae_scale_factor: int
    default_size: int  # pixels (the U-Net's sample size x the VAE factor)
    text_length: int = 77  # tokens: the tokenizers' model_max_length
    guidance: bool = True  # the artifact's default call runs classifier-free guidance (U-Net batch doubled)
    # ControlNets: each residual (a ControlNet graph's output, a U-Net graph's input) and the factor by which
    # its height and width are smaller than the latents' (1, 2, 4, ...: one per stride-2 downsampler passed)
    residual_factors: tuple[tuple[str, int], ...] = ()


def dimension_ranges(config: TensorRTTargetConfig, sizes: ModelSizes) -> dict[str, dict[str, Range]]:
    """(min, opt, max) of every named dynamic ONNX dimension, per component kind.

    Kinds: "text_encoder" (each text encoder), "unet", "vae_decoder", and with ControlNets "controlnet"
    (each ControlNet graph); dimension names are the exporter's dynamic axes (`batch_size`,
    `sequence_length`, `height`, `width`, `latent_height`, `latent_width`; with ControlNets the control
    image's `image_height` / `image_width` in pixels and each residual's `<residual>_height` / `_width`: the
    latent range divided by its factor, rounded up as each stride-2, padding-1 downsampler rounds).
    """
    factor, size = sizes.vae_scale_factor, sizes.default_size
    default = (max(factor, size // 2 // factor * factor), size, (size * 3 // 2 + factor - 1) // factor * factor)
    latent, image = {}, {}
    for name in ("height", "width"):
        pixels = getattr(config, name) or default
        if any(v % factor for v in pixels):
            raise ConfigError(f"target tensorrt: {name}={list(pixels)} must hold multiples of the VAE factor {factor}")
        latent[name] = tuple(v // factor for v in pixels)
        image[name] = tuple(pixels)
    low, opt, high = config.batch_size
    text = (sizes.text_length,) * 3
    unet = {
        "batch_size": (low, opt * (2 if sizes.guidance else 1), high * 2),
        "sequence_length": text,
        "height": latent["height"],
        "width": latent["width"],
    }
    residuals = {
        f"{residual}_{name}": tuple(-(-v // down) for v in latent[name])
        for residual, down in sizes.residual_factors
        for name in ("height", "width")
    }
    ranges = {
        "text_encoder": {"batch_size": (1, opt, high), "sequence_length": text},  # prompts: at most the images
        "unet": unet | residuals,
        "vae_decoder": {
            "batch_size": (low, opt, high),
            "latent_height": latent["height"],
            "latent_width": latent["width"],
        },
    }
    if residuals:  # a ControlNet runs at the U-Net's batch (guess mode: the conditional half, within the range)
        ranges["controlnet"] = unet | {"image_height": image["height"], "image_width": image["width"]} | residuals
    if config.static:
        ranges = {kind: {dim: (r[1],) * 3 for dim, r in dims.items()} for kind, dims in ranges.items()}
    return ranges


def component_kind(name: str) -> str:
    """The kind whose ranges a component's profile takes: its name, or the family of numbered ones."""
    for family in ("text_encoder", "controlnet"):
        if name.startswith(family):
            return family
    return name


def onnx_input_dims(path: Path) -> dict[str, list[int | str]]:
    """Graph inputs (weights excluded) -> dims: an int for a fixed size, the axis name for a dynamic one."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return {
        i.name: [d.dim_param if d.dim_param else d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in graph.input
        if i.name not in weights
    }


def profile_shapes(inputs: Mapping[str, list[int | str]], ranges: Mapping[str, Range]) -> dict[str, Shapes]:
    """The optimization profile: (min, opt, max) shapes of every input that has a dynamic dimension."""
    profile = {}
    for name, dims in inputs.items():
        if all(isinstance(d, int) for d in dims):
            continue
        unknown = [d for d in dims if isinstance(d, str) and d not in ranges]
        if unknown:
            raise LoweringError(
                f"input {name!r} has dynamic dimension(s) {unknown} that the tensorrt target has no "
                "range for; report the model"
            )
        profile[name] = tuple(tuple(ranges[d][i] if isinstance(d, str) else d for d in dims) for i in range(3))
    return profile
