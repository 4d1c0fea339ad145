"""merge_lora: fuse LoRA adapters into the weights, W <- W + scale * (alpha / r) B A.

The files are read by diffusers' own LoRA loader (`load_lora_weights`, which
converts the kohya / A1111 key layouts and peft/diffusers ones; given folder and
`weight_name`, so `HF_HUB_OFFLINE=1` does not stop it at a Hub lookup), attached as
peft adapters, weighted per LoRA (`set_adapters`), fused (`fuse_lora`, U-Net
and text encoders alike) and unloaded, so the result is a plain pipeline with
changed weights and no adapter modules: every later pass and target sees an
ordinary model. It must run before structural passes (their target modules
must still exist; an ordering rule).

Only `.safetensors` files are read (a LoRA file is a checkpoint too). A LoRA
that attaches to no module of this U-Net (made for another architecture, e.g.
an SD 1.x LoRA on SDXL) or whose shapes do not fit is an error, not a warning; a loader error of another
kind is reported with its own cause, never as a misfit.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from sdcompiler.passes.base import Pass, PassContext, register_pass
from sdcompiler.passes.config import PassConfig
from sdcompiler.passes.errors import PassError, path_problem


@dataclass(frozen=True)
class MergeLoRAConfig(PassConfig):
    path: str | None = None  # one LoRA file ...
    scale: float = 1.0
    loras: tuple[dict, ...] = ()  # ... or several: [{path: ..., scale: ...}, ...]

    def items(self) -> list[tuple[str, float]]:
        entries = [(self.path, self.scale)] if self.path else []
        for entry in self.loras:
            unknown = set(entry) - {"path", "scale"}
            if unknown or "path" not in entry:
                raise PassError(f"each entry of 'loras' needs 'path' (and optionally 'scale'); got {dict(entry)}")
            entries.append((str(entry["path"]), float(entry.get("scale", 1.0))))
        if not entries:
            raise PassError(
                "merge_lora needs 'path' or 'loras': the LoRA file(s) to merge "
                "(with a preset: {preset: lcm-lora, path: FILE})"
            )
        return entries


def _adapter_layers(module: torch.nn.Module, adapter: str) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(1 for m in module.modules() if isinstance(m, BaseTunerLayer) and adapter in m.active_adapters)


@contextlib.contextmanager
def _library_chatter_captured():
    """diffusers logs 'no LoRA keys found' as a warning and a misfit LoRA's whole state-dict error (a line per
    tensor) before raising, and peft warns about target modules the file lacks: keep all of it off stderr. The
    cases that matter become one-line errors here (the raise carries the reason)."""
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@register_pass
class MergeLoRA(Pass):
    name = "merge_lora"
    controlnet = "keeps_layout"
    runtime_loras = True
    config_class = MergeLoRAConfig
    stage = "merge"
    description = (
        "fuse LoRA files (diffusers/peft or kohya/A1111 layouts, via diffusers' loader) into the U-Net "
        'and text encoders with per-LoRA scales: `{"pass": "merge_lora", "loras": '
        '[{"path": "a.safetensors", "scale": 0.8}]}`; must precede structural passes'
    )

    def requires(self, pipe, config: MergeLoRAConfig, ctx: PassContext) -> None:
        check_lora_files(config.items())

    def run(self, pipe, config: MergeLoRAConfig, ctx: PassContext) -> dict[str, float]:
        layers, _ = fuse_loras(pipe, config.items(), ctx.arch)
        return {"loras": len(config.items()), "unet_lora_layers": layers}


def check_lora_files(items: list[tuple[str, float]]) -> None:
    """Before anything is fused: each file exists, is .safetensors and has a header that reads."""
    from safetensors import safe_open

    for path, _ in items:
        file = Path(path)
        if not file.is_file():
            raise PassError(f"LoRA file {file} {path_problem(file)}: pass the path of a .safetensors LoRA file")
        if file.suffix != ".safetensors":
            raise PassError(f"LoRA file {file} is not .safetensors; pickle files can run code: convert it first")
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as exc:  # SafetensorError: a broken header, a wrong length, a truncated file
            raise PassError(f"LoRA file {file} is truncated or corrupt ({_reason(exc)}): re-download it") from None


# what diffusers / peft / torch say when a LoRA's keys or shapes do not match the model's modules
_MISFIT_MESSAGES = ("size mismatch", "Error(s) in loading state_dict", "not found in the base model", "Invalid LoRA")


def _is_misfit(exc: BaseException) -> bool:
    """Whether a loader error says the LoRA's keys or shapes do not fit the model (and nothing else: a loader
    failing for another reason, e.g. offline-mode file lookup, must not be reported as a misfit)."""
    if isinstance(exc, KeyError) or type(exc).__name__ == "NoMatchingPeftModuleError":
        return True
    return any(message in str(exc) for message in _MISFIT_MESSAGES)


def _reason(exc: BaseException) -> str:
    """One line of a library error: its first line, or for torch's multi-line state-dict errors ("Error(s) in
    loading state_dict ...:" then a line per tensor) the first tensor's line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    first = lines[1] if lines[0].startswith("Error(s) in loading") and len(lines) > 1 else lines[0]
    more = f" and {len(lines) - 2} more" if lines[0].startswith("Error(s) in loading") and len(lines) > 2 else ""
    return first[:240].rstrip(".") + more


def fuse_loras(pipe, items: list[tuple[str, float]], arch: str) -> tuple[int, dict[str, list[str]]]:
    """Fuse LoRA files with their scales into `pipe`'s U-Net and text encoders, in place (weights keep their
    storage, so CUDA graphs and compiled code stay valid), leaving no adapter modules.

    Returns the number of U-Net layers the LoRAs attached to, and per component ("unet", "text_encoder", ...)
    the names of the parameters the fusion changed. On an error no adapter stays attached, but weights the
    fusion had changed already stay changed (the runtime restores them from the artifact).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    names, scales, layers = [], [], 0
    touched: dict[str, list[str]] = {}
    try:
        for index, (path, scale) in enumerate(items):
            name = f"merge_{index}"
            file = Path(path)
            try:
                with _library_chatter_captured():
                    # folder + weight_name: without a weight_name diffusers looks for the file on the Hub, which
                    # fails under HF_HUB_OFFLINE=1 ("you must specify a `weight_name`") even for a local file
                    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
            except (ValueError, RuntimeError, KeyError, OSError) as exc:
                if _is_misfit(exc):
                    raise PassError(
                        f"LoRA {path} does not fit this {arch} model ({_reason(exc)}); "
                        "check it was made for this architecture"
                    ) from None
                raise PassError(f"cannot load LoRA {path}: {_reason(exc)}") from None  # its own cause, unreworded
            attached = _adapter_layers(pipe.unet, name)
            if attached == 0:
                raise PassError(
                    f"LoRA {path} attaches to no module of this {arch} U-Net (made for another architecture?)"
                )
            layers += attached
            names.append(name)
            scales.append(scale)
        for component in ("unet", "text_encoder", "text_encoder_2"):
            module = getattr(pipe, component, None)
            if module is None:
                continue
            wrapped = [n for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
            params = dict(module.named_parameters())
            touched[component] = [
                f"{n}.{kind}" for n in wrapped for kind in ("weight", "bias") if f"{n}.base_layer.{kind}" in params
            ]
        pipe.set_adapters(names, adapter_weights=scales)
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0, safe_fusing=False)  # in place
    finally:
        if names or hasattr(pipe.unet, "peft_config"):
            pipe.unload_lora_weights()
    return layers, touched
