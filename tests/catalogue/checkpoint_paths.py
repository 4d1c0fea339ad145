"""Checkpoint paths that are not a folder or a regular file, and folders whose contents diffusers would trip on
(given to `sdcompiler compile` and `inspect`): each named for what it is, before any model is built."""

from __future__ import annotations

import json
import struct

from catalogue import Case, fifo, link_loop

BUILDS = ("sdcompiler.loading._pipeline_class",)  # reached right before diffusers builds the pipeline


def _compile(source, tmp, *extra: str) -> list[str]:
    return ["compile", str(source), "--recipe", "none", "--target", "torch", "--out", str(tmp / "out"), *extra]


def _fifo(tmp, inputs):
    return _compile(fifo(tmp, "model.safetensors"), tmp)


def _loop(tmp, inputs):
    return _compile(link_loop(tmp), tmp)


def _broken_link(tmp, inputs):
    (tmp / "model.safetensors").symlink_to(tmp / "gone.safetensors")
    return _compile(tmp / "model.safetensors", tmp)


def _edited_index(tmp, inputs, component: str, entry) -> list[str]:
    folder = inputs.copy_checkpoint(tmp)
    index = json.loads((folder / "model_index.json").read_text())
    index[component] = entry
    (folder / "model_index.json").write_text(json.dumps(index))
    return _compile(folder, tmp)


def _no_unet_weights(tmp, inputs):
    folder = inputs.copy_checkpoint(tmp)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    return _compile(folder, tmp)


def _flipped_component_header(tmp, inputs):
    """A byte flipped in the 8-byte header length of the U-Net's weights: the header no longer fits the file."""
    folder = inputs.copy_checkpoint(tmp)
    file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(file.read_bytes())
    data[3] ^= 0xFF
    file.write_bytes(bytes(data))
    return _compile(folder, tmp)


def _reversed_component_header(tmp, inputs):
    """The text encoder's header JSON bytes reversed (same length, so only the JSON parse catches it)."""
    folder = inputs.copy_checkpoint(tmp)
    file = folder / "text_encoder" / "model.safetensors"
    data = bytearray(file.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + length] = data[8 : 8 + length][::-1]
    file.write_bytes(bytes(data))
    return _compile(folder, tmp)


CASES = [
    Case("checkpoint fifo", _fifo, ("FIFO", "not a regular file")),
    Case("checkpoint /dev/zero", lambda tmp, inputs: _compile("/dev/zero", tmp), ("character device",)),
    Case("checkpoint symlink loop", _loop, ("loops",)),
    Case("checkpoint broken symlink", _broken_link, ("broken symbolic link",)),
    Case(
        "checkpoint component class os.system",
        lambda tmp, inputs: _edited_index(tmp, inputs, "unet", ["os", "system"]),
        ("os.system", "'unet'", "diffusers or transformers"),
        unreached=BUILDS,
    ),
    Case(
        "checkpoint component class unknown to diffusers",
        lambda tmp, inputs: _edited_index(tmp, inputs, "vae", ["diffusers", "NoSuchAutoencoder"]),
        ("diffusers.NoSuchAutoencoder", "'vae'"),
        unreached=BUILDS,
    ),
    Case(
        "checkpoint component entry malformed",
        lambda tmp, inputs: _edited_index(tmp, inputs, "text_encoder", ["transformers"]),
        ("'text_encoder'", "diffusers or transformers"),
        unreached=BUILDS,
    ),
    Case("checkpoint unet weights missing", _no_unet_weights, ("unet", "no weight file"), unreached=BUILDS),
    Case("checkpoint unet header length flipped", _flipped_component_header, ("unet/", "corrupt"), unreached=BUILDS),
    Case(
        "checkpoint text encoder header reversed",
        _reversed_component_header,
        ("text_encoder/", "corrupt"),
        unreached=BUILDS,
    ),
    Case("inspect fifo", lambda tmp, inputs: ["inspect", str(_fifo(tmp, inputs)[1])], ("FIFO",)),
]
