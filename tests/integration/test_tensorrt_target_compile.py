"""The tensorrt target on a machine without TensorRT: everything up to the engine builder.

The tests that compile artifacts (or run the pass end to end); the fast ones, and the oracles they share,
are in tests/unit/test_tensorrt_target.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sdcompiler import compile_pipeline
from sdcompiler.cli import main
from sdcompiler.errors import MissingDependencyError
from sdcompiler.targets.tensorrt import target as tt


def test_compile_runs_export_and_optimize_then_names_the_extra(tiny_checkpoint, tmp_path, monkeypatch):
    optimized = []
    optimize = tt.optimize_onnx

    def spy(source: Path, target: Path):
        report = optimize(source, target)
        optimized.append((target.parent.name, target.is_file()))
        return report

    monkeypatch.setattr(tt, "optimize_onnx", spy)
    out = tmp_path / "artifact"
    with pytest.raises(MissingDependencyError) as info:
        compile_pipeline(tiny_checkpoint("sd15"), target="tensorrt", output_dir=out, device="cpu")
    assert str(info.value) == (
        "the tensorrt target's build_engine stage needs 'tensorrt', which is not installed: "
        "pip install 'sd-compiler[tensorrt]'"
    )
    assert optimized == [("text_encoder", True), ("unet", True), ("vae_decoder", True)]
    assert list(tmp_path.iterdir()) == []  # no artifact, no partial staging folder


def test_cli_compile_without_tensorrt_exits_1_naming_the_extra(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "artifact"
    assert main(["compile", str(tiny_checkpoint("sd15")), "--target", "tensorrt", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "pip install 'sd-compiler[tensorrt]'" in err
    assert list(tmp_path.iterdir()) == []
