"""The pass interface, its record, and the registry.

A pass transforms a diffusers pipeline in place (mostly its U-Net):

    class FuseQKV(Pass):
        name = "fuse_qkv"; config_class = FuseQKVConfig; stage = "structural"
        changes_structure = True
        def run(self, pipe, config, ctx) -> dict[str, float]: ...   # metrics
        def rebuild(self, pipe, config): ...                         # structure only

`stage` places the pass in the ordering rules (`sdcompiler.passes.manager`).
A pass that changes module types or structure must implement `rebuild`,
which re-applies the structural change to freshly built, weightless modules,
so an artifact loads without training or calibration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from sdcompiler.passes.architectures import ARCHS, ArchSpec
from sdcompiler.passes.config import PassConfig
from sdcompiler.passes.errors import PassError, RecipeError

STAGES = ("merge", "structural", "training", "distill_merge", "quantize", "scheduler", "noop")


@dataclass(frozen=True)
class QuantizedUNet:
    """A quantized U-Net, as the ptq pass hands it to the lowering target.

    Attributes:
        backend: "onnxruntime": `onnx_folder` holds the int8 QDQ graph (`model.onnx` [+ `model.onnx.data`])
            that replaces the onnx target's float U-Net export; "modelopt": `pipe.unet` itself carries
            modelopt's fake quantizers (on `layers`) and exports as a Q/DQ graph (target tensorrt) or becomes
            INT8 / FP8 layers (target torch, `ptq_lowp`).
        precision: "int8" | "fp8".
        settings: how it was made (types, granularity, calibration, excluded layers), for the manifest.
        onnx_folder: the onnxruntime backend's graph folder, in the pass's cache.
    """

    backend: Literal["onnxruntime", "modelopt"]
    precision: str
    settings: dict[str, Any] = field(default_factory=dict)
    onnx_folder: Path | None = None
    layers: dict[str, str] = field(default_factory=dict)  # modelopt: the quantized layers, name -> "conv" | "linear"
    # modelopt with `quantize_controlnets`: each ControlNet's quantized layers, artifact folder -> layers as above
    controlnet_layers: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class PassProducts:
    """What passes hand the lowering target besides the transformed pipeline (`PassContext.products`, then
    `LowerContext.products`): typed fields, never attributes set on modules."""

    unet_quantization: QuantizedUNet | None = None


@dataclass
class PassContext:
    """What a pass may know about the run besides the pipeline itself."""

    arch: str  # "sd15" | "sd21" | "sdxl"; `spec` is its ArchSpec
    macs_resolution: tuple[int, int]
    cache_dir: Path
    seed: int = 0
    show_progress: bool = True
    device: str = "cpu"
    source_hash: str = ""  # content hash of the loaded checkpoint: keys data caches
    target: str = ""  # the target the compile lowers to ("" outside compile_pipeline)
    # Set by the PassManager for passes with needs_teacher: the U-Net as it was before the first
    # structural pass since the previous training pass, and a key naming it (source + passes before).
    teacher: Any = None
    teacher_key: str = ""
    model_key: str = ""  # names the model a pass receives (source + passes before it): keys its data caches
    # Call defaults the compiled pipeline should use (num_inference_steps, guidance_scale), set by passes
    # such as set_scheduler; compile_pipeline records them in the manifest's "defaults".
    pipeline_defaults: dict = field(default_factory=dict)
    products: PassProducts = field(default_factory=PassProducts)  # for the target: see PassProducts
    # compile_pipeline(controlnet=...): artifact folder -> diffusers ControlNetModel, in call order (float, as
    # loaded; ptq's and quest_w4a4's `quantize_controlnets` quantize them in place, the torch target lowers or
    # packs them as the U-Net), and a key naming them (their content
    # hashes) for data caches
    controlnets: dict[str, Any] = field(default_factory=dict)
    controlnets_key: str = ""

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise PassError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")

    @property
    def spec(self) -> ArchSpec:
        """The architecture family of the model the passes transform."""
        return ARCHS[self.arch]


@dataclass
class PassRecord:
    """One entry of `manifest.json["passes"]`: the replay script and the ledger."""

    name: str
    config: dict[str, Any]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    # named facts that are not numbers, from the strings a pass's `run` returns among its metrics (e.g.
    # `calibration_data`: what the calibration sampler fed the model; `conv_in`: how an inpainting U-Net's
    # first layer was quantized); left out of the manifest when empty
    notes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        if not record["notes"]:
            del record["notes"]
        return record


class Pass:
    """Base class of every pass. Subclasses set the class attributes and `run`."""

    name: ClassVar[str]
    config_class: ClassVar[type[PassConfig]] = PassConfig
    stage: ClassVar[str] = "noop"
    changes_structure: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False  # the manager keeps a frozen copy of the pre-structural U-Net for it
    targets: ClassVar[tuple[str, ...] | None] = None  # lowering targets that can run the result (None: all)
    # the U-Net keeps the source's module names and float weights, so a LoRA made for the source checkpoint
    # still fits the artifact at run time (`CompiledPipeline.set_loras`); pruning, slimming, fused QKV and
    # quantization do not
    runtime_loras: ClassVar[bool] = False
    # the torch target stores modules of the pass's own making although the parameter layout stays (ptq's INT8 /
    # FP8 layers): `rebuild` runs at load as for structural passes
    deploys_modules: ClassVar[bool] = False
    # with ControlNets (compile_pipeline(controlnet=...)): "keeps_layout" where the U-Net's down / mid blocks keep
    # their names and outputs, so the nets' residuals still fit (the pass is allowed with them);
    # "changes_layout" where the pass removes, renames or reshapes down / mid blocks (refused: the residuals no
    # longer fit); None: not yet checked with ControlNets (refused too)
    controlnet: ClassVar[Literal["keeps_layout", "changes_layout"] | None] = None
    # the pass samples its teacher as a text-to-image model from noise (`teacher_data.teacher_samples`: training
    # data); the manager refuses it, before any pass runs, on models that are not one: an inpainting U-Net
    # (conv_in takes latents + mask + masked-image latents) and the SDXL refiner (aesthetic-score time ids).
    # Calibration passes (`teacher_trajectories`) sample each model as it runs and leave this False
    text_to_image_teacher: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def supported_targets(self, config: PassConfig) -> tuple[str, ...] | None:
        """The lowering targets that can run what this pass makes with `config` (None: all)."""
        return self.targets

    def requires(self, pipe, config: PassConfig, ctx: PassContext) -> None:
        """Raise PassError when `pipe` is not something this pass can transform."""

    def ensures(self, pipe, config: PassConfig, ctx: PassContext) -> None:
        """Raise PassError when the pass did not leave what it promises."""

    def run(self, pipe, config: PassConfig, ctx: PassContext) -> dict[str, float | str]:
        """Transform `pipe` in place; return named metrics for the record (strings go to its `notes`)."""
        raise NotImplementedError

    def rebuild_controlnet(self, controlnet, config: PassConfig) -> bool:
        """Target torch, at load: re-apply to a freshly built (weightless) ControlNet the modules this pass made
        of the compile's ControlNets (ptq's INT8 / FP8 layers, quest_w4a4's packed ones); True when it did (the
        stored state fills them)."""
        return False

    def rebuild(self, pipe, config: PassConfig) -> None:
        """Re-apply the structural change to a freshly built (weightless) pipeline."""
        if self.changes_structure:
            raise NotImplementedError(f"pass {self.name!r} changes structure but has no rebuild()")


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to recipes under `cls.name`."""
    if cls.stage not in STAGES:
        raise ValueError(f"pass {cls.name!r} has unknown stage {cls.stage!r}; stages: {STAGES}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str) -> Pass:
    if not isinstance(name, str):  # a recipe's `pass: [...]` or `pass: {...}`: not hashable, not a name
        raise RecipeError(
            f"a pass name must be a string, got {type(name).__name__} {name!r}; "
            f"available passes: {', '.join(sorted(_REGISTRY))}"
        )
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise RecipeError(f"unknown pass {name!r}; available passes: {', '.join(sorted(_REGISTRY))}") from None


def available_passes() -> list[str]:
    return sorted(_REGISTRY)


def check_structure_unchanged(pass_: Pass, before: dict, after: dict) -> None:
    """Guard used by the manager: a pass that says it keeps structure must keep it."""
    if not pass_.changes_structure and before != after:
        raise PassError(
            f"pass {pass_.name!r} changed the U-Net's parameter layout but declares changes_structure=False; "
            "fix the pass (it must provide rebuild())"
        )
