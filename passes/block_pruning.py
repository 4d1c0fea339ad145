"""Block pruning (BK-SDM) and U-Net slimming (KOALA): fewer blocks, weights inherited by key.

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
pipelines, ONNX export and `load_compiled` take it as is. `rebuild` builds the
same structure without weights.

ME-CondConv inheritance (A-SDM; opt-in: `prune_blocks` with
`condconv_experts: N`, N >= 2; 0, the default, is pure BK-SDM). After the
student is built and filled as above, the `conv2` of the kept ResNet next to
each removed part becomes a `CondConv2d` (`condconv.py`) whose expert 0 is
that conv and whose other experts are the `conv2` of the removed ResNets,
so the knowledge of the pruned blocks stays in the model:

- down stage i that lost ResNets (teacher j >= layers_per_block): target
  `down_blocks.i.resnets[-1].conv2` (the last kept ResNet); candidates: the
  teacher's `down_blocks.i.resnets.j.conv2` for the removed j, in order;
- up stage i that lost ResNets (the teacher's middle ones): target the
  student ResNet that precedes them, `up_blocks.i.resnets[layers_per_block-1]`
  (inherited from teacher index layers_per_block - 1); candidates: the
  teacher's removed middle `resnets.j.conv2` of that (offset) stage, in order;
- `drop_mid_block`: the mid-block's `resnets.k.conv2` are appended to the
  candidates of the student's last down stage's last ResNet `conv2` (the
  same target as above when that stage lost ResNets; a new target if not);
- `drop_deepest_stage`: the removed stage's `conv2`s (its down stage's
  ResNets, then its up stage's) are appended to the same target's candidates.

Per target, candidates in exactly that order (same stage, mid-block, deepest
stage); only convs identical to the kept conv in weight shape, stride,
padding, dilation and bias are used (the others are skipped); the first N-1
are kept. `CondConv2d.from_convs([kept, *candidates], num_experts=N)` pads a
short list with copies of the kept conv and starts the routing at
sigmoid(+-g), g = `condconv_primary_gate` (10): within ~1e-4 of the pure
student. Training caveat: AdamW moves a routing logit by at most about lr per
step, so from g = 10 the extra experts keep a weight ~sigmoid(-10) for any
short budget (tiny-model distill at 40-200 steps: the same SQNR as pure
BK-SDM); a smaller g or a larger routing-head lr is needed for them to act.
A target with no usable
candidate stays a plain conv. The plan depends only on the module structure
(names and shapes), so `rebuild` (teacher and student on meta) makes the same
`CondConv2d`s in the same places and the artifact's weights load strictly.
Record metrics: `condconv_modules` (convs replaced) and `condconv_params`
(parameters added: the extra experts and the routing heads).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from sdcompiler.passes.base import Pass, PassContext, register_pass
from sdcompiler.passes.config import PassConfig
from sdcompiler.passes.errors import PassError


@dataclass(frozen=True)
class PruneBlocksConfig(PassConfig):
    """BK-SDM block removal. Presets: bk-base (1 pair per down stage), bk-small (+ no mid-block),
    bk-tiny (+ no deepest stage)."""

    layers_per_block: int | None = None  # (ResNet, Transformer) pairs kept per down stage; up stages keep one more
    drop_mid_block: bool = False
    drop_deepest_stage: bool = False
    # ME-CondConv (A-SDM): 0 = off (pure BK-SDM); N >= 2 = the conv2 next to each removed part becomes a
    # CondConv2d of N experts inherited from the removed ResNets' conv2 (see the module docstring).
    condconv_experts: int = 0
    condconv_primary_gate: float = 10.0  # routing bias +g for the kept expert, -g for the others


@dataclass(frozen=True)
class SlimUNetConfig(PassConfig):
    """KOALA slimming: fewer pairs per stage and shallower transformers. Presets: koala-1b, koala-700m (SDXL)."""

    layers_per_block: int | None = 1
    transformer_depth: tuple[int, ...] | None = None  # per stage; None keeps the teacher's
    drop_mid_block: bool = False


def student_config(teacher: dict[str, Any], layers_per_block: int | None, drop_mid_block: bool,
                   drop_deepest_stage: bool = False, transformer_depth: tuple[int, ...] | None = None) -> dict:
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
            raise PassError(f"transformer_depth {list(transformer_depth)} must lie between 1 and the teacher's "
                            f"{teacher_depth} per stage")
        config["transformer_layers_per_block"] = list(transformer_depth)
        config.pop("reverse_transformer_layers_per_block", None)
    if drop_deepest_stage:
        if config["down_block_types"][-1] != "DownBlock2D" or config["up_block_types"][0] != "UpBlock2D":
            raise PassError("drop_deepest_stage removes an attention-free deepest stage (SD 1.x/2.x); "
                            f"this U-Net's is {config['down_block_types'][-1]}")
        for key in ("block_out_channels", "down_block_types"):
            config[key] = list(config[key])[:-1]
        config["up_block_types"] = list(config["up_block_types"])[1:]
        for key in ("attention_head_dim", "num_attention_heads", "transformer_layers_per_block", "layers_per_block",
                    "cross_attention_dim", "only_cross_attention"):
            if isinstance(config.get(key), (list, tuple)):
                config[key] = list(config[key])[:-1]
    return config


def _per_stage(value, stages: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * stages


_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$")
_STAGE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(.*)$")


def _transformer_depths(unet: torch.nn.Module) -> dict[str, int]:
    return {name: len(module.transformer_blocks) for name, module in unet.named_modules()
            if hasattr(module, "transformer_blocks")}


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
            raise PassError(f"teacher {source} {tuple(source_state[source].shape)} does not fit student {key} "
                            f"{tuple(shape)}")
        state[key] = source_state[source]
    student.load_state_dict(state, strict=True, assign=True)
    student.train(teacher.training)
    pipe.register_modules(unet=student)
    kept = {v for v in mapping.values()}
    return {"inherited_tensors": len(state), "dropped_tensors": len(set(source_state) - kept)}


def condconv_plan(teacher: torch.nn.Module, student: torch.nn.Module, stage_offset: int,
                  num_experts: int) -> dict[str, list[str]]:
    """Student conv name -> teacher conv names of its extra experts (usable, at most N-1, in order).

    The rule is the module docstring's; it reads only names and shapes, so it gives the same plan for
    real and meta U-Nets.
    """
    candidates: dict[str, list[str]] = {}

    def add(target: str, sources: list[str]) -> None:
        candidates.setdefault(target, []).extend(sources)

    def conv2s(prefix: str, resnets, indices) -> list[str]:
        return [f"{prefix}.resnets.{j}.conv2" for j in indices if hasattr(resnets[j], "conv2")]

    last_target = None
    for i, block in enumerate(student.down_blocks):
        n_s, t_resnets = len(block.resnets), teacher.down_blocks[i].resnets
        target = f"down_blocks.{i}.resnets.{n_s - 1}.conv2"
        if len(t_resnets) > n_s:
            add(target, conv2s(f"down_blocks.{i}", t_resnets, range(n_s, len(t_resnets))))
        last_target = target
    for i, block in enumerate(student.up_blocks):
        t = i + stage_offset
        n_s, t_resnets = len(block.resnets), teacher.up_blocks[t].resnets
        if len(t_resnets) > n_s and n_s >= 2:  # student n_s - 1 <- teacher's last; n_s - 2 precedes the removed
            add(f"up_blocks.{i}.resnets.{n_s - 2}.conv2",
                conv2s(f"up_blocks.{t}", t_resnets, range(n_s - 1, len(t_resnets) - 1)))
    if student.mid_block is None and teacher.mid_block is not None:
        add(last_target, conv2s("mid_block", teacher.mid_block.resnets, range(len(teacher.mid_block.resnets))))
    if stage_offset:
        for k in range(len(teacher.down_blocks) - stage_offset, len(teacher.down_blocks)):
            resnets = teacher.down_blocks[k].resnets
            add(last_target, conv2s(f"down_blocks.{k}", resnets, range(len(resnets))))
        for k in range(stage_offset):
            resnets = teacher.up_blocks[k].resnets
            add(last_target, conv2s(f"up_blocks.{k}", resnets, range(len(resnets))))

    plan = {}
    for target, sources in candidates.items():
        kept = student.get_submodule(target)
        usable = [name for name in sources if _same_conv(kept, teacher.get_submodule(name))]
        if usable:
            plan[target] = usable[:num_experts - 1]
    return plan


def _same_conv(kept: torch.nn.Module, other: torch.nn.Module) -> bool:
    from sdcompiler.passes.condconv import _CONV_ATTRIBUTES

    return (isinstance(kept, torch.nn.Conv2d) and isinstance(other, torch.nn.Conv2d)
            and kept.weight.shape == other.weight.shape and (kept.bias is None) == (other.bias is None)
            and all(getattr(kept, a) == getattr(other, a) for a in _CONV_ATTRIBUTES))


def apply_condconv(teacher: torch.nn.Module, student: torch.nn.Module, stage_offset: int, num_experts: int,
                   primary_gate: float = 10.0) -> dict[str, float]:
    """Replace the planned student convs by `CondConv2d.from_convs` of the kept and the teacher's convs.

    On meta U-Nets (rebuild) this makes the same modules with meta parameters.
    """
    from sdcompiler.passes.condconv import CondConv2d

    plan = condconv_plan(teacher, student, stage_offset, num_experts)
    added = 0
    for target, sources in plan.items():
        kept = student.get_submodule(target)
        module = CondConv2d.from_convs([kept, *(teacher.get_submodule(name) for name in sources)],
                                       num_experts=num_experts, primary_gate=primary_gate)
        module.train(kept.training).requires_grad_(kept.weight.requires_grad)
        parent, _, attribute = target.rpartition(".")
        setattr(student.get_submodule(parent), attribute, module)
        added += sum(p.numel() for p in module.parameters()) - sum(p.numel() for p in kept.parameters())
    return {"condconv_modules": len(plan), "condconv_params": added,
            "condconv_inherited_experts": sum(len(s) for s in plan.values())}


def _offset(config: PruneBlocksConfig) -> int:
    return 1 if config.drop_deepest_stage else 0


@register_pass
class PruneBlocks(Pass):
    name = "prune_blocks"
    config_class = PruneBlocksConfig
    stage = "structural"
    changes_structure = True
    description = "BK-SDM block removal with weight inheritance (bk-base / bk-small / bk-tiny)"

    def _config(self, pipe, config: PruneBlocksConfig) -> dict:
        return student_config(dict(pipe.unet.config), config.layers_per_block, config.drop_mid_block,
                              config.drop_deepest_stage)

    def requires(self, pipe, config: PruneBlocksConfig, ctx: PassContext) -> None:
        if config.drop_mid_block and pipe.unet.mid_block is None:
            raise PassError("the U-Net has no mid-block left to drop")
        if config.condconv_experts < 0 or config.condconv_experts == 1:
            raise PassError(f"condconv_experts={config.condconv_experts}: use 0 (off) or at least 2 experts")
        self._config(pipe, config)  # raises on impossible settings before anything changes

    def _apply(self, pipe, config: PruneBlocksConfig, inherit: bool) -> dict[str, float]:
        teacher = pipe.unet
        metrics = restructure(pipe, self._config(pipe, config), _offset(config), inherit=inherit)
        if config.condconv_experts:  # on meta U-Nets (rebuild) this makes the same modules without weights
            metrics |= apply_condconv(teacher, pipe.unet, _offset(config), config.condconv_experts,
                                      config.condconv_primary_gate)
        return metrics

    def run(self, pipe, config: PruneBlocksConfig, ctx: PassContext) -> dict[str, float]:
        return self._apply(pipe, config, inherit=True)

    def rebuild(self, pipe, config: PruneBlocksConfig) -> None:
        self._apply(pipe, config, inherit=False)


@register_pass
class SlimUNet(Pass):
    name = "slim_unet"
    config_class = SlimUNetConfig
    stage = "structural"
    changes_structure = True
    description = "KOALA slimming: one pair per encoder stage, shallower transformers (koala-1b / koala-700m)"

    def _config(self, pipe, config: SlimUNetConfig) -> dict:
        return student_config(dict(pipe.unet.config), config.layers_per_block, config.drop_mid_block,
                              transformer_depth=config.transformer_depth)

    def requires(self, pipe, config: SlimUNetConfig, ctx: PassContext) -> None:
        self._config(pipe, config)

    def run(self, pipe, config: SlimUNetConfig, ctx: PassContext) -> dict[str, float]:
        return restructure(pipe, self._config(pipe, config), 0, inherit=True)

    def rebuild(self, pipe, config: SlimUNetConfig) -> None:
        restructure(pipe, self._config(pipe, config), 0, inherit=False)
