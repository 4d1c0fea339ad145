"""Lowering targets: named stages that turn a transformed pipeline into artifact files.

A target lowers (`lower(pipe, out_dir, config, ctx) -> [StageRecord]`) at
compile time and loads (`load(root, manifest, device, providers) ->
Components`) at run time; both directions live in the same class so the file
layout is defined once. `lower` runs its stages in order, each timed by a
`Stage` whose record (name, settings, results) goes into the manifest; a stage
that two targets share is one function (the onnx and tensorrt targets both
start with `onnx_target.export_onnx_stage`). Targets are listed by name in
`sdcompiler.targets.TARGETS` (a module beside this one, or a package such as
`sdcompiler.targets.tensorrt`); `compile_pipeline(target=NAME)` and
`load_compiled` look them up there (`get_target`).
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from sdcompiler.archs import ArchSpec
from sdcompiler.errors import ConfigError
from sdcompiler.passes import PassConfig, PassProducts
from sdcompiler.targets.served_models import ModelSpec


@dataclass
class LowerContext:
    """What a target needs besides the pipeline."""

    arch: ArchSpec
    source_unet_config: dict[str, Any]  # the U-Net config before any pass: rebuild starts from it
    show_progress: bool = True
    defaults: dict[str, Any] = field(default_factory=dict)  # the pipeline call defaults the manifest records
    products: PassProducts = field(default_factory=PassProducts)  # what the passes handed over (quantized U-Net)
    controlnets: dict[str, Any] = field(default_factory=dict)  # artifact folder -> ControlNetModel, in call order
    macs_resolution: tuple[int, int] | None = None  # pixel (H, W) the compile counts MACs at (its manifest's)


@dataclass
class StageRecord:
    name: str
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)


class Stage:
    """Times one named lowering stage: `with Stage("export_onnx", settings) as s: ...; s.results[...] = ...`."""

    def __init__(self, records: list[StageRecord], name: str, settings: dict[str, Any] | None = None):
        self.record = StageRecord(name, 0.0, dict(settings or {}))
        self.results = self.record.results
        records.append(self.record)

    def __enter__(self) -> "Stage":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.record.seconds = round(time.perf_counter() - self._start, 3)


class Target:
    name: ClassVar[str]
    config_class: ClassVar[type[PassConfig]] = PassConfig
    # config keys that only change how an artifact runs, so `load_compiled(dir, options=...)` may override them
    load_options: ClassVar[tuple[str, ...]] = ()
    # whether a serving system can run the artifact's components as separate models (`serving_models`)
    serves_components: ClassVar[bool] = False

    def load_config(self, manifest: dict[str, Any], options: dict[str, Any] | None) -> dict[str, Any]:
        """The artifact's recorded target config with load-time `options` applied and validated."""
        recorded = dict(manifest["lowering"]["config"])
        if not options:
            return recorded
        fixed = sorted(set(options) - set(self.load_options))
        if fixed and not self.load_options:
            raise ConfigError(
                f"target {self.name!r} takes no load-time options (got {', '.join(fixed)}); its "
                "settings are fixed when the artifact is compiled"
            )
        if fixed:
            allowed = ", ".join(self.load_options) or "none"
            raise ConfigError(
                f"option(s) {', '.join(fixed)} of target {self.name!r} are fixed when the artifact is "
                f"compiled (load-time options: {allowed}); recompile with --option to change them"
            )
        return self.config_class.from_dict(recorded | dict(options), owner=f"target {self.name}").to_dict()

    def check_tools(self, config: PassConfig) -> None:
        """Refuse, before the checkpoint loads, a config whose tools (libraries, devices) this machine lacks."""

    def lower(self, pipe, out: Path, config: PassConfig, ctx: LowerContext) -> list[StageRecord]:
        raise NotImplementedError

    def load(self, root: Path, manifest: dict[str, Any], device: str, providers: list[str] | None):
        """Return `sampling.Components` for the artifact at `root`."""
        raise NotImplementedError

    def serving_models(self, root: Path, manifest: dict[str, Any]) -> list[tuple[ModelSpec, dict[str, str]]]:
        """The artifact's components as separate serving models (targets with `serves_components`): each
        model's spec and the files its version folder holds (file name there -> path relative to `root`)."""
        raise NotImplementedError

    def check_loras(self, manifest: dict[str, Any], loras: list[tuple[str, float]]) -> None:
        """Refuse LoRAs this artifact cannot switch at run time (`CompiledPipeline.set_loras`); changes nothing."""
        raise ConfigError(
            f"LoRAs switch at run time on torch and onnx artifacts, and this one targets {self.name!r}; "
            "merge them at compile time instead (pass merge_lora, before any structural pass)"
        )

    def switch_loras(
        self,
        components,
        root: Path,
        manifest: dict[str, Any],
        loras: list[tuple[str, float]],
        touched: dict[str, list[str]],
    ) -> dict[str, list[str]]:
        """Replace the LoRAs fused at run time (the parameters in `touched`) with `loras`; returns the parameters
        changed. On an error the artifact's own weights are back."""
        raise NotImplementedError


def check_runtime_loras(manifest: dict[str, Any], loras: list[tuple[str, float]]) -> None:
    """Refuse LoRAs an artifact of this layout cannot switch at run time (nothing changes)."""
    from sdcompiler.passes import get_pass
    from sdcompiler.passes.merge_lora import check_lora_files

    blocked = sorted({p["name"] for p in manifest["passes"] if not get_pass(p["name"]).runtime_loras})
    if loras and blocked:
        raise ConfigError(
            f"LoRAs cannot switch at run time on this artifact: {', '.join(blocked)} changed the "
            "U-Net's module layout or numerics, so LoRA keys no longer fit; merge LoRAs at "
            "compile time (merge_lora before those passes)"
        )
    check_lora_files(loras)


def write_pipeline_files(pipe, out: Path, components: dict[str, list]) -> None:
    """Tokenizers, scheduler and `model_index.json` (with the given component entries)."""
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None:
            tokenizer.save_pretrained(out / name)
    pipe.scheduler.save_pretrained(out / "scheduler")
    index = {"_class_name": type(pipe).__name__, "_diffusers_version": _version("diffusers")}
    for key, value in pipe.config.items():
        if not key.startswith("_") and not (isinstance(value, (list, tuple)) and len(value) == 2):
            index[key] = value  # pipeline flags such as force_zeros_for_empty_prompt
    for name in ("tokenizer", "tokenizer_2", "scheduler"):
        if getattr(pipe, name, None) is not None:
            index[name] = [_library(getattr(pipe, name)), type(getattr(pipe, name)).__name__]
    index.update(components)
    if not type(pipe).__name__.startswith("StableDiffusionXL"):  # SDXL's text-to-image and refiner pipelines
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _library(obj) -> str:
    return type(obj).__module__.split(".")[0]


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def load_tokenizers(root: Path, spec: ArchSpec) -> list:
    """Tokenizers with the class named in model_index.json (slow and fast CLIP tokenizers can differ)."""
    import transformers

    index = json.loads((root / "model_index.json").read_text())
    tokenizers = []
    for name in spec.tokenizers:
        library, class_name = index[name]
        tokenizers.append(getattr(transformers, class_name).from_pretrained(root / name))
    return tokenizers


def scheduler_factory(root: Path):
    """A callable that builds a fresh scheduler from the artifact's scheduler config."""
    import diffusers

    index = json.loads((root / "model_index.json").read_text())
    scheduler_cls = getattr(diffusers, index["scheduler"][1])
    config = scheduler_cls.load_config(root / "scheduler")
    # a swapped scheduler's saved config still carries the old class's keys (PNDM's skip_prk_steps, ...):
    # build without what this class does not take, so loading does not warn about a config that is fine, then
    # keep those keys in its config as diffusers does (a later `X.from_config(pipe.scheduler.config)` reads them)
    accepted = set(inspect.signature(scheduler_cls.__init__).parameters)
    taken = {k: v for k, v in config.items() if k in accepted or k.startswith("_")}
    others = {k: v for k, v in config.items() if k not in taken}

    def build():
        scheduler = scheduler_cls.from_config(taken)
        scheduler.register_to_config(**others)
        return scheduler

    return build
