"""Lowering targets (`torch`, `onnx`; `tensorrt` builds on `onnx`)."""

from sdcompiler.targets.base import LowerContext, StageRecord, Target, get_target, register_target

__all__ = ["LowerContext", "StageRecord", "Target", "get_target", "register_target"]
