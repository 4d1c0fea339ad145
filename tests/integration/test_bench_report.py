"""benchmarks/bench_report.py (`make bench`) on the tiny SD1.5 checkpoint: every subject measured or listed as
skipped with its reason, ratios from the same rounds, fidelity next to speed, JSON + Markdown + plots written.

One report run serves the module (~1 minute on 2 cores: optimum's export and ORT's quantization of the tiny
checkpoint are most of it). Speed is never asserted here: only that it was measured and how the ratios are made.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
pytestmark = pytest.mark.slow

REPEATS = 2


@pytest.fixture(scope="module")
def report(tiny_checkpoint, compiled, tmp_path_factory):
    pytest.importorskip("matplotlib")
    pytest.importorskip("optimum.onnxruntime")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_report
    finally:
        sys.path.remove(str(BENCHMARKS))
    out = tmp_path_factory.mktemp("bench-report")
    variants = [
        f"none={compiled('sd15', 'onnx').root}",
        f"bk-small={compiled('sd15', 'onnx', 'bk-small').root}",
        "no-such-preset:onnx",  # compiles in a subprocess and fails: listed as skipped, with the reason
    ]
    results = bench_report.main(
        [
            "--checkpoint",
            str(tiny_checkpoint("sd15")),
            "--size",
            "64",
            "--steps",
            "2",
            "--repeats",
            str(REPEATS),
            "--variants",
            ",".join(variants),
            "--peers",
            "optimum-onnx,ort-int8",
            "--workdir",
            str(out / "work"),
            "--out",
            str(out / "results"),
        ]
    )
    return results, out / "results", bench_report


def test_every_subject_is_measured_or_skipped_with_a_reason(report):
    results, _, bench_report = report
    measured, skipped = set(results["subjects"]), results["skipped"]
    expected = {"eager", "none", "bk-small", "no-such-preset:onnx", *bench_report.ALL_PEERS}
    assert measured | set(skipped) == expected, "a subject was dropped without a reason"
    assert not measured & set(skipped)
    assert {"eager", "none", "bk-small", "optimum-onnx", "ort-int8"} <= measured
    assert skipped["torch-compile"] == "not asked for (--peers)"
    assert skipped["no-such-preset:onnx"].startswith("compile failed")
    assert results["subjects"]["eager"]["kind"] == "baseline"
    assert {results["subjects"][p]["kind"] for p in ("optimum-onnx", "ort-int8")} == {"peer"}


def test_ratios_come_from_the_same_rounds(report):
    results, _, _ = report
    calls = results["calls"]
    for name, row in results["subjects"].items():
        if name == "eager":
            assert "speedup_image" not in row
            continue
        mine = [c for c in calls[name] if c["phase"] == "timed"]
        partner = [c for c in calls["eager"] if c["phase"] == "timed" and c["partner"] == name]
        assert len(mine) == len(partner) == REPEATS  # every repeat kept
        assert row["image_seconds"]["n"] == REPEATS
        base = sorted(c["seconds"] for c in partner)
        assert row["baseline_image_seconds_same_rounds"] == pytest.approx(sum(base) / 2)  # median of 2
        assert row["speedup_image"] == pytest.approx(
            row["baseline_image_seconds_same_rounds"] / row["image_seconds"]["median"]
        )
        assert row["images_per_second_batch1"] > 0 and row["images_per_second_batch4"] > 0
        assert [c["images"] for c in calls[name] if c["phase"] == "batch4"] == [4]
        assert row["unet_calls_per_image"] > 0 and row["unet_call_seconds"] > 0


def test_fidelity_next_to_speed(report):
    results, _, _ = report
    rows = results["subjects"]
    # our fp32 ONNX graph computes the source U-Net (SQNR far above any quantized one), the pruned one does not
    assert rows["none"]["eps_sqnr_db"] > 60
    assert rows["optimum-onnx"]["eps_sqnr_db"] > 60
    assert rows["bk-small"]["eps_sqnr_db"] < rows["none"]["eps_sqnr_db"] - 20
    assert rows["ort-int8"]["eps_sqnr_db"] < rows["optimum-onnx"]["eps_sqnr_db"] - 20
    assert rows["none"]["psnr_db"] > 40 and rows["none"]["ssim"] > 0.99
    assert rows["bk-small"]["unet_params"] < rows["none"]["unet_params"] == rows["eager"]["unet_params"]
    for name, row in rows.items():
        assert row["bytes"] > 0 and row["memory"]["peak_rss_gib"] > 0, name
    assert rows["ort-int8"]["quantization"]["calibration_inputs"] > 0
    assert results["machine"]["cpu_model"] and "onnxruntime" in results["versions"]


def test_files_written(report):
    results, folder, _ = report
    stored = json.loads((folder / "report.json").read_text())
    assert stored["subjects"].keys() == results["subjects"].keys()
    table = (folder / "report.md").read_text()
    for name, reason in results["skipped"].items():
        assert f"- {name}: {reason}" in table
    for name in results["subjects"]:
        assert f"| {name} |" in table or f"| **{name}** |" in table
    assert len(results["plots"]) == 3
    for plot in results["plots"]:
        assert (folder / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({plot})" in table
