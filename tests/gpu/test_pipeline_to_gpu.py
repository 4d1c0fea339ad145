"""`CompiledPipeline.to("cuda")`: a pipeline loaded on the CPU moves to the GPU and gives the same images (needs
diffusers; skipped where the GPU machine lacks it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")


def test_to_cuda_and_back(tmp_path):
    from sdcompiler import compile_pipeline, load_compiled
    from sdcompiler.testing import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "ckpt", "sd15", "tiny", seed=0)
    compile_pipeline(checkpoint, recipe="none", target="torch", output_dir=tmp_path / "out", device="cpu")
    pipe = load_compiled(tmp_path / "out", device="cpu")
    call = dict(prompt="a fox", num_inference_steps=3, guidance_scale=5.0, output_type="np")
    on_cpu = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert pipe.to("cuda") is pipe and pipe.device == "cuda"
    assert next(pipe.unet.parameters()).is_cuda
    on_gpu = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(on_gpu - on_cpu).max() < 1e-2  # TF32 / kernel differences, same weights and noise
    assert pipe.to("cpu").device == "cpu"
