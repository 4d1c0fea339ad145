"""`sdcompiler inspect` tells a Triton model repository from a checkpoint, and the checkpoint's stored U-Net dtype is
read from safetensors headers (what compile's fp16 -> fp32 notice relies on)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from sdcompiler.cli import main
from sdcompiler.loading import unet_weights_dtype


def test_inspect_names_a_triton_repository(tmp_path, capsys):
    repo = tmp_path / "repo"
    for name, backend in (("unet", 'backend: "onnxruntime"'), ("pipeline", 'backend: "python"')):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(f'name: "{name}"\n{backend}\nmax_batch_size: 0\n')
    assert main(["inspect", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "a Triton Inference Server model repository with 2 model(s)" in out
    assert "unet" in out and "onnxruntime" in out and "python" in out and "tritonserver --model-repository" in out
    assert main(["inspect", str(repo), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "triton_model_repository"
    assert info["models"]["unet"] == {"backend": "onnxruntime", "versions": ["1"]}


def test_unet_weights_dtype_from_headers(tmp_path):
    single = tmp_path / "model.safetensors"
    tensors = {f"model.diffusion_model.w{i}": torch.zeros(2, dtype=torch.float16) for i in range(3)}
    tensors["model.diffusion_model.bias"] = torch.zeros(2)
    tensors["cond_stage_model.x"] = torch.zeros(2, dtype=torch.bfloat16)  # not the U-Net: not counted
    tensors["cond_stage_model.y"] = torch.zeros(2, dtype=torch.bfloat16)
    tensors["cond_stage_model.z"] = torch.zeros(2, dtype=torch.bfloat16)
    tensors["cond_stage_model.v"] = torch.zeros(2, dtype=torch.bfloat16)
    save_file(tensors, str(single))
    assert unet_weights_dtype(single) == "fp16"
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    save_file({"conv.weight": torch.zeros(2, dtype=torch.bfloat16)}, str(folder / "unet" / "m.safetensors"))
    assert unet_weights_dtype(folder) == "bf16"
    (tmp_path / "empty").mkdir()
    assert unet_weights_dtype(tmp_path / "empty") is None
