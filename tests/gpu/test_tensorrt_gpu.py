"""Real TensorRT engines for the tensorrt target: build, run, engine cache, rebuild at load time.

Skipped without CUDA (conftest) or without TensorRT, diffusers, onnx-graphsurgeon or ONNX Runtime. No
machine here has TensorRT, so these tests have not run yet; on one that has it:

    python -m pytest tests/gpu/test_tensorrt_gpu.py --confcutdir=tests/gpu -q
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'sd-compiler[tensorrt]')")
pytest.importorskip("diffusers")
pytest.importorskip("onnx_graphsurgeon")
pytest.importorskip("onnxruntime")

from sdcompiler import compile_pipeline, load_compiled  # noqa: E402
from sdcompiler.compile import compile_artifact  # noqa: E402
from sdcompiler.errors import PipelineArgumentError  # noqa: E402
from sdcompiler.targets.tensorrt import runtime as trt_runtime  # noqa: E402
from sdcompiler.targets.tensorrt.build import OPTIMIZED, compute_capability, plan_filename  # noqa: E402
from sdcompiler.targets.tensorrt.runtime import TrtModel  # noqa: E402
from sdcompiler.testing import make_checkpoint  # noqa: E402

CALL = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tensorrt")
    with pytest.MonkeyPatch.context() as patch:  # engines and timing caches go to a private cache
        patch.setenv("SDCOMPILER_CACHE_DIR", str(root / "cache"))
        patch.setenv("SDCOMPILER_QUIET", "1")
        yield root


@pytest.fixture(scope="module")
def checkpoint(workdir):
    return make_checkpoint(workdir / "ckpt", "sd15", "tiny", seed=0)


@pytest.fixture(scope="module")
def artifact(workdir, checkpoint):
    """fp32 engines, so the images can be compared with ONNX Runtime's closely."""
    return compile_artifact(
        checkpoint, target="tensorrt", output_dir=workdir / "fp32", target_options={"precision": "fp32"}
    )


def _images(pipe, prompt="a red cube"):
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **CALL).images


def _build_record(root):
    manifest = json.loads((root / "manifest.json").read_text())
    return next(s for s in manifest["lowering"]["stages"] if s["name"] == "build_engine")["results"]


def test_engines_run_and_match_onnx_runtime(artifact, checkpoint, workdir):
    cc = compute_capability()
    built = _build_record(artifact)
    assert built["compute_capability"] == cc
    for name in ("text_encoder", "unet", "vae_decoder"):
        assert (artifact / name / plan_filename(cc)).is_file() and (artifact / name / OPTIMIZED).is_file()
        assert built[name]["cache"] == "miss"
    reference = compile_pipeline(checkpoint, target="onnx", output_dir=workdir / "onnx", device="cpu")
    got, expected = _images(load_compiled(artifact, device="cuda")), _images(reference)
    assert got.shape == expected.shape == (1, 128, 128, 3)
    assert np.abs(got - expected).max() < 2e-2  # TensorRT may use TF32 for fp32 convolutions and matmuls


def test_second_compile_hits_the_engine_cache(artifact, checkpoint, workdir):
    again = compile_artifact(
        checkpoint, target="tensorrt", output_dir=workdir / "fp32-again", target_options={"precision": "fp32"}
    )
    first, second = _build_record(artifact), _build_record(again)
    for name in ("text_encoder", "unet", "vae_decoder"):
        assert second[name]["cache"] == "hit" and second[name]["key"] == first[name]["key"]
        plan = plan_filename(first["compute_capability"])
        assert (again / name / plan).read_bytes() == (artifact / name / plan).read_bytes()


def test_load_rebuilds_for_another_gpu_and_another_tensorrt(artifact, workdir, monkeypatch, caplog):
    expected = _images(load_compiled(artifact, device="cuda"))
    real = compute_capability()
    monkeypatch.setattr(trt_runtime, "compute_capability", lambda: "1.0")  # an arch the artifact has no engine for
    with caplog.at_level(logging.WARNING, logger=trt_runtime.__name__):
        got = _images(load_compiled(artifact, device="cuda"))
    assert "this GPU has 1.0" in caplog.text and "rebuilding it from unet/model.opt.onnx" in caplog.text
    assert np.abs(got - expected).max() < 2e-2

    monkeypatch.setattr(trt_runtime, "compute_capability", lambda: real)
    copy = workdir / "other-tensorrt"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    next(s for s in manifest["lowering"]["stages"] if s["name"] == "build_engine")["results"]["tensorrt"] = "0.0.0"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=trt_runtime.__name__):
        got = _images(load_compiled(copy, device="cuda"))
    assert "with TensorRT 0.0.0" in caplog.text
    assert np.abs(got - expected).max() < 2e-2


def test_static_engines_replay_cuda_graphs(artifact, checkpoint, workdir, monkeypatch):
    static = compile_artifact(
        checkpoint,
        target="tensorrt",
        output_dir=workdir / "static",
        target_options={"precision": "fp32", "static": True},
    )
    replays = []
    replay = TrtModel._replay
    monkeypatch.setattr(TrtModel, "_replay", lambda self, feed: replays.append(self.name) or replay(self, feed))
    pipe = load_compiled(static, device="cuda")
    got = _images(pipe)
    assert replays.count("unet") == CALL["num_inference_steps"] and "vae_decoder" in replays
    assert np.abs(got - _images(load_compiled(artifact, device="cuda"))).max() < 2e-2
    with pytest.raises(PipelineArgumentError, match="outside the engine's optimization profile"):
        pipe("a red cube", height=64, width=64, **CALL)


@pytest.mark.parametrize("preset", ["int8", "fp8"])
def test_quantized_engines_from_the_ptq_pass(preset, checkpoint, workdir, artifact):
    """modelopt Q/DQ U-Net -> strongly typed INT8 / FP8 engine (FP8 needs compute capability 8.9 or newer)."""
    pytest.importorskip("modelopt.torch.quantization")
    if preset == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 engines need compute capability >= 8.9")
    recipe = [{"preset": preset, "calib_prompts": 1, "calib_steps": 2, "resolution": 128}]
    root = compile_artifact(
        checkpoint, recipe=recipe, target="tensorrt", output_dir=workdir / preset, target_options={"precision": "fp16"}
    )
    manifest = json.loads((root / "manifest.json").read_text())
    (record,) = manifest["passes"]
    assert record["metrics"]["sqnr_db"] > 15.0
    got = _images(load_compiled(root, device="cuda"))
    expected = _images(load_compiled(artifact, device="cuda"))
    assert got.shape == expected.shape and np.isfinite(got).all()
    psnr = 10 * np.log10(1.0 / max(np.mean((got - expected) ** 2), 1e-12))
    print(f"{preset} engine vs fp32 engine images: PSNR {psnr:.1f} dB")
    assert psnr > 15.0


def test_refit_switches_loras_like_the_onnx_target(checkpoint, workdir):
    """Engines built with refit=true (static: the CUDA-graph path) switched to a LoRA give the onnx target's images
    with the same LoRA switched; set_loras([]) gives the artifact's own images back. The fake TensorRT checks only
    what is handed to the refitter (tests/integration/test_runtime_lora.py); this checks what TensorRT does."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: its conftest is not loaded here
    from lora_files import make_full_lora

    lora = make_full_lora(checkpoint, workdir / "lora", seed=5)
    refit = compile_artifact(
        checkpoint,
        target="tensorrt",
        output_dir=workdir / "refit",
        target_options={"precision": "fp32", "static": True, "refit": True},
    )
    pipe = load_compiled(refit, device="cuda")
    base = _images(pipe)
    reference = compile_pipeline(checkpoint, target="onnx", output_dir=workdir / "onnx-refit", device="cpu")
    reference.set_loras([(lora, 0.7)])
    pipe.set_loras([(lora, 0.7)])
    got = _images(pipe)
    assert np.abs(got - base).max() > 5e-2  # the LoRA changed the engines' output
    assert np.abs(got - _images(reference)).max() < 2e-2
    pipe.set_loras([])
    assert np.abs(_images(pipe) - base).max() < 1e-3  # the artifact's own weights (fp32 kernels, same tactics)
