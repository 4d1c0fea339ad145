"""No silent NaN in what a compile writes: manifests are strict JSON, and the ONNX verify stage fails on NaN/Inf
outputs instead of recording an error of 0 (max(0.0, nan) is 0.0)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sdcompiler.artifact import MANIFEST, write_manifest
from sdcompiler.errors import ArtifactError, LoweringError
from sdcompiler.passes.onnx_export import OnnxExport, export_model
from sdcompiler.targets.onnx_target import check_verified, verify_model


def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_number_is_refused_naming_where_and_nothing_is_written(tmp_path, bad):
    manifest = {"passes": [{"name": "distill", "metrics": {"loss_first": 1.0, "sqnr_after_db": bad}}]}
    with pytest.raises(ArtifactError, match=r"at passes\[0\]\.metrics\.sqnr_after_db in the manifest"):
        write_manifest(tmp_path, manifest)
    assert not (tmp_path / MANIFEST).exists()


def test_a_finite_manifest_is_strict_json(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"1234")
    write_manifest(tmp_path, {"passes": [{"metrics": {"sqnr_db": 31.5, "steps": 4}}], "big": 1e300})
    manifest = _strict((tmp_path / MANIFEST).read_text())
    assert manifest["passes"][0]["metrics"]["sqnr_db"] == 31.5 and set(manifest["files"]) == {"weights.bin"}


def _linear_export(weight_fill: float | None) -> OnnxExport:
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    if weight_fill is not None:
        with torch.no_grad():
            module.weight[0, 0] = weight_fill  # one bad weight, as a corrupt checkpoint has it
    return OnnxExport("unet", module, (torch.randn(2, 4),), ["sample"], ["out_sample"], {}, torch.float32)


@pytest.mark.parametrize("fill", [math.nan, math.inf])
def test_verify_fails_on_non_finite_outputs(tmp_path, fill):
    export = _linear_export(fill)
    result = verify_model(export, export_model(export, tmp_path, 18))
    assert result["nonfinite_values"] > 0  # before this check: max_abs_error 0.0 for a NaN graph
    with pytest.raises(LoweringError, match="NaN/Inf values on the export inputs"):
        check_verified("unet", result, "fp32", quantized=False)
    with pytest.raises(LoweringError, match="NaN/Inf"):  # an int8 graph's SQNR floor does not hide it either
        check_verified("unet", result, "fp32", quantized=True)


def test_verify_of_a_healthy_graph_records_what_it_did_before(tmp_path):
    export = _linear_export(None)
    result = verify_model(export, export_model(export, tmp_path, 18))
    assert set(result) == {"max_abs_error", "relative_error", "sqnr_db"} and result["max_abs_error"] < 1e-5
    check_verified("unet", result, "fp32", quantized=False)
