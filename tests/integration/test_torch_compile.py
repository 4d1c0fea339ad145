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


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["none", "deepcache"])
def test_compiled_unet_takes_controlnet_residuals(tiny_checkpoint, recipe, tmp_path, monkeypatch):
    """With a ControlNet the net and the U-Net call (deepcache: the full and the shallow call) run compiled, the
    residuals as the U-Net graph's inputs: the same latents as eager, and a different control image moves them. Dynamo
    traces the calls for real; its graphs run on the "eager" backend here, because inductor's C++ code generation
    of the tiny U-Net takes minutes per shape on this CPU and is tested above without residuals (with it, both
    cases pass too: 5.3 min measured on the 2-core machine)."""
    import collections

    import numpy as np

    import sdcompiler.cuda_graphs

    runs = collections.Counter()  # calls that went through torch.compile, by the compiled callable's name

    def compiled(fn, mode):
        name = type(fn).__name__ if isinstance(fn, torch.nn.Module) else fn.__name__
        traced = torch.compile(fn, backend="eager")

        def run(*args, **kwargs):
            runs[name] += 1
            return traced(*args, **kwargs)

        return run

    monkeypatch.setattr(sdcompiler.cuda_graphs, "compiled", compiled)

    from sdcompiler import compile_pipeline
    from sdcompiler.testing import make_controlnet

    net = make_controlnet(tmp_path / "net", tiny_checkpoint("sd15"), seed=0)
    compile_pipeline(
        tiny_checkpoint("sd15"),
        recipe=recipe,
        target="torch",
        output_dir=tmp_path / "out",
        device="cpu",
        controlnet=net,
        show_progress=False,
    )
    control = [np.random.default_rng(seed).random((1, 64, 64, 3)).astype(np.float32) for seed in (0, 1)]
    call = dict(SMALL, num_inference_steps=3 if recipe == "deepcache" else 2)

    def latents(pipe, image):
        return pipe("a red cube", image=image, generator=torch.Generator().manual_seed(0), **call).images

    eager = load_compiled(tmp_path / "out", device="cpu")
    compiled_pipe = load_compiled(tmp_path / "out", device="cpu", options={"compile": True})
    reference = latents(eager, control[0])
    out = latents(compiled_pipe, control[0])
    # the ControlNet's forward and every U-Net call with residuals (deepcache: full and shallow) ran compiled
    unet_calls = ("full", "shallow") if recipe == "deepcache" else ("call",)
    assert set(runs) == {"ControlNetModel", *unet_calls} and all(runs[name] > 0 for name in unet_calls)
    # the whole net once per full U-Net call (a deepcache cached step stops the net early, eagerly)
    assert runs["ControlNetModel"] == runs[unet_calls[0]]
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    moved = latents(compiled_pipe, control[1])
    torch.testing.assert_close(moved, latents(eager, control[1]), atol=1e-4, rtol=1e-4)
    assert (moved - out).abs().max() > 1e-3, "the control image changed nothing"
