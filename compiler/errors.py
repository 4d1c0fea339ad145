"""Errors of the compiler layer (loading, lowering, artifacts, runtime).

The base class lives in `sdcompiler.passes.errors` because imports flow
compiler -> passes; it is re-exported here.
"""

from sdcompiler.passes.errors import ConfigError, PassError, RecipeError, SDCompilerError

__all__ = [
    "ArtifactError",
    "CheckpointError",
    "ConfigError",
    "GateError",
    "LoweringError",
    "MissingDependencyError",
    "PassError",
    "PipelineArgumentError",
    "RecipeError",
    "SDCompilerError",
]


class CheckpointError(SDCompilerError):
    """The checkpoint path is missing, unsafe, corrupt or of an unsupported architecture."""


class ArtifactError(SDCompilerError):
    """An artifact folder is missing, incomplete, or would overwrite something else."""


class LoweringError(SDCompilerError):
    """Export to a target failed or produced outputs that disagree with torch."""


class PipelineArgumentError(SDCompilerError, TypeError):
    """A compiled pipeline was called with an argument it does not support."""


class GateError(SDCompilerError):
    """A benchmark's measured value misses a requirement (`sdcompiler bench --require`)."""


class MissingDependencyError(SDCompilerError, ImportError):
    """An optional integration is not installed; the message names the extra."""


def require(module: str, extra: str, purpose: str):
    """Import an optional module, or raise naming the pip extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs '{module}', which is not installed: pip install 'sd-compiler[{extra}]'"
        ) from exc
