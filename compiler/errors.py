"""Errors of the compiler layer (loading, lowering, artifacts, runtime).

The base class (and `require` / `MissingDependencyError` / `LoweringError`,
which passes use too) lives in `sdcompiler.passes.errors` because imports flow compiler ->
passes; they are re-exported here.
"""

from sdcompiler.passes.errors import (
    ConfigError,
    LoweringError,
    MissingDependencyError,
    PassError,
    RecipeError,
    SDCompilerError,
    require,
)

__all__ = [
    "ArtifactError",
    "CheckpointError",
    "ConfigError",
    "GateError",
    "GenerationError",
    "LoweringError",
    "MissingDependencyError",
    "PassError",
    "PipelineArgumentError",
    "RecipeError",
    "RefinerError",
    "SDCompilerError",
    "require",
]


class CheckpointError(SDCompilerError):
    """The checkpoint path is missing, unsafe, corrupt or of an unsupported architecture."""


class ArtifactError(SDCompilerError):
    """An artifact folder is missing, incomplete, or would overwrite something else."""


class PipelineArgumentError(SDCompilerError, TypeError):
    """A compiled pipeline was called with an argument it does not support."""


class RefinerError(SDCompilerError):
    """An SDXL refiner was paired with a base it cannot follow (not an SDXL base, not a refiner, other latents)."""


class GenerationError(SDCompilerError):
    """A generation went wrong while it ran (its latents turned NaN/Inf): stopped instead of writing a black image."""


class GateError(SDCompilerError):
    """A benchmark's measured value misses a requirement (`sdcompiler bench --require`)."""
