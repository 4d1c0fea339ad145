"""README's benchmark numbers against the stored results they cite.

Every part of README's "## Benchmarks" section (and any other paragraph that cites a result file) names its
result files (`results/NAME.md`, `results/{a,b}.md`); each measured number in that text must be one of the
numbers in those files (JSON and Markdown), at the precision README shows it. Numbers that are settings are
written in code spans (skipped), derived ones follow "derived:" up to the closing parenthesis (skipped), and
bare integers count as measurements only with a unit (`s`, `ms`, `GiB`, `dB`, `x`, `%`, ...), so counts
like "50 steps" are not checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"

_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+\.\d+(?:e-?\d+)?|\d+)(?![\w.]*\d)", re.IGNORECASE)
_UNIT = re.compile(r"(%|x\b| s\b| ms\b| GiB\b| GB\b| dB\b| M\b| G\b| T\b|B\b)")
_IN_FILE = re.compile(r"(?<![A-Za-z0-9_.])-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?")
_CITED = re.compile(r"results/(\{[\w,]+\}|\w+)\.(?:md|json)")


def _blocks(readme: str) -> list[str]:
    """The parts to check: each ### part of the Benchmarks section (its intro too), and every other paragraph
    that cites a result file."""
    start = readme.index("\n## Benchmarks")
    end = readme.index("\n## ", start + 1)
    bench = readme[start:end]
    blocks = re.split(r"\n(?=### )", bench)
    for paragraph in re.split(r"\n\s*\n", readme[:start] + "\n\n" + readme[end:]):
        if _CITED.search(paragraph):
            blocks.append(paragraph)
    return blocks


def _cited_files(block: str) -> list[Path]:
    names = []
    for found in _CITED.findall(block):
        names += found.strip("{}").split(",")
    return [path for name in names for path in (RESULTS / f"{name}.md", RESULTS / f"{name}.json") if path.is_file()]


def _file_numbers(paths: list[Path]) -> list[float]:
    values = []
    for path in paths:
        text = re.sub(r"[0-9a-fA-F]{16,}", " ", path.read_text())  # hashes are not numbers
        for token in _IN_FILE.findall(text):
            try:
                values.append(float(token.replace(",", "")))
            except ValueError:
                pass
    return values


def _claims(block: str) -> list[tuple[str, float, float]]:
    """(token, value, tolerance) for each measured number README shows in `block`."""
    text = re.sub(r"`[^`\n]*`", " ", block)  # settings and commands
    text = re.sub(r"derived:[^)\n]*", " ", text)  # derived numbers say so
    text = re.sub(r"^#+ .*$", " ", text, flags=re.MULTILINE)  # headings
    claims = []
    for match in _NUMBER.finditer(text):
        token = match.group(1)
        plain = "." not in token and "," not in token
        if plain and not _UNIT.match(text, match.end()) and not re.match(r"-\d", text[match.end() :]):
            continue  # a count ("50 steps"); a range's first end ("86-94 s") is checked
        if plain and re.match(r"x\d", text[match.end() :]):  # a size such as 32x32
            continue
        mantissa = token.lower().split("e")[0]
        decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
        exponent = int(token.lower().split("e")[1]) if "e" in token.lower() else 0
        tolerance = 0.5 * 10 ** (exponent - decimals) * (1 + 1e-9)
        claims.append((token, float(token.replace(",", "")), tolerance))
    return claims


def _unbacked(block: str) -> list[str]:
    values = _file_numbers(_cited_files(block))
    missing = []
    for token, value, tolerance in _claims(block):
        if not any(abs(v - value) <= tolerance or abs(100 * v - value) <= tolerance for v in values):
            missing.append(token)
    return missing


def _readme_blocks() -> list[str]:
    return _blocks((ROOT / "README.md").read_text())


@pytest.mark.parametrize("index", range(len(_readme_blocks())))
def test_each_readme_benchmark_number_is_in_the_results_it_cites(index):
    block = _readme_blocks()[index]
    title = block.strip().splitlines()[0][:80]
    files = _cited_files(block)
    assert files, f"README part {title!r} cites no result file under benchmarks/results/"
    claims = _claims(block)
    assert claims, f"README part {title!r} shows no number: nothing to check"
    missing = _unbacked(block)
    assert not missing, f"README part {title!r}: {missing} are in none of {[f.name for f in files]}"


def test_checker_bites():
    """A number changed in README's text, or one without a stored result, is caught; settings are not."""
    block = "### x (`results/compile_sd15.md`)\n\nORT 1.131 s vs torch 1.909 s = **0.593**, 93.8 s wall."
    assert _unbacked(block) == []
    assert _unbacked(block.replace("1.131", "1.141")) == ["1.141"]
    assert _unbacked(block.replace("93.8 s", "86-97 s")) == ["86", "97"]
    assert _unbacked(block + " `--steps 17`, 50 steps, 32x32 latent (derived: 12.34x).") == []
    assert _unbacked(block + " error 1.52e-06; 7.7e-06") == ["7.7e-06"]
