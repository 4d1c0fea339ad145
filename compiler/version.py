"""The package version (its own module: the package's lazy `__init__` and the modules it re-exports both read it)."""

__version__ = "0.1.0"
