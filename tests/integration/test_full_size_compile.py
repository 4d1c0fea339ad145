"""Full-size compile (issue 3 acceptance): the real SD1.5 architecture with random weights, pruned by a
preset and compiled to the torch target; the manifest records the published parameter count.

One preset at full size keeps CI within budget (SD1.5 checkpoint ~4 GB on disk, ~10 GB peak RSS); the other
presets' exact counts at full size are checked on meta tensors in test_student_unet.py, and an SDXL
pipeline (~14 GB in fp32) does not fit this test's budget.
"""

from __future__ import annotations

import shutil

import pytest


def _require_free_disk(path, gigabytes: float) -> None:
    """Skip (with the numbers) when the disk cannot hold the checkpoint and the artifact: a full disk is
    the machine's state, not a defect of the compiler, and must not turn the whole suite red."""
    free = shutil.disk_usage(path).free / 1e9
    if free < gigabytes:
        pytest.skip(
            f"needs ~{gigabytes:.0f} GB free disk for the full-size checkpoint and artifact, "
            f"{free:.1f} GB free at {path}"
        )


@pytest.mark.slow
def test_bk_small_full_sd15_compiles_with_published_parameter_count(tmp_path):
    from sdcompiler import compile_pipeline
    from sdcompiler.testing import make_checkpoint

    _require_free_disk(tmp_path, 8)
    checkpoint = make_checkpoint(tmp_path / "sd15-full", "sd15", "full", seed=0)
    pipe = compile_pipeline(
        checkpoint, recipe="bk-small", target="torch", output_dir=tmp_path / "out", show_progress=False
    )
    (record,) = pipe.manifest["passes"]
    assert record["params_before"] == 859_520_964
    assert record["params_after"] == 482_346_884  # BK-SDM-Small: 0.49B published (1.6% off)
    assert abs(record["params_after"] / 0.49e9 - 1) < 0.025
    assert 0.6 < record["macs_after"] / record["macs_before"] < 0.7
    assert sum(p.numel() for p in pipe.unet.parameters()) == 482_346_884  # reloaded from the artifact


@pytest.mark.slow
def test_koala_700m_full_sdxl_compiles_with_published_parameter_count(tmp_path):
    from sdcompiler import compile_pipeline
    from sdcompiler.testing import make_checkpoint

    _require_free_disk(tmp_path, 22)
    checkpoint = make_checkpoint(tmp_path / "sdxl-full", "sdxl", "full", seed=0)
    pipe = compile_pipeline(
        checkpoint, recipe="koala-700m", target="torch", output_dir=tmp_path / "out", show_progress=False
    )
    (record,) = pipe.manifest["passes"]
    assert record["params_before"] == 2_567_463_684
    assert record["params_after"] == 782_822_724  # KOALA-700M
    assert sum(p.numel() for p in pipe.unet.parameters()) == 782_822_724
