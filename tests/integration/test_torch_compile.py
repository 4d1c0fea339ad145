"""The torch target's load-time options: `torch.compile` of the U-Net calls, and `load_compiled(options=...)`.

torch.compile runs for real here (inductor's C++ backend on CPU): a cold compile of the tiny U-Net takes
about a minute on a 2-core machine, so each compiled test uses one small shape (64x64 px, no CFG, 2 steps).
"""

from __future__ import annotations

import pytest
import torch

from sdcompiler import load_compiled
from sdcompiler.errors import ConfigError

SMALL = dict(num_inference_steps=2, guidance_scale=1.0, height=64, width=64, output_type="latent")


def _latents(pipe):
    return pipe("a red cube", generator=torch.Generator().manual_seed(0), **SMALL).images


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["none", "deepcache"])
def test_compiled_unet_matches_eager(compiled, recipe):
    artifact = compiled("sd15", "torch", recipe)
    eager = load_compiled(artifact.root, device="cpu")
    compiled_pipe = load_compiled(artifact.root, device="cpu", options={"compile": True})
    assert compiled_pipe.target_config["compile"] is True
    assert compiled_pipe.manifest["lowering"]["config"]["compile"] is False  # the recorded config is untouched
    reference = _latents(eager)
    before = _graphs()
    out = _latents(compiled_pipe)
    # the U-Net call (deepcache: the full and the shallow call) went through dynamo
    assert _graphs() >= before + (2 if recipe == "deepcache" else 1)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    assert not torch.equal(out, torch.zeros_like(out))


def test_load_options_are_validated(compiled):
    torch_artifact = compiled("sd15", "torch", "none")
    with pytest.raises(ConfigError, match="precision .*fixed when the artifact is compiled.*load-time options"):
        load_compiled(torch_artifact.root, device="cpu", options={"precision": "fp16"})
    with pytest.raises(ConfigError, match="exclude each other"):
        load_compiled(torch_artifact.root, device="cpu", options={"compile": True, "cuda_graphs": True})
    with pytest.raises(ConfigError, match="compile_mode"):
        load_compiled(torch_artifact.root, device="cpu", options={"compile": True, "compile_mode": "fastest"})
    onnx_artifact = compiled("sd15", "onnx", "none")
    with pytest.raises(ConfigError, match="takes no load-time options"):
        load_compiled(onnx_artifact.root, device="cpu", options={"compile": True})


def test_compile_is_off_by_default_and_recorded(compiled):
    config = compiled("sd15", "torch", "none").manifest["lowering"]["config"]
    assert config["compile"] is False and config["compile_mode"] == "default"


def test_generate_cli_passes_load_options(compiled, tmp_path, capsys):
    from sdcompiler.cli import main

    artifact = compiled("sd15", "torch", "none")
    code = main(
        [
            "generate",
            str(artifact.root),
            "--prompt",
            "a cube",
            "--steps",
            "1",
            "--height",
            "64",
            "--width",
            "64",
            "--device",
            "cpu",
            "--option",
            "precision=fp16",
            "--out",
            str(tmp_path / "x.png"),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "load-time options" in err[0]
    assert not (tmp_path / "x.png").exists()
