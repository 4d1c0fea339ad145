"""The tensorrt target on a machine without TensorRT: refused before any work, or `engines=false` on purpose.

The tests that compile artifacts (or run the pass end to end); the fast ones, and the oracles they share,
are in tests/unit/test_tensorrt_target.py.
"""

from __future__ import annotations

import pytest
import torch

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


@pytest.mark.parametrize(("arch", "nets"), [("sd15", 2), ("sdxl", 1)])
def test_engines_false_with_controlnets_profiles_fit_the_residuals(arch, nets, tiny_checkpoint, tmp_path):
    """Every ControlNet gets its optimized graph and profile, and the profiles agree with the graphs: the
    ControlNet graph run (ONNX Runtime) at its profile's min and max shapes returns residuals of exactly the
    shapes the U-Net's profile gives its residual inputs there, and the U-Net graph takes them."""
    import numpy as np
    import onnx

    from sdcompiler.artifact import read_manifest
    from sdcompiler.compile import compile_artifact
    from sdcompiler.targets.components import OrtModel
    from sdcompiler.targets.tensorrt.build import OPTIMIZED, built_engines
    from sdcompiler.testing import make_controlnet

    paths = [make_controlnet(tmp_path / f"cn{i}", tiny_checkpoint(arch), seed=i) for i in range(nets)]
    root = compile_artifact(
        tiny_checkpoint(arch),
        target="tensorrt",
        output_dir=tmp_path / "artifact",
        target_options={"engines": False, "precision": "fp32", "batch_size": [1, 1, 2]},
        controlnet=paths,
    )
    manifest = read_manifest(root)
    folders = [entry["folder"] for entry in manifest["controlnets"]]
    assert folders == (["controlnet"] if nets == 1 else [f"controlnet_{i}" for i in range(nets)])
    built = built_engines(manifest)
    residuals = manifest["lowering"]["stages"][0]["settings"]["controlnet_residuals"]
    outputs = [*residuals["down_residuals"], residuals["mid_residual"]]
    unet_profile = built["unet"]["build"]["profile"]
    assert set(outputs) <= set(unet_profile)

    def feed(path, profile, corner):
        graph = onnx.load(str(path), load_external_data=False).graph
        weights = {t.name for t in graph.initializer}
        inputs = {}
        for i in graph.input:
            if i.name in weights:
                continue
            dims = profile[i.name][corner] if i.name in profile else [d.dim_value for d in i.type.tensor_type.shape.dim]
            kind = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
            inputs[i.name] = torch.from_numpy(np.random.default_rng(0).standard_normal(dims).astype(kind))
        return inputs

    for folder in folders:
        assert (root / folder / OPTIMIZED).is_file() and built[folder]["file"] is None
        profile = built[folder]["build"]["profile"]
        assert {"sample", "controlnet_cond"} <= set(profile)
        for corner in (0, 2):  # min and max
            inputs = feed(root / folder / OPTIMIZED, profile, corner)
            got = OrtModel(root / folder / OPTIMIZED, ["CPUExecutionProvider"])(**inputs)
            assert [tuple(got[n].shape) for n in outputs] == [tuple(unet_profile[n][corner]) for n in outputs]
            unet_inputs = feed(root / "unet" / OPTIMIZED, unet_profile, corner) | {n: got[n] for n in outputs}
            out = OrtModel(root / "unet" / OPTIMIZED, ["CPUExecutionProvider"])(**unet_inputs)["out_sample"]
            assert out.shape == unet_inputs["sample"].shape and torch.isfinite(out).all()
