"""Typed errors shared by every layer.

Every error the user can cause is an `SDCompilerError` whose message is one
line naming the problem and the fix; the CLI prints it as is and exits 1.
"""


class SDCompilerError(Exception):
    """Base of every error sd-compiler raises on purpose."""


class ConfigError(SDCompilerError):
    """A pass config or recipe item has unknown keys or wrong types."""


class RecipeError(SDCompilerError):
    """A recipe cannot be resolved or violates an ordering rule."""


class PassError(SDCompilerError):
    """A pass's requirements are not met, or it failed its own guarantees."""
