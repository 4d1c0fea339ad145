"""Bad checkpoints given to `sdcompiler compile` (and `inspect`)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from catalogue import Case

UNET_LOADERS = ("sdcompiler.loading.load_checkpoint",)


def _compile(source: Path, tmp: Path, *extra: str) -> list[str]:
    return ["compile", str(source), "--recipe", "none", "--target", "torch", "--out", str(tmp / "out"), *extra]


def _safetensors(tmp: Path, payload: bytes) -> Path:
    path = tmp / "model.safetensors"
    path.write_bytes(payload)
    return path


def _header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _valid(tmp: Path) -> Path:
    path = tmp / "valid.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(64, 64)}, str(path))
    return path


def _truncated(tmp, inputs):
    data = _valid(tmp).read_bytes()
    return _compile(_safetensors(tmp, data[: len(data) // 2]), tmp)


def _lying_header(tmp, inputs):
    header = {"x": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}
    return _compile(_safetensors(tmp, _header(header, b"\0" * 64)), tmp)


def _overlapping(tmp, inputs):
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    return _compile(_safetensors(tmp, _header(header, b"\0" * 24)), tmp)


def _huge_header_length(tmp, inputs):
    return _compile(_safetensors(tmp, struct.pack("<Q", 1 << 60) + b"{}"), tmp)


def _pickle(tmp, inputs):
    path = tmp / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, path)
    return _compile(path, tmp)


def _model_index_garbage(tmp, inputs):
    folder = inputs.copy_checkpoint(tmp)
    (folder / "model_index.json").write_text("{not json")
    return _compile(folder, tmp)


def _depth_unet(tmp, inputs):
    folder = inputs.copy_checkpoint(tmp)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["in_channels"] = 5  # depth-to-image (inpainting U-Nets, 9 channels, are supported)
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    return _compile(folder, tmp)


def _plain_folder(tmp, inputs):
    (tmp / "plain").mkdir()
    (tmp / "plain" / "readme.txt").write_text("hello")
    return _compile(tmp / "plain", tmp)


def _unknown_suffix(tmp, inputs):
    (tmp / "model.txt").write_text("weights")
    return _compile(tmp / "model.txt", tmp)


def _no_unet_in_file(tmp, inputs):
    path = tmp / "model.safetensors"
    save_file({"cond_stage_model.x": torch.zeros(4)}, str(path))
    return _compile(path, tmp)


CASES = [
    Case("checkpoint missing", lambda tmp, inputs: _compile(tmp / "nope", tmp), ("does not exist",)),
    Case("checkpoint zero-byte safetensors", lambda tmp, inputs: _compile(_safetensors(tmp, b""), tmp), ("corrupt",)),
    Case(
        "checkpoint garbage safetensors",
        lambda tmp, inputs: _compile(_safetensors(tmp, bytes(range(256)) * 16), tmp),
        ("corrupt",),
    ),
    Case("checkpoint truncated safetensors", _truncated, ("truncated",)),
    Case("checkpoint header lies about sizes", _lying_header, ("corrupt",)),
    Case("checkpoint overlapping tensors", _overlapping, ("corrupt",)),
    Case("checkpoint header length absurd", _huge_header_length, ("corrupt",)),
    Case("checkpoint pickle without opt-in", _pickle, ("allow-pickle",)),
    Case("checkpoint model_index not json", _model_index_garbage, ("model_index.json",)),
    Case("checkpoint unsupported architecture", _depth_unet, ("unsupported architecture",)),
    Case("checkpoint plain folder", _plain_folder, ("not a diffusers pipeline folder",)),
    Case("checkpoint unknown suffix", _unknown_suffix, ("suffix",)),
    Case("checkpoint without unet tensors", _no_unet_in_file, ("u-net",)),
]
