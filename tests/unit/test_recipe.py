"""Recipe resolution: preset names, overrides, pass items, YAML files, errors, and the manifest round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdcompiler.errors import ConfigError, RecipeError
from sdcompiler.passes import PassStep
from sdcompiler.passes.fuse_qkv import FuseQKVConfig
from sdcompiler.recipe import available_presets, load_preset, recipe_to_manifest, resolve_recipe

FUSE_DEFAULT = [PassStep("fuse_qkv", FuseQKVConfig())]
FUSE_SELF_ONLY = [PassStep("fuse_qkv", FuseQKVConfig(cross_attention=False))]


def _write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_presets_include_none_and_fuse_qkv():
    presets = available_presets()
    assert {"none", "fuse-qkv"} <= set(presets)
    for name in presets:  # every shipped preset resolves to one pass, except composites that say so
        steps = resolve_recipe(name)
        preset = load_preset(name)
        composite = "(composite)" in preset["description"]
        assert len(steps) == (0 if name == "none" else len(preset["passes"]) if composite else 1), name
        assert not composite or len(steps) > 1, name
        assert preset["version"] == 1


@pytest.mark.parametrize("recipe", ["none", None, [], ["none"], {"version": 1, "passes": []}])
def test_empty_recipes(recipe):
    assert resolve_recipe(recipe) == []


@pytest.mark.parametrize(
    "recipe",
    [
        "fuse-qkv",
        ["fuse-qkv"],
        [{"preset": "fuse-qkv"}],
        [{"pass": "fuse_qkv"}],
        {"version": 1, "passes": ["fuse-qkv"]},
    ],
)
def test_forms_of_the_same_recipe(recipe):
    assert resolve_recipe(recipe) == FUSE_DEFAULT


def test_preset_overrides():
    assert resolve_recipe([{"preset": "fuse-qkv", "cross_attention": False}]) == FUSE_SELF_ONLY
    steps = resolve_recipe([{"preset": "fuse-qkv", "self_attention": False, "cross_attention": True}])
    assert steps[0].config == FuseQKVConfig(self_attention=False, cross_attention=True)


def test_pass_item_with_config():
    assert resolve_recipe([{"pass": "fuse_qkv", "cross_attention": False}]) == FUSE_SELF_ONLY


def test_yaml_list_file(tmp_path):
    path = _write(tmp_path, "- pass: fuse_qkv\n  cross_attention: false\n")
    assert resolve_recipe(path) == FUSE_SELF_ONLY
    assert resolve_recipe(str(path)) == FUSE_SELF_ONLY


def test_yaml_mapping_file(tmp_path):
    path = _write(
        tmp_path,
        "version: 1\ndescription: mine\npasses:\n  - preset: fuse-qkv\n    cross_attention: false\n",
        "recipe.yml",
    )
    assert resolve_recipe(path) == FUSE_SELF_ONLY


def test_yaml_file_with_preset_names(tmp_path):
    assert resolve_recipe(_write(tmp_path, "- none\n- fuse-qkv\n")) == FUSE_DEFAULT


def test_unknown_preset_lists_presets():
    for recipe in ("no-such-preset", [{"preset": "no-such-preset"}]):
        with pytest.raises(RecipeError) as info:
            resolve_recipe(recipe)
        message = str(info.value)
        assert "no-such-preset" in message
        assert "fuse-qkv" in message and "none" in message


def test_unknown_pass_lists_passes():
    with pytest.raises(RecipeError, match="fuse_qkv") as info:
        resolve_recipe([{"pass": "no_such_pass"}])
    assert "no_such_pass" in str(info.value)


def test_unknown_key_in_yaml_mapping(tmp_path):
    path = _write(tmp_path, "version: 1\npases:\n  - fuse-qkv\n")
    with pytest.raises(RecipeError) as info:
        resolve_recipe(path)
    assert "pases" in str(info.value) and "passes" in str(info.value)


def test_unsupported_recipe_version(tmp_path):
    with pytest.raises(RecipeError, match="version"):
        resolve_recipe(_write(tmp_path, "version: 2\npasses: []\n"))


@pytest.mark.parametrize("item", [{"preset": "fuse-qkv", "bogus": 1}, {"preset": "none", "cross_attention": False}])
def test_bad_override_key(item):
    with pytest.raises(RecipeError) as info:
        resolve_recipe([item])
    assert repr(next(k for k in item if k != "preset")) in str(info.value)


def test_bad_config_in_pass_item():
    with pytest.raises(ConfigError, match="bogus"):
        resolve_recipe([{"pass": "fuse_qkv", "bogus": 1}])
    with pytest.raises(ConfigError, match="self_attention"):
        resolve_recipe([{"preset": "fuse-qkv", "self_attention": "yes"}])


@pytest.mark.parametrize("item", [42, {"preset": "fuse-qkv", "pass": "fuse_qkv"}, {"cross_attention": False}])
def test_malformed_items(item):
    with pytest.raises(RecipeError):
        resolve_recipe([item])


def test_invalid_yaml_text(tmp_path):
    path = _write(tmp_path, "passes: [fuse-qkv\n  - : : :\n")
    with pytest.raises(RecipeError) as info:
        resolve_recipe(path)
    message = str(info.value)
    assert str(path) in message and "YAML" in message and "\n" not in message


def test_yaml_that_is_neither_list_nor_mapping(tmp_path):
    with pytest.raises(RecipeError):
        resolve_recipe(_write(tmp_path, "just a string\n"))


def test_missing_yaml_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError) as info:
        resolve_recipe(missing)
    assert str(missing) in str(info.value)


def test_recipe_of_wrong_type():
    with pytest.raises(RecipeError):
        resolve_recipe(3.5)


@pytest.mark.parametrize(
    "recipe",
    [
        "none",
        "fuse-qkv",
        [{"preset": "fuse-qkv", "cross_attention": False}],
        [{"pass": "fuse_qkv", "self_attention": False}],
    ],
)
def test_recipe_to_manifest_round_trip(recipe, tmp_path):
    import json

    import yaml

    steps = resolve_recipe(recipe)
    manifest = recipe_to_manifest(steps)
    assert manifest["version"] == 1 and len(manifest["passes"]) == len(steps)
    assert json.loads(json.dumps(manifest)) == manifest  # JSON-ready
    assert resolve_recipe(manifest) == steps
    assert resolve_recipe(json.loads(json.dumps(manifest))) == steps
    # the manifest form is also a valid YAML recipe file
    assert resolve_recipe(_write(tmp_path, yaml.safe_dump(manifest))) == steps
    for entry, step in zip(manifest["passes"], steps):
        assert entry == {"pass": step.name, **step.config.to_dict()}


# --- a single item as a recipe; inline recipe strings (`--recipe`) ---------------------------------------------------


@pytest.mark.parametrize(
    "recipe, text",
    [
        ({"preset": "taesd", "path": "/models/taesd"}, "preset: taesd\npath: /models/taesd\n"),
        ({"pass": "swap_vae", "path": "/models/taesd"}, "pass: swap_vae\npath: /models/taesd\n"),
    ],
)
def test_a_single_item_is_a_recipe(recipe, text, tmp_path):
    from sdcompiler.passes.swap_vae import SwapVAEConfig

    expected = [PassStep("swap_vae", SwapVAEConfig(path="/models/taesd"))]
    assert resolve_recipe(recipe) == resolve_recipe([recipe]) == expected
    assert resolve_recipe(_write(tmp_path, text)) == expected


def test_a_mapping_that_is_no_item_names_the_item_form():
    with pytest.raises(RecipeError, match="one item: a mapping with 'preset' or 'pass'"):
        resolve_recipe({"path": "/models/taesd"})


@pytest.mark.parametrize(
    "text, items",
    [
        ("fuse-qkv", ["fuse-qkv"]),
        ("bk-small, fuse-qkv", ["bk-small", "fuse-qkv"]),
        ("taesd:path=/models/taesd", [{"preset": "taesd", "path": "/models/taesd"}]),
        ("distill:steps=200,lr=1e-5", [{"preset": "distill", "steps": 200, "lr": 1e-5}]),
        (
            "bk-small,distill:steps=20,lr=2.5e-4,fuse-qkv:cross_attention=false",
            [
                "bk-small",
                {"preset": "distill", "steps": 20, "lr": 2.5e-4},
                {"preset": "fuse-qkv", "cross_attention": False},
            ],
        ),
        ("swap_vae:path=C:/vae=1", [{"pass": "swap_vae", "path": "C:/vae=1"}]),  # a pass: no preset has the name
        (
            "merge_lora:loras=[{path: a.safetensors, scale: 0.5}, {path: b.safetensors}]",
            [{"pass": "merge_lora", "loras": [{"path": "a.safetensors", "scale": 0.5}, {"path": "b.safetensors"}]}],
        ),
        ("lcm-lora:path='x,y.safetensors'", [{"preset": "lcm-lora", "path": "x,y.safetensors"}]),
        ("a:p=don't,b", [{"preset": "a", "p": "don't"}, "b"]),
    ],
)
def test_parse_recipe_text(text, items):
    from sdcompiler.recipe import parse_recipe_text

    assert parse_recipe_text(text) == items


def test_inline_recipe_resolves_with_typed_values():
    steps = resolve_recipe("distill:steps=200,lr=1e-5,fuse-qkv:cross_attention=false")
    assert [s.name for s in steps] == ["distill", "fuse_qkv"]
    assert steps[0].config.steps == 200 and steps[0].config.lr == 1e-5
    assert steps[1].config == FuseQKVConfig(cross_attention=False)


@pytest.mark.parametrize(
    "text, match",
    [
        ("steps=3", "follows no NAME:KEY=VALUE item"),
        ("fuse-qkv,steps=3", "follows no NAME:KEY=VALUE item"),
        (":steps=3", "has no name before ':'"),
        ("distill:steps", "must look like KEY=VALUE"),
        ("distill:steps=1,steps=2", "appears twice"),
        ("distill:lr=[1", "not YAML"),
        ("fuse-qkv:bogus=1", "override 'bogus' of preset 'fuse-qkv'"),
    ],
)
def test_bad_inline_recipes(text, match):
    with pytest.raises(RecipeError, match=match):
        resolve_recipe(text)


def test_a_recipe_may_name_its_controlnets(tmp_path):
    from sdcompiler.recipe import recipe_controlnets

    folder = tmp_path / "recipes"
    folder.mkdir()
    one = folder / "one.yaml"
    one.write_text("version: 1\ncontrolnet: nets/canny\npasses: [fuse-qkv]\n")
    assert recipe_controlnets(one) == [str(folder / "nets/canny")]  # relative to the recipe file
    assert [s.name for s in resolve_recipe(one)] == ["fuse_qkv"]  # the passes read as before
    two = folder / "two.yaml"
    two.write_text(f"version: 1\ncontrolnet: [a, {tmp_path / 'abs'}]\npasses: []\n")
    assert recipe_controlnets(two) == [str(folder / "a"), str(tmp_path / "abs")]
    assert recipe_controlnets({"passes": [], "controlnet": ["x"]}) == ["x"]
    for recipe in ("fuse-qkv", ["fuse-qkv"], {"pass": "fuse_qkv"}, {"passes": []}, None):
        assert recipe_controlnets(recipe) == []
    with pytest.raises(RecipeError, match="'controlnet' in the recipe must be a ControlNet folder or a list") as info:
        recipe_controlnets({"passes": [], "controlnet": [3]})
    assert "\n" not in str(info.value)
