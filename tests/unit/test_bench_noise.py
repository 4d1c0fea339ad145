"""The bench report's noise flags on injected timings and load readings, and quiet imports.

The report's spread (slowest / fastest call with the same prompts) and busy-machine flag are computed here
from timings and load averages written into the report, never from real load.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sdcompiler.bench import SPREAD_LIMIT, STAGES, BenchReport, Subject

SETTINGS = {
    "prompts": ["p"],
    "images_per_call": 1,
    "calls_per_repeat": 1,
    "height": 64,
    "width": 64,
    "warmup": 0,
    "repeats": 3,
    "seed": 0,
    "device": "cpu",
    "feature_cache": True,
    "threads": 1,
    "cores": 2,
}


def _subject(name: str, totals: list[float], chunks: list[int] | None = None) -> Subject:
    subject = Subject(name, f"{name} label", components=None, num_inference_steps=2, guidance_scale=7.5)
    for total, chunk in zip(totals, chunks or [0] * len(totals)):
        call = {stage: total / 4 for stage in STAGES}
        call.update(total=total, images=1, unet_calls=3, shallow_calls=0, chunk=chunk)
        subject.calls.append(call)
    return subject


def _report(candidate: list[float], baseline: list[float], load=(0.5, 0.5), cores=2) -> BenchReport:
    settings = {**SETTINGS, "cores": cores, "load_average": {"start": load[0], "end": load[1]}}
    return BenchReport(settings, [_subject("candidate", candidate), _subject("baseline", baseline)], {})


def test_min_median_max_of_both_sides_are_reported():
    report = _report([1.0, 1.2, 1.1], [4.0, 4.4, 4.2])
    data = report.to_dict()
    assert data["subjects"]["candidate"]["seconds_per_call"] == {"median": 1.1, "min": 1.0, "max": 1.2, "n": 3}
    assert data["subjects"]["baseline"]["seconds_per_call"] == {"median": 4.2, "min": 4.0, "max": 4.4, "n": 3}
    assert data["subjects"]["candidate"]["spread"] == pytest.approx(1.2)
    assert data["subjects"]["baseline"]["spread"] == pytest.approx(1.1)
    assert data["speedup"] == pytest.approx(4.2 / 1.1)
    assert data["noisy"] is False and data["timing_warnings"] == []
    text = report.markdown()
    assert "| s per call (median, min-max) | 1.1 (1-1.2) | 4.2 (4-4.4) |" in text
    assert "| slowest / fastest call | 1.2 | 1.1 |" in text
    assert "1 intra-op thread(s) for torch and ONNX Runtime, 2 cores, load average 0.50 -> 0.50" in text
    assert "warning:" not in text


@pytest.mark.parametrize("side", ["candidate", "baseline"])
def test_a_wide_spread_on_either_side_is_flagged(side):
    steady, wild = [1.0, 1.05, 1.1], [2.4, 28.8, 10.0]  # the eager baseline: 2.4-28.8 s between calls
    report = _report(wild, steady) if side == "candidate" else _report(steady, wild)
    data = report.to_dict()
    assert data["noisy"] is True
    assert data["subjects"][side]["spread"] == pytest.approx(12.0)
    assert data["timing_warnings"][0] == f"{side} calls took 2.4-28.8 s (12.00x apart, over {SPREAD_LIMIT}x)"
    assert len(data["timing_warnings"]) == 2  # the spread, then what to do
    assert f"warning: {side} calls took 2.4-28.8 s" in report.markdown()


def test_spread_just_under_the_limit_is_not_flagged():
    assert not _report([1.0, 1.49], [1.0, 1.0]).to_dict()["noisy"]
    assert _report([1.0, 1.51], [1.0, 1.0]).to_dict()["noisy"]


def test_spread_compares_calls_with_the_same_prompts():
    # a repeat of two chunks: the second chunk's prompts take 3x as long, every time: not noise
    subject = _subject("candidate", [1.0, 3.0, 1.1, 3.2], chunks=[0, 1, 0, 1])
    assert subject.spread() == pytest.approx(1.1)


@pytest.mark.parametrize(("load", "flagged"), [((2.5, 1.0), "2.50 at the start"), ((1.0, 7.25), "7.25 at the end")])
def test_busy_machine_is_flagged(load, flagged):
    data = _report([1.0, 1.0], [2.0, 2.0], load=load, cores=2).to_dict()
    assert data["noisy"] is True
    assert data["timing_warnings"][0] == f"machine busy: load average {flagged} on 2 cores"


def test_load_at_the_core_count_or_unknown_is_not_busy():
    assert not _report([1.0, 1.0], [2.0, 2.0], load=(2.0, 2.0), cores=2).to_dict()["noisy"]
    assert not _report([1.0, 1.0], [2.0, 2.0], load=(None, None), cores=2).to_dict()["noisy"]


def test_presets_command_and_imports_print_nothing_on_stderr():
    """diffusers' "Multiple distributions found for package optimum" (optimum-onnx shares the namespace)."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}
    for argv in (
        ["-m", "sdcompiler", "presets"],
        ["-m", "sdcompiler", "presets", "--debug"],  # --debug leaves diffusers' logging at its default
        ["-c", "import sdcompiler, diffusers.utils.import_utils"],
    ):
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stderr == "", (argv, proc.stderr[-2000:])


def test_other_diffusers_import_warnings_still_show():
    code = (
        "import logging, sdcompiler\n"
        "logger = logging.getLogger('diffusers.utils.import_utils')\n"
        "logger.warning('Multiple distributions found for package optimum. Picked distribution: x')\n"
        "logger.warning('Multiple distributions found for package modelopt. Picked distribution: y')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stderr == "Multiple distributions found for package modelopt. Picked distribution: y\n"
