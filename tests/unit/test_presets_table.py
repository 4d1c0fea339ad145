"""The presets table: every preset's passes are registered, and README.md embeds exactly the generated table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sdcompiler import recipe
from sdcompiler.cli import main
from sdcompiler.errors import RecipeError
from sdcompiler.passes import available_passes
from sdcompiler.recipe import available_presets, load_preset, preset_rows, presets_table

README = Path(__file__).resolve().parents[2] / "README.md"
BEGIN, END = "<!-- presets:begin", "<!-- presets:end -->"


def _readme_table() -> str:
    text = README.read_text()
    start = text.index(BEGIN)
    start = text.index("\n", start) + 1  # the begin marker's line ends after its comment
    return text[start : text.index(END, start)].strip("\n") + "\n"


def test_every_preset_names_registered_passes_and_has_a_description():
    registered = set(available_passes())
    for name in available_presets():
        preset = load_preset(name)
        assert preset["description"].strip(), f"preset {name!r} has no description"
        for item in preset["passes"]:
            assert item["pass"] in registered, f"preset {name!r} names unregistered pass {item['pass']!r}"


def test_readme_embeds_the_generated_presets_table():
    assert _readme_table() == presets_table(), (
        "README.md's presets table differs from the generated one: run `sdcompiler presets --markdown` and paste "
        f"its output between the `{BEGIN} ...` and `{END}` markers (edit descriptions in compiler/presets/*.yaml)"
    )


def test_table_lists_every_preset_once_and_every_builtin_pass():
    rows = preset_rows()
    names = [n for row_names, _, _ in rows for n in row_names]
    assert sorted(names) == available_presets()
    passes = {p for _, row_passes, _ in rows for p in row_passes}
    assert passes == {p for p in available_passes() if not p.startswith("_test_")}
    assert all(description for _, _, description in rows)
    table = presets_table()
    assert table.count("\n") == 2 + len(rows) and "| `int8` | `ptq` |" in table


def test_a_preset_naming_an_unknown_pass_is_an_error(monkeypatch):
    monkeypatch.setattr(recipe, "available_presets", lambda: ["broken"])
    monkeypatch.setattr(recipe, "load_preset", lambda name: {"passes": [{"pass": "no_such_pass"}], "description": "x"})
    with pytest.raises(RecipeError, match="'broken'.*'no_such_pass'"):
        preset_rows()


def test_cli_presets(capsys):
    assert main(["presets", "--markdown"]) == 0
    assert capsys.readouterr().out == presets_table()
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")}
    assert set(available_presets()) <= listed
    assert re.search(r"^bk-small +prune_blocks$", out, re.MULTILINE)
