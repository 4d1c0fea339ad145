"""benchmarks/bench_report.py (`make bench`) on the tiny SD1.5 checkpoint: every subject measured or listed as
skipped with its reason, ratios from the same rounds, fidelity next to speed, JSON + Markdown + plots written.

One report run with the default settings (`make bench`: no batch-4 calls) serves the module (~1 minute on 2
cores: optimum's export and ORT's quantization of the tiny checkpoint are most of it), and one short `--full` run
of one subject next to the baseline (its build cached) covers the batch-4 calls. Speed is never asserted here:
only that it was measured and how the ratios are made.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
pytestmark = pytest.mark.slow

REPEATS = 2  # the default --repeats
NOT_MEASURED = "not measured (--batch4-repeats 0)"


def _bench_report():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_report
    finally:
        sys.path.remove(str(BENCHMARKS))
    return bench_report


@pytest.fixture(scope="module")
def report(tiny_checkpoint, compiled, tmp_path_factory):
    pytest.importorskip("matplotlib")
    pytest.importorskip("optimum.onnxruntime")
    bench_report = _bench_report()
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
            "--variants",
            ",".join(variants),
            "--peers",
            "optimum-onnx,ort-int8",
            "--workdir",
            str(out / "work"),
            "--out",
            str(out / "results"),
            "--gpu-results",
            str(out / "gpu" / "gpu_e2e.md"),  # no stored GPU run: the GPU rows are listed as skipped
        ]
    )
    return results, out / "results", bench_report


def test_every_subject_is_measured_or_skipped_with_a_reason(report):
    results, _, bench_report = report
    measured, skipped = set(results["subjects"]), results["skipped"]
    expected = {"eager", "none", "bk-small", "no-such-preset:onnx", "gpu-e2e", *bench_report.ALL_PEERS}
    assert measured | set(skipped) == expected, "a subject was dropped without a reason"
    assert not measured & set(skipped)
    assert {"eager", "none", "bk-small", "optimum-onnx", "ort-int8"} <= measured
    assert skipped["torch-compile"] == "not asked for (--peers)"
    assert skipped["no-such-preset:onnx"].startswith("compile failed")
    assert skipped["gpu-e2e"].startswith("no stored GPU run (gpu_e2e.md is not under gpu/)")
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
        partner = [c for c in calls["eager"] if c["phase"] == "timed" and name in c["partners"]]
        assert len(mine) == len(partner) == REPEATS  # every repeat kept
        # each of its calls sits next to the baseline call it is compared with: no other call between them
        assert all(abs(own["order"] - base["order"]) == 1 for own, base in zip(mine, partner))
        assert row["image_seconds"]["n"] == REPEATS
        base = sorted(c["seconds"] for c in partner)
        assert row["baseline_image_seconds_same_rounds"] == pytest.approx(sum(base) / 2)  # median of 2
        assert row["speedup_image"] == pytest.approx(
            row["baseline_image_seconds_same_rounds"] / row["image_seconds"]["median"]
        )
        assert row["images_per_second_batch1"] > 0
        assert row["unet_calls_per_image"] > 0 and row["unet_call_seconds"] > 0


def order(call):
    return call["order"]


def test_subjects_loaded_in_pairs_share_the_baseline_call(report):
    results, _, _ = report
    timed = sorted((c for c in results["calls"]["eager"] if c["phase"] == "timed"), key=order)
    # 4 subjects measured, 2 at a time (--together 2): 2 rounds of 2 groups, one baseline call per round
    assert [sorted(c["partners"]) for c in timed] == [
        sorted(["none", "bk-small"]),
        sorted(["none", "bk-small"]),
        sorted(["optimum-onnx", "ort-int8"]),
        sorted(["optimum-onnx", "ort-int8"]),
    ]
    assert results["settings"]["together"] == 2
    # each subject's warm-up: one call of --warmup-steps 1, the timed call's shapes with fewer U-Net calls
    assert results["settings"]["warmup_steps"] == 1 < results["settings"]["steps"]
    for name, row in results["subjects"].items():
        if name != "eager":
            (warmup,) = [c for c in results["calls"][name] if c["phase"] == "warmup"]
            assert 0 < warmup["unet_calls"] < row["unet_calls_per_image"] and warmup["images"] == 1
    first, second = (
        [c["order"] for c in results["calls"][name] if c["phase"] == "timed"] for name in ("none", "bk-small")
    )
    assert first[0] < timed[0]["order"] < second[0]  # round 1: none, baseline, bk-small
    assert second[1] < timed[1]["order"] < first[1]  # round 2 reversed


def test_default_settings_leave_batch4_out_and_say_so(report):
    results, folder, _ = report
    settings = results["settings"]
    assert (settings["repeats"], settings["batch4_repeats"], settings["full"]) == (REPEATS, 0, False)
    assert not any(c["phase"] == "batch4" for calls in results["calls"].values() for c in calls)
    assert results["not_measured"] == {"images_per_second_batch4": NOT_MEASURED}
    assert all(row["images_per_second_batch4"] is None for row in results["subjects"].values())
    table = (folder / "report.md").read_text()
    eager_row = next(line for line in table.splitlines() if line.startswith("| eager |"))
    assert f"| {NOT_MEASURED} |" in eager_row  # the column stays, each row says why it is empty
    assert f"- images_per_second_batch4 (every subject): {NOT_MEASURED}" in table
    # where the time went: every subject's phases, and the baseline's warm-up folded into its held-out call
    phases = results["phase_seconds"]
    assert set(phases["per_subject"]) == set(results["subjects"]) - {"eager"}
    assert all(set(p) == {"load", "warmup", "rounds", "batch4", "sqnr"} for p in phases["per_subject"].values())
    assert phases["baseline_batch4_start"] < 1 and "Where this run's" in table


def test_full_restores_the_first_runs_settings():
    bench_report = _bench_report()
    default = bench_report.parse_args([])
    assert (default.repeats, default.batch4_repeats, default.held_out_calls, default.together, default.name) == (
        2,
        0,
        1,
        2,
        "report",
    )
    full = bench_report.parse_args(["--full"])
    assert (full.repeats, full.batch4_repeats, full.held_out_calls, full.together, full.name) == (
        3,
        1,
        2,
        1,
        "report_full",
    )
    assert full.warmup == default.warmup == 1  # the warm-up stays in both
    assert (default.warmup_steps, full.warmup_steps) == (1, 0)  # --full: the timed steps, as its first run
    mixed = bench_report.parse_args(["--full", "--repeats", "1", "--name", "x"])  # an explicit flag wins
    assert (mixed.repeats, mixed.batch4_repeats, mixed.name) == (1, 1, "x")


def test_full_run_measures_batch4(report, compiled, tiny_checkpoint):
    _, folder, bench_report = report
    work = folder.parent / "work"  # the module run's cache: nothing is built again
    out = folder.parent / "full"
    results = bench_report.main(
        [
            "--full",
            "--repeats",
            "1",
            "--checkpoint",
            str(tiny_checkpoint("sd15")),
            "--size",
            "64",
            "--steps",
            "2",
            "--variants",
            f"none={compiled('sd15', 'onnx').root}",
            "--peers",
            "",
            "--workdir",
            str(work),
            "--out",
            str(out),
            "--gpu-results",
            str(folder.parent / "gpu" / "gpu_e2e.md"),
        ]
    )
    assert results["settings"]["full"] and results["settings"]["batch4_repeats"] == 1
    assert "not_measured" in results and not results["not_measured"]
    calls = results["calls"]
    assert [c["images"] for c in calls["none"] if c["phase"] == "batch4"] == [4]
    assert [c["images"] for c in calls["eager"] if c["phase"] == "batch4"] == [4, 4]  # at the start and the end
    assert all(row["images_per_second_batch4"] > 0 for row in results["subjects"].values())
    assert (out / "report_full.json").is_file() and (out / "report_full_runs.json").is_file()
    assert NOT_MEASURED not in (out / "report_full.md").read_text()


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


def test_the_run_is_timed_and_kept_in_the_history(report):
    results, folder, _ = report
    runs = json.loads((folder / "report_runs.json").read_text())
    assert runs == results["runs"] and len(runs) == 1
    run = runs[0]
    assert 0 < run["built_in_run_seconds"] < run["wall_seconds"] == results["wall_seconds"]
    # the peers were exported and quantized in this run; the artifacts compiled elsewhere count as cached
    assert set(run["built_in_run"]) == {"optimum-onnx", "ort-int8"}
    assert run["cached"] == ["bk-small", "none"]
    assert run["layout"] == "2 rounds, 2 together, warm-up 1 of 2 steps, 1 held-out, 0 batch-4"
    table = (folder / "report.md").read_text()
    assert f"| {run['date']} | {run['wall_seconds'] / 60:.1f} | optimum-onnx, ort-int8 |" in table


def test_history_keeps_the_cold_run_next_to_the_latest(report, tmp_path):
    results, _, bench_report = report
    history = tmp_path / "runs.json"
    base = {**results, "subjects": {"eager": results["subjects"]["eager"]}}
    cold = {**base, "date": "cold", "subjects": {**base["subjects"], "x": {"build": {"seconds": 9.0, "cached": False}}}}
    warm = {**base, "subjects": {**base["subjects"], "x": {"build": {"seconds": 9.0, "cached": True}}}}
    bench_report.record_run(cold, history)
    for index in range(bench_report.RUNS_KEPT + 3):
        runs = bench_report.record_run({**warm, "date": f"warm {index}"}, history)
    assert len(runs) == bench_report.RUNS_KEPT + 1
    assert runs[0]["date"] == "cold" and runs[0]["built_in_run"] == {"x": 9.0}
    assert [r["date"] for r in runs[1:]] == [f"warm {i}" for i in range(3, bench_report.RUNS_KEPT + 3)]
    assert all(r["cached"] == ["x"] and not r["built_in_run"] for r in runs[1:])


def test_a_stored_gpu_run_is_shown(report, tmp_path):
    results, _, bench_report = report
    stored = tmp_path / "gpu_e2e.md"
    stored.write_text("# bench_gpu_e2e\n\n| row | ms / image |\n|---|---|\n| diffusers-sdpa | 812.0 |\n")
    skipped = {}
    table = bench_report.gpu_rows(stored, skipped)
    assert skipped == {}
    text = bench_report.markdown(results, [], table)
    assert "## GPU rows (the stored run of benchmarks/bench_gpu_e2e.py)" in text
    assert "| diffusers-sdpa | 812.0 |" in text
