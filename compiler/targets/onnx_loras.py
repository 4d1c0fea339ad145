"""Run-time LoRA switching for ONNX artifacts: fused weights given to ONNX Runtime as initializer overrides.

`CompiledPipeline.set_loras` computes the fused weights of the initializers the LoRAs change
(`sdcompiler.targets.lora_weights.fused_weights`, from the `lora_map.json` the export writes next to each U-Net
and text-encoder graph) and rebuilds the affected ONNX Runtime sessions with `SessionOptions.add_initializer`
overrides. The artifact's files are never written; `set_loras([])` rebuilds the sessions without overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdcompiler.passes.onnx_export import graph_path
from sdcompiler.targets.lora_weights import fused_weights, lora_graphs


def switch(components, root: Path, manifest: dict[str, Any], loras: list[tuple[str, float]]) -> dict[str, list[str]]:
    """Rebuild the sessions of `components` with `loras` fused (none: the file's weights); returns, per graph,
    the initializers overridden. On an error every session is back on the file's weights."""
    graphs = lora_graphs(manifest, components.backends)
    try:
        files = {name: root / graph_path(name) for name in graphs}
        overrides = fused_weights(root, manifest, files, loras) if loras else {}
        for name in graphs:
            model = components.backends[name]
            if overrides.get(name) or model.overridden:
                model.override(overrides.get(name, {}))
    except Exception:
        for name in graphs:
            if components.backends[name].overridden:
                components.backends[name].override({})
        raise
    return {name: sorted(found) for name, found in overrides.items() if found}
