"""Bad recipes: out-of-range or non-finite pass config values, work beyond the budgets, and hostile YAML (an alias
bomb, 100,000-deep nesting, a huge file): refused at recipe resolution, before the checkpoint is loaded."""

from __future__ import annotations

from pathlib import Path

from catalogue import Case

NOT_LOADED = ("sdcompiler.loading.load_checkpoint",)


def _yaml(text: str):
    def build(tmp: Path, inputs) -> list[str]:
        (tmp / "recipe.yaml").write_text(text)
        return [
            "compile",
            str(inputs.checkpoint),
            "--recipe",
            str(tmp / "recipe.yaml"),
            "--target",
            "torch",
            "--out",
            str(tmp / "out"),
        ]

    return build


def _distill(line: str):
    return _yaml(f"version: 1\npasses:\n  - bk-small\n  - {{preset: distill, {line}}}\n")


def _alias_bomb() -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "version: 1\npasses: []\ndescription: {" + ", ".join(lines) + "}\n"


def _huge_file(tmp: Path, inputs) -> list[str]:
    return _yaml("version: 1\npasses: []\ndescription: '" + "x" * (2 << 20) + "'\n")(tmp, inputs)


CASES = [
    Case("recipe negative steps", _distill("steps: -5"), ("'steps'", ">= 1", "-5"), NOT_LOADED),
    Case("recipe zero batch size", _distill("batch_size: 0"), ("'batch_size'", ">= 1"), NOT_LOADED),
    Case("recipe zero grad accum", _distill("grad_accum: 0"), ("'grad_accum'", ">= 1"), NOT_LOADED),
    Case("recipe zero teacher steps", _distill("teacher_steps: 0"), ("'teacher_steps'", ">= 1"), NOT_LOADED),
    Case("recipe zero resolution", _distill("resolution: 0"), ("'resolution'", ">= 8"), NOT_LOADED),
    Case("recipe infinite lr", _distill("lr: .inf"), ("'lr'", "finite"), NOT_LOADED),
    Case("recipe nan lr", _distill("lr: .nan"), ("'lr'", "finite"), NOT_LOADED),
    Case("recipe zero lr", _distill("lr: 0"), ("'lr'", "> 0"), NOT_LOADED),
    Case("recipe nan teacher guidance", _distill("teacher_guidance: .nan"), ("teacher_guidance", "finite"), NOT_LOADED),
    Case("recipe steps above the budget", _distill("steps: 100000000"), ("steps=100000000", "limits"), NOT_LOADED),
    Case(
        "recipe limits not a number",
        _yaml("version: 1\nlimits: {steps: many}\npasses: [bk-small, distill]\n"),
        ("limit 'steps'", "positive integer"),
        NOT_LOADED,
    ),
    Case("recipe unknown limit", _yaml("version: 1\nlimits: {speed: 3}\npasses: []\n"), ("unknown limit",), NOT_LOADED),
    Case("recipe alias bomb", _yaml(_alias_bomb()), ("100000 nodes", "aliases"), NOT_LOADED),
    Case("recipe alias cycle", _yaml("version: 1\npasses: &p [*p]\n"), ("contains itself",), NOT_LOADED),
    Case("recipe nested 100000 deep", _yaml("[" * 100_000 + "]" * 100_000 + "\n"), ("deeper than 64",), NOT_LOADED),
    Case("recipe file too large", _huge_file, ("byte limit",), NOT_LOADED),
]
