"""A stand-in for the `tensorrt` module (TensorRT cannot be installed on any machine here).

It records the calls the builder code makes on it and returns b"engine" for a build, so tests check what
sd-compiler asks TensorRT for (network flags, profile shapes, pool limit, optimization level, timing
cache) and what it does with an engine's bytes, never what TensorRT itself does.
"""

from __future__ import annotations


class FakeTensorRT:
    """Stand-in for the `tensorrt` module: it only records the calls the builder code makes on it.

    TensorRT cannot be installed here, so this checks what we ask TensorRT for (network flags, profile
    shapes, pool limit, optimization level, timing cache), not what TensorRT does with it. It has no
    `BuilderFlag`: the strongly typed build must not set precision flags (TensorRT 11 removed them).
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

    def __init__(self, parses: bool = True, builds: bool = True):
        self.calls: list[tuple] = []
        self.parses, self.builds = parses, builds

    def Builder(self, logger):
        return _Recorder(self, "builder")

    def OnnxParser(self, network, logger):
        return _Recorder(self, "parser")


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
