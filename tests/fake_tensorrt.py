"""A stand-in for the `tensorrt` module (TensorRT cannot be installed on any machine here).

It records the calls the builder code makes on it and returns b"engine" for a build, so tests check what
sd-compiler asks TensorRT for (network flags, profile shapes, pool limit, optimization level, timing
cache) and what it does with an engine's bytes, never what TensorRT itself does. Its `Refitter` works on a
`FakeEngine` (named weights with their shapes and types, taken from an ONNX graph as TensorRT's ONNX parser
names them): it refuses unknown names and wrong types or counts, as `set_named_weights` does, reports the
weights an engine combined with the ones set as missing, and on `refit_cuda_engine` reads the values through
the pointers it was handed, so tests see exactly what a refit would write.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np


class FakeTensorRT:
    """Stand-in for the `tensorrt` module: it only records the calls the builder code makes on it.

    TensorRT cannot be installed here, so this checks what we ask TensorRT for (network flags, profile
    shapes, pool limit, optimization level, timing cache), not what TensorRT does with it. Its `BuilderFlag`
    has REFIT only: the strongly typed build must not set precision flags (TensorRT 11 removed them).
    """

    __version__ = "10.0.0-fake"

    class Logger:
        WARNING = "warning"

        def __init__(self, severity):
            self.severity = severity

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class BuilderFlag:
        REFIT = "refit"

    class DataType:  # the numpy type each stands for (trt.nptype's mapping)
        FLOAT = "float32"
        HALF = "float16"
        BF16 = "bfloat16"

    class Weights:
        """`trt.Weights(type, pointer, count)`: a pointer, read only when the engine is refitted."""

        def __init__(self, dtype: str, pointer: int, count: int):
            self.dtype, self.pointer, self.count = dtype, pointer, count

    def __init__(self, parses: bool = True, builds: bool = True):
        self.calls: list[tuple] = []
        self.parses, self.builds = parses, builds

    def Builder(self, logger):
        return _Recorder(self, "builder")

    def OnnxParser(self, network, logger):
        return _Recorder(self, "parser")

    def Refitter(self, engine: "FakeEngine", logger):
        self.calls.append(("Refitter", engine.name))
        return _Refitter(self, engine)


class FakeEngine:
    """A refittable engine's weights: name -> array (the ONNX initializers, as TensorRT's ONNX parser names them).

    `combined`: weight -> the weights TensorRT fused it with (missing until they are set too); `missing_once`:
    names the next `Refitter` reports missing whatever is set (weights TensorRT holds that the graph does not).
    """

    def __init__(self, name: str, weights: dict[str, np.ndarray]):
        self.name, self.weights = name, weights
        self.combined: dict[str, list[str]] = {}
        self.missing_once: set[str] = set()
        self.refits = 0

    @classmethod
    def from_onnx(cls, name: str, path: Path) -> "FakeEngine":
        from sdcompiler.passes.onnx_export import initializer_arrays

        arrays = initializer_arrays(path)
        return cls(name, {k: np.array(v) for k, v in arrays.items() if v.dtype.kind == "f"})


class _Refitter:
    def __init__(self, fake: FakeTensorRT, engine: FakeEngine):
        self.fake, self.engine, self.handed = fake, engine, {}
        self.missing, engine.missing_once = engine.missing_once, set()

    def set_named_weights(self, name: str, weights: FakeTensorRT.Weights) -> bool:
        self.fake.calls.append(("refitter.set_named_weights", self.engine.name, name))
        current = self.engine.weights.get(name)
        if current is None or weights.dtype != current.dtype.name or weights.count != current.size:
            return False
        self.handed[name] = weights
        return True

    def get_missing_weights(self) -> list[str]:
        self.fake.calls.append(("refitter.get_missing_weights", self.engine.name))
        return self._missing()

    def _missing(self) -> list[str]:
        combined = {w for name in self.handed for w in self.engine.combined.get(name, [])}
        return sorted((combined | self.missing) - set(self.handed))

    def refit_cuda_engine(self) -> bool:
        self.fake.calls.append(("refitter.refit_cuda_engine", self.engine.name))
        if self._missing():
            return False
        for name, weights in self.handed.items():
            current = self.engine.weights[name]
            raw = (ctypes.c_uint8 * (weights.count * current.itemsize)).from_address(weights.pointer)
            self.engine.weights[name] = np.frombuffer(bytes(raw), dtype=current.dtype).reshape(current.shape)
        self.engine.refits += 1
        return True


class _Recorder:
    """Builder, parser, network, config, profile and timing cache objects of `FakeTensorRT`."""

    def __init__(self, fake: FakeTensorRT, kind: str):
        object.__setattr__(self, "fake", fake)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "num_errors", 0 if fake.parses else 1)

    def __setattr__(self, name, value):
        self.fake.calls.append((f"{self.kind}.{name}=", value))

    def __getattr__(self, name):
        fake, kind = self.fake, self.kind

        def call(*args, **kwargs):
            recorded = [f"<{a.kind}>" if isinstance(a, _Recorder) else a for a in (*args, *kwargs.values())]
            fake.calls.append((f"{kind}.{name}", *recorded))
            results = {
                "create_network": lambda: _Recorder(fake, "network"),
                "create_builder_config": lambda: _Recorder(fake, "config"),
                "create_optimization_profile": lambda: _Recorder(fake, "profile"),
                "create_timing_cache": lambda: _Recorder(fake, "timing_cache"),
                "get_timing_cache": lambda: _Recorder(fake, "timing_cache"),
                "serialize": lambda: b"timings",
                "parse_from_file": lambda: fake.parses,
                "get_error": lambda: "node 7 (Conv): unsupported\ndata type",
                "build_serialized_network": lambda: b"engine" if fake.builds else None,
            }
            return results.get(name, lambda: None)()

        return call
