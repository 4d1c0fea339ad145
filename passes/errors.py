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


class LoweringError(SDCompilerError):
    """Export to a target failed or produced outputs that disagree with torch."""


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
