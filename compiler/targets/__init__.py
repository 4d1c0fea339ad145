"""Lowering targets, by name: `onnx` (ONNX Runtime), `tensorrt` (engines built from the onnx graphs), `torch`
(PyTorch modules with Triton kernels)."""

from sdcompiler.errors import LoweringError
from sdcompiler.targets.base import LowerContext, StageRecord, Target
from sdcompiler.targets.onnx_target import OnnxTarget
from sdcompiler.targets.tensorrt import TensorRTTarget
from sdcompiler.targets.torch_target import TorchTarget

TARGETS: dict[str, type[Target]] = {cls.name: cls for cls in (OnnxTarget, TensorRTTarget, TorchTarget)}

__all__ = ["TARGETS", "LowerContext", "StageRecord", "Target", "get_target"]


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]()
    except KeyError:
        raise LoweringError(f"unknown target {name!r}; available targets: {', '.join(sorted(TARGETS))}") from None
