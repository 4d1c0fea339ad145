"""The student U-Net of the structural passes `prune_blocks` (BK-SDM, `prune_blocks.py`) and `slim_unet`
(KOALA, `slim_unet.py`): fewer blocks, weights inherited by key.

Both derive a smaller `UNet2DConditionModel` config from the teacher's and
fill the student with the teacher's tensors through one documented mapping:

- down stage i, pair j (ResNet j, Transformer j): student keeps the *first*
  `layers_per_block` pairs, `down_blocks.i.{resnets,attentions}.j <- same`;
- up stage i keeps `layers_per_block + 1` pairs: the first `layers_per_block`
  and the *last* (BK-SDM removes the middle pair of every up stage:
  student 0 <- 0, 1 <- 2);
- `drop_deepest_stage` (BK-tiny) removes the deepest stage, which in SD 1.x /
  2.x is attention-free: `down_blocks.0-2 <- 0-2`, `up_blocks.k <- k+1`; the
  new last down stage loses its downsampler, as diffusers builds it;
- transformer depth d_t -> d_s (KOALA: SDXL stage depths 10 -> 6 or 5):
  student block k takes teacher block `round(k (d_t - 1) / (d_s - 1))`, i.e.
  evenly spaced including the first and the last (for 10 -> 6: 0,2,4,5,7,9);
- `drop_mid_block` removes the mid-block (BK-small/tiny, KOALA-700M);
- everything else (conv_in, time and added embeddings, samplers, conv_out)
  is copied by key.

Skip-connection channel counts line up exactly under this mapping (the
student's skips are a subset of the teacher's with the same widths), so every
inherited tensor keeps its shape; a mismatch is an error, never a silent
re-initialisation. The student's parameters *are* the teacher's tensors
(assigned, not copied), so pruning a full SDXL U-Net needs no extra memory.

The student stays a plain diffusers `UNet2DConditionModel`, so diffusers
pipelines, ONNX export and `load_compiled` take it as is. `restructure` with
`inherit=False` (both passes' `rebuild`) builds the same structure without
weights.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from sdcompiler.passes.errors import PassError


def student_config(
    teacher: dict[str, Any],
    layers_per_block: int | None,
    drop_mid_block: bool,
    drop_deepest_stage: bool = False,
    transformer_depth: tuple[int, ...] | None = None,
) -> dict:
    """The pruned U-Net's diffusers config, derived from the teacher's."""
    config = {k: v for k, v in teacher.items() if not k.startswith("_")}
    stages = len(config["down_block_types"])
    if layers_per_block is not None:
        if layers_per_block < 1:
            raise PassError(f"layers_per_block={layers_per_block} must be at least 1")
        teacher_layers = _per_stage(config["layers_per_block"], stages)
        if any(layers_per_block > t for t in teacher_layers):
            raise PassError(f"layers_per_block={layers_per_block} exceeds the teacher's {teacher_layers}")
        config["layers_per_block"] = layers_per_block
    if drop_mid_block:
        config["mid_block_type"] = None
    if transformer_depth is not None:
        teacher_depth = _per_stage(config.get("transformer_layers_per_block", 1), stages)
        if len(transformer_depth) != stages:
            raise PassError(f"transformer_depth has {len(transformer_depth)} entries for {stages} stages")
        if any(s < 1 or s > t for s, t in zip(transformer_depth, teacher_depth)):
            raise PassError(
                f"transformer_depth {list(transformer_depth)} must lie between 1 and the teacher's "
                f"{teacher_depth} per stage"
            )
        config["transformer_layers_per_block"] = list(transformer_depth)
        config.pop("reverse_transformer_layers_per_block", None)
    if drop_deepest_stage:
        if config["down_block_types"][-1] != "DownBlock2D" or config["up_block_types"][0] != "UpBlock2D":
            raise PassError(
                "drop_deepest_stage removes an attention-free deepest stage (SD 1.x/2.x); "
                f"this U-Net's is {config['down_block_types'][-1]}"
            )
        for key in ("block_out_channels", "down_block_types"):
            config[key] = list(config[key])[:-1]
        config["up_block_types"] = list(config["up_block_types"])[1:]
        for key in (
            "attention_head_dim",
            "num_attention_heads",
            "transformer_layers_per_block",
            "layers_per_block",
            "cross_attention_dim",
            "only_cross_attention",
        ):
            if isinstance(config.get(key), (list, tuple)):
                config[key] = list(config[key])[:-1]
    return config


def _per_stage(value, stages: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * stages


_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$")
_STAGE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(.*)$")


def _transformer_depths(unet: torch.nn.Module) -> dict[str, int]:
    return {
        name: len(module.transformer_blocks)
        for name, module in unet.named_modules()
        if hasattr(module, "transformer_blocks")
    }


def teacher_key_map(teacher: torch.nn.Module, student: torch.nn.Module, stage_offset: int) -> dict[str, str]:
    """Student parameter name -> teacher parameter name, per the mapping in the module docstring."""
    t_depth, s_depth = _transformer_depths(teacher), _transformer_depths(student)
    t_layers = {n: len(m) for n, m in teacher.named_modules() if n.endswith((".resnets",))}
    s_layers = {n: len(m) for n, m in student.named_modules() if n.endswith((".resnets",))}
    mapping = {}
    for key in student.state_dict():
        source = key
        if match := _BLOCK.match(key):
            kind, stage, part, j, rest = match.groups()
            t_stage = int(stage) + (stage_offset if kind == "up_blocks" else 0)
            j = int(j)
            if kind == "up_blocks":
                n_s, n_t = s_layers[f"{kind}.{stage}.resnets"], t_layers[f"{kind}.{t_stage}.resnets"]
                j = j if j < n_s - 1 else n_t - 1
            source = f"{kind}.{t_stage}.{part}.{j}.{rest}"
        elif match := _STAGE.match(key):
            kind, stage, rest = match.groups()
            source = f"{kind}.{int(stage) + (stage_offset if kind == 'up_blocks' else 0)}.{rest}"
        source = _map_transformer_block(key, source, s_depth, t_depth)
        mapping[key] = source
    return mapping


def _map_transformer_block(student_key: str, teacher_key: str, s_depth: dict, t_depth: dict) -> str:
    if ".transformer_blocks." not in student_key:
        return teacher_key
    s_prefix, s_rest = student_key.split(".transformer_blocks.", 1)
    t_prefix, _ = teacher_key.split(".transformer_blocks.", 1)
    k, rest = s_rest.split(".", 1)
    d_s, d_t = s_depth[s_prefix], t_depth[t_prefix]
    source = int(k) if d_s == d_t else round(int(k) * (d_t - 1) / max(d_s - 1, 1))
    return f"{t_prefix}.transformer_blocks.{source}.{rest}"


def build_empty_unet(config: dict[str, Any]) -> UNet2DConditionModel:
    """A U-Net of `config` whose parameters live on the meta device (buffers are real).

    Its parameters get their device and dtype from the tensors assigned to them.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return UNet2DConditionModel.from_config(config)


def restructure(pipe, config: dict[str, Any], stage_offset: int, inherit: bool) -> dict[str, float]:
    """Replace `pipe.unet` by a U-Net of `config`; with `inherit`, assign the teacher's tensors to it."""
    teacher = pipe.unet
    student = build_empty_unet(config)
    if not inherit:
        pipe.register_modules(unet=student)
        return {}
    mapping = teacher_key_map(teacher, student, stage_offset)
    source_state = teacher.state_dict()
    state = {}
    for key, shape in ((k, v.shape) for k, v in student.state_dict().items()):
        source = mapping[key]
        if source not in source_state:
            raise PassError(f"no teacher tensor {source} for student {key}")
        if source_state[source].shape != shape:
            raise PassError(
                f"teacher {source} {tuple(source_state[source].shape)} does not fit student {key} {tuple(shape)}"
            )
        state[key] = source_state[source]
    student.load_state_dict(state, strict=True, assign=True)
    student.train(teacher.training)
    pipe.register_modules(unet=student)
    kept = {v for v in mapping.values()}
    return {"inherited_tensors": len(state), "dropped_tensors": len(set(source_state) - kept)}
