"""The tensorrt target on a machine without TensorRT: refused before any work, or `engines=false` on purpose.

The tests that compile artifacts (or run the pass end to end); the fast ones, and the oracles they share,
are in tests/unit/test_tensorrt_target.py.
"""

from __future__ import annotations

import pytest

from sdcompiler import compile_pipeline
from sdcompiler.cli import main
from sdcompiler.errors import MissingDependencyError
from sdcompiler.targets.tensorrt import target as tt


def test_compile_without_tensorrt_stops_before_any_work(tiny_checkpoint, tmp_path, monkeypatch):
    import sdcompiler.loading

    reached = []
    monkeypatch.setattr(sdcompiler.loading, "load_checkpoint", lambda *a, **k: reached.append("load"))
    monkeypatch.setattr(tt, "export_onnx_stage", lambda *a, **k: reached.append("export"))
    out = tmp_path / "artifact"
    with pytest.raises(MissingDependencyError) as info:
        compile_pipeline(tiny_checkpoint("sd15"), target="tensorrt", output_dir=out, device="cpu")
    assert str(info.value) == (
        "the tensorrt target's build_engine stage needs 'tensorrt', which is not installed: "
        "pip install 'sd-compiler[tensorrt]' (or compile the optimized ONNX without engines: --option engines=false)"
    )
    assert reached == []  # neither the checkpoint nor the export was touched
    assert list(tmp_path.iterdir()) == []  # no artifact, no partial staging folder


def test_engines_false_writes_the_optimized_onnx_and_each_profile(tiny_checkpoint, tmp_path):
    from sdcompiler.artifact import read_manifest
    from sdcompiler.compile import compile_artifact
    from sdcompiler.targets.tensorrt.build import OPTIMIZED, built_engines

    # compile_artifact: compile_pipeline would also load the artifact, which needs TensorRT and a GPU
    root = compile_artifact(
        tiny_checkpoint("sd15"), target="tensorrt", output_dir=tmp_path / "artifact", target_options={"engines": False}
    )
    built = built_engines(read_manifest(root))
    assert built["compute_capability"] is None and built["tensorrt"] is None
    for name in ("text_encoder", "unet", "vae_decoder"):
        assert (root / name / OPTIMIZED).is_file() and not list((root / name).glob("*.plan"))
        assert built[name]["file"] is None and built[name]["build"]["profile"]


def test_cli_compile_without_tensorrt_exits_1_naming_the_extra(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "artifact"
    assert main(["compile", str(tiny_checkpoint("sd15")), "--target", "tensorrt", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "pip install 'sd-compiler[tensorrt]'" in err
    assert list(tmp_path.iterdir()) == []
