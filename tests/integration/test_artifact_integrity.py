"""Artifacts are checked against their manifests before loading (sha256 by default, opt-out for a fast start),
`sdcompiler verify` reports the same, and no compile lowers weights holding NaN / Inf unless told to.
(The refusals themselves, one line each, are cases of the catalogue: tests/catalogue/artifacts.py.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdcompiler import compile_pipeline, load_compiled
from sdcompiler.cli import main
from sdcompiler.compile import compile_artifact
from sdcompiler.errors import ArtifactError, CheckpointError, LoweringError
from sdcompiler.passes import Pass, register_pass


@register_pass
class _PoisonUNet(Pass):
    """Test-only: a 'pass' that diverged, leaving a NaN in the U-Net."""

    name = "_test_integrity_poison"
    stage = "training"

    def run(self, pipe, config, ctx):
        with torch.no_grad():
            pipe.unet.conv_out.bias[1] = float("nan")
        return {}


@pytest.fixture
def tampered(compiled, tmp_path):
    root = shutil.copytree(compiled("sd15", target="torch").root, tmp_path / "artifact")
    weights = root / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors["conv_in.bias"][0] += 1.0  # a plausible edit: the file stays valid safetensors
    save_file(tensors, str(weights))
    return root


def test_tampered_artifact_refused_unless_verify_false(tampered):
    with pytest.raises(ArtifactError, match="unet/diffusion_pytorch_model.safetensors does not match the sha256"):
        load_compiled(tampered, device="cpu")
    pipe = load_compiled(tampered, device="cpu", verify=False)  # the opt-out for a fast start loads it as it is
    assert pipe.unet.conv_in.bias[0] != 0


def test_verify_command(compiled, tampered, capsys):
    for target in ("torch", "onnx"):
        assert main(["verify", str(compiled("sd15", target=target).root)]) == 0
        out = capsys.readouterr().out
        assert out.startswith("ok: ") and "match their sha256" in out
        assert ("ONNX graph(s)" in out) == (target == "onnx"), out
    assert main(["verify", str(tampered)]) == 1
    assert "does not match the sha256" in capsys.readouterr().err


def test_nonfinite_checkpoint_needs_opt_in(tiny_checkpoint, tmp_path):
    folder = shutil.copytree(tiny_checkpoint("sd15"), tmp_path / "ckpt")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors["decoder.conv_out.bias"][2] = float("-inf")
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=r"vae/diffusion_pytorch_model.safetensors: tensor 'decoder.conv_out"):
        compile_pipeline(folder, "none", "torch", tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    pipe = compile_pipeline(folder, "none", "torch", tmp_path / "out", device="cpu", allow_nonfinite=True)
    assert torch.isinf(pipe.components.modules["vae"].decoder.conv_out.bias).any()


def test_pass_that_diverged_is_named_before_lowering(tiny_checkpoint, tmp_path):
    with pytest.raises(LoweringError, match=r"unet holds 1 NaN value\(s\) in 'conv_out.bias' after pass"):
        compile_pipeline(tiny_checkpoint("sd15"), [{"pass": "_test_integrity_poison"}], "torch", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_half_precision_checkpoint_to_fp32_artifact_is_said(tiny_checkpoint, tmp_path, caplog):
    folder = shutil.copytree(tiny_checkpoint("sd15"), tmp_path / "ckpt")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.half() for k, v in load_file(str(weights)).items()}, str(weights))
    with caplog.at_level("WARNING", logger="sdcompiler.compile"):
        compile_artifact(folder, "none", "torch", tmp_path / "fp32", show_progress=False)
    assert "U-Net weights are fp16 and this torch artifact stores fp32" in caplog.text
    assert json.loads((tmp_path / "fp32" / "manifest.json").read_text())["source"]["unet_dtype"] == "fp16"
    caplog.clear()
    with caplog.at_level("WARNING", logger="sdcompiler.compile"):
        compile_artifact(
            folder, "none", "torch", tmp_path / "fp16", target_options={"precision": "fp16"}, show_progress=False
        )
    assert "stores fp32" not in caplog.text
