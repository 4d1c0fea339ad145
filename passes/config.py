"""Strict, typed, versioned pass configs.

A pass config is a frozen dataclass deriving from `PassConfig`. Plain dicts
(from YAML or Python) enter through `PassConfig.from_dict`, which rejects
unknown keys and values of the wrong type with a message naming the pass,
the key and what is allowed. `to_dict` gives the JSON-ready form recorded in
the manifest, from which the same config is rebuilt at load time.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Mapping

from sdcompiler.passes.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Base of all pass configs. `version` lets old recipes keep loading."""

    VERSION: ClassVar[int] = 1
    version: int = 1

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, owner: str = "") -> "PassConfig":
        """Build a config from a mapping, strictly.

        Args:
            data: keys are field names; missing keys take their defaults.
            owner: the pass name, for error messages.
        """
        data = dict(data or {})
        where = f"config of pass {owner!r}" if owner else f"{cls.__name__}"
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            allowed = ", ".join(sorted(fields)) or "(none)"
            raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}; allowed keys: {allowed}")
        version = _coerce(data.get("version", cls.VERSION), int, f"{where}: key 'version'")
        if version > cls.VERSION:
            raise ConfigError(
                f"{where} has version {data['version']}, newer than this sd-compiler supports ({cls.VERSION}); "
                "upgrade sd-compiler"
            )
        hints = typing.get_type_hints(cls)
        values = {name: _coerce(value, hints[name], f"{where}: key {name!r}") for name, value in data.items()}
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid {where}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a type hint; lists become tuples (configs are frozen)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} must be {_describe(hint)}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where} must be null, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, where) for v in value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ConfigError(f"{where} must be {_describe(hint)}, got {value!r}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))
