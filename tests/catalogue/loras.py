"""LoRA files that do not fit, given to `generate --lora` (run-time fusion on a torch artifact) and to the
`merge_lora` pass: one line each, nothing generated. Without care diffusers logs the whole state-dict error
(a line per tensor) and peft warns about the target modules the file lacks."""

from __future__ import annotations

import struct

import torch
from safetensors.torch import save_file

from catalogue import Case, fifo, link_loop

GENERATES = ("sdcompiler.runtime.generate",)
LOWERS = ("sdcompiler.targets.torch_target.TorchTarget.lower",)
# modules of the tiny SD1.5 U-Net, with the widths an SDXL-sized U-Net has there (tiny SD1.5: 32 / 64 channels)
WIDER = {
    "down_blocks.1.attentions.0.proj_in": (64, 64),
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64),
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (2048, 64),
    "down_blocks.1.resnets.0.conv1": (64, 64),
}


def _lora(path, modules: dict[str, tuple[int, int]], rank: int = 4):
    """A LoRA in the diffusers / peft layout (`unet.<module>.lora_A.weight`, `...lora_B.weight`)."""
    tensors = {}
    for module, (fan_in, fan_out) in modules.items():
        tensors[f"unet.{module}.lora_A.weight"] = torch.randn(rank, fan_in)
        tensors[f"unet.{module}.lora_B.weight"] = torch.randn(fan_out, rank)
    save_file(tensors, str(path))
    return path


def _sdxl_sized(tmp):
    return _lora(tmp / "sdxl_lora.safetensors", WIDER)


def _foreign_keys(tmp):
    return _lora(tmp / "other_lora.safetensors", {"middle.block.that.is.not.here": (8, 8)})


def _flipped(tmp, reverse: bool):
    path = _lora(tmp / "damaged.safetensors", {"down_blocks.1.attentions.0.proj_in": (32, 32)})
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    if reverse:
        data[8 : 8 + length] = data[8 : 8 + length][::-1]
    else:
        data[2] ^= 0x01  # the header length now overruns the file
    path.write_bytes(bytes(data))
    return path


def _generate(tmp, inputs, lora) -> list[str]:
    return ["generate", str(inputs.torch_artifact), "--prompt", "a cat", "--steps", "1", "--lora", str(lora),
            "--out", str(tmp / "image.png")]  # fmt: skip


def _merge(tmp, inputs, lora) -> list[str]:
    recipe = tmp / "recipe.yaml"
    recipe.write_text(f"- pass: merge_lora\n  path: {lora}\n")
    out = str(tmp / "out")
    return ["compile", str(inputs.checkpoint), "--recipe", str(recipe), "--target", "torch", "--out", out]


CASES = [
    Case(
        "lora sdxl-sized at run time",
        lambda tmp, inputs: _generate(tmp, inputs, _sdxl_sized(tmp)),
        ("does not fit", "sd15", "size mismatch", "architecture"),
        unreached=GENERATES,
    ),
    Case(
        "lora keys match nothing at run time",
        lambda tmp, inputs: _generate(tmp, inputs, _foreign_keys(tmp)),
        ("does not fit", "architecture"),
        unreached=GENERATES,
    ),
    Case(
        "lora header reversed at run time",
        lambda tmp, inputs: _generate(tmp, inputs, _flipped(tmp, reverse=True)),
        ("corrupt",),
        unreached=GENERATES,
    ),
    Case(
        "lora header length flipped at run time",
        lambda tmp, inputs: _generate(tmp, inputs, _flipped(tmp, reverse=False)),
        ("corrupt",),
        unreached=GENERATES,
    ),
    Case(
        "lora symlink loop",
        lambda tmp, inputs: _generate(tmp, inputs, link_loop(tmp, "a.safetensors", "b.safetensors")),
        ("loops",),
        unreached=GENERATES,
    ),
    Case(
        "lora fifo",
        lambda tmp, inputs: _generate(tmp, inputs, fifo(tmp, "lora.safetensors")),
        ("FIFO",),
        unreached=GENERATES,
    ),
    Case(
        "lora sdxl-sized in merge_lora",
        lambda tmp, inputs: _merge(tmp, inputs, _sdxl_sized(tmp)),
        ("does not fit", "size mismatch"),
        unreached=LOWERS,
    ),
    Case(
        "lora header reversed in merge_lora",
        lambda tmp, inputs: _merge(tmp, inputs, _flipped(tmp, reverse=True)),
        ("corrupt",),
        unreached=LOWERS,
    ),
]
