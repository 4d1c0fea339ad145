"""Recipes: what the user asks for -> an ordered list of validated pass steps.

A recipe is a preset name, a YAML path, a list of items, or a single item. An item is:
- a preset name: `"fuse-qkv"`;
- a preset with overrides: `{"preset": "fuse-qkv", "cross_attention": False}`
  (each override goes to the preset's pass whose config has that key);
- a pass with its config: `{"pass": "fuse_qkv", "self_attention": True}`.
A YAML recipe is such a list, a single item, or `{version: 1, passes: [...]}`.

A recipe string that is not a YAML path is read inline (`parse_recipe_text`, what
`--recipe` takes): items separated by commas, each `NAME` or `NAME:KEY=VALUE`,
where further comma-separated `KEY=VALUE` parts belong to the item before them
(`distill:steps=200,lr=1e-5,fuse-qkv` is two items). NAME is a preset, or a pass
when no preset has that name. Values are YAML scalars (`1e-5` is a float,
`false` a bool); commas inside `[...]`, `{...}` or a quoted value do not split.

Presets are YAML files in `sdcompiler/presets/` of the same mapping form;
each expands to exactly one pass unless its YAML lists several (composite).
Resolution validates every config strictly and checks the ordering rules, so
a bad recipe fails before any work starts.

YAML is read with limits (`read_yaml`): a file of at most 1 MiB, nesting at
most 64 deep, at most 100,000 nodes once aliases are expanded (a "billion
laughs" file is refused in milliseconds, not after exhausting memory). A
mapping recipe may carry `limits: {steps: 50000, ...}`, raising (or
lowering) the work budgets of `sdcompiler.passes.config.BUDGETS` for its
passes.

`presets_table()` renders every preset with its pass(es) and YAML
`description` as the Markdown table README.md embeds (`sdcompiler presets
--markdown`); a unit test keeps the two equal.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import yaml

from sdcompiler.errors import RecipeError
from sdcompiler.passes import PassStep, available_passes, check_order, get_pass
from sdcompiler.passes.base import STAGES
from sdcompiler.passes.config import BUDGETS, check_budget

RecipeLike = Union[str, Path, Sequence[Any], Mapping[str, Any], None]
RECIPE_VERSION = 1
MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000


class _LimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a nesting limit while composing (deeper input would end in RecursionError)."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise RecipeError(
                    f"{self.name} nests deeper than {MAX_YAML_DEPTH} levels (line {self.get_mark().line + 1}); "
                    "flatten the recipe"
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def read_yaml(path: Path) -> Any:
    """Parse a YAML file within the limits above; RecipeError (one line) for anything else."""
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise RecipeError(f"recipe file {path} is {size} bytes, above the {MAX_YAML_BYTES} byte limit; shorten it")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"recipe file {path} is not readable UTF-8 text ({exc}); fix the file") from None
    loader = None
    try:
        loader = _LimitedLoader(text)  # its reader already refuses control characters
        loader.name = f"recipe file {path}"
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node, path)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise RecipeError(f"recipe file {path} is not valid YAML ({first}); fix the file") from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_expanded_size(root: yaml.Node, path: Path) -> None:
    """Count the nodes the document expands to (an alias counts as the whole node it names) without expanding:
    each node's size is computed once; an alias cycle or more than MAX_YAML_NODES nodes is refused."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            children = _children(node)
            sizes[key] = min(MAX_YAML_NODES + 1, 1 + sum(sizes[id(c)] for c in children))
            open_nodes.discard(key)
            if sizes[key] > MAX_YAML_NODES:
                raise RecipeError(
                    f"recipe file {path} expands to more than {MAX_YAML_NODES} nodes (aliases included); "
                    "write the recipe without nested aliases"
                )
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise RecipeError(f"recipe file {path} has an alias that contains itself; remove the cycle")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def available_presets() -> list[str]:
    folder = resources.files("sdcompiler") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    path = resources.files("sdcompiler") / "presets" / f"{name}.yaml"
    if not path.is_file():
        raise RecipeError(f"unknown preset {name!r}; available presets: {', '.join(available_presets())}")
    return _parse_mapping(yaml.load(path.read_text(), Loader=_LimitedLoader), f"preset {name!r}")


def preset_rows() -> list[tuple[list[str], list[str], str]]:
    """Every shipped preset as a `(preset names, pass names, description)` row, plus every built-in pass
    that no preset runs on its own as `([], [pass], the pass class's description)`.

    Presets with the same passes and the same YAML `description` share a row (e.g. `quest-w4a4`, `-w4a8`,
    `-w8a8`). Rows come in recipe order: the ordering stage of their first pass (`none` first), then pass
    and preset name. A preset naming a pass that is not registered is a RecipeError.
    """
    registered = set(available_passes())
    groups: dict[tuple[tuple[str, ...], str], list[str]] = {}
    for name in available_presets():
        preset = load_preset(name)
        passes = tuple(p.get("pass") if isinstance(p, Mapping) else p for p in preset["passes"])
        unknown = [p for p in passes if p not in registered]
        if unknown:
            raise RecipeError(
                f"preset {name!r} names unregistered pass(es) {', '.join(map(repr, unknown))}; "
                f"registered passes: {', '.join(sorted(registered))}"
            )
        groups.setdefault((passes, " ".join(str(preset["description"]).split())), []).append(name)
    rows = [(names, list(passes), description) for (passes, description), names in groups.items()]
    alone = {passes[0] for _, passes, _ in rows if len(passes) == 1}
    builtin = [n for n in sorted(registered) if type(get_pass(n)).__module__.startswith("sdcompiler.passes.")]
    rows += [([], [n], " ".join(get_pass(n).description.split())) for n in builtin if n not in alone]

    def order(row):
        names, passes, _ = row
        stage = STAGES.index(get_pass(passes[0]).stage) if passes else -1
        return stage, passes, not names, names

    return sorted(rows, key=order)


def presets_table() -> str:
    """The Markdown table of `preset_rows()`: preset(s) | pass(es) | what it does (README.md embeds it)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| preset | pass | what it does |", "|---|---|---|"]
    for names, passes, description in preset_rows():
        presets = ", ".join(f"`{n}`" for n in names) or "–"
        steps = " + ".join(f"`{p}`" for p in passes) or "–"
        lines.append(f"| {presets} | {steps} | {cell(description)} |")
    return "\n".join(lines) + "\n"


def resolve_recipe(recipe: RecipeLike) -> list[PassStep]:
    """Resolve any recipe form into validated, order-checked pass steps within the recipe's work budgets."""
    items, limits = _items(recipe)
    steps = [step for item in items for step in _resolve_item(item)]
    for step in steps:
        check_budget(step.config, limits, owner=step.name)
    check_order(steps)
    return steps


def recipe_to_manifest(steps: Iterable[PassStep]) -> dict[str, Any]:
    """The fully resolved recipe: replaying it gives the same passes and configs."""
    return {"version": RECIPE_VERSION, "passes": [{"pass": s.name, **s.config.to_dict()} for s in steps]}


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_recipe_text(text: str) -> list[Any]:
    """An inline recipe (`"bk-small,fuse-qkv"`, `"taesd:path=/models/taesd"`,
    `"distill:steps=200,lr=1e-5,fuse-qkv"`) as recipe items: a plain NAME stays a preset name, NAME:OPTIONS
    becomes `{"preset": NAME, ...}` (or `{"pass": NAME, ...}` when NAME is a pass and no preset).

    A comma-separated part is an option of the item before it when its first `=` comes before any `:`,
    otherwise it starts a new item (so values may hold `:` and `=`: `path=C:/x`, `prompt=a=b`).
    """
    items: list[Any] = []
    current: dict[str, Any] | None = None  # the item whose options the next KEY=VALUE parts extend
    for part in _split_top_level(text):
        if not part:
            continue
        eq, colon = part.find("="), part.find(":")
        if eq > 0 and (colon < 0 or eq < colon):
            if current is None:
                raise RecipeError(
                    f"option {part!r} in recipe {text!r} follows no NAME:KEY=VALUE item; "
                    "write it as PRESET:KEY=VALUE (e.g. taesd:path=/models/taesd)"
                )
            _add_option(current, part, text)
            continue
        if colon < 0:
            items.append(part)
            current = None
            continue
        name, first = part[:colon].strip(), part[colon + 1 :].strip()
        if not name:
            raise RecipeError(f"item {part!r} in recipe {text!r} has no name before ':'; write NAME:KEY=VALUE")
        current = {_item_kind(name): name}
        items.append(current)
        if first:
            _add_option(current, first, text)
    return items


def _split_top_level(text: str) -> list[str]:
    """`text` split at the commas outside brackets and quoted values, each part stripped."""
    parts, depth, start, quote = [], 0, 0, ""
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"" and text[:i].rstrip()[-1:] in ("=", "[", "{", ",", ":"):  # a YAML quoted value
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _item_kind(name: str) -> str:
    if name not in available_presets() and name in available_passes():
        return "pass"
    return "preset"  # an unknown name fails later with the list of presets


def _add_option(item: dict[str, Any], part: str, text: str) -> None:
    key, _, value = part.partition("=")
    key = key.strip()
    if not key or "=" not in part:
        raise RecipeError(f"option {part!r} in recipe {text!r} must look like KEY=VALUE")
    if key in item:
        raise RecipeError(f"option {key!r} appears twice for {next(iter(item.values()))!r} in recipe {text!r}")
    item[key] = _scalar(value.strip(), part, text)


def _scalar(value: str, part: str, text: str) -> Any:
    """A value typed as YAML; `1e-5` (a string to YAML 1.1, which wants `1.0e-5`) is a float too."""
    try:
        typed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise RecipeError(f"option {part!r} in recipe {text!r} has a value that is not YAML ({first})") from None
    if isinstance(typed, str) and _FLOAT.fullmatch(typed):
        return float(typed)
    return typed


def _is_item(data: Any) -> bool:
    """A mapping that is one recipe item (`{"preset": ...}` / `{"pass": ...}`), not a `{passes: [...]}` recipe."""
    return isinstance(data, Mapping) and ("preset" in data or "pass" in data)


def _items(recipe: RecipeLike) -> tuple[list[Any], dict[str, int]]:
    """The recipe's items and its `limits` (empty unless a mapping recipe sets them)."""
    if recipe is None:
        return [], {}
    if isinstance(recipe, (str, Path)):
        text = str(recipe)
        if text.endswith((".yaml", ".yml")) or Path(text).is_file():
            path = Path(text)
            if not path.is_file():
                raise RecipeError(f"recipe file {path} does not exist; pass a preset name or a YAML path")
            data = read_yaml(path)
            if isinstance(data, list):
                return data, {}
            if _is_item(data):
                return [data], {}
            parsed = _parse_mapping(data, f"recipe file {path}")
            return parsed["passes"], parsed["limits"]
        return parse_recipe_text(text), {}
    if _is_item(recipe):
        return [recipe], {}
    if isinstance(recipe, Mapping):
        parsed = _parse_mapping(recipe, "recipe")
        return parsed["passes"], parsed["limits"]
    if isinstance(recipe, Sequence):
        return list(recipe), {}
    raise RecipeError(
        f"a recipe must be a preset name, a YAML path, a list or one item mapping, not {type(recipe).__name__}"
    )


def _parse_mapping(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise RecipeError(
            f"{where} must be a list of passes, one item ({{preset: ...}} / {{pass: ...}}) "
            "or a mapping with 'version' and 'passes'"
        )
    unknown = set(data) - {"version", "passes", "description", "limits", "controlnet"}
    if unknown:
        raise RecipeError(
            f"unknown key(s) {', '.join(sorted(unknown))} in {where}; allowed: version, passes, description, limits, "
            "controlnet "
            "(or one item: a mapping with 'preset' or 'pass')"
        )
    version = data.get("version", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise RecipeError(f"{where} has version {version!r}; this sd-compiler reads version {RECIPE_VERSION}")
    passes = data.get("passes") or []
    if not isinstance(passes, list):
        raise RecipeError(f"'passes' in {where} must be a list")
    return {
        "version": version,
        "passes": passes,
        "description": data.get("description", ""),
        "limits": _parse_limits(data.get("limits") or {}, where),
    }


def recipe_controlnets(recipe: RecipeLike) -> list[str]:
    """The ControlNet folders a mapping recipe names (`controlnet: PATH` or a list of paths), relative paths taken
    from the recipe file's folder (a mapping given in Python: from the working directory); [] for a recipe that
    names none (lists, preset names, one item)."""
    base, data = Path("."), recipe
    if isinstance(recipe, (str, Path)):
        text = str(recipe)
        if not (text.endswith((".yaml", ".yml")) or Path(text).is_file()):
            return []
        base, data = Path(text).parent, read_yaml(Path(text))
    if not isinstance(data, Mapping) or _is_item(data) or data.get("controlnet") is None:
        return []
    named = data["controlnet"]
    paths = [named] if isinstance(named, str) else named
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise RecipeError(
            f"'controlnet' in the recipe must be a ControlNet folder or a list of them (paths), not {named!r}"
        )
    return [str(base / p) if not Path(p).is_absolute() else p for p in paths]


def _parse_limits(limits: Any, where: str) -> dict[str, int]:
    if not isinstance(limits, Mapping):
        raise RecipeError(f"'limits' in {where} must be a mapping such as {{steps: 50000}}")
    for key, value in limits.items():
        if key not in BUDGETS:
            raise RecipeError(f"unknown limit {key!r} in {where}; limits: {', '.join(sorted(BUDGETS))}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RecipeError(f"limit {key!r} in {where} must be a positive integer, got {value!r}")
    return dict(limits)


def _resolve_item(item: Any) -> list[PassStep]:
    if isinstance(item, str):
        if item == "none":
            return []
        return [_step(p["pass"], _without(p, "pass")) for p in load_preset(item)["passes"]]
    if not isinstance(item, Mapping):
        raise RecipeError(f"recipe item {item!r} must be a preset name or a mapping with 'preset' or 'pass'")
    if ("preset" in item) == ("pass" in item):
        raise RecipeError(f"recipe item {dict(item)!r} must have exactly one of 'preset' or 'pass'")
    if "pass" in item:
        return [_step(item["pass"], _without(item, "pass"))]
    name, overrides = item["preset"], _without(item, "preset")
    preset_passes = load_preset(name)["passes"]
    configs = [_without(p, "pass") for p in preset_passes]
    for key, value in overrides.items():
        takers = [i for i, p in enumerate(preset_passes) if key in _config_fields(p["pass"])]
        if not takers:
            passes = ", ".join(p["pass"] for p in preset_passes) or "(it has no passes)"
            raise RecipeError(f"override {key!r} of preset {name!r} is not a config key of its pass(es): {passes}")
        for i in takers:
            configs[i][key] = value
    return [_step(p["pass"], cfg) for p, cfg in zip(preset_passes, configs)]


def _step(pass_name: str, config: Mapping[str, Any]) -> PassStep:
    pass_ = get_pass(pass_name)
    return PassStep(pass_name, pass_.config_class.from_dict(config, owner=pass_name))


def _config_fields(pass_name: str) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(get_pass(pass_name).config_class)}


def _without(mapping: Mapping[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != key}
