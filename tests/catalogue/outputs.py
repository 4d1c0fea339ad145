"""Output paths `compile`, `generate` and `export-server` cannot write: refused before any model is loaded or
any pass runs. Read-only places are ones no user (root included) can write: /proc and /sys (chmod does not stop
root, so a chmod-based case would pass as root without refusing anything); a mount point stands for a busy
folder (it cannot be renamed, and an output is swapped in by renaming)."""

from __future__ import annotations

import struct

from catalogue import Case, fifo, link_loop

LOADS = ("sdcompiler.loading.load_checkpoint",)
ARTIFACT_LOADS = ("sdcompiler.load_compiled",)


def _compile(tmp, inputs, out) -> list[str]:
    return ["compile", str(inputs.checkpoint), "--recipe", "none", "--target", "torch", "--out", str(out)]


def _generate(tmp, inputs, out, artifact=None) -> list[str]:
    artifact = inputs.torch_artifact if artifact is None else artifact
    return ["generate", str(artifact), "--prompt", "a cat", "--steps", "1", "--out", str(out)]


def _file(tmp):
    (tmp / "notes.txt").write_text("mine")
    return tmp / "notes.txt"


def _damaged_artifact(tmp, inputs, reverse: bool):
    """A torch artifact whose U-Net weights have a reversed header JSON or a flipped header-length byte."""
    root = inputs.copy_artifact(tmp)
    file = root / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(file.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    if reverse:
        data[8 : 8 + length] = data[8 : 8 + length][::-1]
    else:
        data[4] ^= 0x01
    file.write_bytes(bytes(data))
    return _generate(tmp, inputs, tmp / "image.png", artifact=root)


CASES = [
    Case(
        "compile out in /proc",
        lambda tmp, inputs: _compile(tmp, inputs, "/proc/sdcompiler-out"),
        ("not writable",),
        unreached=LOADS,
    ),  # fmt: skip
    Case(
        "compile out in /sys",
        lambda tmp, inputs: _compile(tmp, inputs, "/sys/sdcompiler-out"),
        ("not writable",),
        unreached=LOADS,
    ),  # fmt: skip
    Case(
        "compile out a file in a read-only folder",
        lambda tmp, inputs: _compile(tmp, inputs, "/proc/version"),
        ("is a file",),
        unreached=LOADS,
    ),  # fmt: skip
    Case(
        "compile out below a file",
        lambda tmp, inputs: _compile(tmp, inputs, _file(tmp) / "out"),
        ("not a folder",),
        unreached=LOADS,
    ),  # fmt: skip
    Case(
        "compile out a mount point",
        lambda tmp, inputs: _compile(tmp, inputs, "/proc"),
        ("mount point",),
        unreached=LOADS,
    ),  # fmt: skip
    Case(
        "compile out /dev/null",
        lambda tmp, inputs: _compile(tmp, inputs, "/dev/null"),
        ("character device",),
        unreached=LOADS,
    ),  # fmt: skip
    Case("compile out a fifo", lambda tmp, inputs: _compile(tmp, inputs, fifo(tmp, "out")), ("FIFO",), unreached=LOADS),
    Case(
        "compile out a symlink loop",
        lambda tmp, inputs: _compile(tmp, inputs, link_loop(tmp)),
        ("loops",),
        unreached=LOADS,
    ),  # fmt: skip
    Case(
        "generate out a folder",
        lambda tmp, inputs: _generate(tmp, inputs, tmp),
        ("is a folder", "image.png"),
        unreached=ARTIFACT_LOADS,
    ),  # fmt: skip
    Case(
        "generate out unknown suffix",
        lambda tmp, inputs: _generate(tmp, inputs, tmp / "image.xyz"),
        ("suffix",),
        unreached=ARTIFACT_LOADS,
    ),  # fmt: skip
    Case(
        "generate out in /proc",
        lambda tmp, inputs: _generate(tmp, inputs, "/proc/image.png"),
        ("not writable",),
        unreached=ARTIFACT_LOADS,
    ),  # fmt: skip
    Case(
        "generate out below a file",
        lambda tmp, inputs: _generate(tmp, inputs, _file(tmp) / "image.png"),
        ("not a folder",),
        unreached=ARTIFACT_LOADS,
    ),  # fmt: skip
    Case(
        "generate artifact a symlink loop",
        lambda tmp, inputs: _generate(tmp, inputs, tmp / "i.png", link_loop(tmp)),
        ("loops",),
    ),  # fmt: skip
    Case(
        "generate artifact header reversed",
        lambda tmp, inputs: _damaged_artifact(tmp, inputs, reverse=True),
        ("damaged", "recompile"),
        unreached=("sdcompiler.runtime.generate",),
    ),  # fmt: skip
    Case(
        "generate artifact header length flipped",
        lambda tmp, inputs: _damaged_artifact(tmp, inputs, reverse=False),
        ("damaged", "recompile"),
        unreached=("sdcompiler.runtime.generate",),
    ),  # fmt: skip
    Case(
        "export-server out a mount point",
        lambda tmp, inputs: ["export-server", str(inputs.onnx_artifact), "--out", "/proc"],
        ("mount point",),
    ),  # fmt: skip
    Case(
        "export-server artifact a symlink loop",
        lambda tmp, inputs: ["export-server", str(link_loop(tmp)), "--out", str(tmp / "repo")],
        ("loops",),
    ),  # fmt: skip
]
