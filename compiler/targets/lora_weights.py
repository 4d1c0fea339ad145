"""LoRA weights for artifacts that switch them at run time without torch modules (onnx and tensorrt targets).

At export, the onnx target writes `lora_map.json` next to each U-Net and text-encoder graph: the initializer
that holds each LoRA-addressable weight (`sdcompiler.passes.onnx_export.lora_weight_map`; most linear weights
are anonymous, transposed MatMul initializers); the tensorrt target carries it to its optimized graph
(`model.opt.lora_map.json`). `fused_weights` gives, per graph, the new value of every initializer the LoRAs
change:

1. each LoRA's weight change comes from diffusers' own loader and fusion (`merge_lora.fuse_loras`, the code the
   compile-time `merge_lora` pass runs, so every key layout and alpha it reads is read the same way) on a
   skeleton of the model: built on the meta device from the artifact's configs, with only the modules the LoRAs
   address materialized, as zeros, so what the fusion leaves in them is the change itself (`lora_deltas`);
2. the change is added to the graph's initializer (transposed where the graph holds it so), in float32, and the
   sum cast back to the initializer's type: W' = cast(float(W) + dW[^T]).

The onnx target hands the result to ONNX Runtime as initializer overrides (`onnx_loras`), the tensorrt target
to TensorRT's refitter (`tensorrt.refit`).
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdcompiler.archs import get_arch
from sdcompiler.errors import ArtifactError, ConfigError
from sdcompiler.passes.onnx_export import initializer_arrays
from sdcompiler.targets.components import lora_component, lora_map_path

_LORA_KEY = re.compile(
    r"^(unet|text_encoder_2|text_encoder)\.(.+?)\.(lora_A|lora_B|lora\.down|lora\.up|lora_magnitude)"
)


def lora_graphs(manifest: dict[str, Any], backends: dict) -> dict[str, str]:
    """The graphs that hold LoRA-addressable weights, each with the diffusers component it comes from."""
    encoders = get_arch(manifest["arch"]).text_encoders
    return {name: lora_component(name, encoders) for name in backends if lora_component(name, encoders)}


def check_maps(files: dict[str, Path], target: str) -> None:
    """Refuse an artifact whose graphs (`files`: graph name -> graph path) have no LoRA weight map."""
    missing = [name for name, path in files.items() if not lora_map_path(path).is_file()]
    if missing:
        raise ArtifactError(
            f"this {target} artifact has no LoRA weight map for {', '.join(missing)} (compiled by an older "
            "sd-compiler); recompile it to switch LoRAs at run time"
        )


def _skeleton(root: Path, arch: str):
    """The artifact's pipeline with its U-Net and text encoders on the meta device (no memory), no VAE."""
    import diffusers
    import transformers

    index = json.loads((root / "model_index.json").read_text())
    modules = {}
    with torch.device("meta"):
        config = json.loads((root / "unet" / "config.json").read_text())
        modules["unet"] = getattr(diffusers, index["unet"][1]).from_config(config)
        for name in get_arch(arch).text_encoders:
            cls = getattr(transformers, index[name][1])
            config = cls.config_class.from_dict(json.loads((root / name / "config.json").read_text()))
            modules[name] = cls(config)
    pipeline_cls = getattr(diffusers, index["_class_name"])
    params = inspect.signature(pipeline_cls.__init__).parameters
    kwargs = {
        name: modules.get(name)
        for name, p in params.items()
        if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD and p.default is inspect.Parameter.empty
    }
    if "requires_safety_checker" in params:
        kwargs["requires_safety_checker"] = False
    if "add_watermarker" in params:
        kwargs["add_watermarker"] = False
    return pipeline_cls(**kwargs)


def _materialize(module: torch.nn.Module) -> None:
    module.to_empty(device="cpu", recurse=True)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.zero_()


def lora_deltas(
    root: Path, manifest: dict[str, Any], loras: list[tuple[str, float]]
) -> dict[str, dict[str, torch.Tensor]]:
    """Per component ("unet", "text_encoder", ...), the change each LoRA-touched weight gets: the LoRAs fused
    with their scales into zero weights of the addressed modules."""
    from sdcompiler.passes.merge_lora import fuse_loras

    pipe = _skeleton(root, manifest["arch"])
    for path, _ in loras:
        file = Path(path)
        state = pipe.lora_state_dict(str(file.parent), weight_name=file.name)
        state = state[0] if isinstance(state, tuple) else state
        if any("lora_magnitude" in key for key in state):
            raise ConfigError(
                f"LoRA {path} is a DoRA (magnitude vectors): its change depends on the weights, so onnx and tensorrt "
                "artifacts cannot switch it at run time; merge it at compile time (merge_lora)"
            )
        for key in state:
            match = _LORA_KEY.match(key)
            if match is None or getattr(pipe, match.group(1), None) is None:
                continue
            component = getattr(pipe, match.group(1))
            try:
                # the U-Net: only the addressed modules; a text encoder whole (diffusers moves it to the device
                # of its first parameter after loading, which must not be meta)
                module = component.get_submodule(match.group(2)) if match.group(1) == "unet" else component
            except AttributeError:  # a layout the loader renames later: the whole component, to be safe
                module = component
            if any(p.is_meta for p in module.parameters()):
                _materialize(module)
    _, touched = fuse_loras(pipe, loras, manifest["arch"])
    deltas: dict[str, dict[str, torch.Tensor]] = {}
    for component, names in touched.items():
        params = dict(getattr(pipe, component).named_parameters())
        for name in names:
            tensor = params[name]
            if tensor.is_meta:
                raise ConfigError(
                    f"LoRA weight change for {component}.{name} could not be computed; merge it at compile time"
                )
            if name.endswith(".bias"):
                if torch.count_nonzero(tensor):
                    raise ConfigError(
                        f"a LoRA changes the bias {component}.{name}, which onnx and tensorrt artifacts cannot switch at run time; "
                        "merge it at compile time (merge_lora)"
                    )
                continue
            deltas.setdefault(component, {})[name] = tensor.detach().float()
    return deltas


def fused_weights(
    root: Path, manifest: dict[str, Any], files: dict[str, Path], loras: list[tuple[str, float]]
) -> dict[str, dict[str, np.ndarray]]:
    """Per graph, the initializers `loras` change, each with its new value in the initializer's own type.

    Args:
        root: the artifact folder (its configs build the skeleton the LoRAs are fused on).
        manifest: the artifact's manifest.
        files: graph name -> the graph file whose initializers (and `lora_map_path`) are used.
        loras: (path, scale) pairs.
    """
    graphs = lora_graphs(manifest, files)
    deltas = lora_deltas(root, manifest, loras)
    maps = {name: json.loads(lora_map_path(files[name]).read_text())["weights"] for name in graphs}
    wanted: dict[str, list[tuple[str, dict, torch.Tensor]]] = {}  # graph -> (param, map entry, change)
    for component, changes in deltas.items():
        holders = [name for name, source in graphs.items() if source == component]
        for param, delta in changes.items():
            placed = [name for name in holders if param in maps[name]]
            if not placed:
                raise ConfigError(
                    f"a LoRA changes {component}.{param}, which this artifact's graphs do not hold as one "
                    "initializer; merge it at compile time (merge_lora)"
                )
            for name in placed:
                wanted.setdefault(name, []).append((f"{component}.{param}", maps[name][param], delta))
    overrides: dict[str, dict[str, np.ndarray]] = {}
    for name, entries in wanted.items():
        bases = initializer_arrays(files[name], [entry["initializer"] for _, entry, _ in entries])
        for param, entry, delta in entries:
            base = bases[entry["initializer"]]
            change = delta.numpy().T if entry["transposed"] else delta.numpy()
            if change.shape != base.shape:
                raise ConfigError(
                    f"LoRA change for {param} has shape {change.shape}, the graph's weight {base.shape}; the LoRA "
                    "does not fit this model"
                )
            overrides.setdefault(name, {})[entry["initializer"]] = (base.astype(np.float32) + change).astype(base.dtype)
    return overrides
