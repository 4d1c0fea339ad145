"""LoRA files for tests: random LoRAs for the U-Net and every text encoder, saved as diffusers' trainers save
them, and the same LoRA in the kohya / A1111 layout (used by test_merge_lora and test_runtime_lora)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdcompiler.loading import load_checkpoint

# What kohya's LoRA / LoCon trainers target: attention, the transformer's projections and feed-forward, the resnets'
# convolutions and time projection, the resamplers; in the text encoders, attention and MLP. (Only the first two
# transformer blocks of SDXL's 10-deep stage: every kind of module in every block, at a third of the load time.)
UNET_MODULES = (
    r".*(transformer_blocks\.[01]\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"
    r"|proj_in|proj_out|conv1|conv2|time_emb_proj|conv_shortcut|(down|up)samplers\.0\.conv)"
)
TEXT_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
ENCODERS = {"sd15": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}
RANK, ALPHA = 4, 8  # alpha != rank: the alpha / rank factor has to be read from the file, not assumed


def make_full_lora(checkpoint: Path, out: Path, seed: int) -> Path:
    """A random LoRA (A and B non-zero) for the U-Net and every text encoder, saved as diffusers' trainers save it.

    Diffusers keeps `lora_alpha` in the safetensors metadata (`*_lora_adapter_metadata`); the keys are peft's
    `unet.<module>.lora_A.weight` / `text_encoder.<module>.lora_B.weight`.
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = load_checkpoint(checkpoint).pipeline
    layers, metadata = {}, {}
    with torch.random.fork_rng(devices=[]):  # peft draws A and B from the global generator
        torch.manual_seed(seed)
        for name in ("unet", *ENCODERS["sdxl" if hasattr(pipe, "text_encoder_2") else "sd15"]):
            config = LoraConfig(
                r=RANK,
                lora_alpha=ALPHA,
                init_lora_weights=False,
                target_modules=UNET_MODULES if name == "unet" else TEXT_MODULES,
            )
            getattr(pipe, name).add_adapter(config)
            layers[f"{name}_lora_layers"] = get_peft_model_state_dict(getattr(pipe, name))
            metadata[f"{name}_lora_adapter_metadata"] = config.to_dict()
    type(pipe).save_lora_weights(out, **layers, **metadata, safe_serialization=True)
    return out / "pytorch_lora_weights.safetensors"


def _sgm_module(module: str, layers_per_block: int) -> str:
    """A diffusers U-Net module path as kohya names it for SDXL, which it trains on the sgm (LDM) U-Net:
    down_blocks.1.attentions.0.proj_in -> input_blocks.4.1.proj_in, resnets.0.conv1 -> in_layers.2, ..."""
    per_block = layers_per_block + 1
    resnet = {
        "conv1": "in_layers.2",
        "conv2": "out_layers.3",
        "time_emb_proj": "emb_layers.1",
        "conv_shortcut": "skip_connection",
    }

    def inner(kind: str, rest: str) -> str:
        if kind == "attentions":
            return f"1.{rest}"
        head, _, tail = rest.partition(".")
        return "0." + resnet.get(head, head) + (f".{tail}" if tail else "")

    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        return f"input_blocks.{1 + int(m[1]) * per_block + int(m[3])}." + inner(m[2], m[4])
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"input_blocks.{(int(m[1]) + 1) * per_block}.0.op"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", module):
        index = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[m[1], m[2]]
        return f"middle_block.{index}." + inner(m[1], m[3]).split(".", 1)[1]
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        return f"output_blocks.{int(m[1]) * per_block + int(m[3])}." + inner(m[2], m[4])
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):  # SDXL: only cross-attention
        return f"output_blocks.{int(m[1]) * per_block + layers_per_block}.2.conv"  # up blocks upsample
    raise AssertionError(f"no sgm name for {module}")


def to_kohya(file: Path, out: Path, arch: str, layers_per_block: int) -> Path:
    """The same LoRA in the kohya / A1111 layout: lora_unet_* / lora_te_* (SDXL: lora_te1_*, lora_te2_* and sgm
    U-Net names) with .lora_down.weight, .lora_up.weight and .alpha."""
    prefixes = {
        "unet": "lora_unet_",
        "text_encoder": "lora_te_" if arch == "sd15" else "lora_te1_",
        "text_encoder_2": "lora_te2_",
    }
    kohya = {}
    for key, value in load_file(str(file)).items():
        component, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        if component == "unet" and arch == "sdxl":
            module = _sgm_module(module, layers_per_block)
        name = prefixes[component] + module.replace(".", "_")
        kohya[f"{name}.lora_down.weight" if kind.startswith("A") else f"{name}.lora_up.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(float(ALPHA))
    save_file(kohya, str(out))
    return out


def hub_offline(monkeypatch) -> None:
    """`HF_HUB_OFFLINE=1` as a user sets it before starting Python: huggingface_hub reads the variable at import
    time and diffusers copies the value into its modules (`from huggingface_hub.constants import HF_HUB_OFFLINE`),
    so besides the variable every loaded copy is patched."""
    import sys

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, module in list(sys.modules.items()):
        library = name.split(".")[0] in ("huggingface_hub", "diffusers", "transformers")
        if library and isinstance(getattr(module, "HF_HUB_OFFLINE", None), bool):
            monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
