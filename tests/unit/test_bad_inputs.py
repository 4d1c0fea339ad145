"""Every bad checkpoint gives a one-line CheckpointError from compile_pipeline and leaves no output behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdcompiler import compile_pipeline
from sdcompiler.errors import CheckpointError
from sdcompiler.testing import make_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("good") / "sd15", "sd15", "tiny")


def _missing(tmp: Path, good: Path) -> Path:
    return tmp / "does-not-exist"


def _not_a_pipeline(tmp: Path, good: Path) -> Path:
    folder = tmp / "plain"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    return folder


def _truncated(tmp: Path, good: Path) -> Path:
    file = tmp / "model.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(1024, 64)}, str(file))
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    return file


def _corrupt(tmp: Path, good: Path) -> Path:
    file = tmp / "model.safetensors"
    file.write_bytes(torch.randint(0, 255, (4096,), dtype=torch.uint8).numpy().tobytes())
    return file


def _pickle(tmp: Path, good: Path) -> Path:
    file = tmp / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, file)
    return file


def _unsupported(tmp: Path, good: Path) -> Path:
    folder = tmp / "depth"
    shutil.copytree(good, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["in_channels"] = 5  # a depth-to-image U-Net (inpainting ones, 9, are supported)
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    return folder


CASES = {
    "missing path": (_missing, "does not exist"),
    "folder that is not a pipeline": (_not_a_pipeline, "not a diffusers pipeline folder"),
    "truncated safetensors": (_truncated, "truncated or corrupt"),
    "corrupt safetensors": (_corrupt, "truncated or corrupt"),
    "pickle without opt-in": (_pickle, "allow_pickle=True"),
    "unsupported architecture": (_unsupported, "unsupported architecture"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("target", ["onnx", "torch"])
def test_bad_checkpoint_fails_cleanly(case, target, good, tmp_path):
    make, words = CASES[case]
    source = make(tmp_path, good)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as exc:
        compile_pipeline(source, "none", target, out, show_progress=False)
    message = str(exc.value)
    assert words in message and "\n" not in message, message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
