"""Fuzzing the two parsers that read what users and other machines hand sd-compiler: recipes (Python values and
YAML files) and artifact manifests. No input may give anything but a clean result or the project's own error
(an `SDCompilerError`, which the CLI prints as one line) - never a raw KeyError, TypeError, RecursionError, ...

Runs derandomized (the same examples in every CI run); `HYPOTHESIS_PROFILE=explore` draws fresh ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdcompiler.artifact import read_manifest, verify_files
from sdcompiler.cli import summarize_manifest
from sdcompiler.errors import SDCompilerError
from sdcompiler.passes import available_passes
from sdcompiler.recipe import available_presets, resolve_recipe
from sdcompiler.targets import get_target

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", database=None, deadline=None, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

NAMES = sorted(set(available_passes()) | set(available_presets())) + ["none"]
KEYS = ["pass", "preset", "version", "passes", "description", "steps", "lr", "batch_size", "level", "alpha"]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(NAMES)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
# recipe items shaped like real ones: a name, or a mapping naming a pass / preset with some config keys
items = (
    st.sampled_from(NAMES)
    | st.fixed_dictionaries({"pass": st.sampled_from(NAMES)}, optional={key: values for key in KEYS[2:]})
    | st.fixed_dictionaries({"preset": st.sampled_from(NAMES)}, optional={key: values for key in KEYS[2:]})
)


def _outcome(call) -> None:
    try:
        call()
    except SDCompilerError as exc:
        message = str(exc)
        assert message and "\n" not in message, f"not one line: {message!r}"


@given(values)
def test_recipe_values(recipe):
    _outcome(lambda: resolve_recipe(recipe))


@given(st.lists(items, max_size=4))
def test_recipe_item_lists(recipe):
    _outcome(lambda: resolve_recipe(recipe))


@given(st.text(max_size=300) | values.map(lambda v: json.dumps(v, allow_nan=True)))
def test_recipe_yaml_files(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(text)
        _outcome(lambda: resolve_recipe(path))


MANIFEST_KEYS = [
    "schema_version",
    "sdcompiler_version",
    "arch",
    "target",
    "passes",
    "lowering",
    "files",
    "defaults",
    "source",
    "macs_resolution",
]
TARGET_NAMES = ["torch", "onnx", "tensorrt", "nope"]


INDEX_SHA256 = hashlib.sha256(b"{}").hexdigest()  # the model_index.json each fuzzed artifact holds


def _plausible(overrides: dict) -> dict:
    base = {
        "schema_version": 1,
        "sdcompiler_version": "0.1.0",
        "arch": "sd15",
        "target": "torch",
        "passes": [],
        "lowering": {"config": {}},
        "files": {"model_index.json": INDEX_SHA256},
    }
    return {**base, **overrides}


numbers = st.integers(min_value=0, max_value=10**12) | st.floats(allow_nan=True) | values
records = st.fixed_dictionaries(
    {},
    optional={
        key: numbers
        for key in ("name", "params_before", "params_after", "macs_before", "macs_after", "seconds", "metrics")
    },
)
stages = st.fixed_dictionaries(
    {}, optional={"name": st.sampled_from(["verify", "export"]) | values, "seconds": numbers, "results": values}
)
# a valid skeleton whose pass records and lowering stages are fuzzed: what gets past the top-level checks
structured = st.fixed_dictionaries(
    {
        "passes": st.lists(records, max_size=2),
        "lowering": st.fixed_dictionaries({"config": st.just({}) | values, "stages": st.lists(stages, max_size=2)}),
        "source": st.fixed_dictionaries({"path": st.text(max_size=5)}) | values,
        "target": st.sampled_from(TARGET_NAMES),
    },
    optional={"macs_resolution": values},
)


@given(
    st.binary(max_size=200)
    | structured.map(lambda d: json.dumps(_plausible(d), allow_nan=True).encode())
    | values.map(lambda v: json.dumps(v, allow_nan=True).encode())
    | st.dictionaries(st.sampled_from(MANIFEST_KEYS), values | st.sampled_from(TARGET_NAMES), max_size=4).map(
        lambda d: json.dumps(_plausible(d), allow_nan=True).encode()
    )
    | st.dictionaries(st.text(max_size=30), st.text(max_size=70), max_size=3).map(
        lambda files: json.dumps(_plausible({"files": files})).encode()
    )
)
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_manifest_reader(data):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "artifact"
        root.mkdir()
        (root / "manifest.json").write_bytes(data)
        (root / "model_index.json").write_text("{}")

        def read_as_load_compiled_does():  # up to building models: what it reads of the manifest
            manifest = read_manifest(root)
            verify_files(root, manifest)
            summarize_manifest(manifest)  # `sdcompiler inspect`
            get_target(manifest["target"]).load_config(manifest, None)

        _outcome(read_as_load_compiled_does)
