"""Run-time LoRAs on tensorrt artifacts: the engines' weights replaced through TensorRT's refitter.

UNVERIFIED: written against TensorRT's Python API (`Refitter`, `set_named_weights`, `get_missing_weights`,
`refit_cuda_engine`) and checked only against `tests/fake_tensorrt.py`, which records the calls and the
values handed over; no real TensorRT has run it.

An artifact compiled with `--option refit=true` has engines built with `BuilderFlag.REFIT`. TensorRT's ONNX
parser names each engine weight after the ONNX initializer it came from, and the optimize stage keeps the
export's initializer names (`build.carry_lora_map` writes `model.opt.lora_map.json` for the optimized graph),
so the weights the refitter takes are the initializers `lora_weights.fused_weights` computes, the same values
the onnx target hands ONNX Runtime: W' = cast(float(W) + dW[^T]) in the initializer's type, which in a
strongly typed engine is the engine's.

`switch` per affected engine (U-Net, text encoders; never the VAE): a `Refitter`, `set_named_weights` for
every initializer the new LoRAs change and for every one the previous LoRAs changed (back to the artifact's
value, read from `model.opt.onnx`), then `get_missing_weights` (weights TensorRT combined with the ones set,
e.g. into one kernel, must be set too: given from the graph when it holds them, otherwise the switch is
refused) and `refit_cuda_engine`. `set_loras([])` hands back the artifact's own values of the weights changed
before. On any error, every engine this switch refitted, and every engine that held LoRA weights before, is
refitted back to the artifact's weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from sdcompiler.errors import ArtifactError
from sdcompiler.passes.onnx_export import initializer_arrays
from sdcompiler.targets.lora_weights import check_maps, fused_weights, lora_graphs
from sdcompiler.targets.tensorrt.build import OPTIMIZED

TRT_TYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16"}  # numpy dtype name -> trt.DataType


def switch(
    components, root: Path, manifest: dict[str, Any], loras: list[tuple[str, float]], touched: dict[str, list[str]]
) -> dict[str, list[str]]:
    """Refit the U-Net and text-encoder engines of `components` with `loras` fused (none: the artifact's weights);
    `touched`: per engine, the weights the previous switch changed. Returns, per engine, the weights changed."""
    graphs = lora_graphs(manifest, components.backends)
    files = {name: root / name / OPTIMIZED for name in graphs}
    fused: dict[str, dict[str, np.ndarray]] = {}
    refitted: list[str] = []
    try:  # a LoRA that does not fit raises here too: the previous LoRAs' engines are put back all the same
        if loras:
            check_maps(files, "tensorrt")
            fused = fused_weights(root, manifest, files, loras)
        for name in graphs:
            names = set(fused.get(name, {})) | set(touched.get(name, []))
            if not names:
                continue
            weights = initializer_arrays(files[name], sorted(names - set(fused.get(name, {})))) | fused.get(name, {})
            components.backends[name].refit(weights, _stored(files[name]))
            refitted.append(name)
    except Exception as exc:
        _restore(components, files, {name: set(fused.get(name, {})) for name in refitted}, touched, exc)
        raise
    return {name: sorted(found) for name, found in fused.items() if found}


def _restore(components, files: dict[str, Path], changed: dict[str, set], touched: dict[str, list[str]], exc) -> None:
    """Refit the artifact's own weights back into every engine this switch changed or the previous one left."""
    for name in files:
        names = changed.get(name, set()) | set(touched.get(name, []))
        if not names:
            continue
        try:
            components.backends[name].refit(initializer_arrays(files[name], sorted(names)), _stored(files[name]))
        except Exception as again:
            raise ArtifactError(
                f"a LoRA switch failed ({exc}) and putting the {name} engine's own weights back failed too "
                f"({again}); load the artifact again"
            ) from exc


def _stored(path: Path) -> Callable[[list[str]], dict[str, np.ndarray]]:
    return lambda names: initializer_arrays(path, names)


def refit_engine(
    trt,
    engine,
    weights: Mapping[str, np.ndarray],
    stored: Callable[[list[str]], Mapping[str, np.ndarray]],
    name: str,
) -> None:
    """Replace the weights of `engine` named in `weights` (numpy arrays in the engine weights' types).

    Args:
        trt: the `tensorrt` module.
        engine: a refittable `ICudaEngine` (built with `BuilderFlag.REFIT`).
        weights: weight name (the ONNX initializer's) -> new value.
        stored: names -> the artifact's values of the weights among them its graph holds: what TensorRT reports
            missing (weights it combined with the ones set) is given from there.
        name: the engine's component, for messages.
    """
    refitter = trt.Refitter(engine, trt.Logger(trt.Logger.WARNING))
    # TensorRT's default weights_validation (on) stays: it checks the handed weights before they replace the engine's
    alive = []  # trt.Weights holds a pointer: each array must live until refit_cuda_engine returns

    def hand(weight: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        if array.dtype.name not in TRT_TYPES:
            raise ArtifactError(f"the {name} engine's weight {weight} is {array.dtype}, which refit does not hand over")
        alive.append(array)
        handed = trt.Weights(getattr(trt.DataType, TRT_TYPES[array.dtype.name]), array.ctypes.data, array.size)
        if not refitter.set_named_weights(weight, handed):
            raise ArtifactError(
                f"TensorRT refused weight {weight} ({array.dtype}, {array.size} values) for the {name} engine "
                "(its log is above): the engine does not hold it as built (recompile with --option refit=true)"
            )

    for weight, array in weights.items():
        hand(weight, array)
    missing = list(refitter.get_missing_weights())
    if missing:
        for weight, array in stored(missing).items():
            hand(weight, array)
        missing = list(refitter.get_missing_weights())
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (", ..." if len(missing) > 5 else "")
        raise ArtifactError(
            f"the {name} engine needs {len(missing)} more weight(s) to refit ({shown}) that its optimized graph does "
            "not hold; refit refused, merge the LoRAs at compile time (merge_lora)"
        )
    if not refitter.refit_cuda_engine():
        raise ArtifactError(f"TensorRT could not refit the {name} engine (its log is above)")
