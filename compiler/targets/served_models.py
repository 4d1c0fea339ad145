"""What a serving system needs to know about one component model of an artifact: its tensors (`TensorSpec`),
platform, files and batching limits (`ModelSpec`). Each target that serves its components as separate models
describes them (`Target.serving_models`); `sdcompiler.serving` writes Triton configs from these specs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from sdcompiler.errors import ArtifactError


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: Triton data type (`TYPE_FP32`, ...) and the model's full shape (-1: dynamic)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    optional: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """What a model's config.pbtxt is generated from.

    Exactly one of `platform` ("onnxruntime_onnx", "tensorrt_plan") and `backend` ("python").
    `cc_model_filenames` (compute capability such as "8.0" -> plan file in the version folder) and
    `profiles` (TensorRT optimization profile indices the instances may use) are for tensorrt_plan.
    `unbatched_reason` says in the config why a model is exported with max_batch_size 0.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    platform: str | None = None
    backend: str | None = None
    cc_model_filenames: Mapping[str, str] = field(default_factory=dict)
    profiles: tuple[str, ...] = ()
    parameters: Mapping[str, str] = field(default_factory=dict)
    unbatched_reason: str = ""
    batch_limit: int | None = None  # the most items a batching model takes (a TensorRT profile's max batch)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        """Inverse of `dataclasses.asdict` (how models.json stores specs)."""

        def tensors(items):
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"]), t["optional"]) for t in items)

        return cls(
            **{
                **data,
                "inputs": tensors(data["inputs"]),
                "outputs": tensors(data["outputs"]),
                "profiles": tuple(data["profiles"]),
            }
        )


def onnx_model_spec(name: str, path: Path) -> ModelSpec:
    """Inputs and outputs of an ONNX file as Triton sees them (graph only: external data is not read)."""
    import onnx

    types = {
        onnx.TensorProto.FLOAT: "TYPE_FP32",
        onnx.TensorProto.FLOAT16: "TYPE_FP16",
        onnx.TensorProto.DOUBLE: "TYPE_FP64",
        onnx.TensorProto.INT64: "TYPE_INT64",
        onnx.TensorProto.INT32: "TYPE_INT32",
    }
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}  # older exporters list weights as graph inputs

    def tensor(value) -> TensorSpec:
        t = value.type.tensor_type
        if t.elem_type not in types:
            raise ArtifactError(
                f"{path}: {value.name} has ONNX type {onnx.TensorProto.DataType.Name(t.elem_type)}, "
                f"which export-server does not serve; recompile with --precision fp32 or fp16"
            )
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return TensorSpec(value.name, types[t.elem_type], shape)

    return ModelSpec(
        name,
        inputs=tuple(tensor(v) for v in graph.input if v.name not in initializers),
        outputs=tuple(tensor(v) for v in graph.output),
        platform="onnxruntime_onnx",
    )
