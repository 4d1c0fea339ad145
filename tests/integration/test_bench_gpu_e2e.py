"""benchmarks/bench_gpu_e2e.py runs end to end on the tiny checkpoints on CPU (`--tiny --device cpu`), as the
prepared GPU script must: the selected rows measured, the others listed as not selected or skipped with a reason,
the JSON and Markdown written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_cpu_check_writes_rows(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu_e2e.py"), "--tiny", "--device", "cpu"]
    command += ["--rows", "torch-eager,diffusers-compile,diffusers-sdpa", "--archs", "sd15", "--batches", "1"]
    command += [
        "--steps",
        "2",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path),
    ]
    env = os.environ | {"SDCOMPILER_QUIET": "1", "SDCOMPILER_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_e2e_cpu_check.json").read_text())
    assert (tmp_path / "gpu_e2e_cpu_check.md").read_text().count("| diffusers-sdpa |") == 1
    by_row = {r["row"]: r for r in results["rows"]}
    assert len(results["rows"]) == 14  # every row of the one arch x batch, run or not
    assert results["machine"]["device"] == "cpu" and results["versions"]["torch"]
    assert by_row["diffusers-compile"]["status"].startswith("skipped: torch.compile rows run on CUDA")
    assert by_row["fp8"]["status"] == "not run (not selected)"
    base, ours = by_row["diffusers-sdpa"], by_row["torch-eager"]
    for row in (base, ours):
        assert row["status"] == "ok" and row["steps"] == 2 and row["unet_calls"] >= 2  # PNDM: steps + 1
        for key in ("ms_per_image", "ms_per_call", "unet_calls_per_s", "unet_tflops", "macs_per_unet_image"):
            assert row[key] > 0, key
    assert base["psnr_db_vs_baseline"] == float("inf") and ours["psnr_db_vs_baseline"] > 20  # same latents
    assert ours["setup"]["artifact_compile_s"] > 0 and ours["speedup_vs_baseline"] > 0
    reference = results["reference"]
    assert reference["matmul"]["tflops"] > 0 and all(g["int_mm_ms"] > 0 for g in reference["int_mm_vs_linear"]["rows"])
