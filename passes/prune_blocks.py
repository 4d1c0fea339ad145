"""prune_blocks: BK-SDM block removal (presets bk-base, bk-small, bk-tiny and their -condconv variants).

The student U-Net's config and the teacher -> student key mapping its weights are inherited by
are `student_unet.py`'s (shared with `slim_unet`); this module adds the pass and the optional
ME-CondConv inheritance.

ME-CondConv inheritance (A-SDM; opt-in: `prune_blocks` with
`condconv_experts: N`, N >= 2; 0, the default, is pure BK-SDM). After the
student is built and filled (`student_unet.restructure`), the `conv2` of the kept ResNet next to
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

from dataclasses import dataclass

import torch

from sdcompiler.passes.base import Pass, PassContext, register_pass
from sdcompiler.passes.config import PassConfig
from sdcompiler.passes.errors import PassError
from sdcompiler.passes.student_unet import restructure, student_config


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


def condconv_plan(
    teacher: torch.nn.Module, student: torch.nn.Module, stage_offset: int, num_experts: int
) -> dict[str, list[str]]:
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
            add(
                f"up_blocks.{i}.resnets.{n_s - 2}.conv2",
                conv2s(f"up_blocks.{t}", t_resnets, range(n_s - 1, len(t_resnets) - 1)),
            )
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
            plan[target] = usable[: num_experts - 1]
    return plan


def _same_conv(kept: torch.nn.Module, other: torch.nn.Module) -> bool:
    from sdcompiler.passes.condconv import _CONV_ATTRIBUTES

    return (
        isinstance(kept, torch.nn.Conv2d)
        and isinstance(other, torch.nn.Conv2d)
        and kept.weight.shape == other.weight.shape
        and (kept.bias is None) == (other.bias is None)
        and all(getattr(kept, a) == getattr(other, a) for a in _CONV_ATTRIBUTES)
    )


def apply_condconv(
    teacher: torch.nn.Module, student: torch.nn.Module, stage_offset: int, num_experts: int, primary_gate: float = 10.0
) -> dict[str, float]:
    """Replace the planned student convs by `CondConv2d.from_convs` of the kept and the teacher's convs.

    On meta U-Nets (rebuild) this makes the same modules with meta parameters.
    """
    from sdcompiler.passes.condconv import CondConv2d

    plan = condconv_plan(teacher, student, stage_offset, num_experts)
    added = 0
    for target, sources in plan.items():
        kept = student.get_submodule(target)
        module = CondConv2d.from_convs(
            [kept, *(teacher.get_submodule(name) for name in sources)],
            num_experts=num_experts,
            primary_gate=primary_gate,
        )
        module.train(kept.training).requires_grad_(kept.weight.requires_grad)
        parent, _, attribute = target.rpartition(".")
        setattr(student.get_submodule(parent), attribute, module)
        added += sum(p.numel() for p in module.parameters()) - sum(p.numel() for p in kept.parameters())
    return {
        "condconv_modules": len(plan),
        "condconv_params": added,
        "condconv_inherited_experts": sum(len(s) for s in plan.values()),
    }


def _offset(config: PruneBlocksConfig) -> int:
    return 1 if config.drop_deepest_stage else 0


@register_pass
class PruneBlocks(Pass):
    name = "prune_blocks"
    controlnet = "changes_layout"
    config_class = PruneBlocksConfig
    stage = "structural"
    changes_structure = True
    description = "BK-SDM block removal with weight inheritance (bk-base / bk-small / bk-tiny)"

    def _config(self, pipe, config: PruneBlocksConfig) -> dict:
        return student_config(
            dict(pipe.unet.config), config.layers_per_block, config.drop_mid_block, config.drop_deepest_stage
        )

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
            metrics |= apply_condconv(
                teacher, pipe.unet, _offset(config), config.condconv_experts, config.condconv_primary_gate
            )
        return metrics

    def run(self, pipe, config: PruneBlocksConfig, ctx: PassContext) -> dict[str, float]:
        return self._apply(pipe, config, inherit=True)

    def rebuild(self, pipe, config: PruneBlocksConfig) -> None:
        self._apply(pipe, config, inherit=False)
