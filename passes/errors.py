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


def path_problem(path) -> str:
    """Why `path` is neither a folder nor a regular file, in words for an error line: "does not exist", a
    symbolic link that loops or points nowhere, or a special file (FIFO, device, socket) that reading would
    block on or read forever. Callers add the fix."""
    import errno
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link that loops (it points back to itself)"
        if os.path.islink(path):
            return f"is a broken symbolic link (to {os.readlink(path)}, which does not exist)"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "does not exist"
        return f"cannot be read ({os.strerror(exc.errno) if exc.errno else type(exc).__name__})"
    kinds = {stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}
    kind = next((name for test, name in kinds.items() if test(mode)), "a socket" if stat.S_ISSOCK(mode) else None)
    if kind is not None:
        return f"is {kind}, not a regular file or folder"
    return "is a folder" if stat.S_ISDIR(mode) else "is a regular file"


def resolved_path(path, error: type[SDCompilerError], fix: str):
    """`Path(path).resolve()`, raising `error` (one line, with `fix`) where a symbolic link loops."""
    from pathlib import Path

    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError("Symlink loop ..."); later ones OSError
        pass
    raise error(f"{path} {path_problem(path)}; {fix}")  # outside the except: the library error is no cause
