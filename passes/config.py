"""Strict, typed, versioned pass configs.

A pass config is a frozen dataclass deriving from `PassConfig`. Plain dicts
(from YAML or Python) enter through `PassConfig.from_dict`, which rejects
unknown keys and values of the wrong type with a message naming the pass,
the key and what is allowed. `to_dict` gives the JSON-ready form recorded in
the manifest, from which the same config is rebuilt at load time.

Two rules hold for every config without each pass restating them: every
float (also inside lists) is finite (`lr: .inf` would train the weights to
NaN), and a key named in `KEY_RANGES` (steps, batch_size, lr, ...) lies in its
range whichever pass has it. How much work a config may ask for (training
steps, prompts) is bounded separately, at recipe resolution, by `BUDGETS`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, ClassVar, Mapping

from sdcompiler.passes.errors import ConfigError

# key -> (lowest, highest or None, whether the lowest is excluded): a count below its minimum is a mistake
# (a negative step count, an empty batch) that would otherwise fail deep inside training
KEY_RANGES: dict[str, tuple[float, float | None, bool]] = {
    **{
        key: (1, None, False)
        for key in (
            "steps",
            "batch_size",
            "grad_accum",
            "num_prompts",
            "held_out_prompts",
            "teacher_steps",
            "calib_prompts",
            "calib_steps",
            "rank",
            "num_ddim_timesteps",
            "num_inference_steps",
            "reference_steps",
            "image_steps",
            "embedding_dim",
            "search_grid",
        )
    },
    **{
        key: (0, None, False)
        for key in ("incubation_steps", "stage1_steps", "stage2_steps", "checkpoint_every", "weight_decay")
    },
    "lr": (0, None, True),
    "scale_lr": (0, None, True),
    "resolution": (8, None, False),
}

# key -> the most a config may ask for unless the recipe raises it (`limits: {steps: 50000}`): the default
# budgets keep a mistyped recipe from running for hours; a real training run on a GPU raises them
BUDGETS: dict[str, int] = {
    "steps": 10_000,
    "incubation_steps": 10_000,
    "stage1_steps": 10_000,
    "stage2_steps": 10_000,
    "batch_size": 1024,
    "num_prompts": 10_000,
    "calib_prompts": 10_000,
    "teacher_steps": 1_000,
    "calib_steps": 1_000,
    "resolution": 4096,
}


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
        for name, value in values.items():
            _check_value(name, value, where)
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid {where}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _check_value(name: str, value: Any, where: str) -> None:
    """The rules every config shares: finite floats; a value inside its key's range (`KEY_RANGES`)."""
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{where}: key {name!r} must be a finite number, got {item!r}")
    if name not in KEY_RANGES or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    low, high, open_low = KEY_RANGES[name]
    if value < low or (open_low and value == low) or (high is not None and value > high):
        allowed = f"> {low}" if open_low else f">= {low}"
        if high is not None:
            allowed += f" and <= {high}"
        raise ConfigError(f"{where}: key {name!r} must be {allowed}, got {value!r}")


def check_budget(config: "PassConfig", limits: Mapping[str, int], *, owner: str) -> None:
    """Refuse a config that asks for more work than `BUDGETS` allow (or `limits`, which raise or lower them)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name not in BUDGETS or not isinstance(value, int) or isinstance(value, bool):
            continue
        limit = limits.get(f.name, BUDGETS[f.name])
        if value > limit:
            raise ConfigError(
                f"config of pass {owner!r}: {f.name}={value} is above the limit {limit}; lower it, or raise the "
                f"limit in the recipe (a mapping recipe's `limits: {{{f.name}: {value}}}`)"
            )


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
